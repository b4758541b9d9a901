-- compatible-with: 0007
-- tianshu_append_journal (0012), the group commit's batch append, was planned anew on every call
-- (plan_cache_mode = force_custom_plan), so that a generic plan cached while tianshu_cases was
-- small could not keep scanning it sequentially as it grew. Planning each batch cost about a fifth
-- of B1's throughput. Its plan is cached again, and the one lookup that went wrong cannot be a
-- sequential scan (enable_seqscan = off for this function only: the lock of the batch's cases by
-- key, for which the primary key is always the right way). Same signature and result.
ALTER FUNCTION tianshu_append_journal(text[], integer[], text[], text[], text[], bigint[], timestamptz[])
    RESET plan_cache_mode;
ALTER FUNCTION tianshu_append_journal(text[], integer[], text[], text[], text[], bigint[], timestamptz[])
    SET enable_seqscan = off;
