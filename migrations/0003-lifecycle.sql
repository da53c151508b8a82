-- imgsrv catalog schema (SQLite), migration 3: taking versions out of service and
-- reclaiming space (issue 8).
--
-- * retirements: a published version taken out of service (who, when, why). Append-only:
--   a retirement is never changed or withdrawn, only a published version can be retired,
--   once, and not while a movable alias points at it. A retired version leaves the Simple
--   Streams projection and the listings; its manifest, signature and publish record stay.
-- * collections: the retired versions whose bytes garbage collection may reclaim (the
--   grace after retirement is over). Append-only too; from then on the version's blobs
--   are no longer kept for it, and its downloads answer 410 Gone.
-- * blob_pins: short leases on digests a job (a mirror run, a bundle import) has stored
--   and is about to cite in a draft: garbage collection keeps a pinned blob whatever the
--   grace. Pins are deleted by the job that made them, or expire.
-- The rule for what garbage collection may delete is in src/maint/gc.rs; the trigger
-- below only makes sure that no row a non-collected published version cites goes away.

CREATE TABLE retirements (
    version_id      TEXT PRIMARY KEY REFERENCES image_versions (id),
    reason          TEXT NOT NULL CHECK (length(trim(reason)) BETWEEN 1 AND 1024),
    principal_id    TEXT,
    principal_name  TEXT,
    retired_at      TEXT NOT NULL
);

CREATE TABLE collections (
    version_id    TEXT PRIMARY KEY REFERENCES retirements (version_id),
    collected_at  TEXT NOT NULL
);

CREATE TABLE blob_pins (
    digest      TEXT NOT NULL CHECK (length(digest) = 71),
    holder      TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    PRIMARY KEY (digest, holder)
);
CREATE INDEX blob_pins_holder ON blob_pins (holder);

CREATE TRIGGER retirements_guard_insert BEFORE INSERT ON retirements
WHEN (SELECT state FROM image_versions WHERE id = NEW.version_id) IS NOT 'published'
BEGIN
    SELECT RAISE(ABORT, 'precondition: only a published version can be retired');
END;
CREATE TRIGGER retirements_no_replace BEFORE INSERT ON retirements
WHEN EXISTS (SELECT 1 FROM retirements WHERE version_id = NEW.version_id)
BEGIN
    SELECT RAISE(ABORT, 'exists: the version is already retired');
END;
CREATE TRIGGER retirements_guard_alias BEFORE INSERT ON retirements
WHEN EXISTS (SELECT 1 FROM aliases WHERE version_id = NEW.version_id)
BEGIN
    SELECT RAISE(ABORT, 'conflict: an alias points at this version; move it first');
END;
CREATE TRIGGER retirements_no_update BEFORE UPDATE ON retirements
BEGIN
    SELECT RAISE(ABORT, 'immutable: retirements are append-only');
END;
CREATE TRIGGER retirements_no_delete BEFORE DELETE ON retirements
BEGIN
    SELECT RAISE(ABORT, 'immutable: retirements are append-only');
END;

CREATE TRIGGER collections_guard_insert BEFORE INSERT ON collections
WHEN NOT EXISTS (SELECT 1 FROM retirements WHERE version_id = NEW.version_id)
BEGIN
    SELECT RAISE(ABORT, 'precondition: only a retired version can be collected');
END;
CREATE TRIGGER collections_no_replace BEFORE INSERT ON collections
WHEN EXISTS (SELECT 1 FROM collections WHERE version_id = NEW.version_id)
BEGIN
    SELECT RAISE(ABORT, 'exists: the version is already collected');
END;
CREATE TRIGGER collections_no_update BEFORE UPDATE ON collections
BEGIN
    SELECT RAISE(ABORT, 'immutable: collections are append-only');
END;
CREATE TRIGGER collections_no_delete BEFORE DELETE ON collections
BEGIN
    SELECT RAISE(ABORT, 'immutable: collections are append-only');
END;

-- an alias never points at a retired version
CREATE TRIGGER aliases_guard_retired_insert BEFORE INSERT ON aliases
WHEN EXISTS (SELECT 1 FROM retirements WHERE version_id = NEW.version_id)
BEGIN
    SELECT RAISE(ABORT, 'precondition: the version is retired');
END;
CREATE TRIGGER aliases_guard_retired_update BEFORE UPDATE OF version_id ON aliases
WHEN EXISTS (SELECT 1 FROM retirements WHERE version_id = NEW.version_id)
BEGIN
    SELECT RAISE(ABORT, 'precondition: the version is retired');
END;

-- a retirement changes what the projection shows
CREATE TRIGGER catalog_generation_retire AFTER INSERT ON retirements
BEGIN
    UPDATE catalog_state SET generation = generation + 1 WHERE id = 1;
END;

-- blob rows of collected versions may go; those of every other published version stay
DROP TRIGGER cas_blobs_no_delete_referenced;
CREATE TRIGGER cas_blobs_no_delete_referenced BEFORE DELETE ON cas_blobs
WHEN EXISTS (SELECT 1 FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id
             WHERE a.primary_blob_digest = OLD.digest AND v.state <> 'draft'
               AND NOT EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id))
  OR EXISTS (SELECT 1 FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id
             JOIN image_versions v ON v.id = a.version_id
             WHERE t.blob_digest = OLD.digest AND v.state <> 'draft'
               AND NOT EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id))
BEGIN
    SELECT RAISE(ABORT, 'immutable: blob is referenced by a published version');
END;
