-- compatible-with: 0007
-- tianshu_park (0008) looked for an event that came meanwhile through a range of
-- tianshu_events_resource_idx ended by a row comparison, which a btree scan does not stop at: with
-- nothing newer on the waited resource, each park read on through the events of every later
-- resource of the same type (every later tool result, say). The range now ends with the resource
-- (its equalities), as PostgresEventStore.next_after's does since 0012. Same signature and
-- behaviour otherwise, so code of 0007 (which never calls it) and of 0008 keeps working.

CREATE OR REPLACE FUNCTION tianshu_park(
    p_case_key      text,
    p_token         bigint,
    p_resource_type text[],
    p_resource_id   text[],
    p_step_name     text[],
    p_intent        text[],
    p_after         bigint[],
    p_children      text[]
) RETURNS TABLE (ready boolean, pending integer)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_created timestamptz;
    v_ready boolean;
    v_pending integer;
BEGIN
    PERFORM pg_advisory_xact_lock(1953067880, hashtext(r.rt || '/' || r.rid))
       FROM (SELECT DISTINCT u.rt, u.rid FROM unnest(p_resource_type, p_resource_id) AS u(rt, rid)
              WHERE u.rt <> 'tianshu-children' ORDER BY u.rt, u.rid) AS r;
    SELECT c.created_at INTO v_created FROM tianshu_cases c WHERE c.case_key = p_case_key;
    SELECT EXISTS (
        SELECT 1 FROM unnest(p_resource_type, p_resource_id, p_after) AS w(rt, rid, after_seq)
         WHERE w.rt <> 'tianshu-children' AND EXISTS (
               -- As PostgresEventStore.next_after: a range of tianshu_events_resource_idx that
               -- ends with the resource (its equalities; a row comparison's bound does not).
               SELECT 1 FROM tianshu_events e
                WHERE e.resource_type = w.rt AND e.resource_id = w.rid
                  AND (e.resource_type, e.resource_id, e.seq) > (w.rt, w.rid, w.after_seq)
                  AND e.published_at >= v_created))
      INTO v_ready;
    IF NOT v_ready AND coalesce(array_length(p_children, 1), 0) > 0 THEN
        WITH marked AS (
            UPDATE tianshu_cases ch SET parent_awaits = true
             WHERE ch.case_key = ANY(p_children) AND ch.parent_key = p_case_key
               AND ch.execution_state NOT IN ('finished', 'failed')
            RETURNING 1
        )
        SELECT count(*) INTO v_pending FROM marked;
        v_ready := v_pending = 0;
    END IF;
    PERFORM 1 FROM tianshu_cases c WHERE c.case_key = p_case_key AND c.lease_token = p_token FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'case % is no longer leased under token %', p_case_key, p_token
            USING ERRCODE = 'TSL01';
    END IF;
    DELETE FROM tianshu_waits w WHERE w.case_key = p_case_key;
    IF NOT v_ready THEN
        INSERT INTO tianshu_waits
            (case_key, position, resource_type, resource_id, step_name, intent_desc, after_seq)
        SELECT p_case_key, u.ord::int, u.rt, u.rid, u.step, u.intent, u.after_seq
          FROM unnest(p_resource_type, p_resource_id, p_step_name, p_intent, p_after)
               WITH ORDINALITY AS u(rt, rid, step, intent, after_seq, ord);
    END IF;
    RETURN QUERY SELECT v_ready, CASE WHEN v_ready THEN NULL ELSE v_pending END;
END
$$;
