-- compatible-with: 0007
-- A run reads only what it replays. Each run that replays appends a 'replay' record (for
-- inspection: how many steps it replayed and executed); replay skips them, so taking a case no
-- longer reads them, except the journal's last row, whatever its kind: it tells the run the seq to
-- append at. Same signatures as 0003 and 0004, and code of 0007 keeps working: its replay skips
-- 'replay' records too and takes the next seq from the last row.

CREATE OR REPLACE FUNCTION tianshu_acquire(p_case_key text, p_owner text, p_ttl float8)
RETURNS TABLE (c tianshu_cases, j_seq integer[], j_kind text[], j_name text[], j_data text[],
               j_token bigint[], j_created timestamptz[])
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v tianshu_cases;
BEGIN
    UPDATE tianshu_cases
       SET lease_token = lease_token + 1, lease_owner = p_owner,
           lease_expires_at = now() + p_ttl * interval '1 second'
     WHERE case_key = p_case_key AND (lease_expires_at IS NULL OR lease_expires_at < now())
    RETURNING * INTO v;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT v, array_agg(j.seq ORDER BY j.seq), array_agg(j.kind ORDER BY j.seq),
               array_agg(j.name ORDER BY j.seq), array_agg(j.data::text ORDER BY j.seq),
               array_agg(j.token ORDER BY j.seq), array_agg(j.created_at ORDER BY j.seq)
          FROM tianshu_journal j
         WHERE j.case_key = p_case_key
           AND (j.kind <> 'replay'
                OR j.seq = (SELECT max(l.seq) FROM tianshu_journal l WHERE l.case_key = p_case_key));
END
$$;

CREATE OR REPLACE FUNCTION tianshu_publish_wake_take(
    p_resource_type text,
    p_resource_id   text,
    p_payload       jsonb,
    p_event_id      text,
    p_published_at  timestamptz,
    p_dedupe_since  timestamptz,
    p_owner         text,
    p_ttl           float8,
    p_take          integer
) RETURNS TABLE (out_seq bigint, out_payload jsonb, out_published_at timestamptz, out_created boolean,
                 out_woken text[], out_case tianshu_cases, j_seq integer[], j_kind text[], j_name text[],
                 j_data text[], j_token bigint[], j_created timestamptz[], out_after_seq bigint,
                 next_seq bigint, next_event_id text, next_payload jsonb, next_published_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_seq bigint;
    v_payload jsonb;
    v_published_at timestamptz;
    v_created boolean;
    v_woken text[] := ARRAY[]::text[];
    v_after bigint[] := ARRAY[]::bigint[];
    v_case tianshu_cases;
    v_case_after bigint;
BEGIN
    SELECT p.out_seq, p.out_payload, p.out_published_at, p.out_created
      INTO v_seq, v_payload, v_published_at, v_created
      FROM tianshu_publish_event(p_resource_type, p_resource_id, p_payload, p_event_id,
                                 p_published_at, p_dedupe_since) AS p;
    IF v_created THEN
        WITH waiting AS (
            SELECT w.case_key, min(w.after_seq) AS after_seq FROM tianshu_waits w
            WHERE w.resource_type = p_resource_type AND w.resource_id = p_resource_id
            GROUP BY w.case_key
        ), moved AS (
            UPDATE tianshu_cases cs SET execution_state = 'running', updated_at = now()
            FROM waiting WHERE cs.case_key = waiting.case_key AND cs.execution_state = 'waiting'
            RETURNING cs.case_key, waiting.after_seq
        ), dropped AS (
            DELETE FROM tianshu_waits t USING moved WHERE t.case_key = moved.case_key
        )
        SELECT coalesce(array_agg(moved.case_key ORDER BY moved.case_key), ARRAY[]::text[]),
               coalesce(array_agg(moved.after_seq ORDER BY moved.case_key), ARRAY[]::bigint[])
          INTO v_woken, v_after FROM moved;
    END IF;
    RETURN QUERY SELECT v_seq, v_payload, v_published_at, v_created, v_woken,
        NULL::tianshu_cases, NULL::integer[], NULL::text[], NULL::text[], NULL::text[], NULL::bigint[],
        NULL::timestamptz[], NULL::bigint, NULL::bigint, NULL::text, NULL::jsonb, NULL::timestamptz;
    FOR i IN 1 .. least(coalesce(p_take, 0), coalesce(array_length(v_woken, 1), 0)) LOOP
        UPDATE tianshu_cases
           SET lease_token = lease_token + 1, lease_owner = p_owner,
               lease_expires_at = now() + p_ttl * interval '1 second'
         WHERE case_key = v_woken[i] AND (lease_expires_at IS NULL OR lease_expires_at < now())
        RETURNING * INTO v_case;
        CONTINUE WHEN NOT FOUND;
        v_case_after := v_after[i];
        RETURN QUERY
            SELECT NULL::bigint, NULL::jsonb, NULL::timestamptz, NULL::boolean, NULL::text[], v_case,
                   j.seqs, j.kinds, j.names, j.datas, j.tokens, j.created, v_case_after,
                   e.seq, e.event_id, e.payload, e.published_at
              FROM (SELECT array_agg(seq ORDER BY seq) AS seqs, array_agg(kind ORDER BY seq) AS kinds,
                           array_agg(name ORDER BY seq) AS names, array_agg(data::text ORDER BY seq) AS datas,
                           array_agg(token ORDER BY seq) AS tokens,
                           array_agg(created_at ORDER BY seq) AS created
                      FROM tianshu_journal
                     WHERE case_key = v_case.case_key
                       AND (kind <> 'replay'
                            OR seq = (SELECT max(l.seq) FROM tianshu_journal l
                                       WHERE l.case_key = v_case.case_key))) AS j
              LEFT JOIN LATERAL (
                    -- As PostgresEventStore.next_after: a range of tianshu_events_resource_idx that
                    -- ends with the resource (its equalities; a row comparison's bound does not).
                    SELECT ev.seq, ev.event_id, ev.payload, ev.published_at FROM tianshu_events ev
                     WHERE ev.resource_type = p_resource_type AND ev.resource_id = p_resource_id
                       AND (ev.resource_type, ev.resource_id, ev.seq)
                           > (p_resource_type, p_resource_id, v_case_after)
                       AND ev.published_at >= v_case.created_at
                     ORDER BY ev.resource_type, ev.resource_id, ev.seq LIMIT 1
              ) AS e ON true;
    END LOOP;
END
$$;

-- The group commit's batch append (see _committer.py), planned for each call: a plan cached while
-- tianshu_cases was small locks the batch's cases through a sequential scan, and keeps doing so as
-- the table grows (`case_key = ANY(...)` of an array of unknown length).
CREATE FUNCTION tianshu_append_journal(
    p_case_key text[], p_seq integer[], p_kind text[], p_name text[], p_data text[], p_token bigint[],
    p_created timestamptz[]
) RETURNS TABLE (out_case_key text, out_seq integer)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    RETURN QUERY
        WITH u AS (
            SELECT * FROM unnest(p_case_key, p_seq, p_kind, p_name, p_data, p_token, p_created)
                AS u(case_key, seq, kind, name, data, token, created_at)
        ), locked AS MATERIALIZED (
            SELECT c.case_key, c.lease_token, c.lifecycle FROM tianshu_cases c
            WHERE c.case_key = ANY(p_case_key)
            ORDER BY c.case_key
            FOR SHARE
        )
        INSERT INTO tianshu_journal AS j (case_key, seq, kind, name, data, token, created_at)
        SELECT u.case_key, u.seq, u.kind, u.name, u.data::json, u.token, u.created_at
        FROM u JOIN locked l ON l.case_key = u.case_key AND l.lease_token = u.token AND l.lifecycle = 'normal'
        ON CONFLICT (case_key, seq) DO NOTHING
        RETURNING j.case_key, j.seq;
END
$$;
