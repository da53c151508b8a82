//! SQLite catalog (the embedded default).
//!
//! * Schema: `schema.sql` at the repository root is migration 1, the files
//!   in `migrations/` the next ones; [`super::migrate`] applies the pending
//!   ones in one exclusive transaction and repairs what the sqlite3 shell
//!   may have broken outside the guarded rows.
//! * Columns the guards leave writable are read whatever was stored in them
//!   (a number or bytes where text belongs): a tampered side row must not
//!   make a published version unreadable.
//! * WAL mode, `synchronous = FULL` (a publish that returned is on disk),
//!   foreign keys on, busy timeout 10 s. Readers never block the writer.
//! * Every multi-row change runs in one `BEGIN IMMEDIATE` transaction.
//! * Connections come from a small pool; each is used by one thread at a time.
//! * A full disk is [`CatalogError::Full`] (SQLITE_FULL, or an I/O error
//!   whose errno is ENOSPC/EDQUOT), and room for the audit log is kept in
//!   reserve as free pages: see `space.rs`.

mod audit;
mod keys;
mod lifecycle;
mod maint;
mod projection;
mod tlog;
mod transfer;

use super::space;
use super::*;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

pub struct SqliteCatalog {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
    /// One top-up of the audit log's reserve at a time.
    reserve: Mutex<()>,
}

struct Pooled<'a> {
    cat: &'a SqliteCatalog,
    conn: Option<Connection>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("connection present until drop")
    }
}
impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("connection present until drop")
    }
}
impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            // A connection opened while the file or its filesystem could not be written
            // is read-only for good (SQLite's fallback): not kept, so that writes work
            // again once the filesystem does.
            if c.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
                return;
            }
            if let Ok(mut p) = self.cat.pool.lock() {
                if p.len() < 16 {
                    p.push(c);
                }
            }
        }
    }
}

fn backend(e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Backend(e.to_string())
}

/// Maps SQLite errors to the catalog's vocabulary. Trigger aborts carry
/// `precondition: …` or `immutable: …` messages.
fn map_err(e: rusqlite::Error, what: &str) -> CatalogError {
    use rusqlite::ffi::ErrorCode;
    match &e {
        rusqlite::Error::QueryReturnedNoRows => CatalogError::NotFound(what.to_string()),
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DiskFull => {
            CatalogError::Full(format!("writing the {what}: {e}"))
        }
        rusqlite::Error::SqliteFailure(f, msg) if f.code == ErrorCode::ConstraintViolation => {
            let msg = msg.clone().unwrap_or_default();
            match f.extended_code {
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                    CatalogError::AlreadyExists(what.to_string())
                }
                rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY => {
                    CatalogError::NotFound(what.to_string())
                }
                rusqlite::ffi::SQLITE_CONSTRAINT_TRIGGER if msg.starts_with("exists: ") => {
                    CatalogError::AlreadyExists(what.to_string())
                }
                rusqlite::ffi::SQLITE_CONSTRAINT_TRIGGER if msg.starts_with("conflict: ") => {
                    CatalogError::Conflict(msg.trim_start_matches("conflict: ").to_string())
                }
                rusqlite::ffi::SQLITE_CONSTRAINT_TRIGGER => CatalogError::Precondition(
                    msg.trim_start_matches("precondition: ")
                        .trim_start_matches("immutable: ")
                        .to_string(),
                ),
                rusqlite::ffi::SQLITE_CONSTRAINT_CHECK => {
                    CatalogError::Invalid(format!("{what}: {msg}"))
                }
                _ => CatalogError::Precondition(msg),
            }
        }
        _ => backend(e),
    }
}

trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T>;
}
impl<T> Ctx<T> for rusqlite::Result<T> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| map_err(e, what))
    }
}

fn digest_col(row: &Row, idx: usize) -> rusqlite::Result<Digest> {
    let s: String = row.get(idx)?;
    s.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// A digest stored as bare hex (the Incus fingerprints).
fn hex_digest_col(row: &Row, idx: usize) -> rusqlite::Result<Digest> {
    let s: String = row.get(idx)?;
    Digest::from_hex(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn u64_col(row: &Row, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Integer, Box::new(e))
    })
}

/// A text column as text whatever is stored in it: NULL as "", a number
/// written out, bytes as UTF-8 (lossy). For the columns the guards leave
/// writable, where the sqlite3 shell can put anything.
fn text(row: &Row, idx: usize) -> rusqlite::Result<String> {
    Ok(opt_text(row, idx)?.unwrap_or_default())
}

/// [`text`] for a column that may be NULL.
fn opt_text(row: &Row, idx: usize) -> rusqlite::Result<Option<String>> {
    use rusqlite::types::ValueRef;
    Ok(match row.get_ref(idx)? {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(i.to_string()),
        ValueRef::Real(f) => Some(f.to_string()),
        ValueRef::Text(b) | ValueRef::Blob(b) => Some(String::from_utf8_lossy(b).into_owned()),
    })
}

const IMAGE_COLS: &str =
    "i.id, i.name, i.display_name, i.description, i.created_at, i.updated_at, i.visibility";
fn image_row(r: &Row, o: usize) -> rusqlite::Result<Image> {
    Ok(Image {
        id: text(r, o)?,
        name: text(r, o + 1)?,
        display_name: opt_text(r, o + 2)?,
        description: opt_text(r, o + 3)?,
        created_at: text(r, o + 4)?,
        updated_at: text(r, o + 5)?,
        visibility: text(r, o + 6)?,
    })
}

/// A condition on `v` (an `image_versions` row): not retired. Retired versions
/// leave the listings and the projection; they stay readable by name.
const NOT_RETIRED: &str = "NOT EXISTS (SELECT 1 FROM retirements rt WHERE rt.version_id = v.id)";

const VERSION_COLS: &str =
    "v.id, v.image_id, i.name, v.version, v.state, v.published_at, v.created_at, v.updated_at";
fn version_row(r: &Row, o: usize) -> rusqlite::Result<ImageVersion> {
    let state = text(r, o + 4)?;
    Ok(ImageVersion {
        id: text(r, o)?,
        image_id: text(r, o + 1)?,
        image_name: text(r, o + 2)?,
        version: text(r, o + 3)?,
        state: VersionState::parse(&state).unwrap_or(VersionState::Draft),
        metadata: BTreeMap::new(),
        published_at: opt_text(r, o + 5)?,
        created_at: text(r, o + 6)?,
        updated_at: text(r, o + 7)?,
    })
}

const ARTIFACT_COLS: &str = "a.id, a.version_id, a.variant, a.operating_system, a.architecture, a.format, \
     a.primary_blob_digest, a.primary_blob_size_bytes, a.primary_media_type, a.created_at, a.updated_at";
fn artifact_row(r: &Row, o: usize) -> rusqlite::Result<Artifact> {
    Ok(Artifact {
        id: text(r, o)?,
        version_id: text(r, o + 1)?,
        variant: text(r, o + 2)?,
        operating_system: text(r, o + 3)?,
        architecture: text(r, o + 4)?,
        format: text(r, o + 5)?,
        primary_blob_digest: digest_col(r, o + 6)?,
        primary_blob_size_bytes: u64_col(r, o + 7)?,
        primary_media_type: text(r, o + 8)?,
        created_at: text(r, o + 9)?,
        updated_at: text(r, o + 10)?,
    })
}

const ATTACHMENT_COLS: &str =
    "t.id, t.artifact_id, t.name, t.media_type, t.blob_digest, t.blob_size_bytes, t.created_at, t.updated_at";
fn attachment_row(r: &Row, o: usize) -> rusqlite::Result<Attachment> {
    Ok(Attachment {
        id: text(r, o)?,
        artifact_id: text(r, o + 1)?,
        name: text(r, o + 2)?,
        media_type: text(r, o + 3)?,
        blob_digest: digest_col(r, o + 4)?,
        blob_size_bytes: u64_col(r, o + 5)?,
        created_at: text(r, o + 6)?,
        updated_at: text(r, o + 7)?,
    })
}

const ALIAS_COLS: &str =
    "l.id, l.image_id, l.alias, l.version_id, v.version, l.created_at, l.updated_at";
fn alias_row(r: &Row, o: usize) -> rusqlite::Result<Alias> {
    Ok(Alias {
        id: text(r, o)?,
        image_id: text(r, o + 1)?,
        alias: text(r, o + 2)?,
        version_id: text(r, o + 3)?,
        version: text(r, o + 4)?,
        created_at: text(r, o + 5)?,
        updated_at: text(r, o + 6)?,
    })
}

const BLOB_COLS: &str = "digest, size_bytes, storage_key, media_type, verified_at, created_at";
fn blob_row(r: &Row) -> rusqlite::Result<Blob> {
    Ok(Blob {
        digest: digest_col(r, 0)?,
        size_bytes: u64_col(r, 1)?,
        storage_key: r.get(2)?,
        media_type: r.get(3)?,
        verified_at: r.get(4)?,
        created_at: r.get(5)?,
    })
}

const UPLOAD_COLS: &str =
    "id, expected_digest, expected_size_bytes, state, expires_at, media_type_hint, \
     filename_hint, failure_message, principal_id, created_at, updated_at";
fn upload_row(r: &Row) -> rusqlite::Result<UploadSession> {
    let state = text(r, 3)?;
    Ok(UploadSession {
        id: text(r, 0)?,
        expected_digest: digest_col(r, 1)?,
        expected_size_bytes: u64_col(r, 2)?,
        state: UploadState::parse(&state).unwrap_or(UploadState::Failed),
        expires_at: text(r, 4)?,
        media_type_hint: opt_text(r, 5)?,
        filename_hint: opt_text(r, 6)?,
        failure_message: opt_text(r, 7)?,
        principal_id: opt_text(r, 8)?,
        created_at: text(r, 9)?,
        updated_at: text(r, 10)?,
    })
}

const TOKEN_COLS: &str =
    "id, principal_id, name, secret_hash, expires_at, last_used_at, revoked_at, created_at";
fn token_row(r: &Row) -> rusqlite::Result<ApiToken> {
    Ok(ApiToken {
        id: text(r, 0)?,
        principal_id: text(r, 1)?,
        name: text(r, 2)?,
        // the bytes whatever was stored (a hash that is not 32 bytes never matches)
        secret_hash: r
            .get_ref(3)?
            .as_bytes()
            .map(<[u8]>::to_vec)
            .unwrap_or_default(),
        expires_at: opt_text(r, 4)?,
        last_used_at: opt_text(r, 5)?,
        revoked_at: opt_text(r, 6)?,
        created_at: text(r, 7)?,
    })
}

fn i64_of(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| CatalogError::Invalid(format!("size {v} too large")))
}

impl SqliteCatalog {
    /// Opens (creating if needed) the catalog at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<SqliteCatalog> {
        let cat = SqliteCatalog {
            path: path.to_path_buf(),
            pool: Mutex::new(Vec::new()),
            reserve: Mutex::new(()),
        };
        let mut conn = cat.connect()?;
        super::migrate::migrate(&mut conn)?;
        cat.pool.lock().map_err(backend)?.push(conn);
        Ok(cat)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn connect(&self) -> Result<Connection> {
        let conn = Connection::open(&self.path)
            .map_err(|e| CatalogError::Backend(format!("opening {}: {e}", self.path.display())))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(backend)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(backend)?;
        space::keep_wal(&conn);
        Ok(conn)
    }

    fn conn(&self) -> Result<Pooled<'_>> {
        let pooled = self.pool.lock().map_err(backend)?.pop();
        let conn = match pooled {
            Some(c) => c,
            None => self.connect()?,
        };
        Ok(Pooled {
            cat: self,
            conn: Some(conn),
        })
    }

    fn write<T>(&self, f: impl FnOnce(&Transaction) -> Result<T>) -> Result<T> {
        let mut c = self.conn()?;
        let tx = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| map_err(e, "catalog"))?;
        let out = f(&tx).map_err(|e| space::full_disk(&tx, space::last_code(&tx), e))?;
        // A failed commit is rolled back (rusqlite drops the transaction),
        // which resets the connection's last code: take it from the error.
        tx.commit().map_err(|e| {
            let code = match &e {
                rusqlite::Error::SqliteFailure(f, _) => f.extended_code,
                _ => 0,
            };
            space::full_disk(&c, code, map_err(e, "catalog"))
        })?;
        Ok(out)
    }

    fn image_id(c: &Connection, name: &str) -> Result<String> {
        c.query_row("SELECT id FROM images WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .ctx(&format!("image {name}"))
    }

    fn image_by_name(c: &Connection, name: &str) -> Result<Image> {
        c.query_row(
            &format!("SELECT {IMAGE_COLS} FROM images i WHERE i.name = ?1"),
            [name],
            |r| image_row(r, 0),
        )
        .ctx(&format!("image {name}"))
    }

    /// The version matching `condition` (on `v` and `i`), with its metadata;
    /// `what` names it in a NotFound.
    fn version_where(
        c: &Connection,
        condition: &str,
        params: impl rusqlite::Params,
        what: &str,
    ) -> Result<ImageVersion> {
        let mut v = c
            .query_row(
                &format!(
                    "SELECT {VERSION_COLS} FROM image_versions v JOIN images i ON i.id = v.image_id \
                     WHERE {condition}"
                ),
                params,
                |r| version_row(r, 0),
            )
            .ctx(what)?;
        v.metadata = Self::metadata(c, &v.id)?;
        Ok(v)
    }

    fn load_version(c: &Connection, image: &str, version: &str) -> Result<ImageVersion> {
        Self::version_where(
            c,
            "i.name = ?1 AND v.version = ?2",
            [image, version],
            &format!("version {image}@{version}"),
        )
    }

    fn blob_by_digest(c: &Connection, digest: &Digest) -> Result<Option<Blob>> {
        c.query_row(
            &format!("SELECT {BLOB_COLS} FROM cas_blobs WHERE digest = ?1"),
            [digest.to_string()],
            blob_row,
        )
        .optional()
        .map_err(backend)
    }

    fn load_version_by_id(c: &Connection, id: &str) -> Result<ImageVersion> {
        Self::version_where(c, "v.id = ?1", [id], "version")
    }

    fn metadata(c: &Connection, version_id: &str) -> Result<BTreeMap<String, String>> {
        let mut st = c
            .prepare_cached("SELECT key, value FROM version_metadata WHERE version_id = ?1")
            .map_err(backend)?;
        let rows = st
            .query_map([version_id], |r| Ok((text(r, 0)?, text(r, 1)?)))
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn view(c: &Connection, image: &str, version: &str) -> Result<VersionView> {
        let img = Self::image_by_name(c, image)?;
        let v = Self::load_version(c, image, version)?;
        let mut st = c
            .prepare_cached(&format!(
                "SELECT {ARTIFACT_COLS} FROM release_artifacts a WHERE a.version_id = ?1 \
                 ORDER BY a.variant, a.operating_system, a.architecture, a.format, a.id"
            ))
            .map_err(backend)?;
        let arts: Vec<Artifact> = st
            .query_map([&v.id], |r| artifact_row(r, 0))
            .map_err(backend)?
            .collect::<rusqlite::Result<_>>()
            .map_err(backend)?;
        let mut st = c
            .prepare_cached(&format!(
                "SELECT {ATTACHMENT_COLS} FROM artifact_attachments t WHERE t.artifact_id = ?1 ORDER BY t.name, t.id"
            ))
            .map_err(backend)?;
        let mut artifacts = Vec::with_capacity(arts.len());
        for a in arts {
            let attachments = st
                .query_map([&a.id], |r| attachment_row(r, 0))
                .map_err(backend)?
                .collect::<rusqlite::Result<_>>()
                .map_err(backend)?;
            artifacts.push(ArtifactWithAttachments {
                artifact: a,
                attachments,
            });
        }
        Ok(VersionView {
            image: img,
            version: v,
            artifacts,
        })
    }

    fn artifact_in_version(
        c: &Connection,
        version_id: &str,
        artifact_id: &str,
    ) -> Result<Artifact> {
        c.query_row(
            &format!("SELECT {ARTIFACT_COLS} FROM release_artifacts a WHERE a.id = ?1 AND a.version_id = ?2"),
            [artifact_id, version_id],
            |r| artifact_row(r, 0),
        )
        .ctx(&format!("artifact {artifact_id}"))
    }

    fn alias_by_name(c: &Connection, image: &str, alias: &str) -> Result<Alias> {
        c.query_row(
            &format!(
                "SELECT {ALIAS_COLS} FROM aliases l JOIN images i ON i.id = l.image_id \
                 JOIN image_versions v ON v.id = l.version_id WHERE i.name = ?1 AND l.alias = ?2"
            ),
            [image, alias],
            |r| alias_row(r, 0),
        )
        .ctx(&format!("alias {image}:{alias}"))
    }

    fn principal(c: &Connection, id_or_name: &str) -> Result<Principal> {
        let (id, name, kind, display_name, created_at): (String, String, String, String, String) = c
            .query_row(
                "SELECT id, name, kind, display_name, created_at FROM principals \
                 WHERE id = ?1 OR (name = ?1 AND NOT EXISTS (SELECT 1 FROM principals WHERE id = ?1))",
                [id_or_name],
                |r| Ok((text(r, 0)?, text(r, 1)?, text(r, 2)?, text(r, 3)?, text(r, 4)?)),
            )
            .ctx(&format!("principal {id_or_name}"))?;
        let mut st = c
            .prepare_cached(
                "SELECT role_id, scope FROM grants WHERE principal_id = ?1 ORDER BY role_id, scope",
            )
            .map_err(backend)?;
        let grants: Vec<Grant> = st
            .query_map([&id], |r| {
                Ok(Grant {
                    role: text(r, 0)?,
                    scope: text(r, 1)?,
                })
            })
            .map_err(backend)?
            .collect::<rusqlite::Result<_>>()
            .map_err(backend)?;
        let mut role_ids: Vec<String> = grants.iter().map(|g| g.role.clone()).collect();
        role_ids.dedup();
        Ok(Principal {
            id,
            name,
            kind,
            display_name,
            role_ids,
            grants,
            created_at,
        })
    }
}

impl ContentCatalog for SqliteCatalog {
    fn create_image(
        &self,
        name: &str,
        display_name: Option<&str>,
        description: Option<&str>,
        visibility: &str,
    ) -> Result<Image> {
        let now = now();
        let img = Image {
            id: new_id(),
            name: name.to_string(),
            display_name: display_name.map(str::to_string),
            description: description.map(str::to_string),
            visibility: visibility.to_string(),
            created_at: now.clone(),
            updated_at: now,
        };
        self.write(|tx| {
            tx.execute(
                "INSERT INTO images (id, name, display_name, description, visibility, created_at, updated_at) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7)",
                params![img.id, img.name, img.display_name, img.description, img.visibility, img.created_at, img.updated_at],
            )
            .ctx(&format!("image {name}"))
        })?;
        Ok(img)
    }

    fn set_visibility(&self, name: &str, visibility: &str) -> Result<Image> {
        let now = now();
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE images SET visibility = ?2, updated_at = ?3 WHERE name = ?1",
                    params![name, visibility, now],
                )
                .ctx("image")?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!("image {name}")));
            }
            Self::image_by_name(tx, name)
        })
    }

    fn get_image(&self, name: &str) -> Result<Image> {
        Self::image_by_name(&*self.conn()?, name)
    }

    fn list_images(&self, include_unpublished: bool) -> Result<Vec<Image>> {
        let c = self.conn()?;
        let sql = if include_unpublished {
            format!("SELECT {IMAGE_COLS} FROM images i ORDER BY i.name")
        } else {
            format!(
                "SELECT {IMAGE_COLS} FROM images i WHERE EXISTS (SELECT 1 FROM image_versions v \
                 WHERE v.image_id = i.id AND v.state = 'published' AND {NOT_RETIRED}) ORDER BY i.name"
            )
        };
        let mut st = c.prepare(&sql).map_err(backend)?;
        let rows = st.query_map([], |r| image_row(r, 0)).map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn create_version(
        &self,
        image: &str,
        version: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<ImageVersion> {
        let id = new_id();
        let now = now();
        self.write(|tx| {
            let image_id = Self::image_id(tx, image)?;
            tx.execute(
                "INSERT INTO image_versions (id, image_id, version, state, published_at, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, 'draft', NULL, ?4, ?4)",
                params![id, image_id, version, now],
            )
            .ctx(&format!("version {image}@{version}"))?;
            for (k, v) in metadata {
                tx.execute("INSERT INTO version_metadata (version_id, key, value) VALUES (?1, ?2, ?3)", params![id, k, v])
                    .ctx(&format!("metadata key {k}"))?;
            }
            Self::load_version_by_id(tx, &id)
        })
    }

    fn get_version(&self, image: &str, version: &str) -> Result<ImageVersion> {
        Self::load_version(&*self.conn()?, image, version)
    }

    fn list_versions(&self, image: &str, include_unpublished: bool) -> Result<Vec<ImageVersion>> {
        let c = self.conn()?;
        let image_id = Self::image_id(&c, image)?;
        let filter = if include_unpublished {
            ""
        } else {
            "AND v.state = 'published'"
        };
        let filter = format!("{filter} AND {NOT_RETIRED}");
        let mut st = c
            .prepare(&format!(
                "SELECT {VERSION_COLS} FROM image_versions v JOIN images i ON i.id = v.image_id \
                 WHERE v.image_id = ?1 {filter} ORDER BY v.created_at DESC, v.version, v.id"
            ))
            .map_err(backend)?;
        let mut out: Vec<ImageVersion> = st
            .query_map([&image_id], |r| version_row(r, 0))
            .map_err(backend)?
            .collect::<rusqlite::Result<_>>()
            .map_err(backend)?;
        for v in &mut out {
            v.metadata = Self::metadata(&c, &v.id)?;
        }
        Ok(out)
    }

    fn version_view(&self, image: &str, version: &str) -> Result<VersionView> {
        Self::view(&*self.conn()?, image, version)
    }

    fn add_artifact(&self, version_id: &str, a: &NewArtifact) -> Result<Artifact> {
        let id = new_id();
        let now = now();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO release_artifacts (id, version_id, variant, operating_system, architecture, format, \
                 primary_blob_digest, primary_blob_size_bytes, primary_media_type, created_at, updated_at) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?10)",
                params![
                    id,
                    version_id,
                    a.variant,
                    a.operating_system,
                    a.architecture,
                    a.format,
                    a.primary_blob_digest.to_string(),
                    i64_of(a.primary_blob_size_bytes)?,
                    a.primary_media_type,
                    now
                ],
            )
            .ctx(&format!(
                "artifact ({}, {}, {}, {})",
                a.variant, a.operating_system, a.architecture, a.format
            ))?;
            Self::artifact_in_version(tx, version_id, &id)
        })
    }

    fn delete_artifact(&self, version_id: &str, artifact_id: &str) -> Result<()> {
        self.write(|tx| {
            Self::artifact_in_version(tx, version_id, artifact_id)?;
            tx.execute(
                "DELETE FROM artifact_attachments WHERE artifact_id = ?1",
                [artifact_id],
            )
            .ctx("attachments")?;
            tx.execute("DELETE FROM release_artifacts WHERE id = ?1", [artifact_id])
                .ctx("artifact")?;
            Ok(())
        })
    }

    fn add_attachment(
        &self,
        version_id: &str,
        artifact_id: &str,
        a: &NewAttachment,
    ) -> Result<Attachment> {
        let id = new_id();
        let now = now();
        self.write(|tx| {
            Self::artifact_in_version(tx, version_id, artifact_id)?;
            tx.execute(
                "INSERT INTO artifact_attachments (id, artifact_id, name, media_type, blob_digest, blob_size_bytes, \
                 created_at, updated_at) VALUES (?1,?2,?3,?4,?5,?6,?7,?7)",
                params![id, artifact_id, a.name, a.media_type, a.blob_digest.to_string(), i64_of(a.blob_size_bytes)?, now],
            )
            .ctx(&format!("attachment {}", a.name))?;
            tx.query_row(
                &format!("SELECT {ATTACHMENT_COLS} FROM artifact_attachments t WHERE t.id = ?1"),
                [&id],
                |r| attachment_row(r, 0),
            )
            .ctx("attachment")
        })
    }

    fn delete_attachment(
        &self,
        version_id: &str,
        artifact_id: &str,
        attachment_id: &str,
    ) -> Result<()> {
        self.write(|tx| {
            Self::artifact_in_version(tx, version_id, artifact_id)?;
            let n = tx
                .execute(
                    "DELETE FROM artifact_attachments WHERE id = ?1 AND artifact_id = ?2",
                    [attachment_id, artifact_id],
                )
                .ctx("attachment")?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!(
                    "attachment {attachment_id}"
                )));
            }
            Ok(())
        })
    }

    fn publish(
        &self,
        record: &PublishRecord,
        projection: &[ProjectionRow],
    ) -> Result<ImageVersion> {
        self.write(|tx| {
            let v = Self::load_version_by_id(tx, &record.version_id)?;
            if v.state != VersionState::Draft {
                return Err(CatalogError::Precondition("version is not a draft".into()));
            }
            let view = Self::view(tx, &v.image_name, &v.version)?;
            if crate::manifest::canonical(&view) != record.manifest {
                return Err(CatalogError::Precondition(
                    "the draft changed while it was being published; fetch the manifest and sign it again".into(),
                ));
            }
            let now = &record.published_at;
            tx.execute(
                "UPDATE image_versions SET state = 'publishing', updated_at = ?2 WHERE id = ?1",
                params![v.id, now],
            )
            .ctx("version")?;
            tx.execute(
                "INSERT INTO publish_records (version_id, manifest, manifest_digest, signature, signer_key_id, \
                 signer_key_name, verification, principal_id, published_at) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
                params![
                    v.id,
                    record.manifest,
                    record.manifest_digest.to_string(),
                    record.signature,
                    record.signer_key_id,
                    record.signer_key_name,
                    record.verification.as_str(),
                    record.principal_id,
                    now
                ],
            )
            .ctx("publish record")?;
            for p in projection {
                tx.execute(
                    "INSERT INTO incus_projection (artifact_id, version_id, metadata_attachment_id, ftype, combined_sha256) \
                     VALUES (?1,?2,?3,?4,?5)",
                    params![p.artifact_id, v.id, p.metadata_attachment_id, p.ftype, p.combined_sha256.hex()],
                )
                .ctx("projection row")?;
            }
            tx.execute(
                "UPDATE image_versions SET state = 'published', published_at = ?2, updated_at = ?2 WHERE id = ?1",
                params![v.id, now],
            )
            .ctx("version")?;
            tlog::append(tx, &log_entry::published(&v, record))?;
            Self::load_version_by_id(tx, &v.id)
        })
    }

    fn publish_record(&self, version_id: &str) -> Result<PublishRecord> {
        let c = self.conn()?;
        c.query_row(
            "SELECT version_id, manifest, manifest_digest, signature, signer_key_id, signer_key_name, verification, \
             principal_id, published_at FROM publish_records WHERE version_id = ?1",
            [version_id],
            |r| {
                let verification: String = r.get(6)?;
                Ok(PublishRecord {
                    version_id: r.get(0)?,
                    manifest: r.get(1)?,
                    manifest_digest: digest_col(r, 2)?,
                    signature: r.get(3)?,
                    signer_key_id: r.get(4)?,
                    signer_key_name: r.get(5)?,
                    verification: match verification.as_str() {
                        "verified" => Verification::Verified,
                        "skipped" => Verification::Skipped,
                        _ => Verification::Unverified,
                    },
                    principal_id: r.get(7)?,
                    published_at: r.get(8)?,
                })
            },
        )
        .ctx("publish record")
    }

    fn projection_rows(&self, version_id: &str) -> Result<Vec<ProjectionRow>> {
        let c = self.conn()?;
        let mut st = c
            .prepare_cached(
                "SELECT artifact_id, metadata_attachment_id, ftype, combined_sha256 FROM incus_projection \
                 WHERE version_id = ?1 ORDER BY artifact_id",
            )
            .map_err(backend)?;
        let rows = st
            .query_map([version_id], |r| {
                Ok(ProjectionRow {
                    artifact_id: r.get(0)?,
                    metadata_attachment_id: r.get(1)?,
                    ftype: r.get(2)?,
                    combined_sha256: hex_digest_col(r, 3)?,
                })
            })
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn put_alias(&self, image: &str, alias: &str, version: &str) -> Result<Alias> {
        let now = now();
        self.write(|tx| {
            let image_id = Self::image_id(tx, image)?;
            let v = Self::load_version(tx, image, version)?;
            if v.state != VersionState::Published {
                return Err(CatalogError::Precondition(format!("version {version} is not published")));
            }
            let n = tx
                .execute(
                    "UPDATE aliases SET version_id = ?3, updated_at = ?4 WHERE image_id = ?1 AND alias = ?2",
                    params![image_id, alias, v.id, now],
                )
                .ctx("alias")?;
            if n == 0 {
                tx.execute(
                    "INSERT INTO aliases (id, image_id, alias, version_id, created_at, updated_at) VALUES (?1,?2,?3,?4,?5,?5)",
                    params![new_id(), image_id, alias, v.id, now],
                )
                .ctx(&format!("alias {alias}"))?;
            }
            Self::alias_by_name(tx, image, alias)
        })
    }

    fn get_alias(&self, image: &str, alias: &str) -> Result<Alias> {
        Self::alias_by_name(&*self.conn()?, image, alias)
    }

    fn delete_alias(&self, image: &str, alias: &str) -> Result<()> {
        self.write(|tx| {
            let a = Self::alias_by_name(tx, image, alias)?;
            tx.execute("DELETE FROM aliases WHERE id = ?1", [&a.id])
                .ctx("alias")?;
            Ok(())
        })
    }

    fn list_aliases(&self, image: &str) -> Result<Vec<Alias>> {
        let c = self.conn()?;
        Self::image_id(&c, image)?;
        let mut st = c
            .prepare(&format!(
                "SELECT {ALIAS_COLS} FROM aliases l JOIN images i ON i.id = l.image_id \
                 JOIN image_versions v ON v.id = l.version_id WHERE i.name = ?1 ORDER BY l.alias, l.id"
            ))
            .map_err(backend)?;
        let rows = st
            .query_map([image], |r| alias_row(r, 0))
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn all_aliases(&self) -> Result<Vec<(String, Alias)>> {
        let c = self.conn()?;
        let mut st = c
            .prepare(&format!(
                "SELECT i.name, {ALIAS_COLS} FROM aliases l JOIN images i ON i.id = l.image_id \
                 JOIN image_versions v ON v.id = l.version_id ORDER BY i.name, l.alias"
            ))
            .map_err(backend)?;
        let rows = st
            .query_map([], |r| Ok((text(r, 0)?, alias_row(r, 1)?)))
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn generation(&self) -> Result<Option<i64>> {
        self.conn()?
            .query_row(
                "SELECT generation FROM catalog_state WHERE id = 1",
                [],
                |r| Ok(super::migrate::usable_generation(r.get_ref(0)?)),
            )
            .optional()
            .map(Option::flatten)
            .map_err(backend)
    }

    fn renew_generation(&self, above: i64) -> Result<i64> {
        self.write(|tx| super::migrate::ensure_generation(tx, Some(above)))
    }

    fn projection_entries(&self) -> Result<Vec<ProjectionEntry>> {
        self.projection_where(&format!("v.state = 'published' AND {NOT_RETIRED}"), None)
    }

    fn projection_by_fingerprint(&self, prefix: &str) -> Result<Vec<ProjectionEntry>> {
        self.projection_matching(prefix)
    }

    fn blob_references(&self, digest: &Digest) -> Result<Vec<BlobRef>> {
        let c = self.conn()?;
        let mut st = c
            .prepare_cached(&format!(
                "SELECT DISTINCT {IMAGE_COLS}, v.id, v.state = 'published' FROM image_versions v \
                 JOIN images i ON i.id = v.image_id JOIN release_artifacts a ON a.version_id = v.id \
                 LEFT JOIN artifact_attachments t ON t.artifact_id = a.id \
                 WHERE a.primary_blob_digest = ?1 OR t.blob_digest = ?1"
            ))
            .map_err(backend)?;
        let rows = st
            .query_map([digest.to_string()], |r| {
                Ok(BlobRef {
                    image: image_row(r, 0)?,
                    version_id: text(r, 7)?,
                    published: r.get(8)?,
                })
            })
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }
}

impl BlobCatalog for SqliteCatalog {
    fn get_blob(&self, digest: &Digest) -> Result<Option<Blob>> {
        Self::blob_by_digest(&*self.conn()?, digest)
    }

    fn insert_blob(&self, digest: &Digest, size: u64, media_type: Option<&str>) -> Result<Blob> {
        let now = now();
        self.write(|tx| {
            // only a digest not stored yet: the guards refuse any insert over a row
            tx.execute(
                "INSERT INTO cas_blobs (digest, size_bytes, storage_key, media_type, verified_at, created_at) \
                 SELECT ?1, ?2, ?3, ?4, ?5, ?5 WHERE NOT EXISTS (SELECT 1 FROM cas_blobs WHERE digest = ?1)",
                params![digest.to_string(), i64_of(size)?, digest.cas_path(), media_type, now],
            )
            .ctx("blob")?;
            Ok(())
        })?;
        let b = self
            .get_blob(digest)?
            .ok_or_else(|| CatalogError::NotFound(format!("blob {digest}")))?;
        if b.size_bytes != size {
            return Err(CatalogError::Precondition(format!(
                "blob {digest} is stored with size {} not {size}",
                b.size_bytes
            )));
        }
        Ok(b)
    }

    fn create_upload(&self, s: &UploadSession) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                &format!("INSERT INTO upload_sessions ({UPLOAD_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)"),
                params![
                    s.id,
                    s.expected_digest.to_string(),
                    i64_of(s.expected_size_bytes)?,
                    s.state.as_str(),
                    s.expires_at,
                    s.media_type_hint,
                    s.filename_hint,
                    s.failure_message,
                    s.principal_id,
                    s.created_at,
                    s.updated_at
                ],
            )
            .ctx("upload session")?;
            Ok(())
        })
    }

    fn get_upload(&self, id: &str) -> Result<UploadSession> {
        self.conn()?
            .query_row(
                &format!("SELECT {UPLOAD_COLS} FROM upload_sessions WHERE id = ?1"),
                [id],
                upload_row,
            )
            .ctx(&format!("upload {id}"))
    }

    fn set_upload_state(
        &self,
        id: &str,
        state: UploadState,
        failure: Option<&str>,
    ) -> Result<UploadSession> {
        let now = now();
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE upload_sessions SET state = ?2, failure_message = ?3, updated_at = ?4 WHERE id = ?1",
                    params![id, state.as_str(), failure, now],
                )
                .ctx("upload")?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!("upload {id}")));
            }
            tx.query_row(&format!("SELECT {UPLOAD_COLS} FROM upload_sessions WHERE id = ?1"), [id], upload_row)
                .ctx("upload")
        })
    }

    fn put_upload_part(&self, p: &UploadPart) -> Result<()> {
        let now = now();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO upload_parts (upload_id, part_number, etag, size_bytes, uploaded_at) VALUES (?1,?2,?3,?4,?5) \
                 ON CONFLICT (upload_id, part_number) DO UPDATE SET etag = excluded.etag, \
                 size_bytes = excluded.size_bytes, uploaded_at = excluded.uploaded_at",
                params![p.upload_id, p.part_number, p.etag, i64_of(p.size_bytes)?, now],
            )
            .ctx("upload part")?;
            tx.execute(
                "UPDATE upload_sessions SET state = 'uploading', updated_at = ?2 WHERE id = ?1 AND state = 'created'",
                params![p.upload_id, now],
            )
            .ctx("upload")?;
            Ok(())
        })
    }

    fn upload_parts(&self, id: &str) -> Result<Vec<UploadPart>> {
        let c = self.conn()?;
        let mut st = c
            .prepare_cached(
                "SELECT upload_id, part_number, etag, size_bytes FROM upload_parts WHERE upload_id = ?1 ORDER BY part_number",
            )
            .map_err(backend)?;
        let rows = st
            .query_map([id], |r| {
                Ok(UploadPart {
                    upload_id: r.get(0)?,
                    part_number: r.get(1)?,
                    etag: r.get(2)?,
                    size_bytes: u64_col(r, 3)?,
                })
            })
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }
}

/// The roles and their actions as stored (the catalog's own, and the reference schema
/// the repair at open compares with, [`super::migrate`]).
pub(super) fn read_roles(c: &Connection) -> Result<Vec<Role>> {
    let mut st = c
        .prepare("SELECT id, display_name, description FROM roles ORDER BY id")
        .map_err(backend)?;
    let roles: Vec<(String, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(backend)?
        .collect::<rusqlite::Result<_>>()
        .map_err(backend)?;
    let mut out = Vec::new();
    for (id, display_name, description) in roles {
        let mut st = c
            .prepare_cached("SELECT action FROM role_actions WHERE role_id = ?1 ORDER BY action")
            .map_err(backend)?;
        let actions = st
            .query_map([&id], |r| r.get(0))
            .map_err(backend)?
            .collect::<rusqlite::Result<_>>()
            .map_err(backend)?;
        out.push(Role {
            id,
            display_name,
            description,
            actions,
        });
    }
    Ok(out)
}

impl AuthCatalog for SqliteCatalog {
    fn roles(&self) -> Result<Vec<Role>> {
        let c = self.conn()?;
        read_roles(&c)
    }

    fn create_principal(
        &self,
        name: &str,
        kind: &str,
        display_name: &str,
        attributes: &str,
    ) -> Result<Principal> {
        let id = new_id();
        let now = now();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO principals (id, name, kind, display_name, attributes, created_at) VALUES (?1,?2,?3,?4,?5,?6)",
                params![id, name, kind, display_name, attributes, now],
            )
            .ctx(&format!("principal {name}"))?;
            Self::principal(tx, &id)
        })
    }

    fn get_principal(&self, id_or_name: &str) -> Result<Principal> {
        Self::principal(&*self.conn()?, id_or_name)
    }

    fn list_principals(&self) -> Result<Vec<Principal>> {
        let c = self.conn()?;
        let mut st = c
            .prepare("SELECT id FROM principals ORDER BY name")
            .map_err(backend)?;
        let ids: Vec<String> = st
            .query_map([], |r| r.get(0))
            .map_err(backend)?
            .collect::<rusqlite::Result<_>>()
            .map_err(backend)?;
        ids.iter().map(|id| Self::principal(&c, id)).collect()
    }

    fn delete_principal(&self, id: &str) -> Result<()> {
        self.write(|tx| {
            let p = Self::principal(tx, id)?;
            tx.execute("DELETE FROM api_tokens WHERE principal_id = ?1", [&p.id])
                .ctx("tokens")?;
            tx.execute("DELETE FROM grants WHERE principal_id = ?1", [&p.id])
                .ctx("grants")?;
            tx.execute("DELETE FROM principals WHERE id = ?1", [&p.id])
                .ctx("principal")?;
            Ok(())
        })
    }

    fn grant(&self, principal_id: &str, role: &str, scope: &str) -> Result<()> {
        let now = now();
        self.write(|tx| {
            let p = Self::principal(tx, principal_id)?;
            let known: bool = tx
                .query_row("SELECT EXISTS (SELECT 1 FROM roles WHERE id = ?1)", [role], |r| r.get(0))
                .map_err(backend)?;
            if !known {
                return Err(CatalogError::Invalid(format!("unknown role {role}")));
            }
            tx.execute(
                "INSERT INTO grants (principal_id, role_id, scope, created_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT DO NOTHING",
                params![p.id, role, scope, now],
            )
            .ctx("grant")?;
            Ok(())
        })
    }

    fn revoke_grant(&self, principal_id: &str, role: &str, scope: &str) -> Result<()> {
        self.write(|tx| {
            let p = Self::principal(tx, principal_id)?;
            let n = tx
                .execute(
                    "DELETE FROM grants WHERE principal_id = ?1 AND role_id = ?2 AND scope = ?3",
                    params![p.id, role, scope],
                )
                .ctx("grant")?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!(
                    "grant {role} on {scope} for {}",
                    p.name
                )));
            }
            Ok(())
        })
    }

    fn role_actions(&self) -> Result<Vec<(String, String)>> {
        let c = self.conn()?;
        let mut st = c
            .prepare_cached("SELECT role_id, action FROM role_actions ORDER BY role_id, action")
            .map_err(backend)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn count_principals_with_role(&self, role: &str) -> Result<u64> {
        let n: i64 = self
            .conn()?
            .query_row(
                "SELECT count(DISTINCT principal_id) FROM grants WHERE role_id = ?1",
                [role],
                |r| r.get(0),
            )
            .map_err(backend)?;
        Ok(n as u64)
    }

    fn insert_token(&self, t: &ApiToken) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                &format!("INSERT INTO api_tokens ({TOKEN_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)"),
                params![
                    t.id,
                    t.principal_id,
                    t.name,
                    t.secret_hash,
                    t.expires_at,
                    t.last_used_at,
                    t.revoked_at,
                    t.created_at
                ],
            )
            .ctx("api token")?;
            Ok(())
        })
    }

    fn get_token(&self, id: &str) -> Result<ApiToken> {
        self.conn()?
            .query_row(
                &format!("SELECT {TOKEN_COLS} FROM api_tokens WHERE id = ?1"),
                [id],
                token_row,
            )
            .ctx("api token")
    }

    fn list_tokens(&self, principal_id: &str) -> Result<Vec<ApiToken>> {
        let c = self.conn()?;
        let principal_id = &Self::principal(&c, principal_id)?.id;
        let mut st = c
            .prepare(&format!("SELECT {TOKEN_COLS} FROM api_tokens WHERE principal_id = ?1 ORDER BY created_at, id"))
            .map_err(backend)?;
        let rows = st.query_map([principal_id], token_row).map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn revoke_token(&self, id: &str) -> Result<()> {
        let now = now();
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                    params![id, now],
                )
                .ctx("api token")?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!("api token {id}")));
            }
            Ok(())
        })
    }

    fn touch_token(&self, id: &str) -> Result<()> {
        let now = now();
        self.conn()?
            .execute(
                "UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1",
                params![id, now],
            )
            .ctx("api token")?;
        Ok(())
    }

    fn note_auth_failure(&self, client: &str, at_ms: i64, forget_ms: i64) -> Result<u32> {
        keys::note_auth_failure(self, client, at_ms, forget_ms)
    }
}

#[cfg(test)]
mod tests {
    /// CVE-2025-29087, CVE-2025-3277 and CVE-2025-6965 are fixed in SQLite
    /// 3.50.2; the bundled library must be at least that.
    #[test]
    fn bundled_sqlite_has_the_2025_fixes() {
        assert!(
            rusqlite::version_number() >= 3_050_002,
            "bundled SQLite {} predates 3.50.2",
            rusqlite::version()
        );
    }
}
