-- imgsrv catalog schema (PostgreSQL), migration 5: the transparency log (issue 11), the
-- twin of migrations/0007-log.sql (which says what each table holds). Written so that
-- it can be run again whole (IF NOT EXISTS, CREATE OR REPLACE): it is one of the
-- migrations run again to re-arm the guards.
--
-- Appends from several instances take turns on a transaction-level advisory lock
-- (taken by the catalog before it reads the log's size): the guard below refuses any
-- entry that is not the next one, and a concurrent append would otherwise fail on it.

CREATE TABLE IF NOT EXISTS log_entries (
    idx      BIGINT PRIMARY KEY CHECK (idx >= 0),
    entry    BYTEA NOT NULL CHECK (length(entry) BETWEEN 1 AND 65535),
    kind     TEXT COLLATE "C" NOT NULL
             CHECK (kind IN ('publish', 'retire', 'key-add', 'key-retire', 'key-revoke')),
    image    TEXT COLLATE "C",
    version  TEXT COLLATE "C",
    key_id   TEXT COLLATE "C",
    CHECK ((kind IN ('publish', 'retire')) = (image IS NOT NULL AND version IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS log_entries_version ON log_entries (image, version);

CREATE TABLE IF NOT EXISTS log_hashes (
    level  SMALLINT NOT NULL CHECK (level BETWEEN 0 AND 63),
    idx    BIGINT NOT NULL CHECK (idx >= 0),
    hash   BYTEA NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
);

CREATE TABLE IF NOT EXISTS log_checkpoints (
    size        BIGINT PRIMARY KEY CHECK (size >= 1),
    note        TEXT COLLATE "C" NOT NULL CHECK (length(note) BETWEEN 1 AND 65535),
    created_at  TEXT COLLATE "C" NOT NULL
);

CREATE TABLE IF NOT EXISTS log_identity (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    vkey        TEXT COLLATE "C" NOT NULL CHECK (length(vkey) BETWEEN 1 AND 512),
    created_at  TEXT COLLATE "C" NOT NULL
);
CREATE OR REPLACE TRIGGER log_identity_no_change BEFORE UPDATE OR DELETE ON log_identity
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: the log''s key never changes');
CREATE OR REPLACE TRIGGER log_identity_no_truncate BEFORE TRUNCATE ON log_identity
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: the log''s key never changes');

CREATE OR REPLACE FUNCTION imgsrv_log_entries_append() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.idx IS DISTINCT FROM (SELECT coalesce(max(idx) + 1, 0) FROM log_entries) THEN
        RAISE EXCEPTION 'immutable: the log is append-only: an entry is added as the next number, never in between';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER log_entries_append BEFORE INSERT ON log_entries
FOR EACH ROW EXECUTE FUNCTION imgsrv_log_entries_append();

CREATE OR REPLACE FUNCTION imgsrv_log_hash_covered() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.idx >= ((SELECT coalesce(max(idx) + 1, 0) FROM log_entries) >> NEW.level) THEN
        RAISE EXCEPTION 'precondition: a log hash covers entries the log has';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER log_hashes_covered BEFORE INSERT ON log_hashes
FOR EACH ROW EXECUTE FUNCTION imgsrv_log_hash_covered();

CREATE OR REPLACE FUNCTION imgsrv_log_checkpoint_covered() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.size > (SELECT coalesce(max(idx) + 1, 0) FROM log_entries) THEN
        RAISE EXCEPTION 'precondition: a checkpoint covers entries the log has';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER log_checkpoints_covered BEFORE INSERT ON log_checkpoints
FOR EACH ROW EXECUTE FUNCTION imgsrv_log_checkpoint_covered();

CREATE OR REPLACE TRIGGER log_entries_no_change BEFORE UPDATE OR DELETE ON log_entries
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: log entries never change and are never deleted');
CREATE OR REPLACE TRIGGER log_entries_no_truncate BEFORE TRUNCATE ON log_entries
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: log entries never change and are never deleted');
CREATE OR REPLACE TRIGGER log_hashes_no_change BEFORE UPDATE OR DELETE ON log_hashes
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: log hashes never change and are never deleted');
CREATE OR REPLACE TRIGGER log_hashes_no_truncate BEFORE TRUNCATE ON log_hashes
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: log hashes never change and are never deleted');
CREATE OR REPLACE TRIGGER log_checkpoints_no_change BEFORE UPDATE OR DELETE ON log_checkpoints
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: checkpoints never change and are never deleted');
CREATE OR REPLACE TRIGGER log_checkpoints_no_truncate BEFORE TRUNCATE ON log_checkpoints
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: checkpoints never change and are never deleted');

DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.relname, tg.tgname FROM pg_trigger tg
             JOIN pg_class c ON c.oid = tg.tgrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_proc p ON p.oid = tg.tgfoid
             WHERE NOT tg.tgisinternal AND n.nspname = current_schema()
               AND p.proname LIKE 'imgsrv\_%' AND tg.tgenabled <> 'A'
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER %I', t.relname, t.tgname);
    END LOOP;
END;
$$;
