-- compatible-with: 0007
-- The engine's per-case budget: runs in a row that failed for a reason that was neither the
-- workflow's own error nor an outage. The engine sets it as it backs a case off (holding its
-- lease until the case may run again); a save that stores an outcome resets it.
-- A constant default: no table rewrite, and code that does not know the column keeps working.
ALTER TABLE tianshu_cases ADD COLUMN failures integer NOT NULL DEFAULT 0;
