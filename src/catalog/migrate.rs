//! Schema migrations, and the repairs made each time a catalog is opened.
//!
//! The sqlite3 shell can change more than the triggers guard: `PRAGMA
//! user_version`, the built-in roles, the generation counter of a catalog
//! migrated before its guards existed, the audit log's AUTOINCREMENT
//! sequence, even drop a trigger. None of that may stop a server from
//! starting or from serving what was published, so opening a catalog:
//!
//! * reads which migrations it has from its tables, with `user_version` only
//!   as the tie-breaker (a forgotten or absurd `user_version` is corrected,
//!   not trusted; a schema from a newer imgsrv, with objects this one does
//!   not know, is still refused);
//! * re-creates the triggers and indexes of the current schema that are
//!   missing or were changed (they hold no data);
//! * re-creates the built-in roles and their actions as the schema defines
//!   them;
//! * replaces a missing or unreadable generation counter with a value no
//!   Simple Streams cache can have seen;
//! * sets the audit log's sequence back to its last row when it was moved.
//!
//! What the migrations create is learnt by applying them to an empty
//! in-memory database once per process: the SQL files stay the only
//! definition.

use super::{CatalogError, Result};
use rusqlite::{params, Connection, Transaction, TransactionBehavior};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// Migrations in order; index + 1 is the `user_version` after applying it.
/// A migration that changes no table must consist of triggers and indexes
/// only: when `user_version` cannot be trusted, such a migration is told
/// applied or not by its objects alone.
const MIGRATIONS: &[&str] = &[
    include_str!("../../schema.sql"),
    include_str!("../../migrations/0002-guards.sql"),
    include_str!("../../migrations/0003-lifecycle.sql"),
    include_str!("../../migrations/0004-job-runs.sql"),
    include_str!("../../migrations/0005-audit-replace.sql"),
    include_str!("../../migrations/0006-trusted-keys.sql"),
    include_str!("../../migrations/0007-log.sql"),
];

/// Largest generation value the guards accept (2^53): far below overflow.
const GENERATION_MAX: i64 = 1 << 53;

/// (type, name) -> sql of the schema objects that are not SQLite's own.
type Objects = BTreeMap<(String, String), String>;

/// What the migrations make, from an empty database.
struct Reference {
    /// The objects after 0, 1, ... migrations.
    steps: Vec<Objects>,
    /// The built-in roles and their actions.
    roles: Vec<super::Role>,
}

fn backend(e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Backend(e.to_string())
}

/// The schema's objects; a table by its columns (name, type, NOT NULL,
/// default, key), so that a comment or a line break in its CREATE statement
/// does not make it another table; a trigger or index by its SQL.
fn objects(c: &Connection) -> Result<Objects> {
    let mut st = c
        .prepare(
            "SELECT m.type, m.name, CASE m.type WHEN 'table' THEN \
                 (SELECT group_concat(c.name || ' ' || c.type || ' ' || c.\"notnull\" || ' ' \
                                      || coalesce(c.dflt_value, '-') || ' ' || c.pk, ', ' ORDER BY c.cid) \
                  FROM pragma_table_info(m.name) c) \
             ELSE m.sql END \
             FROM sqlite_master m \
             WHERE m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND m.sql IS NOT NULL",
        )
        .map_err(backend)?;
    let rows = st
        .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))
        .map_err(backend)?;
    rows.collect::<rusqlite::Result<_>>().map_err(backend)
}

fn tables(all: &Objects) -> Objects {
    all.iter()
        .filter(|((kind, _), _)| kind == "table")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn build_reference() -> Result<Reference> {
    let c = Connection::open_in_memory().map_err(backend)?;
    let mut steps = vec![Objects::new()];
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        c.execute_batch(sql)
            .map_err(|e| backend(format!("built-in migration {}: {e}", i + 1)))?;
        steps.push(objects(&c)?);
    }
    let roles = super::sqlite::read_roles(&c)?;
    Ok(Reference { steps, roles })
}

fn reference() -> Result<&'static Reference> {
    static REFERENCE: OnceLock<std::result::Result<Reference, String>> = OnceLock::new();
    REFERENCE
        .get_or_init(|| build_reference().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| CatalogError::Backend(e.clone()))
}

/// Brings the catalog on `conn` to the current schema and repairs what the
/// sqlite3 shell may have broken, in one exclusive transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let reference = reference()?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Exclusive)
        .map_err(backend)?;
    let recorded: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(backend)?;
    let applied = applied(reference, &objects(&tx)?, recorded)?;
    let target = MIGRATIONS.len();
    if usize::try_from(recorded) != Ok(applied) {
        log::warn!(
            "catalog: PRAGMA user_version was {recorded} but the tables are those of migration \
             {applied}; going on from there"
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(sql)
            .map_err(|e| CatalogError::Backend(format!("migration {}: {e}", i + 1)))?;
    }
    rearm(&tx, reference)?;
    if recorded != target as i64 {
        tx.execute_batch(&format!("PRAGMA user_version = {target}"))
            .map_err(backend)?;
    }
    repair_roles(&tx, reference)?;
    ensure_generation(&tx, None)?;
    repair_audit_sequence(&tx)?;
    tx.commit().map_err(backend)
}

impl Reference {
    fn all(&self) -> &Objects {
        self.steps.last().expect("step 0 is always there")
    }
}

/// How many migrations the catalog has, from its tables: `recorded` when
/// they agree with it (and no object of a later migration is there), else
/// the most whose tables are exactly these (the triggers and indexes of a
/// migration that changed no table are then made by [`rearm`]).
fn applied(reference: &Reference, found: &Objects, recorded: i64) -> Result<usize> {
    let target = MIGRATIONS.len();
    let have = tables(found);
    let fits: Vec<usize> = (0..=target)
        .filter(|k| tables(&reference.steps[*k]) == have)
        .collect();
    if let Some(n) = usize::try_from(recorded).ok().filter(|n| fits.contains(n)) {
        let later = reference
            .all()
            .keys()
            .any(|k| found.contains_key(k) && !reference.steps[n].contains_key(k));
        if !later {
            return Ok(n);
        }
    }
    let unknown: Vec<&str> = found
        .keys()
        .filter(|k| !reference.all().contains_key(*k))
        .map(|(_, name)| name.as_str())
        .collect();
    let newer = recorded > target as i64 && !unknown.is_empty();
    match fits.last() {
        Some(n) if !newer => Ok(*n),
        _ if recorded > target as i64 => Err(CatalogError::Backend(format!(
            "catalog schema version {recorded} is newer than this imgsrv supports ({target}); \
             upgrade imgsrv"
        ))),
        _ => {
            let want = tables(reference.all());
            let missing: Vec<&str> = want
                .iter()
                .filter(|(k, sql)| have.get(*k) != Some(*sql))
                .map(|((_, name), _)| name.as_str())
                .collect();
            Err(CatalogError::Backend(format!(
                "the catalog's tables are not those of any imgsrv schema (PRAGMA user_version \
                 {recorded}; missing or changed: {}; unknown objects: {}): restore catalog.db \
                 from a backup",
                missing.join(", "),
                unknown.join(", ")
            )))
        }
    }
}

/// Re-creates the triggers and indexes of the current schema that are
/// missing or differ from it (someone dropped or rewrote a guard).
fn rearm(tx: &Transaction, reference: &Reference) -> Result<()> {
    let found = objects(tx)?;
    for ((kind, name), sql) in reference.all() {
        if kind == "table" || found.get(&(kind.clone(), name.clone())) == Some(sql) {
            continue;
        }
        log::warn!("catalog: {kind} {name} was missing or changed; made again");
        if found.contains_key(&(kind.clone(), name.clone())) {
            tx.execute_batch(&format!("DROP {kind} \"{name}\""))
                .map_err(backend)?;
        }
        tx.execute_batch(sql)
            .map_err(|e| backend(format!("re-creating {kind} {name}: {e}")))?;
    }
    Ok(())
}

/// The built-in roles and their actions, exactly as the schema defines them.
fn repair_roles(tx: &Transaction, reference: &Reference) -> Result<()> {
    for super::Role {
        id,
        display_name: name,
        description,
        actions,
    } in &reference.roles
    {
        let mut changed = tx
            .execute(
                "INSERT INTO roles (id, display_name, description) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (id) DO UPDATE SET display_name = excluded.display_name, \
                 description = excluded.description \
                 WHERE display_name IS NOT excluded.display_name \
                    OR description IS NOT excluded.description",
                params![id, name, description],
            )
            .map_err(backend)?;
        let list = serde_json::to_string(actions).map_err(backend)?;
        changed += tx
            .execute(
                "DELETE FROM role_actions WHERE role_id = ?1 \
                 AND NOT (typeof(action) = 'text' AND action IN (SELECT value FROM json_each(?2)))",
                params![id, list],
            )
            .map_err(backend)?;
        for action in actions {
            changed += tx
                .execute(
                    "INSERT INTO role_actions (role_id, action) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    params![id, action],
                )
                .map_err(backend)?;
        }
        if changed > 0 {
            log::warn!("catalog: built-in role {id} was missing or changed; made again");
        }
    }
    Ok(())
}

/// A generation counter that can be trusted: a non-negative integer no
/// larger than the guards allow.
pub(super) fn usable_generation(v: rusqlite::types::ValueRef<'_>) -> Option<i64> {
    match v {
        rusqlite::types::ValueRef::Integer(g) if (0..=GENERATION_MAX).contains(&g) => Some(g),
        _ => None,
    }
}

/// A generation no cache can have seen: microseconds since 1970, far above
/// what counting publications reaches (and below [`GENERATION_MAX`] until
/// the 23rd century).
pub(super) fn fresh_generation(above: i64) -> i64 {
    let now = chrono::Utc::now().timestamp_micros();
    now.max(above.saturating_add(1)).clamp(1, GENERATION_MAX)
}

/// The generation counter, replaced when it is missing, unreadable (a
/// catalog tampered with before the guards of migration 2 existed) or not
/// above `above` (a value a cache has seen, when the counter went back):
/// the new value is then one no cache can have seen, and always forward
/// of the old one, which the guards allow.
pub(super) fn ensure_generation(tx: &Connection, above: Option<i64>) -> Result<i64> {
    let row: Option<Option<i64>> = tx
        .query_row(
            "SELECT generation FROM catalog_state WHERE id = 1",
            [],
            |r| Ok(usable_generation(r.get_ref(0)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(backend(e)),
        })?;
    let current = row.flatten();
    if let Some(g) = current.filter(|g| above.is_none_or(|a| *g > a)) {
        return Ok(g);
    }
    let fresh = fresh_generation(above.unwrap_or(0).max(current.unwrap_or(0)));
    match row {
        Some(_) => tx.execute(
            "UPDATE catalog_state SET generation = ?1 WHERE id = 1",
            [fresh],
        ),
        None => tx.execute(
            "INSERT INTO catalog_state (id, generation) VALUES (1, ?1)",
            [fresh],
        ),
    }
    .map_err(backend)?;
    log::warn!(
        "catalog: the generation counter was {} (a cache had seen {}); set to {fresh}",
        current.map_or("missing or unreadable".to_string(), |g| g.to_string()),
        above.map_or("nothing".to_string(), |a| a.to_string())
    );
    Ok(fresh)
}

/// The audit log's AUTOINCREMENT sequence back on its last row: its rows
/// are never deleted, so anything else was written by hand (and a sequence
/// at the largest integer would refuse every new row).
fn repair_audit_sequence(tx: &Transaction) -> Result<()> {
    let n = tx
        .execute(
            "UPDATE sqlite_sequence SET seq = (SELECT coalesce(max(id), 0) FROM audit_log) \
             WHERE name = 'audit_log' AND seq IS NOT (SELECT coalesce(max(id), 0) FROM audit_log)",
            [],
        )
        .map_err(backend)?;
    if n > 0 {
        log::warn!("catalog: the audit log's sequence had been changed; set back to its last row");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> Connection {
        let mut c = Connection::open(path).unwrap();
        migrate(&mut c).unwrap();
        c
    }

    fn version(c: &Connection) -> i64 {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn user_version_is_read_from_the_schema_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.db");
        let c = open(&p);
        let target = MIGRATIONS.len() as i64;
        assert_eq!(version(&c), target);
        for tampered in [0, -1, 1, target + 7] {
            c.execute_batch(&format!("PRAGMA user_version = {tampered}"))
                .unwrap();
            let c = open(&p);
            assert_eq!(version(&c), target, "after user_version = {tampered}");
        }
        // a newer imgsrv's schema: objects this one does not know
        c.execute_batch(&format!(
            "CREATE TABLE from_the_future (x); PRAGMA user_version = {}",
            target + 1
        ))
        .unwrap();
        let mut again = Connection::open(&p).unwrap();
        let e = migrate(&mut again).unwrap_err().to_string();
        assert!(
            e.contains("newer than this imgsrv") && e.contains("upgrade"),
            "{e}"
        );
        // a catalog that lost a table is not "migrated" over
        c.execute_batch(
            "DROP TABLE from_the_future; DROP TABLE upload_parts; PRAGMA user_version = 2",
        )
        .unwrap();
        let e = migrate(&mut again).unwrap_err().to_string();
        assert!(e.contains("upload_parts") && e.contains("backup"), "{e}");
    }

    #[test]
    fn a_comment_in_a_create_table_does_not_make_another_schema() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.db");
        let c = Connection::open(&p).unwrap();
        let edited = MIGRATIONS[0].replace("CREATE TABLE images (", "CREATE TABLE images ( -- x\n");
        assert_ne!(edited, MIGRATIONS[0]);
        c.execute_batch(&edited).unwrap();
        c.execute_batch("PRAGMA user_version = 1").unwrap();
        drop(c);
        assert_eq!(version(&open(&p)), MIGRATIONS.len() as i64);
    }

    #[test]
    fn dropped_guards_and_roles_are_made_again() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.db");
        let c = open(&p);
        c.execute_batch(
            "PRAGMA foreign_keys = OFF; \
             DROP TRIGGER audit_log_no_delete; DROP TRIGGER catalog_state_no_delete; \
             DROP TRIGGER images_guard_delete; \
             CREATE TRIGGER images_guard_delete BEFORE DELETE ON images BEGIN SELECT 1; END; \
             DELETE FROM roles; DELETE FROM role_actions; \
             INSERT INTO role_actions VALUES ('reader', 'auth.manage'); \
             DELETE FROM catalog_state; \
             INSERT INTO audit_log (at, action, outcome) VALUES ('t', 'x', 'ok'); \
             UPDATE sqlite_sequence SET seq = 9223372036854775807;",
        )
        .unwrap();
        let c = open(&p);
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN \
                 ('audit_log_no_delete', 'catalog_state_no_delete') \
                 OR (name = 'images_guard_delete' AND sql LIKE '%RAISE%')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 3);
        let actions: Vec<String> = c
            .prepare("SELECT role_id || ':' || action FROM role_actions ORDER BY 1")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            actions,
            [
                "auth-manager:auth.manage",
                "content-writer:content.read",
                "content-writer:content.write",
                "reader:content.read"
            ]
        );
        let roles: i64 = c
            .query_row("SELECT count(*) FROM roles", [], |r| r.get(0))
            .unwrap();
        assert_eq!(roles, 3);
        let g: i64 = c
            .query_row("SELECT generation FROM catalog_state", [], |r| r.get(0))
            .unwrap();
        assert!(
            g > 1_000_000_000_000_000,
            "{g}: not a value a cache has seen"
        );
        // the audit log takes rows again
        c.execute(
            "INSERT INTO audit_log (at, action, outcome) VALUES ('t', 'y', 'ok')",
            [],
        )
        .unwrap();
    }

    #[test]
    fn the_counter_only_moves_forward_and_replace_cannot_delete_guarded_rows() {
        let d = tempfile::tempdir().unwrap();
        let c = open(&d.path().join("c.db"));
        let refused = |sql: &str| {
            let e = c.execute_batch(sql).expect_err(sql).to_string();
            assert!(
                e.contains("immutable") || e.contains("exists"),
                "{sql}: {e}"
            );
        };
        c.execute_batch("UPDATE catalog_state SET generation = 5")
            .unwrap();
        for sql in [
            "UPDATE catalog_state SET generation = 4",
            "UPDATE catalog_state SET generation = NULL",
            "UPDATE catalog_state SET generation = 'x'",
            "UPDATE catalog_state SET generation = 5.5",
            "UPDATE catalog_state SET generation = 9223372036854775807",
            "DELETE FROM catalog_state",
            "INSERT OR REPLACE INTO catalog_state VALUES (1, 0)",
        ] {
            refused(sql);
        }
        let h = "a".repeat(64);
        c.execute_batch(&format!(
            "INSERT INTO images VALUES ('i1', 'img', NULL, NULL, 'public', 't', 't');
             INSERT INTO images VALUES ('i2', 'other', NULL, NULL, 'public', 't', 't');
             INSERT INTO image_versions VALUES ('v1', 'i1', '1', 'draft', NULL, 't', 't');
             INSERT INTO image_versions VALUES ('v2', 'i2', '1', 'draft', NULL, 't', 't');
             INSERT INTO cas_blobs VALUES ('sha256:{h}', 4, 'sha256/aa/aa/{h}', NULL, 't', 't');
             INSERT INTO release_artifacts VALUES ('a1', 'v1', 'default', 'debian', 'x86_64',
                 'squashfs', 'sha256:{h}', 4, 'x', 't', 't');
             INSERT INTO release_artifacts VALUES ('a2', 'v2', 'default', 'debian', 'x86_64',
                 'squashfs', 'sha256:{h}', 4, 'x', 't', 't');
             INSERT INTO artifact_attachments VALUES ('t1', 'a1', 'm', 'x', 'sha256:{h}', 4, 't', 't');
             INSERT INTO artifact_attachments VALUES ('t2', 'a2', 'm', 'x', 'sha256:{h}', 4, 't', 't');
             UPDATE image_versions SET state = 'publishing' WHERE id = 'v1';
             INSERT INTO publish_records VALUES ('v1', X'00', 'sha256:{h}', NULL, NULL, NULL,
                 'skipped', NULL, 't');
             UPDATE image_versions SET state = 'published', published_at = 't' WHERE id = 'v1';"
        ))
        .unwrap();
        for sql in [
            "INSERT OR REPLACE INTO image_versions VALUES ('v1', 'i1', '1', 'draft', NULL, 't', 't')"
                .to_string(),
            "REPLACE INTO image_versions VALUES ('v9', 'i1', '1', 'draft', NULL, 't', 't')".into(),
            "INSERT OR REPLACE INTO images VALUES ('i1', 'new', NULL, NULL, 'public', 't', 't')"
                .into(),
            "INSERT OR REPLACE INTO images VALUES ('i9', 'img', NULL, NULL, 'public', 't', 't')"
                .into(),
            "UPDATE OR REPLACE images SET name = 'img' WHERE id = 'i2'".into(),
            "UPDATE OR REPLACE release_artifacts SET id = 'a1' WHERE id = 'a2'".into(),
            "INSERT OR REPLACE INTO release_artifacts VALUES ('a1', 'v2', 'default', 'debian', \
             'x86_64', 'qcow2', 'x', 4, 'x', 't', 't')"
                .into(),
            "UPDATE OR REPLACE artifact_attachments SET id = 't1' WHERE id = 't2'".into(),
            "INSERT OR REPLACE INTO artifact_attachments VALUES ('t1', 'a2', 'n', 'x', 'x', 4, 't', 't')"
                .into(),
            format!(
                "INSERT OR REPLACE INTO cas_blobs VALUES ('sha256:{h}', 1, 'sha256/aa/aa/{h}', NULL, 't', 't')"
            ),
        ] {
            refused(&sql);
        }
        let state: String = c
            .query_row(
                "SELECT v.state || i.name || a.id || t.id FROM image_versions v \
                 JOIN images i ON i.id = v.image_id JOIN release_artifacts a ON a.version_id = v.id \
                 JOIN artifact_attachments t ON t.artifact_id = a.id WHERE v.id = 'v1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(state, "publishedimga1t1");
        // drafts stay writable, and a counter can still move forward
        c.execute_batch(
            "UPDATE OR REPLACE images SET name = 'renamed' WHERE id = 'i2'; \
             UPDATE catalog_state SET generation = generation + 1",
        )
        .unwrap();
    }
}
