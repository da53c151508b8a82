-- imgsrv catalog schema (PostgreSQL), migration 4: the trusted publisher keys, their
-- retirements and revocations, and the failed-login throttle's counts, shared by every
-- instance (issue 10). The same tables, rules and messages as the SQLite migration
-- migrations/0006-trusted-keys.sql (see there for what each table is):
--   * a trusted key's name, key id and public key never change (its scopes may);
--   * key_states (retirements, revocations) is append-only: no UPDATE, DELETE or TRUNCATE;
--   * a key id with a retirement or revocation is never added again, and a revoked key's
--     row is never removed (it stays listed), so a revoked key never becomes active again;
--   * a revoked key is not retired.
--
-- Every statement is idempotent (IF NOT EXISTS, CREATE OR REPLACE): opening a catalog
-- re-runs this file with 0002-guards.sql when one of its guards is missing, disabled or
-- was changed (src/catalog/postgres/migrate.rs). Every guard trigger is ENABLE ALWAYS.

CREATE TABLE IF NOT EXISTS trusted_keys (
    name        TEXT COLLATE "C" PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
    key_id      TEXT COLLATE "C" NOT NULL UNIQUE CHECK (key_id ~ '^[0-9A-F]{1,16}$'),
    public_key  TEXT COLLATE "C" NOT NULL CHECK (length(public_key) BETWEEN 1 AND 4096),
    -- a JSON array of image-name globs
    scopes      TEXT COLLATE "C" NOT NULL CHECK (jsonb_typeof(scopes::jsonb) = 'array'),
    added_at    TEXT COLLATE "C" NOT NULL
);

CREATE TABLE IF NOT EXISTS key_states (
    key_id  TEXT COLLATE "C" NOT NULL CHECK (key_id ~ '^[0-9A-F]{1,16}$'),
    state   TEXT COLLATE "C" NOT NULL CHECK (state IN ('retired', 'revoked')),
    -- the key's name when the state was recorded
    name    TEXT COLLATE "C" NOT NULL,
    at      TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (key_id, state)
);

CREATE TABLE IF NOT EXISTS auth_failures (
    client    TEXT COLLATE "C" PRIMARY KEY CHECK (length(client) BETWEEN 1 AND 64),
    failures  INTEGER NOT NULL CHECK (failures >= 1),
    -- milliseconds since 1970 of the last failure
    last_ms   BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_failures_last ON auth_failures (last_ms);

CREATE OR REPLACE FUNCTION imgsrv_trusted_keys_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- what the key's states say is read under a lock, so that a concurrent
        -- revocation is either seen here or waits for this insert
        PERFORM pg_advisory_xact_lock(hashtext('imgsrv key ' || NEW.key_id));
        IF EXISTS (SELECT 1 FROM key_states WHERE key_id = NEW.key_id) THEN
            RAISE EXCEPTION 'precondition: this key was retired or revoked: a key is never trusted again';
        END IF;
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.name IS DISTINCT FROM OLD.name OR NEW.key_id IS DISTINCT FROM OLD.key_id
           OR NEW.public_key IS DISTINCT FROM OLD.public_key
           OR NEW.added_at IS DISTINCT FROM OLD.added_at THEN
            RAISE EXCEPTION 'immutable: a trusted key''s name, key id and public key never change';
        END IF;
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('imgsrv key ' || OLD.key_id));
    IF EXISTS (SELECT 1 FROM key_states WHERE key_id = OLD.key_id AND state = 'revoked') THEN
        RAISE EXCEPTION 'immutable: a revoked key stays listed';
    END IF;
    RETURN OLD;
END;
$$;
CREATE OR REPLACE TRIGGER trusted_keys_guard BEFORE INSERT OR UPDATE OR DELETE ON trusted_keys
FOR EACH ROW EXECUTE FUNCTION imgsrv_trusted_keys_guard();

CREATE OR REPLACE FUNCTION imgsrv_key_states_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('imgsrv key ' || NEW.key_id));
    IF EXISTS (SELECT 1 FROM key_states WHERE key_id = NEW.key_id AND state = NEW.state) THEN
        RAISE EXCEPTION 'exists: the key''s state is already recorded';
    END IF;
    IF NEW.state = 'retired'
       AND EXISTS (SELECT 1 FROM key_states WHERE key_id = NEW.key_id AND state = 'revoked') THEN
        RAISE EXCEPTION 'precondition: the key is revoked';
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER key_states_guard_insert BEFORE INSERT ON key_states
FOR EACH ROW EXECUTE FUNCTION imgsrv_key_states_insert();
CREATE OR REPLACE TRIGGER key_states_no_change BEFORE UPDATE OR DELETE ON key_states
FOR EACH ROW EXECUTE FUNCTION imgsrv_refuse('immutable: key retirements and revocations are append-only');
CREATE OR REPLACE TRIGGER key_states_no_truncate BEFORE TRUNCATE ON key_states
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: key retirements and revocations are append-only');
-- TRUNCATE would remove a revoked key's row without the row guard
CREATE OR REPLACE TRIGGER trusted_keys_no_truncate BEFORE TRUNCATE ON trusted_keys
FOR EACH STATEMENT EXECUTE FUNCTION imgsrv_refuse('immutable: trusted_keys is not truncated (revoked keys stay listed); remove keys with imgsrv key remove');

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
