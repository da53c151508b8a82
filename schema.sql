-- imgsrv catalog schema (SQLite), migration 1.
--
-- Applied by src/catalog/migrate.rs inside one exclusive transaction and recorded in
-- PRAGMA user_version. Later changes are appended as new migrations, never edited here.
--
-- Invariants enforced by triggers, so that they hold even for someone typing SQL into
-- the sqlite3 shell (where foreign keys are off by default):
--   * a version is created as a draft and only moves forward:
--     draft -> publishing -> published; a published version never changes or goes away;
--   * artifacts, attachments and version metadata change only while their version is a draft;
--   * a version becomes publishing only with >= 1 artifact and every cited blob stored with
--     the declared size, and becomes published only with its publish record;
--   * publish records and Incus projection rows are written once and never change;
--   * CAS blob rows never change, and a row that a publishing/published version cites
--     cannot be deleted;
--   * an alias points at a published version of its own image;
--   * the audit log is append-only.
-- Timestamps are RFC 3339 UTC text written by the application.

CREATE TABLE catalog_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    -- bumped whenever what the Simple Streams projection shows may have changed
    generation  INTEGER NOT NULL
);
INSERT INTO catalog_state (id, generation) VALUES (1, 0);

CREATE TABLE cas_blobs (
    digest       TEXT PRIMARY KEY
                 CHECK (length(digest) = 71 AND substr(digest, 1, 7) = 'sha256:'
                        AND substr(digest, 8) NOT GLOB '*[^0-9a-f]*'),
    size_bytes   INTEGER NOT NULL CHECK (size_bytes >= 0),
    storage_key  TEXT NOT NULL UNIQUE
                 CHECK (storage_key = 'sha256/' || substr(digest, 8, 2) || '/'
                        || substr(digest, 10, 2) || '/' || substr(digest, 8)),
    media_type   TEXT,
    verified_at  TEXT NOT NULL,
    created_at   TEXT NOT NULL
);

CREATE TABLE upload_sessions (
    id                   TEXT PRIMARY KEY,
    expected_digest      TEXT NOT NULL CHECK (length(expected_digest) = 71),
    expected_size_bytes  INTEGER NOT NULL CHECK (expected_size_bytes >= 0),
    state                TEXT NOT NULL
                         CHECK (state IN ('created', 'uploading', 'ready', 'failed', 'aborted')),
    media_type_hint      TEXT,
    filename_hint        TEXT,
    principal_id         TEXT,
    failure_message      TEXT,
    expires_at           TEXT NOT NULL,
    created_at           TEXT NOT NULL,
    updated_at           TEXT NOT NULL,
    CHECK ((state = 'failed') = (failure_message IS NOT NULL))
);
CREATE INDEX upload_sessions_digest ON upload_sessions (expected_digest);

CREATE TABLE upload_parts (
    upload_id    TEXT NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    part_number  INTEGER NOT NULL CHECK (part_number BETWEEN 1 AND 10000),
    etag         TEXT NOT NULL,
    size_bytes   INTEGER NOT NULL CHECK (size_bytes >= 0),
    uploaded_at  TEXT NOT NULL,
    PRIMARY KEY (upload_id, part_number)
);

CREATE TABLE images (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE
                  CHECK (length(name) BETWEEN 1 AND 128 AND substr(name, 1, 1) GLOB '[a-z0-9]'
                         AND name NOT GLOB '*[^a-z0-9._-]*'),
    display_name  TEXT,
    description   TEXT,
    -- private images are visible only to principals with reader (or more) on them
    visibility    TEXT NOT NULL DEFAULT 'public' CHECK (visibility IN ('public', 'private')),
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);

CREATE TABLE image_versions (
    id            TEXT PRIMARY KEY,
    image_id      TEXT NOT NULL REFERENCES images (id),
    version       TEXT NOT NULL
                  CHECK (length(version) BETWEEN 1 AND 128 AND substr(version, 1, 1) GLOB '[A-Za-z0-9]'
                         AND version NOT GLOB '*[^A-Za-z0-9._+:-]*'),
    state         TEXT NOT NULL CHECK (state IN ('draft', 'publishing', 'published')),
    published_at  TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    UNIQUE (image_id, version),
    CHECK ((state = 'published') = (published_at IS NOT NULL))
);
CREATE INDEX image_versions_published ON image_versions (image_id, state);

CREATE TABLE version_metadata (
    version_id  TEXT NOT NULL REFERENCES image_versions (id) ON DELETE CASCADE,
    key         TEXT NOT NULL CHECK (length(key) BETWEEN 1 AND 128),
    value       TEXT NOT NULL,
    PRIMARY KEY (version_id, key)
);

CREATE TABLE release_artifacts (
    id                       TEXT PRIMARY KEY,
    version_id               TEXT NOT NULL REFERENCES image_versions (id) ON DELETE CASCADE,
    variant                  TEXT NOT NULL DEFAULT 'default',
    operating_system         TEXT NOT NULL,
    architecture             TEXT NOT NULL,
    format                   TEXT NOT NULL CHECK (format IN ('squashfs', 'qcow2', 'tar.xz', 'raw', 'raw.gz')),
    -- by digest, no foreign key: drafts may cite blobs that are still uploading
    primary_blob_digest      TEXT NOT NULL CHECK (length(primary_blob_digest) = 71),
    primary_blob_size_bytes  INTEGER NOT NULL CHECK (primary_blob_size_bytes >= 0),
    primary_media_type       TEXT NOT NULL CHECK (length(trim(primary_media_type)) > 0),
    created_at               TEXT NOT NULL,
    updated_at               TEXT NOT NULL,
    UNIQUE (version_id, variant, operating_system, architecture, format)
);
CREATE INDEX release_artifacts_digest ON release_artifacts (primary_blob_digest);

CREATE TABLE artifact_attachments (
    id               TEXT PRIMARY KEY,
    artifact_id      TEXT NOT NULL REFERENCES release_artifacts (id) ON DELETE CASCADE,
    name             TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    media_type       TEXT NOT NULL CHECK (length(trim(media_type)) > 0),
    blob_digest      TEXT NOT NULL CHECK (length(blob_digest) = 71),
    blob_size_bytes  INTEGER NOT NULL CHECK (blob_size_bytes >= 0),
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    UNIQUE (artifact_id, name)
);
CREATE INDEX artifact_attachments_digest ON artifact_attachments (blob_digest);

CREATE TABLE aliases (
    id          TEXT PRIMARY KEY,
    image_id    TEXT NOT NULL REFERENCES images (id),
    alias       TEXT NOT NULL
                CHECK (length(alias) BETWEEN 1 AND 64 AND substr(alias, 1, 1) GLOB '[A-Za-z0-9]'
                       AND alias NOT GLOB '*[^A-Za-z0-9._-]*'),
    version_id  TEXT NOT NULL REFERENCES image_versions (id),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    UNIQUE (image_id, alias)
);

-- What was signed and how it was checked, written in the publish transaction.
CREATE TABLE publish_records (
    version_id       TEXT PRIMARY KEY REFERENCES image_versions (id),
    manifest         BLOB NOT NULL,
    manifest_digest  TEXT NOT NULL CHECK (length(manifest_digest) = 71),
    signature        TEXT,
    signer_key_id    TEXT,
    signer_key_name  TEXT,
    verification     TEXT NOT NULL CHECK (verification IN ('verified', 'unverified', 'skipped')),
    principal_id     TEXT,
    published_at     TEXT NOT NULL,
    CHECK ((verification = 'verified') = (signer_key_id IS NOT NULL AND signature IS NOT NULL))
);

-- Incus fingerprints, computed from the bytes at publish time.
CREATE TABLE incus_projection (
    artifact_id             TEXT PRIMARY KEY REFERENCES release_artifacts (id),
    version_id              TEXT NOT NULL REFERENCES image_versions (id),
    metadata_attachment_id  TEXT NOT NULL REFERENCES artifact_attachments (id),
    ftype                   TEXT NOT NULL CHECK (ftype IN ('squashfs', 'disk-kvm.img', 'root.tar.xz')),
    combined_sha256         TEXT NOT NULL
                            CHECK (length(combined_sha256) = 64 AND combined_sha256 NOT GLOB '*[^0-9a-f]*')
);

CREATE TABLE roles (
    id            TEXT PRIMARY KEY,
    display_name  TEXT NOT NULL,
    description   TEXT NOT NULL
);
CREATE TABLE role_actions (
    role_id  TEXT NOT NULL REFERENCES roles (id),
    action   TEXT NOT NULL,
    PRIMARY KEY (role_id, action)
);
INSERT INTO roles VALUES ('auth-manager', 'Auth manager', 'Can manage principals, grants and tokens, and read the audit log.');
INSERT INTO roles VALUES ('content-writer', 'Content writer', 'Can upload, compose, publish and alias images in its scope, and read them.');
INSERT INTO roles VALUES ('reader', 'Reader', 'Can read images in its scope, private ones included.');
INSERT INTO role_actions VALUES ('auth-manager', 'auth.manage');
INSERT INTO role_actions VALUES ('content-writer', 'content.write');
INSERT INTO role_actions VALUES ('content-writer', 'content.read');
INSERT INTO role_actions VALUES ('reader', 'content.read');

CREATE TABLE principals (
    id            TEXT PRIMARY KEY,
    -- what operators type and what goes in https://NAME:TOKEN@host remotes
    name          TEXT NOT NULL UNIQUE
                  CHECK (length(name) BETWEEN 1 AND 64 AND substr(name, 1, 1) GLOB '[a-z0-9]'
                         AND name NOT GLOB '*[^a-z0-9._-]*'),
    kind          TEXT NOT NULL CHECK (kind IN ('user', 'service')),
    display_name  TEXT NOT NULL CHECK (length(trim(display_name)) > 0),
    attributes    TEXT NOT NULL DEFAULT '{}',
    created_at    TEXT NOT NULL
);
-- The identity matrix: a principal holds a role on the images matching a
-- scope (an image-name glob such as debian-* or *).
CREATE TABLE grants (
    principal_id  TEXT NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    role_id       TEXT NOT NULL REFERENCES roles (id),
    scope         TEXT NOT NULL
                  CHECK (length(scope) BETWEEN 1 AND 128 AND scope NOT GLOB '*[^a-z0-9._*?-]*'),
    created_at    TEXT NOT NULL,
    PRIMARY KEY (principal_id, role_id, scope)
);
CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    principal_id  TEXT NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    -- SHA-256 of the secret part; the secret itself is shown once and never stored
    secret_hash   BLOB NOT NULL CHECK (length(secret_hash) = 32),
    expires_at    TEXT,
    last_used_at  TEXT,
    revoked_at    TEXT,
    created_at    TEXT NOT NULL
);

-- Append-only record of every write and every denied request.
CREATE TABLE audit_log (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    at              TEXT NOT NULL,
    principal_id    TEXT,
    principal_name  TEXT,
    -- e.g. publish, alias.put, upload.begin, grant.add, key.revoke, denied
    action          TEXT NOT NULL,
    target          TEXT NOT NULL DEFAULT '',
    outcome         TEXT NOT NULL CHECK (outcome IN ('ok', 'denied', 'failed')),
    status          INTEGER,
    method          TEXT,
    path            TEXT,
    remote          TEXT,
    detail          TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_principal ON audit_log (principal_name, at);

-- ---------------------------------------------------------------- triggers

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'immutable: the audit log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'immutable: the audit log is append-only');
END;

CREATE TRIGGER cas_blobs_no_update BEFORE UPDATE ON cas_blobs
BEGIN
    SELECT RAISE(ABORT, 'immutable: cas_blobs rows never change');
END;

CREATE TRIGGER cas_blobs_no_delete_referenced BEFORE DELETE ON cas_blobs
WHEN EXISTS (SELECT 1 FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id
             WHERE a.primary_blob_digest = OLD.digest AND v.state <> 'draft')
  OR EXISTS (SELECT 1 FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id
             JOIN image_versions v ON v.id = a.version_id
             WHERE t.blob_digest = OLD.digest AND v.state <> 'draft')
BEGIN
    SELECT RAISE(ABORT, 'immutable: blob is referenced by a published version');
END;

CREATE TRIGGER images_guard_update BEFORE UPDATE ON images
WHEN NEW.id IS NOT OLD.id
  OR (NEW.name IS NOT OLD.name
      AND EXISTS (SELECT 1 FROM image_versions WHERE image_id = OLD.id AND state <> 'draft'))
BEGIN
    SELECT RAISE(ABORT, 'immutable: image identity cannot change once a version is published');
END;

CREATE TRIGGER images_guard_delete BEFORE DELETE ON images
WHEN EXISTS (SELECT 1 FROM image_versions WHERE image_id = OLD.id)
BEGIN
    SELECT RAISE(ABORT, 'immutable: image has versions');
END;

CREATE TRIGGER image_versions_guard_insert BEFORE INSERT ON image_versions
WHEN NEW.state <> 'draft' OR NEW.published_at IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'precondition: versions are created as drafts');
END;

CREATE TRIGGER image_versions_guard_identity BEFORE UPDATE ON image_versions
WHEN NEW.id IS NOT OLD.id OR NEW.image_id IS NOT OLD.image_id
  OR NEW.version IS NOT OLD.version OR NEW.created_at IS NOT OLD.created_at
BEGIN
    SELECT RAISE(ABORT, 'immutable: version identity never changes');
END;

CREATE TRIGGER image_versions_guard_published BEFORE UPDATE ON image_versions
WHEN OLD.state = 'published'
BEGIN
    SELECT RAISE(ABORT, 'immutable: version is published');
END;

CREATE TRIGGER image_versions_guard_transition BEFORE UPDATE OF state ON image_versions
WHEN NOT ((OLD.state = NEW.state)
       OR (OLD.state = 'draft' AND NEW.state = 'publishing')
       OR (OLD.state = 'publishing' AND NEW.state = 'published'))
BEGIN
    SELECT RAISE(ABORT, 'precondition: version state only moves draft -> publishing -> published');
END;

CREATE TRIGGER image_versions_guard_publishing BEFORE UPDATE OF state ON image_versions
WHEN OLD.state = 'draft' AND NEW.state = 'publishing' AND (
       NOT EXISTS (SELECT 1 FROM release_artifacts WHERE version_id = OLD.id)
    OR EXISTS (SELECT 1 FROM release_artifacts a
               WHERE a.version_id = OLD.id
                 AND NOT EXISTS (SELECT 1 FROM cas_blobs b WHERE b.digest = a.primary_blob_digest
                                 AND b.size_bytes = a.primary_blob_size_bytes))
    OR EXISTS (SELECT 1 FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id
               WHERE a.version_id = OLD.id
                 AND NOT EXISTS (SELECT 1 FROM cas_blobs b WHERE b.digest = t.blob_digest
                                 AND b.size_bytes = t.blob_size_bytes)))
BEGIN
    SELECT RAISE(ABORT, 'precondition: version needs an artifact and every cited blob stored with its size');
END;

CREATE TRIGGER image_versions_guard_published_record BEFORE UPDATE OF state ON image_versions
WHEN NEW.state = 'published' AND OLD.state <> 'published'
 AND NOT EXISTS (SELECT 1 FROM publish_records WHERE version_id = OLD.id)
BEGIN
    SELECT RAISE(ABORT, 'precondition: a version is published only with its publish record');
END;

CREATE TRIGGER image_versions_guard_delete BEFORE DELETE ON image_versions
WHEN OLD.state <> 'draft'
BEGIN
    SELECT RAISE(ABORT, 'immutable: only drafts can be deleted');
END;

CREATE TRIGGER version_metadata_require_draft_insert BEFORE INSERT ON version_metadata
WHEN (SELECT state FROM image_versions WHERE id = NEW.version_id) IS NOT 'draft'
BEGIN
    SELECT RAISE(ABORT, 'precondition: version is not a draft');
END;
CREATE TRIGGER version_metadata_require_draft_update BEFORE UPDATE ON version_metadata
WHEN (SELECT state FROM image_versions WHERE id = OLD.version_id) IS NOT 'draft'
  OR (SELECT state FROM image_versions WHERE id = NEW.version_id) IS NOT 'draft'
BEGIN
    SELECT RAISE(ABORT, 'precondition: version is not a draft');
END;
CREATE TRIGGER version_metadata_require_draft_delete BEFORE DELETE ON version_metadata
WHEN (SELECT state FROM image_versions WHERE id = OLD.version_id) IS NOT 'draft'
BEGIN
    SELECT RAISE(ABORT, 'precondition: version is not a draft');
END;

CREATE TRIGGER release_artifacts_require_draft_insert BEFORE INSERT ON release_artifacts
WHEN (SELECT state FROM image_versions WHERE id = NEW.version_id) IS NOT 'draft'
BEGIN
    SELECT RAISE(ABORT, 'precondition: version is not a draft');
END;
CREATE TRIGGER release_artifacts_require_draft_update BEFORE UPDATE ON release_artifacts
WHEN (SELECT state FROM image_versions WHERE id = OLD.version_id) IS NOT 'draft'
  OR (SELECT state FROM image_versions WHERE id = NEW.version_id) IS NOT 'draft'
BEGIN
    SELECT RAISE(ABORT, 'precondition: version is not a draft');
END;
CREATE TRIGGER release_artifacts_require_draft_delete BEFORE DELETE ON release_artifacts
WHEN (SELECT state FROM image_versions WHERE id = OLD.version_id) IS NOT 'draft'
BEGIN
    SELECT RAISE(ABORT, 'precondition: version is not a draft');
END;

CREATE TRIGGER artifact_attachments_require_draft_insert BEFORE INSERT ON artifact_attachments
WHEN (SELECT v.state FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id
      WHERE a.id = NEW.artifact_id) IS NOT 'draft'
BEGIN
    SELECT RAISE(ABORT, 'precondition: version is not a draft');
END;
CREATE TRIGGER artifact_attachments_require_draft_update BEFORE UPDATE ON artifact_attachments
WHEN (SELECT v.state FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id
      WHERE a.id = OLD.artifact_id) IS NOT 'draft'
  OR (SELECT v.state FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id
      WHERE a.id = NEW.artifact_id) IS NOT 'draft'
BEGIN
    SELECT RAISE(ABORT, 'precondition: version is not a draft');
END;
CREATE TRIGGER artifact_attachments_require_draft_delete BEFORE DELETE ON artifact_attachments
WHEN (SELECT v.state FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id
      WHERE a.id = OLD.artifact_id) IS NOT 'draft'
BEGIN
    SELECT RAISE(ABORT, 'precondition: version is not a draft');
END;

CREATE TRIGGER publish_records_guard_insert BEFORE INSERT ON publish_records
WHEN (SELECT state FROM image_versions WHERE id = NEW.version_id) IS NOT 'publishing'
BEGIN
    SELECT RAISE(ABORT, 'precondition: publish records are written while publishing');
END;
CREATE TRIGGER publish_records_no_update BEFORE UPDATE ON publish_records
BEGIN
    SELECT RAISE(ABORT, 'immutable: publish records never change');
END;
CREATE TRIGGER publish_records_no_delete BEFORE DELETE ON publish_records
BEGIN
    SELECT RAISE(ABORT, 'immutable: publish records never change');
END;

CREATE TRIGGER incus_projection_guard_insert BEFORE INSERT ON incus_projection
WHEN (SELECT state FROM image_versions WHERE id = NEW.version_id) IS NOT 'publishing'
  OR (SELECT version_id FROM release_artifacts WHERE id = NEW.artifact_id) IS NOT NEW.version_id
BEGIN
    SELECT RAISE(ABORT, 'precondition: projection rows are written while publishing');
END;
CREATE TRIGGER incus_projection_no_update BEFORE UPDATE ON incus_projection
BEGIN
    SELECT RAISE(ABORT, 'immutable: projection rows never change');
END;
CREATE TRIGGER incus_projection_no_delete BEFORE DELETE ON incus_projection
BEGIN
    SELECT RAISE(ABORT, 'immutable: projection rows never change');
END;

CREATE TRIGGER aliases_guard_insert BEFORE INSERT ON aliases
WHEN (SELECT state FROM image_versions WHERE id = NEW.version_id AND image_id = NEW.image_id)
     IS NOT 'published'
BEGIN
    SELECT RAISE(ABORT, 'precondition: alias target must be a published version of the same image');
END;
CREATE TRIGGER aliases_guard_update BEFORE UPDATE ON aliases
WHEN NEW.id IS NOT OLD.id OR NEW.image_id IS NOT OLD.image_id OR NEW.alias IS NOT OLD.alias
  OR (SELECT state FROM image_versions WHERE id = NEW.version_id AND image_id = NEW.image_id)
     IS NOT 'published'
BEGIN
    SELECT RAISE(ABORT, 'precondition: alias target must be a published version of the same image');
END;

-- the Simple Streams projection is rebuilt when the generation moves
CREATE TRIGGER catalog_generation_publish AFTER UPDATE OF state ON image_versions
WHEN NEW.state = 'published' AND OLD.state <> 'published'
BEGIN
    UPDATE catalog_state SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER catalog_generation_alias_insert AFTER INSERT ON aliases
BEGIN
    UPDATE catalog_state SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER catalog_generation_alias_update AFTER UPDATE ON aliases
BEGIN
    UPDATE catalog_state SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER catalog_generation_alias_delete AFTER DELETE ON aliases
BEGIN
    UPDATE catalog_state SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER catalog_generation_image_update AFTER UPDATE ON images
BEGIN
    UPDATE catalog_state SET generation = generation + 1 WHERE id = 1;
END;
