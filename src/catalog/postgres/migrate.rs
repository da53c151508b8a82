//! Schema migrations of the PostgreSQL catalog, and the checks and repairs made each
//! time it is opened.
//!
//! * The files in `migrations/postgres/` in order; `schema_migrations` records each one
//!   applied (its number and name). All pending ones are applied in one transaction,
//!   under a transaction-level advisory lock: instances starting at once take turns, and
//!   the second finds the work done.
//! * A database recording a migration this imgsrv does not know (a newer imgsrv's) is
//!   refused, as is one whose record names a migration differently.
//! * The guard files ([`GUARDS`]) are written idempotently: when a guard trigger is
//!   missing, disabled or calls another function, or a guard function was changed, they
//!   are run again (with a warning), which puts every guard back as defined. What a
//!   guard should be is read from those files: the SQL stays the only definition.
//! * The built-in roles and their actions are put back as the schema defines them, and
//!   a missing generation counter is replaced with a value no cache can have seen.

use super::*;
use ::postgres::Client;

/// Migrations in order: (name, SQL); number = index + 1.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001-schema",
        include_str!("../../../migrations/postgres/0001-schema.sql"),
    ),
    (
        "0002-guards",
        include_str!("../../../migrations/postgres/0002-guards.sql"),
    ),
    (
        "0003-isolation",
        include_str!("../../../migrations/postgres/0003-isolation.sql"),
    ),
    (
        "0004-trusted-keys",
        include_str!("../../../migrations/postgres/0004-trusted-keys.sql"),
    ),
    (
        "0005-log",
        include_str!("../../../migrations/postgres/0005-log.sql"),
    ),
];

/// The migrations (by index) that define guards idempotently and are run again to
/// re-arm them (0004 creates its tables IF NOT EXISTS, so it can be run again whole).
const GUARDS: &[usize] = &[1, 3, 4];

/// Second key of the advisory lock migrations take (the first is
/// [`maint::LOCK_NAMESPACE`]); job locks hash their names into other keys.
const MIGRATE_KEY: i32 = 0;

/// Brings the catalog to the current schema and re-arms its guards, in one transaction.
pub(super) fn migrate(c: &mut Client) -> Result<()> {
    let mut tx = c.transaction().ctx("catalog")?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&maint::LOCK_NAMESPACE, &MIGRATE_KEY],
    )
    .ctx("migration lock")?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (\
             version     INTEGER PRIMARY KEY, \
             name        TEXT NOT NULL, \
             applied_at  TEXT NOT NULL)",
    )
    .map_err(|e| schema_error("creating schema_migrations", &e))?;
    let applied = recorded(&mut tx)?;
    if let Some(problem) = version_problem(&applied) {
        return Err(CatalogError::Backend(problem));
    }
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(applied.len()) {
        tx.batch_execute(sql)
            .map_err(|e| schema_error(&format!("migration {name}"), &e))?;
        let version = i32::try_from(i + 1).map_err(backend)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            &[&version, name, &now()],
        )
        .ctx("schema_migrations")?;
        log::info!("catalog: applied PostgreSQL migration {name}");
    }
    let broken = guard_problems(&mut tx)?;
    if !broken.is_empty() {
        log::warn!(
            "catalog: guards re-armed ({}): someone changed the schema by hand",
            broken.join("; ")
        );
        rearm(&mut tx)?;
        let still = guard_problems(&mut tx)?;
        if !still.is_empty() {
            return Err(CatalogError::Backend(format!(
                "the catalog's guards could not be re-armed: {}",
                still.join("; ")
            )));
        }
    }
    repair_roles(&mut tx)?;
    ensure_generation(&mut tx, None)?;
    tx.commit().ctx("catalog")
}

/// A failure to change the schema, with what to do when the role may not.
fn schema_error(what: &str, e: &::postgres::Error) -> CatalogError {
    let hint = match e.as_db_error().map(|d| d.code().code()) {
        Some("42501") => {
            " (the role in postgres_url must own the database: create it with \
             `createdb --owner=ROLE imgsrv`, or ALTER DATABASE imgsrv OWNER TO ROLE)"
        }
        _ => "",
    };
    match map_err_plain(e) {
        Some(unavailable) => unavailable,
        None => backend(format!("{what}: {}{hint}", pool::words(e))),
    }
}

/// [`CatalogError::Unavailable`] when `e` is a lost connection.
fn map_err_plain(e: &::postgres::Error) -> Option<CatalogError> {
    pool::is_connection_error(e).then(|| CatalogError::Unavailable(pool::words(e)))
}

/// (version, name) of the migrations recorded, in order.
fn recorded(c: &mut impl GenericClient) -> Result<Vec<(i32, String)>> {
    rows(
        c.query(
            "SELECT version, name FROM schema_migrations ORDER BY version",
            &[],
        )
        .ctx("schema_migrations")?,
        |r| Ok((get(r, 0)?, get(r, 1)?)),
    )
}

/// What is wrong with the record of applied migrations, if anything.
fn version_problem(applied: &[(i32, String)]) -> Option<String> {
    let known = MIGRATIONS.len();
    if let Some((v, name)) = applied
        .iter()
        .find(|(v, _)| usize::try_from(*v).map_or(true, |v| v > known))
    {
        return Some(format!(
            "catalog schema version {v} ({name}) is newer than this imgsrv supports ({known}); \
             upgrade imgsrv"
        ));
    }
    for (i, (v, name)) in applied.iter().enumerate() {
        let want = i32::try_from(i + 1).unwrap_or(i32::MAX);
        let expected = MIGRATIONS[i].0;
        if *v != want || name != expected {
            return Some(format!(
                "schema_migrations records migration {v} as {name:?}, where this imgsrv has \
                 {want} {expected:?}: the database was not made by imgsrv, or its record was \
                 edited; restore it from a backup"
            ));
        }
    }
    None
}

/// A guard trigger: its table, its name, the function it calls.
struct Trigger {
    table: String,
    name: String,
    function: String,
}

/// The word after `marker` in `s`, from `from` on, and where it ends.
fn word_after(s: &str, marker: &str, from: usize) -> Option<(String, usize)> {
    let at = s[from..].find(marker)? + from + marker.len();
    let rest = &s[at..];
    let rest_trimmed = rest.trim_start();
    let start = at + (rest.len() - rest_trimmed.len());
    let len = rest_trimmed
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest_trimmed.len());
    Some((s[start..start + len].to_string(), start + len))
}

/// The triggers and functions the guard files define: ([`Trigger`]s, (function name,
/// body as PostgreSQL stores it)).
fn guard_definitions() -> (Vec<Trigger>, Vec<(String, String)>) {
    let mut triggers = Vec::new();
    let mut functions = Vec::new();
    for &g in GUARDS {
        let sql = MIGRATIONS[g].1;
        let mut pos = 0;
        while let Some((name, end)) = word_after(sql, "CREATE OR REPLACE TRIGGER ", pos) {
            let (table, t_end) = word_after(sql, " ON ", end).unwrap_or_default();
            let (function, f_end) = word_after(sql, "EXECUTE FUNCTION ", t_end).unwrap_or_default();
            triggers.push(Trigger {
                table,
                name,
                function,
            });
            pos = f_end.max(end);
        }
        let mut pos = 0;
        while let Some((name, end)) = word_after(sql, "CREATE OR REPLACE FUNCTION ", pos) {
            let body_start = sql[end..].find("$$").map(|i| end + i + 2);
            let body_end = body_start.and_then(|s| sql[s..].find("$$").map(|i| s + i));
            if let (Some(s), Some(e)) = (body_start, body_end) {
                functions.push((name, sql[s..e].to_string()));
                pos = e + 2;
            } else {
                pos = end;
            }
        }
    }
    (triggers, functions)
}

/// The guards that are not as the migrations define them.
fn guard_problems(c: &mut impl GenericClient) -> Result<Vec<String>> {
    let (triggers, functions) = guard_definitions();
    let found: std::collections::HashMap<(String, String), (String, String)> = c
        .query(
            "SELECT c.relname::text, t.tgname::text, t.tgenabled::text, p.proname::text \
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE NOT t.tgisinternal AND n.nspname = current_schema()",
            &[],
        )
        .ctx("triggers")?
        .iter()
        .map(|r| Ok(((get(r, 0)?, get(r, 1)?), (get(r, 2)?, get(r, 3)?))))
        .collect::<Result<_>>()?;
    let bodies: std::collections::HashMap<String, String> = c
        .query(
            "SELECT p.proname::text, p.prosrc FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = current_schema()",
            &[],
        )
        .ctx("functions")?
        .iter()
        .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
        .collect::<Result<_>>()?;
    let mut problems = Vec::new();
    for t in &triggers {
        match found.get(&(t.table.clone(), t.name.clone())) {
            None => problems.push(format!("trigger {} on {} is missing", t.name, t.table)),
            Some((enabled, _)) if enabled == "D" => {
                problems.push(format!("trigger {} on {} is disabled", t.name, t.table))
            }
            Some((enabled, _)) if enabled != "A" => problems.push(format!(
                "trigger {} on {} is not ENABLE ALWAYS (a replication session would skip it)",
                t.name, t.table
            )),
            Some((_, function)) if *function != t.function => problems.push(format!(
                "trigger {} on {} calls {function}, not {}",
                t.name, t.table, t.function
            )),
            Some(_) => {}
        }
    }
    for (name, body) in &functions {
        match bodies.get(name) {
            None => problems.push(format!("function {name} is missing")),
            Some(b) if b != body => problems.push(format!("function {name} was changed")),
            Some(_) => {}
        }
    }
    Ok(problems)
}

/// Runs the guard files again and enables every guard trigger, always.
fn rearm(tx: &mut impl GenericClient) -> Result<()> {
    for &g in GUARDS {
        let (name, sql) = MIGRATIONS[g];
        tx.batch_execute(sql).map_err(|e| {
            backend(format!(
                "re-arming the guards of {name}: {}",
                pool::words(&e)
            ))
        })?;
    }
    for t in guard_definitions().0 {
        tx.batch_execute(&format!(
            "ALTER TABLE \"{}\" ENABLE ALWAYS TRIGGER \"{}\"",
            t.table, t.name
        ))
        .map_err(|e| backend(format!("enabling trigger {}: {}", t.name, pool::words(&e))))?;
    }
    Ok(())
}

/// What [`MaintCatalog::check_integrity`] reports: the migrations, the tables, the
/// guards and the generation counter.
pub(super) fn problems(c: &mut impl GenericClient) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let applied = recorded(c)?;
    if let Some(p) = version_problem(&applied) {
        out.push(p);
    } else if applied.len() < MIGRATIONS.len() {
        out.push(format!(
            "schema version {} of {}: migrations pending",
            applied.len(),
            MIGRATIONS.len()
        ));
    }
    let tables: Vec<String> = rows(
        c.query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname = current_schema()",
            &[],
        )
        .ctx("tables")?,
        |r| get(r, 0),
    )?;
    for (_, schema) in MIGRATIONS {
        let mut pos = 0;
        while let Some((mut table, mut end)) = word_after(schema, "CREATE TABLE ", pos) {
            if table == "IF" {
                (table, end) = word_after(schema, "NOT EXISTS ", end).unwrap_or_default();
            }
            if !table.is_empty() && !tables.contains(&table) {
                out.push(format!("table {table} is missing"));
            }
            pos = end.max(pos + 1);
        }
    }
    out.extend(guard_problems(c)?);
    let n: i64 = get(
        &c.query_one("SELECT count(*) FROM catalog_state", &[])
            .ctx("catalog_state")?,
        0,
    )?;
    if n != 1 {
        out.push(format!("catalog_state holds {n} rows, not 1"));
    }
    Ok(out)
}

/// The built-in roles and their actions, exactly as migration 1 defines them.
fn repair_roles(tx: &mut impl GenericClient) -> Result<()> {
    let mut roles: Vec<(String, String, String)> = Vec::new();
    let mut actions: Vec<(String, String)> = Vec::new();
    for line in MIGRATIONS[0].1.lines() {
        let vals = |prefix: &str| -> Option<Vec<String>> {
            let inner = line.strip_prefix(prefix)?.strip_suffix(");")?;
            Some(
                inner
                    .split("', '")
                    .map(|s| s.trim_matches('\'').replace("''", "'"))
                    .collect(),
            )
        };
        if let Some(v) = vals("INSERT INTO roles VALUES (") {
            if let [id, name, desc] = v.as_slice() {
                roles.push((id.clone(), name.clone(), desc.clone()));
            }
        } else if let Some(v) = vals("INSERT INTO role_actions VALUES (") {
            if let [id, action] = v.as_slice() {
                actions.push((id.clone(), action.clone()));
            }
        }
    }
    for (id, name, description) in &roles {
        let mut changed = tx
            .execute(
                "INSERT INTO roles (id, display_name, description) VALUES ($1, $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET display_name = excluded.display_name, \
                 description = excluded.description \
                 WHERE roles.display_name IS DISTINCT FROM excluded.display_name \
                    OR roles.description IS DISTINCT FROM excluded.description",
                &[id, name, description],
            )
            .ctx("roles")?;
        let mine: Vec<String> = actions
            .iter()
            .filter(|(r, _)| r == id)
            .map(|(_, a)| a.clone())
            .collect();
        changed += tx
            .execute(
                "DELETE FROM role_actions WHERE role_id = $1 AND NOT (action = ANY($2))",
                &[id, &mine],
            )
            .ctx("role actions")?;
        for action in &mine {
            changed += tx
                .execute(
                    "INSERT INTO role_actions (role_id, action) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[id, action],
                )
                .ctx("role actions")?;
        }
        if changed > 0 {
            log::warn!("catalog: built-in role {id} was missing or changed; made again");
        }
    }
    Ok(())
}

/// The generation counter, replaced when it is missing or not above `above` (a value
/// a cache has seen): the new value is one no cache can have seen, always forward of
/// the old one, which the guards allow.
pub(super) fn ensure_generation(tx: &mut impl GenericClient, above: Option<i64>) -> Result<i64> {
    let current: Option<i64> = tx
        .query_opt(
            "SELECT generation FROM catalog_state WHERE id = 1 FOR UPDATE",
            &[],
        )
        .ctx("generation")?
        .map(|r| get(&r, 0))
        .transpose()?;
    if let Some(g) = current.filter(|g| above.is_none_or(|a| *g > a)) {
        return Ok(g);
    }
    let fresh =
        crate::catalog::migrate::fresh_generation(above.unwrap_or(0).max(current.unwrap_or(0)));
    match current {
        Some(_) => tx.execute(
            "UPDATE catalog_state SET generation = $1 WHERE id = 1",
            &[&fresh],
        ),
        None => tx.execute(
            "INSERT INTO catalog_state (id, generation) VALUES (1, $1)",
            &[&fresh],
        ),
    }
    .ctx("generation")?;
    log::warn!(
        "catalog: the generation counter was {} (a cache had seen {}); set to {fresh}",
        current.map_or("missing".to_string(), |g| g.to_string()),
        above.map_or("nothing".to_string(), |a| a.to_string())
    );
    Ok(fresh)
}
