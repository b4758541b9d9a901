-- tianshu:concurrently
-- History retention deletes finished and failed cases by age: a small partial index holds only
-- those, ordered by the time they ended (updated_at, the engine's clock). Built without stopping
-- writes to a table that may be large by now (a database that applied this migration when it was
-- a plain CREATE INDEX in a transaction has the same index and does not run it again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS tianshu_cases_done_idx ON tianshu_cases (updated_at)
    WHERE execution_state IN ('finished', 'failed');
