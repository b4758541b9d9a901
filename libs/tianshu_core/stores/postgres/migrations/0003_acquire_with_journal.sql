-- Taking a case's lease and reading its journal in one round trip: the first two things every run
-- does. A function, not one statement: in PL/pgSQL each query takes a new snapshot, so the journal
-- read sees every row committed by a former holder before its lease moved to us (a single
-- statement would read with the snapshot it had before waiting for that holder's share lock).

CREATE FUNCTION tianshu_acquire(p_case_key text, p_owner text, p_ttl float8)
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
         WHERE j.case_key = p_case_key;
END
$$;
