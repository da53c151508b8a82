-- imgsrv catalog schema (SQLite), migration 7: the transparency log (issue 11; the
-- PostgreSQL twin is migrations/postgres/0005-log.sql).
--
-- * log_entries: entry idx of the log (numbered from 0), its canonical text
--   (src/tlog/entry.rs) and, to find it again, what it is about. Written in the same
--   transaction as the event it records (a publish, a retirement, a publisher key
--   change). Append-only: the next entry is always idx = the number of entries, and no
--   entry is ever changed or deleted.
-- * log_hashes: the RFC 6962 hashes of the complete subtrees (level 0: the leaves),
--   written with the entry that completes them; what tiles, proofs and checkpoints are
--   read from without recomputing the tree. Append-only.
-- * log_checkpoints: every checkpoint the log's key signed (a C2SP signed note), by
--   tree size. Append-only, at most one per size.
--
-- * log_identity: the log's verifier key (signed-note vkey), recorded by the first
--   instance that signs for this catalog; an instance whose DATA/log/log.key is another
--   key refuses to start (two keys would make two logs of one history).
--
-- The log's private key is not here: it lives in DATA/log/ (a database alone cannot
-- sign, so whoever can write the database still cannot forge a checkpoint).

CREATE TABLE log_entries (
    idx      INTEGER PRIMARY KEY CHECK (idx >= 0),
    entry    BLOB NOT NULL CHECK (length(entry) BETWEEN 1 AND 65535),
    kind     TEXT NOT NULL
             CHECK (kind IN ('publish', 'retire', 'key-add', 'key-retire', 'key-revoke')),
    image    TEXT,
    version  TEXT,
    key_id   TEXT,
    CHECK ((kind IN ('publish', 'retire')) = (image IS NOT NULL AND version IS NOT NULL))
);
CREATE INDEX log_entries_version ON log_entries (image, version);

CREATE TABLE log_hashes (
    level  INTEGER NOT NULL CHECK (level BETWEEN 0 AND 63),
    idx    INTEGER NOT NULL CHECK (idx >= 0),
    hash   BLOB NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
);

CREATE TABLE log_checkpoints (
    size        INTEGER PRIMARY KEY CHECK (size >= 1),
    note        TEXT NOT NULL CHECK (length(note) BETWEEN 1 AND 65535),
    created_at  TEXT NOT NULL
);

CREATE TABLE log_identity (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    vkey        TEXT NOT NULL CHECK (length(vkey) BETWEEN 1 AND 512),
    created_at  TEXT NOT NULL
);
CREATE TRIGGER log_identity_once BEFORE INSERT ON log_identity
BEGIN
    SELECT RAISE(ABORT, 'exists: the log''s key is recorded')
    WHERE EXISTS (SELECT 1 FROM log_identity);
END;
CREATE TRIGGER log_identity_no_update BEFORE UPDATE ON log_identity
BEGIN
    SELECT RAISE(ABORT, 'immutable: the log''s key never changes');
END;
CREATE TRIGGER log_identity_no_delete BEFORE DELETE ON log_identity
BEGIN
    SELECT RAISE(ABORT, 'immutable: the log''s key never changes');
END;

-- (INSERT OR REPLACE deletes the row it replaces without firing a delete trigger: each
-- insert guard refuses a row whose key is taken, so that no replace gets that far)
CREATE TRIGGER log_entries_append BEFORE INSERT ON log_entries
BEGIN
    SELECT RAISE(ABORT, 'immutable: the log is append-only: an entry is added as the next number, never in between')
    WHERE NEW.idx IS NOT (SELECT coalesce(max(idx) + 1, 0) FROM log_entries);
END;
CREATE TRIGGER log_entries_no_update BEFORE UPDATE ON log_entries
BEGIN
    SELECT RAISE(ABORT, 'immutable: log entries never change');
END;
CREATE TRIGGER log_entries_no_delete BEFORE DELETE ON log_entries
BEGIN
    SELECT RAISE(ABORT, 'immutable: log entries are never deleted');
END;

CREATE TRIGGER log_hashes_append BEFORE INSERT ON log_hashes
BEGIN
    SELECT RAISE(ABORT, 'immutable: a log hash is written once')
    WHERE EXISTS (SELECT 1 FROM log_hashes WHERE level = NEW.level AND idx = NEW.idx);
    SELECT RAISE(ABORT, 'precondition: a log hash covers entries the log has')
    WHERE NEW.idx >= ((SELECT coalesce(max(idx) + 1, 0) FROM log_entries) >> NEW.level);
END;
CREATE TRIGGER log_hashes_no_update BEFORE UPDATE ON log_hashes
BEGIN
    SELECT RAISE(ABORT, 'immutable: log hashes never change');
END;
CREATE TRIGGER log_hashes_no_delete BEFORE DELETE ON log_hashes
BEGIN
    SELECT RAISE(ABORT, 'immutable: log hashes are never deleted');
END;

CREATE TRIGGER log_checkpoints_append BEFORE INSERT ON log_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'exists: a checkpoint of this size is stored')
    WHERE EXISTS (SELECT 1 FROM log_checkpoints WHERE size = NEW.size);
    SELECT RAISE(ABORT, 'precondition: a checkpoint covers entries the log has')
    WHERE NEW.size > (SELECT coalesce(max(idx) + 1, 0) FROM log_entries);
END;
CREATE TRIGGER log_checkpoints_no_update BEFORE UPDATE ON log_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'immutable: checkpoints never change');
END;
CREATE TRIGGER log_checkpoints_no_delete BEFORE DELETE ON log_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'immutable: checkpoints are never deleted');
END;
