-- Tianshu schema, version 1: every table the store protocols need.
-- Payload columns are JSONB, except the journal's `data`, which is JSON: the journal must give
-- back the exact text a step checkpointed (JSONB re-orders object keys and re-spaces the text,
-- which would change dict order on replay and defeat the engine's "same text, no write" check).

CREATE TABLE tianshu_sessions (
    session_id  text PRIMARY KEY,
    metadata    jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE tianshu_cases (
    case_key              text PRIMARY KEY,
    session_id            text NOT NULL,
    workflow_code         text NOT NULL,
    execution_state       text NOT NULL,
    lifecycle             text NOT NULL,
    parent_key            text,
    child_keys            jsonb NOT NULL DEFAULT '[]',
    resource_data         jsonb,
    private_vars          jsonb NOT NULL DEFAULT '{}',
    processing_report     jsonb,
    finished_type         text,
    finished_description  text,
    output                jsonb,
    error                 jsonb,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL,
    -- The lease lives on the case row so that taking it is one conditional UPDATE.
    lease_owner           text,
    lease_token           bigint NOT NULL DEFAULT 0,
    lease_expires_at      timestamptz
);

CREATE INDEX tianshu_cases_session_idx ON tianshu_cases (session_id, created_at);
-- Runnable and waiting scans: state + lifecycle equality, oldest first.
CREATE INDEX tianshu_cases_scan_idx ON tianshu_cases (execution_state, lifecycle, created_at);
CREATE INDEX tianshu_cases_parent_idx ON tianshu_cases (parent_key, created_at) WHERE parent_key IS NOT NULL;
CREATE INDEX tianshu_cases_workflow_idx ON tianshu_cases (workflow_code, created_at);
CREATE INDEX tianshu_cases_created_idx ON tianshu_cases (created_at);

CREATE TABLE tianshu_journal (
    case_key    text NOT NULL,
    seq         integer NOT NULL,
    kind        text NOT NULL,
    name        text NOT NULL,
    data        json NOT NULL,
    -- The lease token the row was written under: lets a retried append recognise its own row.
    token       bigint NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (case_key, seq)
);

CREATE TABLE tianshu_case_state (
    case_key    text NOT NULL,
    name        text NOT NULL,
    data        jsonb NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (case_key, name)
);

CREATE TABLE tianshu_session_state (
    session_id  text NOT NULL,
    name        text NOT NULL,
    data        jsonb NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (session_id, name)
);

CREATE TABLE tianshu_waits (
    case_key       text NOT NULL,
    position       integer NOT NULL,
    resource_type  text NOT NULL,
    resource_id    text NOT NULL,
    step_name      text NOT NULL,
    intent_desc    text,
    PRIMARY KEY (case_key, position)
);

-- Waking is an indexed lookup by resource, whatever the number of waiting cases.
CREATE INDEX tianshu_waits_resource_idx ON tianshu_waits (resource_type, resource_id);

CREATE TABLE tianshu_events (
    seq            bigserial PRIMARY KEY,
    resource_type  text NOT NULL,
    resource_id    text NOT NULL,
    event_id       text,
    payload        jsonb,
    published_at   timestamptz NOT NULL
);

CREATE INDEX tianshu_events_resource_idx ON tianshu_events (resource_type, resource_id, seq);
-- Not unique: the same id may come back once the dedupe window has passed.
CREATE INDEX tianshu_events_event_id_idx ON tianshu_events (resource_type, resource_id, event_id)
    WHERE event_id IS NOT NULL;
CREATE INDEX tianshu_events_published_idx ON tianshu_events (published_at);

CREATE TABLE tianshu_timers (
    case_key  text NOT NULL,
    name      text NOT NULL,
    fire_at   timestamptz NOT NULL,
    PRIMARY KEY (case_key, name)
);

CREATE INDEX tianshu_timers_fire_idx ON tianshu_timers (fire_at);

-- Publish one event in one round trip. Publishes to one resource are serialised by a
-- transaction-scoped advisory lock, so (a) the dedupe check cannot race a concurrent publish of
-- the same id and (b) seq order equals commit order per resource: a reader that consumed seq N
-- can never later see a smaller seq appear on that resource (bigserial alone does not promise
-- that under concurrent inserts). The (int, int) lock form keeps clear of the migration lock.
CREATE FUNCTION tianshu_publish_event(
    p_resource_type text,
    p_resource_id   text,
    p_payload       jsonb,
    p_event_id      text,
    p_published_at  timestamptz,
    p_dedupe_since  timestamptz
) RETURNS TABLE (out_seq bigint, out_payload jsonb, out_published_at timestamptz, out_created boolean)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1953067880, hashtext(p_resource_type || '/' || p_resource_id));
    IF p_event_id IS NOT NULL THEN
        RETURN QUERY
            SELECT e.seq, e.payload, e.published_at, false
            FROM tianshu_events e
            WHERE e.resource_type = p_resource_type
              AND e.resource_id = p_resource_id
              AND e.event_id = p_event_id
              AND e.published_at >= p_dedupe_since
            ORDER BY e.seq
            LIMIT 1;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    RETURN QUERY
        INSERT INTO tianshu_events AS e (resource_type, resource_id, event_id, payload, published_at)
        VALUES (p_resource_type, p_resource_id, p_event_id, p_payload, p_published_at)
        RETURNING e.seq, e.payload, e.published_at, true;
END
$$;
