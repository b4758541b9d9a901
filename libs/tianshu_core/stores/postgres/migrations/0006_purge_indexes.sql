-- History retention deletes finished and failed cases by age: a small partial index holds only
-- those, ordered by the time they ended (updated_at, the engine's clock).
CREATE INDEX tianshu_cases_done_idx ON tianshu_cases (updated_at)
    WHERE execution_state IN ('finished', 'failed');
