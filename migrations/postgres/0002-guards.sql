-- imgsrv catalog schema (PostgreSQL), migration 2: the guards, as PL/pgSQL triggers, so
-- that the invariants hold for every client of the database (psql included), not only
-- for imgsrv. The same rules as the SQLite triggers of schema.sql and migrations/0002..0005,
-- with the same messages (the application maps them by their prefix: `precondition:`,
-- `immutable:`, `exists:`, `conflict:`):
--   * a version is created as a draft and only moves forward:
--     draft -> publishing -> published; a published version never changes or goes away;
--   * artifacts, attachments and version metadata change only while their version is a draft;
--   * a version becomes publishing only with >= 1 artifact and every cited blob stored with
--     the declared size, and becomes published only with its publish record;
--   * publish records and Incus projection rows are written once and never change;
--   * CAS blob rows never change, and a row that a non-collected publishing/published
--     version cites cannot be deleted;
--   * an alias points at a published, not retired version of its own image;
--   * the audit log, retirements and collections are append-only;
--   * the generation counter only moves forward and is never deleted;
--   * TRUNCATE (which fires no row trigger) is refused on every guarded table.
-- PostgreSQL has no INSERT OR REPLACE: the REPLACE holes SQLite's migrations 2 and 5 close
-- do not exist here (an insert over an existing key is a unique violation; ON CONFLICT DO
-- UPDATE fires the update guards).
--
-- Every guard trigger is ENABLE ALWAYS: it fires in a replication session too
-- (session_replication_role = replica skips ordinary triggers).
-- Every statement is idempotent (CREATE OR REPLACE): opening a catalog re-runs this file
-- when a guard is missing, disabled or was changed (src/catalog/postgres/migrate.rs), and
-- check_integrity (run by `imgsrv restore`) reports such a guard. A superuser or the
-- tables' owner can still drop or disable a trigger (ALTER TABLE ... DISABLE TRIGGER):
-- give the roles other than imgsrv's only the privileges they need.

CREATE OR REPLACE FUNCTION imgsrv_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0];
END;
$$;

CREATE OR REPLACE FUNCTION imgsrv_bump_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE catalog_state SET generation = generation + 1 WHERE id = 1;
    RETURN NULL;
END;
$$;

-- ------------------------------------------------------------------ audit log

CREATE OR REPLACE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: the audit log is append-only');

-- ------------------------------------------------------------------ blobs

CREATE OR REPLACE TRIGGER cas_blobs_no_update BEFORE UPDATE ON cas_blobs
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: cas_blobs rows never change');

CREATE OR REPLACE FUNCTION imgsrv_cas_blobs_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id
               WHERE a.primary_blob_digest = OLD.digest AND v.state <> 'draft'
                 AND NOT EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id))
    OR EXISTS (SELECT 1 FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id
               JOIN image_versions v ON v.id = a.version_id
               WHERE t.blob_digest = OLD.digest AND v.state <> 'draft'
                 AND NOT EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id)) THEN
        RAISE EXCEPTION 'immutable: blob is referenced by a published version';
    END IF;
    RETURN OLD;
END;
$$;
CREATE OR REPLACE TRIGGER cas_blobs_no_delete_referenced BEFORE DELETE ON cas_blobs
FOR EACH ROW EXECUTE FUNCTION imgsrv_cas_blobs_delete();

-- ------------------------------------------------------------------ images

CREATE OR REPLACE FUNCTION imgsrv_images_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF EXISTS (SELECT 1 FROM image_versions WHERE image_id = OLD.id) THEN
            RAISE EXCEPTION 'immutable: image has versions';
        END IF;
        RETURN OLD;
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id
       OR (NEW.name IS DISTINCT FROM OLD.name
           AND EXISTS (SELECT 1 FROM image_versions WHERE image_id = OLD.id AND state <> 'draft')) THEN
        RAISE EXCEPTION 'immutable: image identity cannot change once a version is published';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER images_guard BEFORE UPDATE OR DELETE ON images
FOR EACH ROW EXECUTE FUNCTION imgsrv_images_guard();
CREATE OR REPLACE TRIGGER catalog_generation_image_update AFTER UPDATE ON images
FOR EACH ROW EXECUTE FUNCTION imgsrv_bump_generation();

-- ------------------------------------------------------------------ versions

CREATE OR REPLACE FUNCTION imgsrv_image_versions_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state <> 'draft' OR NEW.published_at IS NOT NULL THEN
            RAISE EXCEPTION 'precondition: versions are created as drafts';
        END IF;
        RETURN NEW;
    END IF;
    IF TG_OP = 'DELETE' THEN
        IF OLD.state <> 'draft' THEN
            RAISE EXCEPTION 'immutable: only drafts can be deleted';
        END IF;
        RETURN OLD;
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.image_id IS DISTINCT FROM OLD.image_id
       OR NEW.version IS DISTINCT FROM OLD.version OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        RAISE EXCEPTION 'immutable: version identity never changes';
    END IF;
    IF OLD.state = 'published' THEN
        RAISE EXCEPTION 'immutable: version is published';
    END IF;
    IF NOT (OLD.state = NEW.state
            OR (OLD.state = 'draft' AND NEW.state = 'publishing')
            OR (OLD.state = 'publishing' AND NEW.state = 'published')) THEN
        RAISE EXCEPTION 'precondition: version state only moves draft -> publishing -> published';
    END IF;
    IF OLD.state = 'draft' AND NEW.state = 'publishing' THEN
        -- the cited blob rows are locked: a delete of one (by any client) waits for this
        -- publish and then finds the blob referenced, or went first and is seen missing
        PERFORM 1 FROM cas_blobs b
         WHERE b.digest IN (SELECT a.primary_blob_digest FROM release_artifacts a WHERE a.version_id = OLD.id
                            UNION
                            SELECT t.blob_digest FROM artifact_attachments t
                            JOIN release_artifacts a ON a.id = t.artifact_id WHERE a.version_id = OLD.id)
           FOR SHARE;
    END IF;
    IF OLD.state = 'draft' AND NEW.state = 'publishing' AND (
           NOT EXISTS (SELECT 1 FROM release_artifacts WHERE version_id = OLD.id)
        OR EXISTS (SELECT 1 FROM release_artifacts a
                   WHERE a.version_id = OLD.id
                     AND NOT EXISTS (SELECT 1 FROM cas_blobs b WHERE b.digest = a.primary_blob_digest
                                     AND b.size_bytes = a.primary_blob_size_bytes))
        OR EXISTS (SELECT 1 FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id
                   WHERE a.version_id = OLD.id
                     AND NOT EXISTS (SELECT 1 FROM cas_blobs b WHERE b.digest = t.blob_digest
                                     AND b.size_bytes = t.blob_size_bytes))) THEN
        RAISE EXCEPTION 'precondition: version needs an artifact and every cited blob stored with its size';
    END IF;
    IF NEW.state = 'published' AND OLD.state <> 'published'
       AND NOT EXISTS (SELECT 1 FROM publish_records WHERE version_id = OLD.id) THEN
        RAISE EXCEPTION 'precondition: a version is published only with its publish record';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER image_versions_guard BEFORE INSERT OR UPDATE OR DELETE ON image_versions
FOR EACH ROW EXECUTE FUNCTION imgsrv_image_versions_guard();

-- the Simple Streams projection is rebuilt when the generation moves
CREATE OR REPLACE TRIGGER catalog_generation_publish AFTER UPDATE OF state ON image_versions
FOR EACH ROW WHEN (NEW.state = 'published' AND OLD.state <> 'published')
EXECUTE FUNCTION imgsrv_bump_generation();

-- ------------------------------------------------------------------ draft contents

-- Draft contents change only while the version is a draft. The change also locks the
-- version row and writes it (a no-op update): a publish running meanwhile, in any client
-- and at any isolation level, either waits for the change and then fails to publish what
-- it did not read (a SERIALIZABLE or REPEATABLE READ publish gets a serialization failure
-- and starts again; imgsrv's sees the changed draft and refuses), or publishes first, and
-- then the change finds the version published.
CREATE OR REPLACE FUNCTION imgsrv_lock_draft(vid text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT state FROM image_versions WHERE id = vid FOR NO KEY UPDATE) IS DISTINCT FROM 'draft' THEN
        RAISE EXCEPTION 'precondition: version is not a draft';
    END IF;
    UPDATE image_versions SET updated_at = updated_at WHERE id = vid;
END;
$$;

-- metadata and artifacts: by their version_id
CREATE OR REPLACE FUNCTION imgsrv_require_draft() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM imgsrv_lock_draft(OLD.version_id);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.version_id IS DISTINCT FROM OLD.version_id) THEN
        PERFORM imgsrv_lock_draft(NEW.version_id);
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER version_metadata_require_draft
BEFORE INSERT OR UPDATE OR DELETE ON version_metadata
FOR EACH ROW EXECUTE FUNCTION imgsrv_require_draft();
CREATE OR REPLACE TRIGGER release_artifacts_require_draft
BEFORE INSERT OR UPDATE OR DELETE ON release_artifacts
FOR EACH ROW EXECUTE FUNCTION imgsrv_require_draft();

-- attachments: through their artifact
CREATE OR REPLACE FUNCTION imgsrv_attachments_require_draft() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM imgsrv_lock_draft((SELECT version_id FROM release_artifacts WHERE id = OLD.artifact_id));
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.artifact_id IS DISTINCT FROM OLD.artifact_id) THEN
        PERFORM imgsrv_lock_draft((SELECT version_id FROM release_artifacts WHERE id = NEW.artifact_id));
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER artifact_attachments_require_draft
BEFORE INSERT OR UPDATE OR DELETE ON artifact_attachments
FOR EACH ROW EXECUTE FUNCTION imgsrv_attachments_require_draft();

-- ------------------------------------------------------------------ publishing

CREATE OR REPLACE FUNCTION imgsrv_publish_records_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT state FROM image_versions WHERE id = NEW.version_id) IS DISTINCT FROM 'publishing' THEN
        RAISE EXCEPTION 'precondition: publish records are written while publishing';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER publish_records_guard_insert BEFORE INSERT ON publish_records
FOR EACH ROW EXECUTE FUNCTION imgsrv_publish_records_insert();
CREATE OR REPLACE TRIGGER publish_records_no_change BEFORE UPDATE OR DELETE ON publish_records
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: publish records never change');

CREATE OR REPLACE FUNCTION imgsrv_incus_projection_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT state FROM image_versions WHERE id = NEW.version_id) IS DISTINCT FROM 'publishing'
       OR (SELECT version_id FROM release_artifacts WHERE id = NEW.artifact_id)
          IS DISTINCT FROM NEW.version_id THEN
        RAISE EXCEPTION 'precondition: projection rows are written while publishing';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER incus_projection_guard_insert BEFORE INSERT ON incus_projection
FOR EACH ROW EXECUTE FUNCTION imgsrv_incus_projection_insert();
CREATE OR REPLACE TRIGGER incus_projection_no_change BEFORE UPDATE OR DELETE ON incus_projection
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: projection rows never change');

-- ------------------------------------------------------------------ aliases

CREATE OR REPLACE FUNCTION imgsrv_aliases_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.id IS DISTINCT FROM OLD.id OR NEW.image_id IS DISTINCT FROM OLD.image_id
                             OR NEW.alias IS DISTINCT FROM OLD.alias) THEN
        RAISE EXCEPTION 'precondition: alias target must be a published version of the same image';
    END IF;
    IF (SELECT state FROM image_versions WHERE id = NEW.version_id AND image_id = NEW.image_id)
       IS DISTINCT FROM 'published' THEN
        RAISE EXCEPTION 'precondition: alias target must be a published version of the same image';
    END IF;
    IF EXISTS (SELECT 1 FROM retirements WHERE version_id = NEW.version_id) THEN
        RAISE EXCEPTION 'precondition: the version is retired';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER aliases_guard BEFORE INSERT OR UPDATE ON aliases
FOR EACH ROW EXECUTE FUNCTION imgsrv_aliases_guard();
CREATE OR REPLACE TRIGGER catalog_generation_alias AFTER INSERT OR UPDATE OR DELETE ON aliases
FOR EACH ROW EXECUTE FUNCTION imgsrv_bump_generation();

-- ------------------------------------------------------------------ generation counter

CREATE OR REPLACE FUNCTION imgsrv_catalog_state_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'immutable: the generation counter is never deleted';
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF EXISTS (SELECT 1 FROM catalog_state) THEN
            RAISE EXCEPTION 'immutable: the generation counter is never replaced';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.generation IS NULL OR NEW.generation < OLD.generation THEN
        RAISE EXCEPTION 'immutable: the generation counter only moves forward';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER catalog_state_guard BEFORE INSERT OR UPDATE OR DELETE ON catalog_state
FOR EACH ROW EXECUTE FUNCTION imgsrv_catalog_state_guard();

-- ------------------------------------------------------------------ lifecycle

CREATE OR REPLACE FUNCTION imgsrv_retirements_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM retirements WHERE version_id = NEW.version_id) THEN
        RAISE EXCEPTION 'exists: the version is already retired';
    END IF;
    IF (SELECT state FROM image_versions WHERE id = NEW.version_id) IS DISTINCT FROM 'published' THEN
        RAISE EXCEPTION 'precondition: only a published version can be retired';
    END IF;
    IF EXISTS (SELECT 1 FROM aliases WHERE version_id = NEW.version_id) THEN
        RAISE EXCEPTION 'conflict: an alias points at this version; move it first';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER retirements_guard_insert BEFORE INSERT ON retirements
FOR EACH ROW EXECUTE FUNCTION imgsrv_retirements_insert();
CREATE OR REPLACE TRIGGER retirements_no_change BEFORE UPDATE OR DELETE ON retirements
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: retirements are append-only');
-- a retirement changes what the projection shows
CREATE OR REPLACE TRIGGER catalog_generation_retire AFTER INSERT ON retirements
FOR EACH ROW EXECUTE FUNCTION imgsrv_bump_generation();

CREATE OR REPLACE FUNCTION imgsrv_collections_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM collections WHERE version_id = NEW.version_id) THEN
        RAISE EXCEPTION 'exists: the version is already collected';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM retirements WHERE version_id = NEW.version_id) THEN
        RAISE EXCEPTION 'precondition: only a retired version can be collected';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER collections_guard_insert BEFORE INSERT ON collections
FOR EACH ROW EXECUTE FUNCTION imgsrv_collections_insert();
CREATE OR REPLACE TRIGGER collections_no_change BEFORE UPDATE OR DELETE ON collections
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: collections are append-only');

-- ------------------------------------------------------------------ TRUNCATE

-- TRUNCATE removes rows without firing a row trigger: refused wherever rows are guarded
CREATE OR REPLACE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: the audit log is append-only');
CREATE OR REPLACE TRIGGER cas_blobs_no_truncate BEFORE TRUNCATE ON cas_blobs
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: cas_blobs is not truncated (published versions cite its rows); delete rows instead');
CREATE OR REPLACE TRIGGER images_no_truncate BEFORE TRUNCATE ON images
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: images is not truncated; delete rows instead');
CREATE OR REPLACE TRIGGER image_versions_no_truncate BEFORE TRUNCATE ON image_versions
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: image_versions is not truncated (published versions never go away)');
CREATE OR REPLACE TRIGGER version_metadata_no_truncate BEFORE TRUNCATE ON version_metadata
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: version_metadata is not truncated; delete rows instead');
CREATE OR REPLACE TRIGGER release_artifacts_no_truncate BEFORE TRUNCATE ON release_artifacts
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: release_artifacts is not truncated; delete rows instead');
CREATE OR REPLACE TRIGGER artifact_attachments_no_truncate BEFORE TRUNCATE ON artifact_attachments
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: artifact_attachments is not truncated; delete rows instead');
CREATE OR REPLACE TRIGGER publish_records_no_truncate BEFORE TRUNCATE ON publish_records
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: publish records never change');
CREATE OR REPLACE TRIGGER incus_projection_no_truncate BEFORE TRUNCATE ON incus_projection
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: projection rows never change');
CREATE OR REPLACE TRIGGER retirements_no_truncate BEFORE TRUNCATE ON retirements
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: retirements are append-only');
CREATE OR REPLACE TRIGGER collections_no_truncate BEFORE TRUNCATE ON collections
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: collections are append-only');
CREATE OR REPLACE TRIGGER catalog_state_no_truncate BEFORE TRUNCATE ON catalog_state
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: the generation counter is never deleted');

-- ------------------------------------------------------------------ ENABLE ALWAYS

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
