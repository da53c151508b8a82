//! The PostgreSQL catalog's side of the maintenance jobs and of operations: job locks
//! (advisory locks, shared by every instance on the database), blob rows and their
//! claims, pins, expired upload sessions, integrity checks, blob totals (metrics), the
//! write probe (`/readyz`), the listings a scrub checks the store against.

use super::*;
use std::sync::{Arc, Mutex};

/// The claims on blobs, as (digest, kind, id, state, collected, expires_at, at);
/// `{cond}` is replaced by a condition on each part's digest column.
const CLAIMS: &str = "\
    SELECT a.primary_blob_digest, 'v', v.id, v.state, \
           EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id), NULL::text, a.created_at \
      FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id \
     WHERE {cond:a.primary_blob_digest} \
    UNION ALL \
    SELECT t.blob_digest, 'v', v.id, v.state, \
           EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id), NULL::text, t.created_at \
      FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id \
      JOIN image_versions v ON v.id = a.version_id \
     WHERE {cond:t.blob_digest} \
    UNION ALL \
    SELECT expected_digest, 'u', id, state, false, expires_at, updated_at FROM upload_sessions \
     WHERE {cond:expected_digest} \
    UNION ALL \
    SELECT digest, 'p', holder, NULL::text, false, expires_at, NULL::text FROM blob_pins \
     WHERE {cond:digest}";

fn claims_sql(one: bool) -> String {
    let mut sql = CLAIMS.to_string();
    for col in [
        "a.primary_blob_digest",
        "t.blob_digest",
        "expected_digest",
        "digest",
    ] {
        let cond = if one {
            format!("{col} = $1")
        } else {
            "true".to_string()
        };
        sql = sql.replace(&format!("{{cond:{col}}}"), &cond);
    }
    sql
}

/// Reads claims; a row whose digest does not parse cites no stored blob and is
/// skipped. A state that does not parse keeps the blob (a draft's claim; an upload
/// that counts as live).
fn read_claims(
    c: &mut impl GenericClient,
    digest: Option<&Digest>,
) -> Result<Vec<(Digest, Claim)>> {
    let sql = claims_sql(digest.is_some());
    let found = match digest {
        Some(d) => c.query(&sql, &[&d.to_string()]),
        None => c.query(&sql, &[]),
    }
    .ctx("blob claims")?;
    let mut out = Vec::new();
    for r in &found {
        let Some(d) = get::<Option<String>>(r, 0)?.and_then(|s| s.parse::<Digest>().ok()) else {
            continue;
        };
        let kind: String = get(r, 1)?;
        let id: String = get(r, 2)?;
        let state = get::<Option<String>>(r, 3)?.unwrap_or_default();
        let expires_at = get::<Option<String>>(r, 5)?.unwrap_or_default();
        let at = get::<Option<String>>(r, 6)?.unwrap_or_default();
        let claim = match kind.as_str() {
            "v" => Claim::Version {
                version_id: id,
                state: VersionState::parse(&state).unwrap_or(VersionState::Draft),
                collected: get(r, 4)?,
                cited_at: at,
            },
            "u" => Claim::Upload {
                id,
                state: UploadState::parse(&state).unwrap_or(UploadState::Uploading),
                expires_at,
                updated_at: at,
            },
            _ => Claim::Pin {
                holder: id,
                expires_at,
            },
        };
        out.push((d, claim));
    }
    Ok(out)
}

/// Blob rows read per query by [`MaintCatalog::each_blob`].
const BLOB_PAGE: i64 = 512;

/// First key of every imgsrv advisory lock (`imgs`); the second is a hash of the name.
pub(super) const LOCK_NAMESPACE: i32 = 0x696d_6773;

/// The advisory lock key of job lock `job`.
fn lock_key(job: &str) -> i32 {
    let d = Digest::of(format!("imgsrv job lock {job}").as_bytes());
    let b = d.as_bytes();
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A job lock: its connection, on which the advisory lock is held. Dropping it
/// releases the lock (`pg_advisory_unlock_all`) and gives the connection back; if that
/// fails the connection is closed, which releases the lock too.
struct PgJobLock {
    client: Mutex<Option<::postgres::Client>>,
    pool: Arc<pool::Pool>,
    job: String,
    key: i32,
}

impl super::super::HeldLock for PgJobLock {
    /// Asks the lock's own session whether it still holds the lock. A session that
    /// ended (a restart, `pg_terminate_backend`) fails the question: its lock went
    /// with it, and a new session can never inherit it, so an answer of yes means
    /// the lock was held without a break since it was granted.
    fn check(&self) -> Result<()> {
        let lost = |why: String| {
            CatalogError::Unavailable(format!(
                "the job lock {} was lost ({why}): the database ended the session that \
                 held it (a restart?), so another process may have taken it since",
                self.job
            ))
        };
        let mut guard = self
            .client
            .lock()
            .map_err(|_| CatalogError::Backend("a job lock's mutex was poisoned".into()))?;
        let Some(client) = guard.as_mut() else {
            return Err(lost("released".into()));
        };
        // objsubid 2: the two-key form of the advisory lock functions
        let held: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                 AND pid = pg_backend_pid() AND granted AND classid = $1::int::oid \
                 AND objid = $2::int::oid AND objsubid = 2)",
                &[&LOCK_NAMESPACE, &self.key],
            )
            .and_then(|r| r.try_get(0))
            .map_err(|e| lost(e.to_string()))?;
        if held {
            Ok(())
        } else {
            Err(lost("its session no longer holds it".into()))
        }
    }
}

impl Drop for PgJobLock {
    fn drop(&mut self) {
        let client = match self.client.get_mut() {
            Ok(c) => c.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(mut c) = client {
            if c.execute("SELECT pg_advisory_unlock_all()", &[]).is_ok() {
                self.pool.return_lock_connection(c);
            }
        }
    }
}

impl MaintCatalog for PgCatalog {
    fn cited_blobs(&self) -> Result<Vec<CitedBlob>> {
        rows(
            self.conn()?
                .query(
                    "SELECT i.name, v.version, v.id, v.state = 'published', \
                            a.variant || ' ' || a.architecture || ' ' || a.format, NULL::text, \
                            a.primary_blob_digest, a.primary_blob_size_bytes \
                     FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id \
                     JOIN images i ON i.id = v.image_id \
                     WHERE NOT EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id) \
                     UNION ALL \
                     SELECT i.name, v.version, v.id, v.state = 'published', \
                            a.variant || ' ' || a.architecture || ' ' || a.format, t.name, \
                            t.blob_digest, t.blob_size_bytes \
                     FROM artifact_attachments t JOIN release_artifacts a ON a.id = t.artifact_id \
                     JOIN image_versions v ON v.id = a.version_id JOIN images i ON i.id = v.image_id \
                     WHERE NOT EXISTS (SELECT 1 FROM collections c WHERE c.version_id = v.id) \
                     ORDER BY 1, 2, 5, 6 NULLS FIRST",
                    &[],
                )
                .ctx("cited blobs")?,
            |r| {
                Ok(CitedBlob {
                    image: get(r, 0)?,
                    version: get(r, 1)?,
                    version_id: get(r, 2)?,
                    published: get(r, 3)?,
                    artifact: get(r, 4)?,
                    attachment: get(r, 5)?,
                    digest: digest_col(r, 6)?,
                    size: u64_col(r, 7)?,
                })
            },
        )
    }

    fn record_job_run(&self, job: &str, ok: bool, detail: &str) -> Result<()> {
        let now = now();
        let outcome = if ok { "success" } else { "error" };
        let detail: String = detail.chars().take(1000).collect();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO job_runs (job, last_attempt_at, last_outcome, last_success_at, \
                 last_error_at, detail) VALUES ($1::text, $2::text, $3::text, \
                 CASE WHEN $3::text = 'success' THEN $2::text END, \
                 CASE WHEN $3::text = 'error' THEN $2::text END, $4::text) \
                 ON CONFLICT (job) DO UPDATE SET last_attempt_at = excluded.last_attempt_at, \
                 last_outcome = excluded.last_outcome, \
                 last_success_at = coalesce(excluded.last_success_at, job_runs.last_success_at), \
                 last_error_at = coalesce(excluded.last_error_at, job_runs.last_error_at), \
                 detail = excluded.detail",
                &[&job, &now, &outcome, &detail],
            )
            .ctx("job run")?;
            Ok(())
        })
    }

    fn job_runs(&self) -> Result<Vec<JobRun>> {
        rows(
            self.conn()?
                .query(
                    "SELECT job, last_attempt_at, last_outcome, last_success_at, last_error_at, detail \
                     FROM job_runs ORDER BY job",
                    &[],
                )
                .ctx("job runs")?,
            |r| {
                Ok(JobRun {
                    job: get(r, 0)?,
                    last_attempt_at: get(r, 1)?,
                    last_outcome: get(r, 2)?,
                    last_success_at: get(r, 3)?,
                    last_error_at: get(r, 4)?,
                    detail: get(r, 5)?,
                })
            },
        )
    }

    fn blob_rows(&self) -> Result<Vec<Blob>> {
        rows(
            self.conn()?
                .query(
                    &format!("SELECT {BLOB_COLS} FROM cas_blobs ORDER BY digest"),
                    &[],
                )
                .ctx("blobs")?,
            blob_row,
        )
    }

    fn blob_claims(&self, digest: Option<&Digest>) -> Result<Vec<(Digest, Claim)>> {
        read_claims(&mut *self.conn()?, digest)
    }

    /// One SERIALIZABLE transaction: a claim made meanwhile by another instance
    /// (an upload, a draft citing the digest) makes one of the two fail and be
    /// retried, so nothing is deleted that a claim made before the delete committed.
    fn delete_blob_rows(
        &self,
        digests: &[Digest],
        keep: &mut dyn FnMut(&Blob, &[Claim]) -> bool,
    ) -> Result<Vec<Blob>> {
        self.write(|tx| {
            let mut deleted = Vec::new();
            for digest in digests {
                let Some(row) = Self::blob_by_digest(tx, digest)? else {
                    continue;
                };
                let claims: Vec<Claim> = read_claims(tx, Some(digest))?
                    .into_iter()
                    .map(|(_, c)| c)
                    .collect();
                if keep(&row, &claims) {
                    continue;
                }
                tx.execute(
                    "DELETE FROM cas_blobs WHERE digest = $1",
                    &[&digest.to_string()],
                )
                .ctx(&format!("blob {digest}"))?;
                deleted.push(row);
            }
            Ok(deleted)
        })
    }

    fn pin_blob(&self, digest: &Digest, holder: &str, expires_at: &str) -> Result<()> {
        let d = digest.to_string();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO blob_pins (digest, holder, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (digest, holder) DO UPDATE SET expires_at = \
                 greatest(blob_pins.expires_at, excluded.expires_at)",
                &[&d, &holder, &expires_at],
            )
            .ctx("blob pin")?;
            Ok(())
        })
    }

    fn release_pins(&self, holder: &str) -> Result<()> {
        let now = now();
        self.write(|tx| {
            tx.execute(
                "DELETE FROM blob_pins WHERE holder = $1 OR expires_at < $2",
                &[&holder, &now],
            )
            .ctx("blob pins")?;
            Ok(())
        })
    }

    fn expired_uploads(&self, before: &str) -> Result<Vec<UploadSession>> {
        rows(
            self.conn()?
                .query(
                    &format!(
                        "SELECT {UPLOAD_COLS} FROM upload_sessions WHERE expires_at < $1 ORDER BY expires_at"
                    ),
                    &[&before],
                )
                .ctx("upload sessions")?,
            upload_row,
        )
    }

    fn delete_upload(&self, id: &str, before: &str) -> Result<bool> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM upload_parts WHERE upload_id = $1 AND EXISTS \
                        (SELECT 1 FROM upload_sessions WHERE id = $1 AND expires_at < $2)",
                &[&id, &before],
            )
            .ctx("upload parts")?;
            let n = tx
                .execute(
                    "DELETE FROM upload_sessions WHERE id = $1 AND expires_at < $2",
                    &[&id, &before],
                )
                .ctx(&format!("upload {id}"))?;
            Ok(n > 0)
        })
    }

    /// An advisory lock (`pg_advisory_lock` / `_shared`, or their `pg_try_` forms)
    /// held on a connection of its own for the life of the returned lock: every
    /// instance and every command on this database sees it, and the server releases it
    /// however the holder ends (its connection closes). A restart of the database ends
    /// the session and with it the lock, unknown to the holder until it asks
    /// ([`JobLock::check`]): a job that must not overlap with another checks after each
    /// step it took under the lock.
    fn job_lock(&self, job: &str, mode: LockMode, wait: bool) -> Result<Option<JobLock>> {
        if !crate::catalog::job_lock_name_ok(job) {
            return Err(CatalogError::Invalid(format!("job lock name {job:?}")));
        }
        let key = lock_key(job);
        let mut client = self.pool.lock_connection()?;
        let what = format!("job lock {job}");
        let got = match (mode, wait) {
            (LockMode::Shared, true) => client
                .execute(
                    "SELECT pg_advisory_lock_shared($1, $2)",
                    &[&LOCK_NAMESPACE, &key],
                )
                .map(|_| true),
            (LockMode::Exclusive, true) => client
                .execute("SELECT pg_advisory_lock($1, $2)", &[&LOCK_NAMESPACE, &key])
                .map(|_| true),
            (LockMode::Shared, false) => client
                .query_one(
                    "SELECT pg_try_advisory_lock_shared($1, $2)",
                    &[&LOCK_NAMESPACE, &key],
                )
                .and_then(|r| r.try_get(0)),
            (LockMode::Exclusive, false) => client
                .query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&LOCK_NAMESPACE, &key],
                )
                .and_then(|r| r.try_get(0)),
        }
        .ctx(&what)?;
        if !got {
            self.pool.return_lock_connection(client);
            return Ok(None);
        }
        Ok(Some(JobLock::new(PgJobLock {
            client: Mutex::new(Some(client)),
            pool: self.pool.clone(),
            job: job.to_string(),
            key,
        })))
    }

    fn blob_totals(&self) -> Result<(u64, u64)> {
        let r = self
            .conn()?
            .query_one(
                "SELECT count(*), coalesce(sum(size_bytes), 0)::bigint FROM cas_blobs",
                &[],
            )
            .ctx("blob totals")?;
        Ok((u64_col(&r, 0)?, u64_col(&r, 1)?))
    }

    /// The database answers, is not a standby, and its sessions may write.
    /// PostgreSQL does not tell beforehand whether its disk has room: a full disk
    /// fails the change itself ([`CatalogError::Full`]).
    fn probe_writable(&self) -> Result<()> {
        let r = self
            .conn()?
            .query_one(
                "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
                &[],
            )
            .ctx("catalog")?;
        let (recovery, read_only): (bool, String) = (get(&r, 0)?, get(&r, 1)?);
        if recovery {
            return Err(CatalogError::Backend(
                "the catalog database is a standby (in recovery) and cannot be written: \
                 point postgres_url at the primary"
                    .into(),
            ));
        }
        if read_only == "on" {
            return Err(CatalogError::Backend(
                "the catalog database's sessions are read-only (default_transaction_read_only \
                 is on for this role or database)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Refused: a PostgreSQL catalog is backed up by PostgreSQL's own tools.
    fn snapshot_to(&self, _dest: &Path) -> Result<()> {
        Err(CatalogError::Precondition(
            "the catalog is in PostgreSQL, which imgsrv does not copy into a file: back it up \
             with pg_dump (e.g. `pg_dump --format=custom --file=catalog.pgdump URL`, a \
             consistent snapshot taken while imgsrv runs) or the database's own backups, \
             and the blob store with its own tools"
                .into(),
        ))
    }

    /// The schema version and the guards: every migration applied and recorded, every
    /// table there, every guard trigger present, enabled and calling its function, and
    /// every guard function as the migrations define it.
    fn check_integrity(&self) -> Result<Vec<String>> {
        migrate::problems(&mut *self.conn()?)
    }

    fn each_blob(&self, each: &mut dyn FnMut(Blob) -> bool) -> Result<()> {
        let mut after = String::new();
        loop {
            let page = rows(
                self.conn()?
                    .query(
                        &format!(
                            "SELECT {BLOB_COLS} FROM cas_blobs WHERE digest > $1 ORDER BY digest LIMIT $2"
                        ),
                        &[&after, &BLOB_PAGE],
                    )
                    .ctx("blobs")?,
                blob_row,
            )?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = last.digest.to_string();
            let full = page.len() as i64 == BLOB_PAGE;
            for b in page {
                if !each(b) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }
}
