-- compatible-with: 0007
-- Every wake a stored change implies is committed with that change:
-- * a case that waits stores its waits, its state and the recheck for what came meanwhile in one
--   statement (tianshu_park), holding the publish lock of each resource it waits on;
-- * a child that ends, awaited by its parent, counts itself out in the transaction that stores its
--   outcome, and the last one wakes the parent (PostgresCaseStore.save).
-- Code of 0007 keeps working: it knows none of this and needs none of it (the columns have
-- defaults; a parent it parks without a count is woken by its children as before, or by the
-- sweep of a newer replica, Engine.wake_met).

-- On a child: its parent parked awaiting it (set by tianshu_park, read by the child's last save).
ALTER TABLE tianshu_cases ADD COLUMN parent_awaits boolean NOT NULL DEFAULT false;
-- On a parent parked awaiting children: how many of them have not ended (NULL: not awaiting).
ALTER TABLE tianshu_cases ADD COLUMN children_pending integer;

-- The first half of a park, for PostgresCaseStore.park, whose UPDATE of the case row uses the
-- answer: ready (what the case waits for is already there: run it again, no waits stored) and,
-- for children, how many of the awaited ones are still open. In this order, which keeps it clear
-- of deadlocks with publishes (publish lock, then case rows) and with children's last saves (the
-- child's row, then the parent's):
-- 1. the publish lock of every waited resource, in one order: a publish in flight commits first
--    and its event is seen below; one that comes later finds our waits and our waiting state;
-- 2. an event on a waited resource after the case's last consumed one: ready;
-- 3. the awaited children not ended get parent_awaits (their row locks order us after a child's
--    save in flight, which is then ended); none left: ready;
-- 4. the fence: the case row, locked, still under p_token; otherwise SQLSTATE TSL01 rolls the
--    statement back (LeaseLostError);
-- 5. the case's waits replaced (none when ready).
CREATE FUNCTION tianshu_park(
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
               -- As PostgresEventStore.next_after: a range of tianshu_events_resource_idx.
               SELECT 1 FROM tianshu_events e
                WHERE (e.resource_type, e.resource_id, e.seq) > (w.rt, w.rid, w.after_seq)
                  AND (e.resource_type, e.resource_id, e.seq) <= (w.rt, w.rid, 9223372036854775807)
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
