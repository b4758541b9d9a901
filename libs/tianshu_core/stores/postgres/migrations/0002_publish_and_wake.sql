-- Publishing an event and waking the cases waiting on its resource in one round trip and one
-- commit: the wake path of every event, whose latency users feel.

CREATE FUNCTION tianshu_publish_and_wake(
    p_resource_type text,
    p_resource_id   text,
    p_payload       jsonb,
    p_event_id      text,
    p_published_at  timestamptz,
    p_dedupe_since  timestamptz
) RETURNS TABLE (out_seq bigint, out_payload jsonb, out_published_at timestamptz, out_created boolean,
                 out_woken text[])
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_seq bigint;
    v_payload jsonb;
    v_published_at timestamptz;
    v_created boolean;
    v_woken text[];
BEGIN
    SELECT p.out_seq, p.out_payload, p.out_published_at, p.out_created
      INTO v_seq, v_payload, v_published_at, v_created
      FROM tianshu_publish_event(p_resource_type, p_resource_id, p_payload, p_event_id,
                                 p_published_at, p_dedupe_since) AS p;
    v_woken := ARRAY[]::text[];
    IF v_created THEN
        WITH waiting AS (
            SELECT DISTINCT w.case_key FROM tianshu_waits w
            WHERE w.resource_type = p_resource_type AND w.resource_id = p_resource_id
        ), moved AS (
            UPDATE tianshu_cases c SET execution_state = 'running', updated_at = now()
            FROM waiting WHERE c.case_key = waiting.case_key AND c.execution_state = 'waiting'
            RETURNING c.case_key
        ), dropped AS (
            DELETE FROM tianshu_waits t USING moved WHERE t.case_key = moved.case_key
        )
        SELECT coalesce(array_agg(moved.case_key ORDER BY moved.case_key), ARRAY[]::text[])
          INTO v_woken FROM moved;
    END IF;
    RETURN QUERY SELECT v_seq, v_payload, v_published_at, v_created, v_woken;
END
$$;
