//! The SQLite catalog's audit log: appends, the room check before changes
//! (see `catalog/space.rs`), queries.

use super::super::space;
use super::*;

impl AuditCatalog for SqliteCatalog {
    /// On a full disk the row goes into the free pages kept in reserve.
    fn append_audit(&self, e: &AuditEntry) -> Result<()> {
        let now = now();
        // a plain insert: one row, its own transaction
        let c = self.conn()?;
        c.execute(
                "INSERT INTO audit_log (at, principal_id, principal_name, action, target, outcome, status, method, \
                 path, remote, detail) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)",
                params![
                    now,
                    e.principal_id,
                    e.principal_name,
                    e.action,
                    e.target,
                    e.outcome,
                    e.status,
                    e.method,
                    e.path,
                    e.remote,
                    if e.detail.is_empty() { "{}" } else { e.detail.as_str() }
                ],
            )
            .ctx("audit row")
            .map_err(|e| space::full_disk(&c, space::last_code(&c), e))?;
        Ok(())
    }

    fn room_for_change(&self) -> Result<()> {
        let _one = self.reserve.lock().map_err(backend)?;
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut c = self.conn()?;
        space::room_for_change(&mut c, dir)
    }

    fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let c = self.conn()?;
        let mut sql = String::from(
            "SELECT id, at, principal_id, principal_name, action, target, outcome, status, method, path, remote, detail \
             FROM audit_log WHERE 1 = 1",
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        // every `?` in a condition is the same (numbered) parameter
        let mut push = |cond: &str, v: rusqlite::types::Value| {
            args.push(v);
            sql.push_str(&cond.replace('?', &format!("?{}", args.len())));
        };
        if let Some(p) = &q.principal {
            push(
                " AND (principal_name = ? OR principal_id = ?)",
                p.clone().into(),
            );
        }
        if let Some(a) = &q.action {
            if a.ends_with('.') {
                push(" AND substr(action, 1, length(?)) = ?", a.clone().into());
            } else {
                push(" AND action = ?", a.clone().into());
            }
        }
        if let Some(o) = &q.outcome {
            push(" AND outcome = ?", o.clone().into());
        }
        if let Some(t) = &q.target {
            push(" AND instr(target, ?) > 0", t.clone().into());
        }
        if let Some(t) = &q.since {
            push(" AND at >= ?", t.clone().into());
        }
        if let Some(t) = &q.until {
            push(" AND at < ?", t.clone().into());
        }
        if let Some(id) = q.after_id {
            push(" AND id > ?", id.into());
        }
        sql.push_str(" ORDER BY id");
        if let Some(l) = q.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let mut st = c.prepare(&sql).map_err(backend)?;
        let rows = st
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok(AuditRecord {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    entry: AuditEntry {
                        principal_id: r.get(2)?,
                        principal_name: r.get(3)?,
                        action: r.get(4)?,
                        target: r.get(5)?,
                        outcome: r.get(6)?,
                        status: r.get(7)?,
                        method: r.get(8)?,
                        path: r.get(9)?,
                        remote: r.get(10)?,
                        detail: r.get(11)?,
                    },
                })
            })
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }
}
