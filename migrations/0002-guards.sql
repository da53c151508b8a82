-- imgsrv catalog schema (SQLite), migration 2: guards that schema.sql (migration 1)
-- leaves open to someone typing SQL into the sqlite3 shell.
--
-- * REPLACE (INSERT OR REPLACE, REPLACE INTO, UPDATE OR REPLACE) deletes the rows a new
--   or changed row conflicts with without firing their delete triggers (recursive_triggers
--   is off by default), so every delete guard of migration 1 gets a twin on insert (and on
--   a key change, for the keys an update may change): a published version cannot be
--   replaced by a draft, nor its image, artifacts, attachments or blob rows by others.
--   A collision with such a row is refused with `exists: ...` (the application reports
--   it as "already exists", as it did the constraint failure).
-- * The generation counter that the Simple Streams cache trusts only moves forward (a
--   counter set back to a value the cache has seen would make it serve a stale
--   projection), stays an integer well below overflow (the triggers add 1 to it), and its
--   row is never deleted or replaced. A counter that is already broken (a catalog
--   tampered with before this migration) may be set to anything: that is how it is
--   repaired.
-- A migration that changes no table must consist of triggers and indexes only: see
-- src/catalog/migrate.rs.

CREATE TRIGGER images_guard_replace_insert BEFORE INSERT ON images
WHEN EXISTS (SELECT 1 FROM images i WHERE (i.id = NEW.id OR i.name = NEW.name)
             AND EXISTS (SELECT 1 FROM image_versions v WHERE v.image_id = i.id))
BEGIN
    SELECT RAISE(ABORT, 'exists: image has versions');
END;
CREATE TRIGGER images_guard_replace_rename BEFORE UPDATE OF name ON images
WHEN NEW.name IS NOT OLD.name
 AND EXISTS (SELECT 1 FROM images i WHERE i.name = NEW.name AND i.id IS NOT OLD.id
             AND EXISTS (SELECT 1 FROM image_versions v WHERE v.image_id = i.id))
BEGIN
    SELECT RAISE(ABORT, 'exists: image has versions');
END;

CREATE TRIGGER image_versions_guard_replace BEFORE INSERT ON image_versions
WHEN EXISTS (SELECT 1 FROM image_versions
             WHERE state <> 'draft'
               AND (id = NEW.id OR (image_id = NEW.image_id AND version = NEW.version)))
BEGIN
    SELECT RAISE(ABORT, 'exists: version is not a draft');
END;

CREATE TRIGGER release_artifacts_guard_replace_insert BEFORE INSERT ON release_artifacts
WHEN EXISTS (SELECT 1 FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id
             WHERE a.id = NEW.id AND v.state <> 'draft')
BEGIN
    SELECT RAISE(ABORT, 'exists: artifact of a version that is not a draft');
END;
CREATE TRIGGER release_artifacts_guard_replace_update BEFORE UPDATE OF id ON release_artifacts
WHEN NEW.id IS NOT OLD.id
 AND EXISTS (SELECT 1 FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id
             WHERE a.id = NEW.id AND v.state <> 'draft')
BEGIN
    SELECT RAISE(ABORT, 'exists: artifact of a version that is not a draft');
END;

CREATE TRIGGER artifact_attachments_guard_replace_insert BEFORE INSERT ON artifact_attachments
WHEN EXISTS (SELECT 1 FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id
             JOIN image_versions v ON v.id = a.version_id
             WHERE t.id = NEW.id AND v.state <> 'draft')
BEGIN
    SELECT RAISE(ABORT, 'exists: attachment of a version that is not a draft');
END;
CREATE TRIGGER artifact_attachments_guard_replace_update BEFORE UPDATE OF id ON artifact_attachments
WHEN NEW.id IS NOT OLD.id
 AND EXISTS (SELECT 1 FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id
             JOIN image_versions v ON v.id = a.version_id
             WHERE t.id = NEW.id AND v.state <> 'draft')
BEGIN
    SELECT RAISE(ABORT, 'exists: attachment of a version that is not a draft');
END;

-- blob rows never change: an insert over one is refused (the application inserts
-- only digests it does not have)
CREATE TRIGGER cas_blobs_no_replace BEFORE INSERT ON cas_blobs
WHEN EXISTS (SELECT 1 FROM cas_blobs WHERE digest = NEW.digest OR storage_key = NEW.storage_key)
BEGIN
    SELECT RAISE(ABORT, 'exists: cas_blobs rows never change');
END;

CREATE TRIGGER catalog_state_forward_only BEFORE UPDATE ON catalog_state
WHEN typeof(OLD.generation) = 'integer' AND OLD.generation BETWEEN 0 AND 9007199254740992
 AND NOT (typeof(NEW.generation) = 'integer'
          AND NEW.generation BETWEEN OLD.generation AND 9007199254740992)
BEGIN
    SELECT RAISE(ABORT, 'immutable: the generation counter only moves forward');
END;
CREATE TRIGGER catalog_state_no_delete BEFORE DELETE ON catalog_state
BEGIN
    SELECT RAISE(ABORT, 'immutable: the generation counter is never deleted');
END;
CREATE TRIGGER catalog_state_no_replace BEFORE INSERT ON catalog_state
WHEN EXISTS (SELECT 1 FROM catalog_state)
BEGIN
    SELECT RAISE(ABORT, 'immutable: the generation counter is never replaced');
END;
