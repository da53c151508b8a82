-- imgsrv catalog schema (SQLite), migration 6: what several instances sharing a catalog
-- must agree on (issue 10), kept in the catalog for both backends (the PostgreSQL twin is
-- migrations/postgres/0004-trusted-keys.sql).
--
-- * trusted_keys: the trusted publisher keys (minisign public keys) and the image globs
--   each may sign for. Managed by operators only (`imgsrv key ... --data DIR`), never
--   through the HTTP API. A key's name, key id and public key never change; its scopes
--   may (`imgsrv key scope`).
-- * key_states: retirements and revocations, keyed by key id, append-only. A key's state
--   is the furthest one recorded (revoked > retired > active), so no change to
--   trusted_keys can make a revoked key active again: a key id with a record is never
--   added again, a revoked key's row is never removed (it stays listed in GET /v1/keys,
--   which is how consumers learn of the revocation), and a revoked key is not retired.
-- * auth_failures: the failed-login throttle's counts per client address, shared by
--   every instance (src/auth.rs has the window and the backoff).
--
-- Keys that an appliance kept as files (DATA/keys/NAME.pub and NAME.toml) are imported
-- when the catalog is next opened (src/sign/files.rs), not by this migration: it does not
-- know the data directory.

CREATE TABLE trusted_keys (
    name        TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
    key_id      TEXT NOT NULL UNIQUE
                CHECK (length(key_id) BETWEEN 1 AND 16 AND key_id NOT GLOB '*[^0-9A-F]*'),
    public_key  TEXT NOT NULL CHECK (length(public_key) BETWEEN 1 AND 4096),
    -- a JSON array of image-name globs
    scopes      TEXT NOT NULL CHECK (json_valid(scopes) AND json_type(scopes) = 'array'),
    added_at    TEXT NOT NULL
);

CREATE TABLE key_states (
    key_id  TEXT NOT NULL CHECK (length(key_id) BETWEEN 1 AND 16 AND key_id NOT GLOB '*[^0-9A-F]*'),
    state   TEXT NOT NULL CHECK (state IN ('retired', 'revoked')),
    -- the key's name when the state was recorded
    name    TEXT NOT NULL,
    at      TEXT NOT NULL,
    PRIMARY KEY (key_id, state)
);

CREATE TABLE auth_failures (
    client    TEXT PRIMARY KEY CHECK (length(client) BETWEEN 1 AND 64),
    failures  INTEGER NOT NULL CHECK (failures >= 1),
    -- milliseconds since 1970 of the last failure
    last_ms   INTEGER NOT NULL
);
CREATE INDEX auth_failures_last ON auth_failures (last_ms);

-- (one trigger, so that the checks come in this order, as in PostgreSQL: a key id with
-- states first; then INSERT OR REPLACE, which deletes the row it replaces without firing
-- the delete guard, must not take a revoked key's name or key id, which PostgreSQL
-- refuses as a unique violation)
CREATE TRIGGER trusted_keys_guard_insert BEFORE INSERT ON trusted_keys
BEGIN
    SELECT RAISE(ABORT, 'precondition: this key was retired or revoked: a key is never trusted again')
    WHERE EXISTS (SELECT 1 FROM key_states WHERE key_id = NEW.key_id);
    SELECT RAISE(ABORT, 'exists: a revoked key stays listed (its name and key id stay taken)')
    WHERE EXISTS (SELECT 1 FROM trusted_keys t JOIN key_states s ON s.key_id = t.key_id
                  WHERE s.state = 'revoked' AND (t.name = NEW.name OR t.key_id = NEW.key_id));
END;
CREATE TRIGGER trusted_keys_identity BEFORE UPDATE OF name, key_id, public_key, added_at
ON trusted_keys
BEGIN
    SELECT RAISE(ABORT, 'immutable: a trusted key''s name, key id and public key never change');
END;
CREATE TRIGGER trusted_keys_guard_delete BEFORE DELETE ON trusted_keys
WHEN EXISTS (SELECT 1 FROM key_states WHERE key_id = OLD.key_id AND state = 'revoked')
BEGIN
    SELECT RAISE(ABORT, 'immutable: a revoked key stays listed');
END;

CREATE TRIGGER key_states_no_replace BEFORE INSERT ON key_states
WHEN EXISTS (SELECT 1 FROM key_states WHERE key_id = NEW.key_id AND state = NEW.state)
BEGIN
    SELECT RAISE(ABORT, 'exists: the key''s state is already recorded');
END;
CREATE TRIGGER key_states_forward BEFORE INSERT ON key_states
WHEN NEW.state = 'retired'
 AND EXISTS (SELECT 1 FROM key_states WHERE key_id = NEW.key_id AND state = 'revoked')
BEGIN
    SELECT RAISE(ABORT, 'precondition: the key is revoked');
END;
CREATE TRIGGER key_states_no_update BEFORE UPDATE ON key_states
BEGIN
    SELECT RAISE(ABORT, 'immutable: key retirements and revocations are append-only');
END;
CREATE TRIGGER key_states_no_delete BEFORE DELETE ON key_states
BEGIN
    SELECT RAISE(ABORT, 'immutable: key retirements and revocations are append-only');
END;
