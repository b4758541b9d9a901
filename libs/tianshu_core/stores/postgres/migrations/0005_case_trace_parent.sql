-- The W3C traceparent of the span that started a case: every run of the case is a span in that
-- trace. Written once, when the case is created; NULL when tracing was off.
ALTER TABLE tianshu_cases ADD COLUMN trace_parent text;
