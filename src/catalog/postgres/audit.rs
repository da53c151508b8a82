//! The PostgreSQL catalog's audit log: appends (the guards refuse any change or
//! deletion of a row), the room check before changes, queries.

use super::*;

impl AuditCatalog for PgCatalog {
    fn append_audit(&self, e: &AuditEntry) -> Result<()> {
        let now = now();
        let status = e.status.map(i32::from);
        let detail = if e.detail.is_empty() {
            "{}"
        } else {
            e.detail.as_str()
        };
        // one row, its own (autocommit) transaction
        self.conn()?
            .execute(
                "INSERT INTO audit_log (at, principal_id, principal_name, action, target, outcome, status, \
                 method, path, remote, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[
                    &now,
                    &e.principal_id,
                    &e.principal_name,
                    &e.action,
                    &e.target,
                    &e.outcome,
                    &status,
                    &e.method,
                    &e.path,
                    &e.remote,
                    &detail,
                ],
            )
            .ctx("audit row")?;
        Ok(())
    }

    /// PostgreSQL does not say how much room it has left, and keeps no reserve: a
    /// change is let through while the database answers (a full disk then fails the
    /// change itself with [`CatalogError::Full`], and nothing of it is kept). The
    /// database's disk is watched by its operator, not by imgsrv.
    fn room_for_change(&self) -> Result<()> {
        self.conn()?.execute("SELECT 1", &[]).ctx("catalog")?;
        Ok(())
    }

    fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let mut sql = String::from(
            "SELECT id, at, principal_id, principal_name, action, target, outcome, status, method, path, \
             remote, detail FROM audit_log WHERE true",
        );
        let mut args: Vec<Box<dyn ToSql + Sync>> = Vec::new();
        // every `?` in a condition is the same (numbered) parameter
        let mut push = |cond: &str, v: Box<dyn ToSql + Sync>| {
            args.push(v);
            sql.push_str(&cond.replace('?', &format!("${}", args.len())));
        };
        if let Some(p) = &q.principal {
            push(
                " AND (principal_name = ? OR principal_id = ?)",
                Box::new(p.clone()),
            );
        }
        if let Some(a) = &q.action {
            if a.ends_with('.') {
                push(" AND starts_with(action, ?)", Box::new(a.clone()));
            } else {
                push(" AND action = ?", Box::new(a.clone()));
            }
        }
        if let Some(o) = &q.outcome {
            push(" AND outcome = ?", Box::new(o.clone()));
        }
        if let Some(t) = &q.target {
            push(" AND strpos(target, ?) > 0", Box::new(t.clone()));
        }
        if let Some(t) = &q.since {
            push(" AND at >= ?", Box::new(t.clone()));
        }
        if let Some(t) = &q.until {
            push(" AND at < ?", Box::new(t.clone()));
        }
        if let Some(id) = q.after_id {
            push(" AND id > ?", Box::new(id));
        }
        sql.push_str(" ORDER BY id");
        if let Some(l) = q.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|b| b.as_ref()).collect();
        rows(self.conn()?.query(&sql, &params).ctx("audit log")?, |r| {
            let status: Option<i32> = get(r, 7)?;
            Ok(AuditRecord {
                id: get(r, 0)?,
                at: get(r, 1)?,
                entry: AuditEntry {
                    principal_id: get(r, 2)?,
                    principal_name: get(r, 3)?,
                    action: get(r, 4)?,
                    target: get(r, 5)?,
                    outcome: get(r, 6)?,
                    status: status.and_then(|s| u16::try_from(s).ok()),
                    method: get(r, 8)?,
                    path: get(r, 9)?,
                    remote: get(r, 10)?,
                    detail: get(r, 11)?,
                },
            })
        })
    }
}
