//! PostgreSQL catalog (cargo feature `postgres`): the catalog of a full deployment, shared
//! by several imgsrv instances.
//!
//! * Schema: `migrations/postgres/*.sql`, applied by [`migrate`] in one transaction under
//!   an advisory lock and recorded in `schema_migrations`. The same tables and the same
//!   guarantees as the SQLite schema, enforced by PL/pgSQL triggers with the same
//!   messages: a published version, its artifacts, attachments, metadata and publish
//!   record, the audit log, retirements and collections cannot be changed or deleted, by
//!   imgsrv or from `psql`.
//! * Every change runs in one SERIALIZABLE transaction, retried when PostgreSQL reports a
//!   serialization failure or a deadlock: the outcome is that of the changes made one
//!   after the other, as with SQLite's single writer, whichever instance makes them.
//!   Reads are single statements (or one REPEATABLE READ transaction when they read
//!   several tables).
//! * Connections come from a small pool ([`pool`]) that makes them again by itself after
//!   the database restarted; while it cannot be reached, calls fail with
//!   [`CatalogError::Unavailable`] (HTTP 503).
//! * Job locks are advisory locks held on a connection of their own ([`maint`]); the
//!   generation counter is a row, read at each call, so a publish on one instance is seen
//!   by the next request on every other.
//! * The connection string is a libpq URL or key=value string as the `postgres` crate
//!   reads it: `postgresql://imgsrv@127.0.0.1:5432/imgsrv`, or for a unix socket the
//!   directory percent-encoded as the host, `postgresql://imgsrv@%2Frun%2Fpostgresql/imgsrv`
//!   (or `host=/run/postgresql user=imgsrv dbname=imgsrv`). No TLS: connect over a unix
//!   socket or a trusted network.

mod audit;
mod auth;
mod blobs;
mod content;
mod keys;
mod lifecycle;
mod maint;
mod migrate;
mod pool;
mod projection;
mod tlog;
mod transfer;

use super::*;
use ::postgres::types::ToSql;
use ::postgres::{GenericClient, IsolationLevel, Row, Transaction};
use std::sync::Arc;
use std::time::Duration;

/// A catalog in a PostgreSQL database.
pub struct PgCatalog {
    pool: Arc<pool::Pool>,
}

/// Parameters of a statement.
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Marks a serialization failure or deadlock inside [`CatalogError::Backend`], for
/// [`PgCatalog::write`] to retry.
const RETRY: &str = "\u{0}retry: ";
/// Attempts of a change that keeps meeting concurrent ones.
const WRITE_ATTEMPTS: u32 = 30;

fn backend(e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Backend(e.to_string())
}

/// Maps PostgreSQL errors to the catalog's vocabulary, as the SQLite catalog maps its
/// own: the guards raise `precondition: …`, `immutable: …`, `exists: …` or
/// `conflict: …` (SQLSTATE P0001).
fn map_err(e: ::postgres::Error, what: &str) -> CatalogError {
    let Some(db) = e.as_db_error() else {
        return if pool::is_connection_error(&e) {
            CatalogError::Unavailable(pool::words(&e))
        } else {
            CatalogError::Backend(format!("{what}: {}", pool::words(&e)))
        };
    };
    let msg = db.message();
    match db.code().code() {
        "23505" => CatalogError::AlreadyExists(what.to_string()),
        "23503" => CatalogError::NotFound(what.to_string()),
        "23514" | "23502" | "22001" | "22P02" | "22003" => {
            CatalogError::Invalid(format!("{what}: {msg}"))
        }
        "P0001" if msg.starts_with("exists: ") => CatalogError::AlreadyExists(what.to_string()),
        "P0001" if msg.starts_with("conflict: ") => {
            CatalogError::Conflict(msg.trim_start_matches("conflict: ").to_string())
        }
        "P0001" => CatalogError::Precondition(
            msg.trim_start_matches("precondition: ")
                .trim_start_matches("immutable: ")
                .to_string(),
        ),
        "40001" | "40P01" => CatalogError::Backend(format!("{RETRY}{msg}")),
        "53100" => CatalogError::Full(format!("writing the {what}: {msg}")),
        _ if pool::is_connection_error(&e) => CatalogError::Unavailable(msg.to_string()),
        _ => CatalogError::Backend(format!("{what}: {msg}")),
    }
}

trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T>;
}
impl<T> Ctx<T> for std::result::Result<T, ::postgres::Error> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| map_err(e, what))
    }
}

/// A row or [`CatalogError::NotFound`]`(what)`.
fn one(rows: std::result::Result<Option<Row>, ::postgres::Error>, what: &str) -> Result<Row> {
    rows.ctx(what)?
        .ok_or_else(|| CatalogError::NotFound(what.to_string()))
}

fn get<'a, T: ::postgres::types::FromSql<'a>>(r: &'a Row, idx: usize) -> Result<T> {
    r.try_get(idx)
        .map_err(|e| backend(format!("reading column {idx}: {e}")))
}

fn digest_col(r: &Row, idx: usize) -> Result<Digest> {
    let s: String = get(r, idx)?;
    s.parse()
        .map_err(|e| backend(format!("column {idx} ({s:?}) is not a digest: {e}")))
}

/// A digest stored as bare hex (the Incus fingerprints).
fn hex_digest_col(r: &Row, idx: usize) -> Result<Digest> {
    let s: String = get(r, idx)?;
    Digest::from_hex(&s).map_err(|e| backend(format!("column {idx} ({s:?}): {e}")))
}

fn u64_col(r: &Row, idx: usize) -> Result<u64> {
    let v: i64 = get(r, idx)?;
    u64::try_from(v).map_err(|e| backend(format!("column {idx} ({v}): {e}")))
}

fn i64_of(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| CatalogError::Invalid(format!("size {v} too large")))
}

const IMAGE_COLS: &str =
    "i.id, i.name, i.display_name, i.description, i.created_at, i.updated_at, i.visibility";
fn image_row(r: &Row, o: usize) -> Result<Image> {
    Ok(Image {
        id: get(r, o)?,
        name: get(r, o + 1)?,
        display_name: get(r, o + 2)?,
        description: get(r, o + 3)?,
        created_at: get(r, o + 4)?,
        updated_at: get(r, o + 5)?,
        visibility: get(r, o + 6)?,
    })
}

/// A condition on `v` (an `image_versions` row): not retired.
const NOT_RETIRED: &str = "NOT EXISTS (SELECT 1 FROM retirements rt WHERE rt.version_id = v.id)";

const VERSION_COLS: &str =
    "v.id, v.image_id, i.name, v.version, v.state, v.published_at, v.created_at, v.updated_at";
fn version_row(r: &Row, o: usize) -> Result<ImageVersion> {
    let state: String = get(r, o + 4)?;
    Ok(ImageVersion {
        id: get(r, o)?,
        image_id: get(r, o + 1)?,
        image_name: get(r, o + 2)?,
        version: get(r, o + 3)?,
        state: VersionState::parse(&state).unwrap_or(VersionState::Draft),
        metadata: BTreeMap::new(),
        published_at: get(r, o + 5)?,
        created_at: get(r, o + 6)?,
        updated_at: get(r, o + 7)?,
    })
}

const ARTIFACT_COLS: &str = "a.id, a.version_id, a.variant, a.operating_system, a.architecture, a.format, \
     a.primary_blob_digest, a.primary_blob_size_bytes, a.primary_media_type, a.created_at, a.updated_at";
fn artifact_row(r: &Row, o: usize) -> Result<Artifact> {
    Ok(Artifact {
        id: get(r, o)?,
        version_id: get(r, o + 1)?,
        variant: get(r, o + 2)?,
        operating_system: get(r, o + 3)?,
        architecture: get(r, o + 4)?,
        format: get(r, o + 5)?,
        primary_blob_digest: digest_col(r, o + 6)?,
        primary_blob_size_bytes: u64_col(r, o + 7)?,
        primary_media_type: get(r, o + 8)?,
        created_at: get(r, o + 9)?,
        updated_at: get(r, o + 10)?,
    })
}

const ATTACHMENT_COLS: &str =
    "t.id, t.artifact_id, t.name, t.media_type, t.blob_digest, t.blob_size_bytes, t.created_at, t.updated_at";
fn attachment_row(r: &Row, o: usize) -> Result<Attachment> {
    Ok(Attachment {
        id: get(r, o)?,
        artifact_id: get(r, o + 1)?,
        name: get(r, o + 2)?,
        media_type: get(r, o + 3)?,
        blob_digest: digest_col(r, o + 4)?,
        blob_size_bytes: u64_col(r, o + 5)?,
        created_at: get(r, o + 6)?,
        updated_at: get(r, o + 7)?,
    })
}

const ALIAS_COLS: &str =
    "l.id, l.image_id, l.alias, l.version_id, v.version, l.created_at, l.updated_at";
fn alias_row(r: &Row, o: usize) -> Result<Alias> {
    Ok(Alias {
        id: get(r, o)?,
        image_id: get(r, o + 1)?,
        alias: get(r, o + 2)?,
        version_id: get(r, o + 3)?,
        version: get(r, o + 4)?,
        created_at: get(r, o + 5)?,
        updated_at: get(r, o + 6)?,
    })
}

const BLOB_COLS: &str = "digest, size_bytes, storage_key, media_type, verified_at, created_at";
fn blob_row(r: &Row) -> Result<Blob> {
    Ok(Blob {
        digest: digest_col(r, 0)?,
        size_bytes: u64_col(r, 1)?,
        storage_key: get(r, 2)?,
        media_type: get(r, 3)?,
        verified_at: get(r, 4)?,
        created_at: get(r, 5)?,
    })
}

const UPLOAD_COLS: &str =
    "id, expected_digest, expected_size_bytes, state, expires_at, media_type_hint, \
     filename_hint, failure_message, principal_id, created_at, updated_at";
fn upload_row(r: &Row) -> Result<UploadSession> {
    let state: String = get(r, 3)?;
    Ok(UploadSession {
        id: get(r, 0)?,
        expected_digest: digest_col(r, 1)?,
        expected_size_bytes: u64_col(r, 2)?,
        state: UploadState::parse(&state).unwrap_or(UploadState::Failed),
        expires_at: get(r, 4)?,
        media_type_hint: get(r, 5)?,
        filename_hint: get(r, 6)?,
        failure_message: get(r, 7)?,
        principal_id: get(r, 8)?,
        created_at: get(r, 9)?,
        updated_at: get(r, 10)?,
    })
}

/// Rows mapped by `f`, all or the first error.
fn rows<T>(rows: Vec<Row>, f: impl Fn(&Row) -> Result<T>) -> Result<Vec<T>> {
    rows.iter().map(f).collect()
}

impl PgCatalog {
    /// Connects to the database at `url` (see the module doc for its forms), applies
    /// pending migrations (several instances starting at once take turns) and re-arms
    /// guards that were dropped or disabled.
    pub fn open(url: &str) -> Result<PgCatalog> {
        let mut config: ::postgres::Config = url.parse().map_err(|e| {
            CatalogError::Invalid(format!(
                "postgres_url: {e} (expected e.g. postgresql://imgsrv@127.0.0.1:5432/imgsrv, \
                 or postgresql://imgsrv@%2Frun%2Fpostgresql/imgsrv for a unix socket)"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("imgsrv");
        }
        let cat = PgCatalog {
            pool: Arc::new(pool::Pool::new(config)),
        };
        {
            let mut c = cat.pool.get()?;
            migrate::migrate(&mut c)?;
        }
        Ok(cat)
    }

    fn conn(&self) -> Result<pool::Conn<'_>> {
        self.pool.get()
    }

    /// Runs `f` in one SERIALIZABLE transaction and commits it, again from the start
    /// when PostgreSQL refuses it for a concurrent change (serialization failure,
    /// deadlock): `f` must have no effect outside the transaction.
    fn write<T>(&self, mut f: impl FnMut(&mut Transaction) -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            let mut c = self.conn()?;
            let done = (|| {
                let mut tx = c
                    .build_transaction()
                    .isolation_level(IsolationLevel::Serializable)
                    .start()
                    .ctx("catalog")?;
                let out = f(&mut tx)?;
                tx.commit().ctx("catalog")?;
                Ok(out)
            })();
            match done {
                Err(CatalogError::Backend(m)) if m.starts_with(RETRY) => {
                    attempt += 1;
                    if attempt >= WRITE_ATTEMPTS {
                        return Err(CatalogError::Conflict(format!(
                            "the catalog kept changing under this change ({}); retry it",
                            m.trim_start_matches(RETRY)
                        )));
                    }
                    drop(c);
                    // a little longer each time, with jitter, so that the rivals part
                    let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 8;
                    std::thread::sleep(Duration::from_millis(
                        u64::from(attempt.min(10)) * 2 + jitter,
                    ));
                }
                other => return other,
            }
        }
    }

    /// Runs `f` in one REPEATABLE READ, READ ONLY transaction: one moment of the
    /// catalog across several statements.
    fn read<T>(&self, f: impl FnOnce(&mut Transaction) -> Result<T>) -> Result<T> {
        let mut c = self.conn()?;
        let mut tx = c
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .ctx("catalog")?;
        let out = f(&mut tx)?;
        tx.commit().ctx("catalog")?;
        Ok(out)
    }

    fn image_id(c: &mut impl GenericClient, name: &str) -> Result<String> {
        let what = format!("image {name}");
        get(
            &one(
                c.query_opt("SELECT id FROM images WHERE name = $1", &[&name]),
                &what,
            )?,
            0,
        )
    }

    fn image_by_name(c: &mut impl GenericClient, name: &str) -> Result<Image> {
        let what = format!("image {name}");
        let r = one(
            c.query_opt(
                &format!("SELECT {IMAGE_COLS} FROM images i WHERE i.name = $1"),
                &[&name],
            ),
            &what,
        )?;
        image_row(&r, 0)
    }

    /// The version matching `condition` (on `v` and `i`), with its metadata; `what`
    /// names it in a NotFound.
    fn version_where(
        c: &mut impl GenericClient,
        condition: &str,
        params: Params<'_>,
        what: &str,
    ) -> Result<ImageVersion> {
        let r = one(
            c.query_opt(
                &format!(
                    "SELECT {VERSION_COLS} FROM image_versions v JOIN images i ON i.id = v.image_id \
                     WHERE {condition}"
                ),
                params,
            ),
            what,
        )?;
        let mut v = version_row(&r, 0)?;
        v.metadata = Self::metadata(c, &v.id)?;
        Ok(v)
    }

    fn load_version(
        c: &mut impl GenericClient,
        image: &str,
        version: &str,
    ) -> Result<ImageVersion> {
        Self::version_where(
            c,
            "i.name = $1 AND v.version = $2",
            &[&image, &version],
            &format!("version {image}@{version}"),
        )
    }

    fn load_version_by_id(c: &mut impl GenericClient, id: &str) -> Result<ImageVersion> {
        Self::version_where(c, "v.id = $1", &[&id], "version")
    }

    fn metadata(c: &mut impl GenericClient, version_id: &str) -> Result<BTreeMap<String, String>> {
        let found = c
            .query(
                "SELECT key, value FROM version_metadata WHERE version_id = $1",
                &[&version_id],
            )
            .ctx("metadata")?;
        found.iter().map(|r| Ok((get(r, 0)?, get(r, 1)?))).collect()
    }

    fn view(c: &mut impl GenericClient, image: &str, version: &str) -> Result<VersionView> {
        let img = Self::image_by_name(c, image)?;
        let v = Self::load_version(c, image, version)?;
        let arts = rows(
            c.query(
                &format!(
                    "SELECT {ARTIFACT_COLS} FROM release_artifacts a WHERE a.version_id = $1 \
                     ORDER BY a.variant, a.operating_system, a.architecture, a.format, a.id"
                ),
                &[&v.id],
            )
            .ctx("artifacts")?,
            |r| artifact_row(r, 0),
        )?;
        let mut attachments: std::collections::HashMap<String, Vec<Attachment>> =
            Default::default();
        let found = c
            .query(
                &format!(
                    "SELECT {ATTACHMENT_COLS} FROM artifact_attachments t \
                     JOIN release_artifacts a ON a.id = t.artifact_id WHERE a.version_id = $1 \
                     ORDER BY t.name, t.id"
                ),
                &[&v.id],
            )
            .ctx("attachments")?;
        for r in &found {
            let t = attachment_row(r, 0)?;
            attachments
                .entry(t.artifact_id.clone())
                .or_default()
                .push(t);
        }
        let artifacts = arts
            .into_iter()
            .map(|a| ArtifactWithAttachments {
                attachments: attachments.remove(&a.id).unwrap_or_default(),
                artifact: a,
            })
            .collect();
        Ok(VersionView {
            image: img,
            version: v,
            artifacts,
        })
    }

    fn artifact_in_version(
        c: &mut impl GenericClient,
        version_id: &str,
        artifact_id: &str,
    ) -> Result<Artifact> {
        let r = one(
            c.query_opt(
                &format!(
                    "SELECT {ARTIFACT_COLS} FROM release_artifacts a WHERE a.id = $1 AND a.version_id = $2"
                ),
                &[&artifact_id, &version_id],
            ),
            &format!("artifact {artifact_id}"),
        )?;
        artifact_row(&r, 0)
    }

    fn alias_by_name(c: &mut impl GenericClient, image: &str, alias: &str) -> Result<Alias> {
        let r = one(
            c.query_opt(
                &format!(
                    "SELECT {ALIAS_COLS} FROM aliases l JOIN images i ON i.id = l.image_id \
                     JOIN image_versions v ON v.id = l.version_id WHERE i.name = $1 AND l.alias = $2"
                ),
                &[&image, &alias],
            ),
            &format!("alias {image}:{alias}"),
        )?;
        alias_row(&r, 0)
    }

    fn principal(c: &mut impl GenericClient, id_or_name: &str) -> Result<Principal> {
        let r = one(
            c.query_opt(
                "SELECT id, name, kind, display_name, created_at FROM principals \
                 WHERE id = $1 OR (name = $1 AND NOT EXISTS (SELECT 1 FROM principals WHERE id = $1))",
                &[&id_or_name],
            ),
            &format!("principal {id_or_name}"),
        )?;
        let id: String = get(&r, 0)?;
        let grants = rows(
            c.query(
                "SELECT role_id, scope FROM grants WHERE principal_id = $1 ORDER BY role_id, scope",
                &[&id],
            )
            .ctx("grants")?,
            |r| {
                Ok(Grant {
                    role: get(r, 0)?,
                    scope: get(r, 1)?,
                })
            },
        )?;
        let mut role_ids: Vec<String> = grants.iter().map(|g| g.role.clone()).collect();
        role_ids.dedup();
        Ok(Principal {
            id,
            name: get(&r, 1)?,
            kind: get(&r, 2)?,
            display_name: get(&r, 3)?,
            role_ids,
            grants,
            created_at: get(&r, 4)?,
        })
    }

    fn blob_by_digest(c: &mut impl GenericClient, digest: &Digest) -> Result<Option<Blob>> {
        c.query_opt(
            &format!("SELECT {BLOB_COLS} FROM cas_blobs WHERE digest = $1"),
            &[&digest.to_string()],
        )
        .ctx("blob")?
        .map(|r| blob_row(&r))
        .transpose()
    }
}
