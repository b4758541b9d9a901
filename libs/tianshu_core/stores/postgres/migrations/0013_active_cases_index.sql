-- tianshu:concurrently
-- compatible-with: 0007
-- Smaller indexes on tianshu_cases, built and dropped without stopping writes.
--
-- Every save of a case writes a new row version into every index (it changes execution_state and
-- updated_at, which indexes hold), so each index costs every save. The sweep's runnable and
-- waiting scans, and listings of running or waiting cases, only ever look at active cases: their
-- index now holds only those (a case that ends leaves it), in the listing's order. The other
-- indexes each serve a query: the key; sessions; workflows and the creation order (listing, and
-- its keyset pages); children by parent; ended cases by age (retention).
-- Code of 0007 keeps working: it names none of these indexes, and its scans, planned with the
-- states they ask for, can use the partial one.
--
-- Pages are left 10% free, so that the updates that change no indexed column (taking, renewing
-- and releasing a lease) can stay on their page as heap-only tuples and touch no index.
ALTER TABLE tianshu_cases SET (fillfactor = 90);
CREATE INDEX CONCURRENTLY IF NOT EXISTS tianshu_cases_active_idx
    ON tianshu_cases (execution_state, created_at, case_key)
    WHERE execution_state IN ('running', 'waiting');
DROP INDEX CONCURRENTLY IF EXISTS tianshu_cases_scan_idx;
