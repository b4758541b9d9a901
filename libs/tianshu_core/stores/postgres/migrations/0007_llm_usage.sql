-- What each model call cost: one row per call id (a result recorded twice is one row), written by
-- the scheduler as it consumes the LLM gateway's results. Not deleted with the case (history
-- retention and `tianshu cases purge` leave it): what was spent stays spent.
CREATE TABLE tianshu_llm_usage (
    call_id             text PRIMARY KEY,
    case_key            text NOT NULL,
    session_id          text,
    workflow_code       text,
    route               text NOT NULL,
    -- Who answered; NULL when nobody did (error_class then says why).
    provider            text,
    model               text,
    attempts            integer NOT NULL DEFAULT 0,
    -- Summed over the call's upstream attempts, failed ones included.
    input_tokens        bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    cache_read_tokens   bigint NOT NULL DEFAULT 0,
    cache_write_tokens  bigint NOT NULL DEFAULT 0,
    -- The gateway's estimate from the route's prices; NULL when it has none.
    cost_usd            double precision,
    latency_s           double precision NOT NULL DEFAULT 0,
    first_token_s       double precision,
    error_class         text,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX tianshu_llm_usage_case_idx ON tianshu_llm_usage (case_key);
CREATE INDEX tianshu_llm_usage_session_idx ON tianshu_llm_usage (session_id, created_at);
CREATE INDEX tianshu_llm_usage_created_idx ON tianshu_llm_usage (created_at);
