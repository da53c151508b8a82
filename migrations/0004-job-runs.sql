-- imgsrv catalog schema (SQLite), migration 4: the last run of each maintenance job.
--
-- `imgsrv gc`, `imgsrv scrub` and `imgsrv backup` run from cron or a systemd timer as
-- well as inside `imgsrv serve`; each records its outcome here, in the catalog every
-- process of the data directory (and every instance of a shared deployment) sees, so that
-- the server's /metrics can say when each last succeeded, wherever it ran. One row per
-- job, overwritten by the next run: status, not history (the audit log keeps that).

CREATE TABLE job_runs (
    job              TEXT PRIMARY KEY CHECK (length(job) BETWEEN 1 AND 32),
    last_attempt_at  TEXT NOT NULL,
    last_outcome     TEXT NOT NULL CHECK (last_outcome IN ('success', 'error')),
    last_success_at  TEXT,
    last_error_at    TEXT,
    -- a short summary of the last run (counts, or the error)
    detail           TEXT NOT NULL DEFAULT ''
);
