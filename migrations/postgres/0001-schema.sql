-- imgsrv catalog schema (PostgreSQL), migration 1: the tables of the SQLite schema
-- (schema.sql and migrations/0002..0005) with the same columns, keys and checks.
--
-- Applied by src/catalog/postgres/migrate.rs in one transaction, under an advisory lock
-- (two instances starting at once do not race), and recorded in schema_migrations. Later
-- changes are appended as new files, never edited here. The guards (PL/pgSQL triggers) are
-- in 0002-guards.sql.
--
-- * Every text column is COLLATE "C": comparisons and ORDER BY are byte order, as in
--   SQLite, whatever the database's locale (RFC 3339 timestamps compare as text; names
--   list in the same order on both backends; the [a-z] of a check means a to z).
-- * Timestamps are RFC 3339 UTC text written by the application, as in SQLite.

CREATE TABLE catalog_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    -- bumped whenever what the Simple Streams projection shows may have changed; 2^53 at most
    generation  BIGINT NOT NULL CHECK (generation BETWEEN 0 AND 9007199254740992)
);
INSERT INTO catalog_state (id, generation) VALUES (1, 0);

CREATE TABLE cas_blobs (
    digest       TEXT COLLATE "C" PRIMARY KEY CHECK (digest ~ '^sha256:[0-9a-f]{64}$'),
    size_bytes   BIGINT NOT NULL CHECK (size_bytes >= 0),
    storage_key  TEXT COLLATE "C" NOT NULL UNIQUE
                 CHECK (storage_key = 'sha256/' || substr(digest, 8, 2) || '/'
                        || substr(digest, 10, 2) || '/' || substr(digest, 8)),
    media_type   TEXT COLLATE "C",
    verified_at  TEXT COLLATE "C" NOT NULL,
    created_at   TEXT COLLATE "C" NOT NULL
);

CREATE TABLE upload_sessions (
    id                   TEXT COLLATE "C" PRIMARY KEY,
    expected_digest      TEXT COLLATE "C" NOT NULL CHECK (length(expected_digest) = 71),
    expected_size_bytes  BIGINT NOT NULL CHECK (expected_size_bytes >= 0),
    state                TEXT COLLATE "C" NOT NULL
                         CHECK (state IN ('created', 'uploading', 'ready', 'failed', 'aborted')),
    media_type_hint      TEXT COLLATE "C",
    filename_hint        TEXT COLLATE "C",
    principal_id         TEXT COLLATE "C",
    failure_message      TEXT COLLATE "C",
    expires_at           TEXT COLLATE "C" NOT NULL,
    created_at           TEXT COLLATE "C" NOT NULL,
    updated_at           TEXT COLLATE "C" NOT NULL,
    CHECK ((state = 'failed') = (failure_message IS NOT NULL))
);
CREATE INDEX upload_sessions_digest ON upload_sessions (expected_digest);
CREATE INDEX upload_sessions_expires ON upload_sessions (expires_at);

CREATE TABLE upload_parts (
    upload_id    TEXT COLLATE "C" NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    part_number  INTEGER NOT NULL CHECK (part_number BETWEEN 1 AND 10000),
    etag         TEXT COLLATE "C" NOT NULL,
    size_bytes   BIGINT NOT NULL CHECK (size_bytes >= 0),
    uploaded_at  TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (upload_id, part_number)
);

CREATE TABLE images (
    id            TEXT COLLATE "C" PRIMARY KEY,
    name          TEXT COLLATE "C" NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,127}$'),
    display_name  TEXT COLLATE "C",
    description   TEXT COLLATE "C",
    -- private images are visible only to principals with reader (or more) on them
    visibility    TEXT COLLATE "C" NOT NULL DEFAULT 'public'
                  CHECK (visibility IN ('public', 'private')),
    created_at    TEXT COLLATE "C" NOT NULL,
    updated_at    TEXT COLLATE "C" NOT NULL
);

CREATE TABLE image_versions (
    id            TEXT COLLATE "C" PRIMARY KEY,
    image_id      TEXT COLLATE "C" NOT NULL REFERENCES images (id),
    version       TEXT COLLATE "C" NOT NULL CHECK (version ~ '^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}$'),
    state         TEXT COLLATE "C" NOT NULL CHECK (state IN ('draft', 'publishing', 'published')),
    published_at  TEXT COLLATE "C",
    created_at    TEXT COLLATE "C" NOT NULL,
    updated_at    TEXT COLLATE "C" NOT NULL,
    UNIQUE (image_id, version),
    CHECK ((state = 'published') = (published_at IS NOT NULL))
);
CREATE INDEX image_versions_published ON image_versions (image_id, state);

CREATE TABLE version_metadata (
    version_id  TEXT COLLATE "C" NOT NULL REFERENCES image_versions (id) ON DELETE CASCADE,
    key         TEXT COLLATE "C" NOT NULL CHECK (length(key) BETWEEN 1 AND 128),
    value       TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (version_id, key)
);

CREATE TABLE release_artifacts (
    id                       TEXT COLLATE "C" PRIMARY KEY,
    version_id               TEXT COLLATE "C" NOT NULL REFERENCES image_versions (id) ON DELETE CASCADE,
    variant                  TEXT COLLATE "C" NOT NULL DEFAULT 'default',
    operating_system         TEXT COLLATE "C" NOT NULL,
    architecture             TEXT COLLATE "C" NOT NULL,
    format                   TEXT COLLATE "C" NOT NULL
                             CHECK (format IN ('squashfs', 'qcow2', 'tar.xz', 'raw', 'raw.gz')),
    -- by digest, no foreign key: drafts may cite blobs that are still uploading
    primary_blob_digest      TEXT COLLATE "C" NOT NULL CHECK (length(primary_blob_digest) = 71),
    primary_blob_size_bytes  BIGINT NOT NULL CHECK (primary_blob_size_bytes >= 0),
    primary_media_type       TEXT COLLATE "C" NOT NULL CHECK (length(trim(primary_media_type)) > 0),
    created_at               TEXT COLLATE "C" NOT NULL,
    updated_at               TEXT COLLATE "C" NOT NULL,
    UNIQUE (version_id, variant, operating_system, architecture, format)
);
CREATE INDEX release_artifacts_digest ON release_artifacts (primary_blob_digest);

CREATE TABLE artifact_attachments (
    id               TEXT COLLATE "C" PRIMARY KEY,
    artifact_id      TEXT COLLATE "C" NOT NULL REFERENCES release_artifacts (id) ON DELETE CASCADE,
    name             TEXT COLLATE "C" NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    media_type       TEXT COLLATE "C" NOT NULL CHECK (length(trim(media_type)) > 0),
    blob_digest      TEXT COLLATE "C" NOT NULL CHECK (length(blob_digest) = 71),
    blob_size_bytes  BIGINT NOT NULL CHECK (blob_size_bytes >= 0),
    created_at       TEXT COLLATE "C" NOT NULL,
    updated_at       TEXT COLLATE "C" NOT NULL,
    UNIQUE (artifact_id, name)
);
CREATE INDEX artifact_attachments_digest ON artifact_attachments (blob_digest);

CREATE TABLE aliases (
    id          TEXT COLLATE "C" PRIMARY KEY,
    image_id    TEXT COLLATE "C" NOT NULL REFERENCES images (id),
    alias       TEXT COLLATE "C" NOT NULL CHECK (alias ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    version_id  TEXT COLLATE "C" NOT NULL REFERENCES image_versions (id),
    created_at  TEXT COLLATE "C" NOT NULL,
    updated_at  TEXT COLLATE "C" NOT NULL,
    UNIQUE (image_id, alias)
);
CREATE INDEX aliases_version ON aliases (version_id);

-- What was signed and how it was checked, written in the publish transaction.
CREATE TABLE publish_records (
    version_id       TEXT COLLATE "C" PRIMARY KEY REFERENCES image_versions (id),
    manifest         BYTEA NOT NULL,
    manifest_digest  TEXT COLLATE "C" NOT NULL CHECK (length(manifest_digest) = 71),
    signature        TEXT COLLATE "C",
    signer_key_id    TEXT COLLATE "C",
    signer_key_name  TEXT COLLATE "C",
    verification     TEXT COLLATE "C" NOT NULL
                     CHECK (verification IN ('verified', 'unverified', 'skipped')),
    principal_id     TEXT COLLATE "C",
    published_at     TEXT COLLATE "C" NOT NULL,
    CHECK ((verification = 'verified') = (signer_key_id IS NOT NULL AND signature IS NOT NULL))
);

-- Incus fingerprints, computed from the bytes at publish time.
CREATE TABLE incus_projection (
    artifact_id             TEXT COLLATE "C" PRIMARY KEY REFERENCES release_artifacts (id),
    version_id              TEXT COLLATE "C" NOT NULL REFERENCES image_versions (id),
    metadata_attachment_id  TEXT COLLATE "C" NOT NULL REFERENCES artifact_attachments (id),
    ftype                   TEXT COLLATE "C" NOT NULL
                            CHECK (ftype IN ('squashfs', 'disk-kvm.img', 'root.tar.xz')),
    combined_sha256         TEXT COLLATE "C" NOT NULL CHECK (combined_sha256 ~ '^[0-9a-f]{64}$')
);
CREATE INDEX incus_projection_version ON incus_projection (version_id);
CREATE INDEX incus_projection_fingerprint ON incus_projection (combined_sha256);

CREATE TABLE roles (
    id            TEXT COLLATE "C" PRIMARY KEY,
    display_name  TEXT COLLATE "C" NOT NULL,
    description   TEXT COLLATE "C" NOT NULL
);
CREATE TABLE role_actions (
    role_id  TEXT COLLATE "C" NOT NULL REFERENCES roles (id),
    action   TEXT COLLATE "C" NOT NULL,
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
    id            TEXT COLLATE "C" PRIMARY KEY,
    -- what operators type and what goes in https://NAME:TOKEN@host remotes
    name          TEXT COLLATE "C" NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    kind          TEXT COLLATE "C" NOT NULL CHECK (kind IN ('user', 'service')),
    display_name  TEXT COLLATE "C" NOT NULL CHECK (length(trim(display_name)) > 0),
    attributes    TEXT COLLATE "C" NOT NULL DEFAULT '{}',
    created_at    TEXT COLLATE "C" NOT NULL
);
-- The identity matrix: a principal holds a role on the images matching a
-- scope (an image-name glob such as debian-* or *).
CREATE TABLE grants (
    principal_id  TEXT COLLATE "C" NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    role_id       TEXT COLLATE "C" NOT NULL REFERENCES roles (id),
    scope         TEXT COLLATE "C" NOT NULL CHECK (scope ~ '^[a-z0-9._*?-]{1,128}$'),
    created_at    TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (principal_id, role_id, scope)
);
CREATE TABLE api_tokens (
    id            TEXT COLLATE "C" PRIMARY KEY,
    principal_id  TEXT COLLATE "C" NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    name          TEXT COLLATE "C" NOT NULL,
    -- SHA-256 of the secret part; the secret itself is shown once and never stored
    secret_hash   BYTEA NOT NULL CHECK (octet_length(secret_hash) = 32),
    expires_at    TEXT COLLATE "C",
    last_used_at  TEXT COLLATE "C",
    revoked_at    TEXT COLLATE "C",
    created_at    TEXT COLLATE "C" NOT NULL
);
CREATE INDEX api_tokens_principal ON api_tokens (principal_id);

-- Append-only record of every write and every denied request. The id is the order of
-- appends (GENERATED ALWAYS: no row is written with an id of its own choosing).
CREATE TABLE audit_log (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              TEXT COLLATE "C" NOT NULL,
    principal_id    TEXT COLLATE "C",
    principal_name  TEXT COLLATE "C",
    -- e.g. publish, alias.put, upload.begin, grant.add, key.revoke, denied
    action          TEXT COLLATE "C" NOT NULL,
    target          TEXT COLLATE "C" NOT NULL DEFAULT '',
    outcome         TEXT COLLATE "C" NOT NULL CHECK (outcome IN ('ok', 'denied', 'failed')),
    status          INTEGER,
    method          TEXT COLLATE "C",
    path            TEXT COLLATE "C",
    remote          TEXT COLLATE "C",
    detail          TEXT COLLATE "C" NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_principal ON audit_log (principal_name, at);

-- A published version taken out of service: append-only (SQLite migration 3).
CREATE TABLE retirements (
    version_id      TEXT COLLATE "C" PRIMARY KEY REFERENCES image_versions (id),
    reason          TEXT COLLATE "C" NOT NULL CHECK (length(trim(reason)) BETWEEN 1 AND 1024),
    principal_id    TEXT COLLATE "C",
    principal_name  TEXT COLLATE "C",
    retired_at      TEXT COLLATE "C" NOT NULL
);

-- The retired versions whose bytes garbage collection may reclaim: append-only.
CREATE TABLE collections (
    version_id    TEXT COLLATE "C" PRIMARY KEY REFERENCES retirements (version_id),
    collected_at  TEXT COLLATE "C" NOT NULL
);

-- Short leases on digests a job has stored and is about to cite in a draft.
CREATE TABLE blob_pins (
    digest      TEXT COLLATE "C" NOT NULL CHECK (length(digest) = 71),
    holder      TEXT COLLATE "C" NOT NULL,
    expires_at  TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (digest, holder)
);
CREATE INDEX blob_pins_holder ON blob_pins (holder);

-- The last run of each maintenance job (SQLite migration 4): status, not history.
CREATE TABLE job_runs (
    job              TEXT COLLATE "C" PRIMARY KEY CHECK (length(job) BETWEEN 1 AND 32),
    last_attempt_at  TEXT COLLATE "C" NOT NULL,
    last_outcome     TEXT COLLATE "C" NOT NULL CHECK (last_outcome IN ('success', 'error')),
    last_success_at  TEXT COLLATE "C",
    last_error_at    TEXT COLLATE "C",
    detail           TEXT COLLATE "C" NOT NULL DEFAULT ''
);
