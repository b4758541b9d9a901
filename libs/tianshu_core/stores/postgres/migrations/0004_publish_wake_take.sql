-- The wake path in one round trip: publish an event, wake the cases waiting on its resource, and
-- take the leases of some of them for the caller, each with its journal and the event it will
-- consume next. The scheduler that received the event runs those cases at once, without a
-- separate acquire and event lookup per case. tianshu_publish_and_wake (0002) stays, for replicas
-- of the previous release during a rolling upgrade.

-- Where a waiting case stood on the resource: the seq of the last event it consumed there.
-- The event it consumes next is the oldest one after it (0: none consumed yet).
ALTER TABLE tianshu_waits ADD COLUMN after_seq bigint NOT NULL DEFAULT 0;

-- Row 1 is the event (seq, payload as stored, published_at, created) and every woken key. Each
-- further row is one case taken for p_owner (event columns NULL): the case row after the lease
-- moved, its journal as arrays (like tianshu_acquire), and the first event on the resource after
-- its wait's after_seq, published at or after the case's creation. That event is settled: this
-- function holds the resource's publish lock, so every event before ours has committed.
CREATE FUNCTION tianshu_publish_wake_take(
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
                      FROM tianshu_journal WHERE case_key = v_case.case_key) AS j
              LEFT JOIN LATERAL (
                    -- As PostgresEventStore.next_after: a range of tianshu_events_resource_idx.
                    SELECT ev.seq, ev.event_id, ev.payload, ev.published_at FROM tianshu_events ev
                     WHERE (ev.resource_type, ev.resource_id, ev.seq) > (p_resource_type, p_resource_id, v_case_after)
                       AND (ev.resource_type, ev.resource_id, ev.seq)
                           <= (p_resource_type, p_resource_id, 9223372036854775807)
                       AND ev.published_at >= v_case.created_at
                     ORDER BY ev.resource_type, ev.resource_id, ev.seq LIMIT 1
              ) AS e ON true;
    END LOOP;
END
$$;
