-- imgsrv catalog schema (PostgreSQL), migration 3: SERIALIZABLE by default for every
-- session on this database.
--
-- imgsrv makes each change in a SERIALIZABLE transaction (src/catalog/postgres/mod.rs):
-- the outcome is that of the changes made one after the other, which is what the guards
-- of 0002-guards.sql rely on when two changes race (a publish reading the draft it signs
-- while an artifact is added to it; a blob row deleted while a version being published
-- cites it). PostgreSQL checks that only between SERIALIZABLE transactions, so another
-- client (psql) gets it too, unless it asks for a lower level itself. imgsrv's own
-- connections set their default back to READ COMMITTED and choose per transaction.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation = %L',
                   current_database(), 'serializable');
END;
$$;
