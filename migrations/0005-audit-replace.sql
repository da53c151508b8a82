-- imgsrv catalog schema (SQLite), migration 5: the audit log's REPLACE hole.
--
-- INSERT OR REPLACE (and REPLACE INTO) with the id of an existing audit row deletes that
-- row without firing the delete guard (recursive_triggers is off by default): from the
-- sqlite3 shell, a row could be rewritten. An insert that would collide with an existing
-- row is refused instead. Triggers only (see src/catalog/migrate.rs).

CREATE TRIGGER audit_log_no_replace BEFORE INSERT ON audit_log
WHEN NEW.id IS NOT NULL AND EXISTS (SELECT 1 FROM audit_log WHERE id = NEW.id)
BEGIN
    SELECT RAISE(ABORT, 'immutable: the audit log is append-only');
END;
