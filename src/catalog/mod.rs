//! The catalog: what images, versions, artifacts, aliases, blobs, uploads and
//! principals exist. Storage sits behind three narrow traits so that a
//! PostgreSQL catalog can be added as a cargo feature without touching the
//! HTTP code:
//!
//! * [`ContentCatalog`]: images, versions, artifacts, attachments, aliases,
//!   publishing and the Incus projection rows;
//! * [`BlobCatalog`]: CAS blob rows and upload sessions;
//! * [`AuthCatalog`]: principals, roles and API tokens, and the failed-login
//!   throttle's counts;
//! * [`KeyCatalog`]: the trusted publisher keys and their retirements and
//!   revocations (append-only).
//! * [`TransferCatalog`]: rows written as another catalog had them, through
//!   the same guards (`imgsrv migrate`; see [`transfer`]).
//!
//! The invariants (published versions never change, forward-only states) are
//! enforced by the backend itself (SQLite triggers in `schema.sql`), not only
//! by this code.

mod migrate;
#[cfg(feature = "postgres")]
pub mod postgres;
mod space;
pub mod sqlite;
pub mod transfer;

/// The embedded catalog's file in the data directory.
pub const SQLITE_FILE: &str = "catalog.db";

/// Opens the catalog `storage` names: `DATA_DIR/catalog.db` (created when
/// missing), or the PostgreSQL database (its schema migrated). The one place
/// that chooses a catalog backend; every command opens its catalog here. Key
/// files an appliance kept in `DATA_DIR/keys/` are imported into it
/// ([`crate::sign::import_key_files`]).
pub fn open(
    storage: &crate::config::StorageConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<dyn Catalog>> {
    let cat = open_backend(storage, data_dir)?;
    anyhow::Context::context(
        backfill_log(cat.as_ref()),
        "writing the transparency log of what the catalog holds",
    )?;
    crate::sign::import_key_files(cat.as_ref(), data_dir)
        .map_err(|e| e.context("importing the trusted keys of DATA/keys into the catalog"))?;
    Ok(cat)
}

/// Fills the log of a catalog written before imgsrv had one ([`LogCatalog::append_log_at`]),
/// once: a catalog whose log has entries, or that holds nothing to log, is left as it is.
fn backfill_log(cat: &dyn Catalog) -> Result<()> {
    // a log that ever had a key or a checkpoint is not refilled: emptied behind
    // imgsrv's back, it would be refilled from what the intruder left (`imgsrv log
    // verify` reports it instead); and a deployment `imgsrv migrate` is filling gets
    // the appliance's log, copied, which it claims before the first row
    if cat.log_size()? > 0 || cat.log_vkey()?.is_some() || cat.latest_checkpoint()?.is_some() {
        return Ok(());
    }
    let entries = log_entry::existing(cat)?;
    if !entries.is_empty() && cat.append_log_at(0, &entries)? {
        log::info!(
            "transparency log: wrote {} entries for what the catalog held",
            entries.len()
        );
    }
    Ok(())
}

fn open_backend(
    storage: &crate::config::StorageConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<dyn Catalog>> {
    use anyhow::Context;
    match &storage.catalog {
        crate::config::CatalogBackend::Sqlite => {
            let db = data_dir.join(SQLITE_FILE);
            let c = SqliteCatalog::open(&db)
                .with_context(|| format!("opening catalog {}", db.display()))?;
            Ok(std::sync::Arc::new(c))
        }
        #[cfg(feature = "postgres")]
        crate::config::CatalogBackend::Postgres { url } => {
            let c = postgres::PgCatalog::open(url).with_context(|| {
                format!(
                    "opening the PostgreSQL catalog {}",
                    crate::config::redact_url(url)
                )
            })?;
            Ok(std::sync::Arc::new(c))
        }
        #[cfg(not(feature = "postgres"))]
        crate::config::CatalogBackend::Postgres { .. } => anyhow::bail!(
            "[storage] catalog = \"postgres\", but this imgsrv was built without PostgreSQL \
             support: build it with `cargo build --release --features full`"
        ),
    }
}

use crate::digest::Digest;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

pub use sqlite::SqliteCatalog;
pub use transfer::TransferCatalog;

/// What went wrong in a catalog operation. Variants name the failure, never
/// the backend.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A state precondition (not a draft, blob missing, alias to an
    /// unpublished version, immutable row...).
    #[error("{0}")]
    Precondition(String),
    #[error("invalid: {0}")]
    Invalid(String),
    /// The change conflicts with the current state of other rows (an alias
    /// points at a version being retired): it works once that is changed.
    #[error("{0}")]
    Conflict(String),
    #[error("catalog backend error: {0}")]
    Backend(String),
    /// The catalog's storage is full: nothing was changed (a transaction is
    /// all or nothing), and the same change works once space is freed.
    #[error("the catalog's disk is full: {0}")]
    Full(String),
    /// The catalog's database cannot be reached now (it is down, restarting,
    /// or refuses connections): nothing was changed, or the change's outcome
    /// is unknown when the connection broke at its commit; the same request
    /// works once the database is back (connections are made again by
    /// themselves).
    #[error("the catalog database is unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `public` or `private`.
    pub visibility: String,
    pub created_at: String,
    pub updated_at: String,
}

impl Image {
    /// Anything but `public` is private: a visibility the sqlite3 shell set to
    /// something else (with CHECK constraints ignored) hides the image rather
    /// than exposing one that was private.
    pub fn is_private(&self) -> bool {
        self.visibility != "public"
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    Draft,
    Publishing,
    Published,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Draft => "draft",
            VersionState::Publishing => "publishing",
            VersionState::Published => "published",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "draft" => VersionState::Draft,
            "publishing" => VersionState::Publishing,
            "published" => VersionState::Published,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageVersion {
    pub id: String,
    pub image_id: String,
    pub image_name: String,
    pub version: String,
    pub state: VersionState,
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Artifact {
    pub id: String,
    pub version_id: String,
    pub variant: String,
    pub operating_system: String,
    pub architecture: String,
    pub format: String,
    pub primary_blob_digest: Digest,
    pub primary_blob_size_bytes: u64,
    pub primary_media_type: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Attachment {
    pub id: String,
    pub artifact_id: String,
    pub name: String,
    pub media_type: String,
    pub blob_digest: Digest,
    pub blob_size_bytes: u64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ArtifactWithAttachments {
    pub artifact: Artifact,
    pub attachments: Vec<Attachment>,
}

/// A version with everything it contains: the read model behind the
/// canonical manifest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VersionView {
    pub image: Image,
    pub version: ImageVersion,
    pub artifacts: Vec<ArtifactWithAttachments>,
}

/// A version citing a blob (see [`ContentCatalog::blob_references`]).
#[derive(Debug, Clone)]
pub struct BlobRef {
    pub image: Image,
    pub version_id: String,
    /// Published (else a draft, or publishing).
    pub published: bool,
}

/// A published version taken out of service: append-only, never withdrawn.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Retirement {
    #[serde(skip)]
    pub version_id: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal_name: Option<String>,
    pub retired_at: String,
    /// When garbage collection stopped keeping its bytes (they answer 410
    /// from then on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collected_at: Option<String>,
}

/// A retirement with the names of what it retired.
#[derive(Debug, Clone)]
pub struct RetiredVersion {
    pub image: String,
    pub version: String,
    pub retirement: Retirement,
}

/// Something that keeps a blob from being collected
/// ([`MaintCatalog::blob_claims`]); which claims keep it is decided in one
/// place, `crate::maint::gc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// An artifact or attachment of a version cites it.
    Version {
        version_id: String,
        state: VersionState,
        /// Retired and collected.
        collected: bool,
        /// When the artifact or attachment citing it was added.
        cited_at: String,
    },
    /// An upload session expects it.
    Upload {
        id: String,
        state: UploadState,
        expires_at: String,
        /// When the session last changed (for a `ready` one: when its blob
        /// was stored).
        updated_at: String,
    },
    /// A job stored it and is about to cite it ([`MaintCatalog::pin_blob`]).
    Pin { holder: String, expires_at: String },
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Alias {
    pub id: String,
    pub image_id: String,
    pub alias: String,
    pub version_id: String,
    pub version: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone)]
pub struct NewArtifact {
    pub variant: String,
    pub operating_system: String,
    pub architecture: String,
    pub format: String,
    pub primary_blob_digest: Digest,
    pub primary_blob_size_bytes: u64,
    pub primary_media_type: String,
}

#[derive(Debug, Clone)]
pub struct NewAttachment {
    pub name: String,
    pub media_type: String,
    pub blob_digest: Digest,
    pub blob_size_bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verification {
    Verified,
    Unverified,
    Skipped,
}

impl Verification {
    pub fn as_str(self) -> &'static str {
        match self {
            Verification::Verified => "verified",
            Verification::Unverified => "unverified",
            Verification::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRecord {
    pub version_id: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
    pub signature: Option<String>,
    pub signer_key_id: Option<String>,
    pub signer_key_name: Option<String>,
    pub verification: Verification,
    pub principal_id: Option<String>,
    pub published_at: String,
}

/// Incus fingerprint of one artifact: sha256(metadata tarball || root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionRow {
    pub artifact_id: String,
    pub metadata_attachment_id: String,
    /// `squashfs`, `disk-kvm.img` or `root.tar.xz`.
    pub ftype: String,
    pub combined_sha256: Digest,
}

/// One projected artifact of a published version, with what the Simple
/// Streams builder needs.
#[derive(Debug, Clone)]
pub struct ProjectionEntry {
    pub image: Image,
    pub version: ImageVersion,
    pub published_at: String,
    pub artifact: Artifact,
    pub metadata: Attachment,
    pub ftype: String,
    pub combined_sha256: Digest,
    /// The key id that signed the version's publication, when it was
    /// verified (none when published unsigned or unverified).
    pub signer_key_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Blob {
    pub digest: Digest,
    pub size_bytes: u64,
    pub storage_key: String,
    pub media_type: Option<String>,
    pub verified_at: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UploadState {
    Created,
    Uploading,
    Ready,
    Failed,
    Aborted,
}

impl UploadState {
    pub fn as_str(self) -> &'static str {
        match self {
            UploadState::Created => "created",
            UploadState::Uploading => "uploading",
            UploadState::Ready => "ready",
            UploadState::Failed => "failed",
            UploadState::Aborted => "aborted",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "created" => UploadState::Created,
            "uploading" => UploadState::Uploading,
            "ready" => UploadState::Ready,
            "failed" => UploadState::Failed,
            "aborted" => UploadState::Aborted,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UploadSession {
    pub id: String,
    pub expected_digest: Digest,
    pub expected_size_bytes: u64,
    pub state: UploadState,
    pub expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type_hint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename_hint: Option<String>,
    #[serde(skip)]
    pub failure_message: Option<String>,
    #[serde(skip)]
    pub principal_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UploadPart {
    pub upload_id: String,
    pub part_number: u32,
    pub etag: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Role {
    pub id: String,
    pub display_name: String,
    pub description: String,
    pub actions: Vec<String>,
}

/// One cell of the identity matrix: a role on the images matching a scope.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    pub role: String,
    pub scope: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Principal {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub display_name: String,
    /// Distinct roles held on any scope.
    pub role_ids: Vec<String>,
    pub grants: Vec<Grant>,
    pub created_at: String,
}

/// One audit log row to append.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AuditEntry {
    pub principal_id: Option<String>,
    pub principal_name: Option<String>,
    pub action: String,
    pub target: String,
    /// `ok`, `denied` or `failed`.
    pub outcome: String,
    pub status: Option<u16>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub remote: Option<String>,
    /// A JSON object.
    pub detail: String,
}

/// A stored audit row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub id: i64,
    pub at: String,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// Filters for reading the audit log; all optional, combined with AND.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub principal: Option<String>,
    /// Exact action, or a prefix ending in `.` (e.g. `grant.`).
    pub action: Option<String>,
    pub outcome: Option<String>,
    /// Substring of the target (e.g. an image name).
    pub target: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    /// Rows after this id (for paging).
    pub after_id: Option<i64>,
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    pub principal_id: String,
    pub name: String,
    #[serde(skip)]
    pub secret_hash: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    pub created_at: String,
}

/// Images, versions, artifacts, attachments, aliases, publishing.
pub trait ContentCatalog: Send + Sync {
    fn create_image(
        &self,
        name: &str,
        display_name: Option<&str>,
        description: Option<&str>,
        visibility: &str,
    ) -> Result<Image>;
    fn set_visibility(&self, name: &str, visibility: &str) -> Result<Image>;
    fn get_image(&self, name: &str) -> Result<Image>;
    /// Images with at least one published version (all images if `include_unpublished`).
    fn list_images(&self, include_unpublished: bool) -> Result<Vec<Image>>;

    fn create_version(
        &self,
        image: &str,
        version: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<ImageVersion>;
    fn get_version(&self, image: &str, version: &str) -> Result<ImageVersion>;
    /// Newest first; drafts only if `include_unpublished`.
    fn list_versions(&self, image: &str, include_unpublished: bool) -> Result<Vec<ImageVersion>>;
    fn version_view(&self, image: &str, version: &str) -> Result<VersionView>;

    fn add_artifact(&self, version_id: &str, a: &NewArtifact) -> Result<Artifact>;
    fn delete_artifact(&self, version_id: &str, artifact_id: &str) -> Result<()>;
    fn add_attachment(
        &self,
        version_id: &str,
        artifact_id: &str,
        a: &NewAttachment,
    ) -> Result<Attachment>;
    fn delete_attachment(
        &self,
        version_id: &str,
        artifact_id: &str,
        attachment_id: &str,
    ) -> Result<()>;

    /// In one transaction: checks that the version's canonical manifest still
    /// equals `record.manifest` (the bytes whose signature was checked), moves
    /// draft -> publishing, writes the record and the projection rows, and
    /// marks the version published.
    fn publish(&self, record: &PublishRecord, projection: &[ProjectionRow])
        -> Result<ImageVersion>;
    fn publish_record(&self, version_id: &str) -> Result<PublishRecord>;
    fn projection_rows(&self, version_id: &str) -> Result<Vec<ProjectionRow>>;

    fn put_alias(&self, image: &str, alias: &str, version: &str) -> Result<Alias>;
    fn get_alias(&self, image: &str, alias: &str) -> Result<Alias>;
    fn delete_alias(&self, image: &str, alias: &str) -> Result<()>;
    fn list_aliases(&self, image: &str) -> Result<Vec<Alias>>;
    /// Every alias of every image (Simple Streams projection).
    fn all_aliases(&self) -> Result<Vec<(String, Alias)>>;

    /// Changes whenever what the projection shows may have changed, and only
    /// moves forward. `None` when the counter is missing or unreadable (the
    /// sqlite3 shell, before the guards): nothing can be cached on it.
    fn generation(&self) -> Result<Option<i64>>;
    /// Moves the counter to a value above `above` that no cache can have
    /// seen, repairing a missing or unreadable one; returns it. For a cache
    /// that found the counter unreadable or behind what it had seen.
    fn renew_generation(&self, above: i64) -> Result<i64>;
    fn projection_entries(&self) -> Result<Vec<ProjectionEntry>>;
    /// The projection entries of every published version (retired or not, of any
    /// image, whoever signed it) whose Incus fingerprint starts with `prefix` (1 to
    /// 64 lowercase hex digits, else [`CatalogError::Invalid`]): what an Incus client
    /// asks for by fingerprint may be one the projection no longer lists, and the
    /// download rule ([`crate::download`]) says why it is not served.
    fn projection_by_fingerprint(&self, prefix: &str) -> Result<Vec<ProjectionEntry>>;
    /// The versions citing this digest (as an artifact or an attachment), with
    /// their images: who may download a blob follows from these
    /// ([`crate::download`]).
    fn blob_references(&self, digest: &Digest) -> Result<Vec<BlobRef>>;
}

/// CAS blob rows and upload sessions.
pub trait BlobCatalog: Send + Sync {
    fn get_blob(&self, digest: &Digest) -> Result<Option<Blob>>;
    /// Inserts the row if absent (idempotent: an identical row may exist).
    fn insert_blob(&self, digest: &Digest, size: u64, media_type: Option<&str>) -> Result<Blob>;

    fn create_upload(&self, s: &UploadSession) -> Result<()>;
    fn get_upload(&self, id: &str) -> Result<UploadSession>;
    fn set_upload_state(
        &self,
        id: &str,
        state: UploadState,
        failure: Option<&str>,
    ) -> Result<UploadSession>;
    fn put_upload_part(&self, p: &UploadPart) -> Result<()>;
    fn upload_parts(&self, id: &str) -> Result<Vec<UploadPart>>;
}

/// Principals, roles, API tokens.
pub trait AuthCatalog: Send + Sync {
    fn roles(&self) -> Result<Vec<Role>>;
    fn create_principal(
        &self,
        name: &str,
        kind: &str,
        display_name: &str,
        attributes: &str,
    ) -> Result<Principal>;
    /// By id, or else by name.
    fn get_principal(&self, id_or_name: &str) -> Result<Principal>;
    fn list_principals(&self) -> Result<Vec<Principal>>;
    /// Removes a principal with its grants and tokens.
    fn delete_principal(&self, id: &str) -> Result<()>;
    /// Adds a grant (idempotent).
    fn grant(&self, principal_id: &str, role: &str, scope: &str) -> Result<()>;
    /// Removes a grant; NotFound if the principal does not hold it.
    fn revoke_grant(&self, principal_id: &str, role: &str, scope: &str) -> Result<()>;
    /// Actions of each role.
    fn role_actions(&self) -> Result<Vec<(String, String)>>;
    fn count_principals_with_role(&self, role: &str) -> Result<u64>;

    fn insert_token(&self, t: &ApiToken) -> Result<()>;
    fn get_token(&self, id: &str) -> Result<ApiToken>;
    fn list_tokens(&self, principal_id: &str) -> Result<Vec<ApiToken>>;
    fn revoke_token(&self, id: &str) -> Result<()>;
    fn touch_token(&self, id: &str) -> Result<()>;

    /// Records a failed authentication from `client` (an IP address) at `at_ms`
    /// (milliseconds since 1970) and returns how many failures it has made in a row,
    /// this one included: the count starts again at 1 after `forget_ms` without a
    /// failure. The rows of every client quiet for longer than that are dropped. Shared
    /// by every instance on this catalog, so failures on one slow the next attempt on
    /// any other ([`crate::auth::FailureThrottle`]).
    fn note_auth_failure(&self, client: &str, at_ms: i64, forget_ms: i64) -> Result<u32>;
}

/// A trusted publisher key's lifecycle. `retired`: no new publications, older ones
/// still verify. `revoked` (compromised): nothing signed with it verifies. Only
/// forward: active -> retired -> revoked, or active -> revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Active,
    Retired,
    Revoked,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Retired => "retired",
            KeyState::Revoked => "revoked",
        }
    }
}

/// A trusted publisher key as the catalog keeps it ([`KeyCatalog`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub name: String,
    /// Upper-case hex, as minisign prints it.
    pub key_id: String,
    /// The text of the `minisign -G` public key file (two lines).
    pub public_key: String,
    /// Image-name globs this key may sign publications for.
    pub scopes: Vec<String>,
    pub added_at: String,
    /// When it was retired (its first retirement record), if it was.
    pub retired_at: Option<String>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<String>,
}

impl KeyRecord {
    /// Revoked if a revocation is recorded, else retired if a retirement is.
    pub fn state(&self) -> KeyState {
        if self.revoked_at.is_some() {
            KeyState::Revoked
        } else if self.retired_at.is_some() {
            KeyState::Retired
        } else {
            KeyState::Active
        }
    }
}

/// The trusted publisher keys, shared by every instance on the catalog: a
/// revocation recorded by one holds on every other at its next read. Managed by
/// operators only (`imgsrv key ... --data DIR`), never through the HTTP API.
///
/// Retirements and revocations are records of their own, append-only and keyed
/// by key id (the backend's guards refuse changing or deleting them, also from
/// `sqlite3`/`psql`): a key's state is the furthest one recorded, so a revoked
/// key never becomes active again, not even removed and added back (refused),
/// and a revoked key's row cannot be removed (it stays listed, so that
/// consumers learn of the revocation from `GET /v1/keys`).
pub trait KeyCatalog: Send + Sync {
    /// Every trusted key, by name, with its state.
    fn trusted_keys(&self) -> Result<Vec<KeyRecord>>;
    /// Adds a key, with the retirement and revocation it carries (a revoked key
    /// imported from files), in one transaction. [`CatalogError::AlreadyExists`]
    /// when its name or key id is taken; [`CatalogError::Precondition`] when its key
    /// id was retired or revoked before (a key is never trusted again).
    fn add_trusted_key(&self, k: &KeyRecord) -> Result<()>;
    /// Replaces a key's scopes ([`CatalogError::NotFound`] for an unknown key id).
    fn set_key_scopes(&self, key_id: &str, scopes: &[String]) -> Result<()>;
    /// Records that `key_id` (named `name` then) was retired or revoked at `at`:
    /// `true` when recorded now, `false` when that state was recorded before (it
    /// keeps its first time). Also for a key id the catalog does not trust: it can
    /// then never be added. [`CatalogError::Precondition`] for retiring a revoked
    /// key; [`CatalogError::Invalid`] for [`KeyState::Active`] (nothing goes back).
    fn record_key_state(&self, key_id: &str, name: &str, state: KeyState, at: &str)
        -> Result<bool>;
    /// Stops trusting a key: its row goes, its retirement record stays (it is never
    /// trusted again). [`CatalogError::NotFound`] for an unknown key id;
    /// [`CatalogError::Precondition`] for a revoked key (it stays listed).
    fn remove_trusted_key(&self, key_id: &str) -> Result<()>;
}

/// The transparency log's rows (migrations/0007-log.sql, [`crate::tlog`]). Entries are
/// appended by the catalog itself, in the transaction of the event they record
/// ([`ContentCatalog::publish`], [`LifecycleCatalog::retire`], [`KeyCatalog`]'s changes),
/// never through this trait; the log's key signs checkpoints outside the catalog
/// ([`crate::tlog::Log`]).
pub trait LogCatalog: Send + Sync {
    /// Entries in the log.
    fn log_size(&self) -> Result<u64>;
    /// The texts of entries `[start, end)` (`end` beyond the log: up to its end).
    fn log_entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>>;
    /// The stored hashes at `nodes`, in that order ([`CatalogError::NotFound`] for one
    /// the log has not completed).
    fn log_hashes(&self, nodes: &[crate::tlog::tree::Node])
        -> Result<Vec<crate::tlog::tree::Hash>>;
    /// The entries about `image`@`version` (its publication, its retirement): index and kind.
    fn log_entries_of(&self, image: &str, version: &str) -> Result<Vec<(u64, String)>>;
    /// Appends `entries` to a log that has exactly `at` entries, in one transaction;
    /// `false` (and nothing written) when it has another number. For what is not an
    /// event of this catalog: the log of a catalog written before there was one,
    /// filled from what it holds (`at` 0), and a log copied entry by entry from
    /// another catalog (`imgsrv migrate`), which makes the same tree.
    fn append_log_at(&self, at: u64, entries: &[crate::tlog::entry::Entry]) -> Result<bool>;
    /// Stores a signed checkpoint of the first `size` entries; `false` when one of
    /// that size is stored already (the first stays).
    fn put_checkpoint(&self, size: u64, note: &str) -> Result<bool>;
    /// The stored checkpoint of the largest size.
    fn latest_checkpoint(&self) -> Result<Option<(u64, String)>>;
    /// Every stored checkpoint, smallest first.
    fn checkpoints(&self) -> Result<Vec<(u64, String)>>;
    /// The log's verifier key, once an instance recorded it.
    fn log_vkey(&self) -> Result<Option<String>>;
    /// Records `vkey` as the log's key unless one is recorded: the one recorded.
    fn claim_log_vkey(&self, vkey: &str) -> Result<String>;
}

/// The log entries of the events a catalog records ([`crate::tlog::entry`]).
pub(crate) mod log_entry {
    use super::*;
    use crate::tlog::entry::Entry;

    pub fn published(v: &ImageVersion, r: &PublishRecord) -> Entry {
        Entry::Publish {
            image: v.image_name.clone(),
            version: v.version.clone(),
            manifest: r.manifest_digest,
            signer: r.signer_key_id.clone(),
            time: r.published_at.clone(),
        }
    }

    pub fn retired(image: String, version: String, manifest: Digest, at: &str) -> Entry {
        Entry::Retire {
            image,
            version,
            manifest,
            time: at.to_string(),
        }
    }

    /// A key's addition (its retirement and revocation, if it carries them, are
    /// entries of their own: [`key_state`]).
    pub fn key_added(k: &KeyRecord) -> Entry {
        // the key line of the minisign public key file, without its comment
        let public_key = k
            .public_key
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .unwrap_or_default()
            .to_string();
        Entry::KeyAdd {
            key: k.key_id.clone(),
            name: k.name.clone(),
            public_key,
            time: k.added_at.clone(),
        }
    }

    /// The entries of what a catalog written before it had a log holds, oldest first:
    /// every publication (retired versions' too), retirement, and trusted key with
    /// its states, ordered by their times.
    pub fn existing(cat: &dyn Catalog) -> Result<Vec<Entry>> {
        let mut out: Vec<(String, Entry)> = Vec::new();
        let mut publication = |image: &str, version: &str| -> Result<PublishRecord> {
            let v = cat.get_version(image, version)?;
            let r = cat.publish_record(&v.id)?;
            out.push((r.published_at.clone(), published(&v, &r)));
            Ok(r)
        };
        for img in cat.list_images(true)? {
            for v in cat.list_versions(&img.name, false)? {
                publication(&img.name, &v.version)?;
            }
        }
        let mut retirements = Vec::new();
        for rv in cat.retirements()? {
            let r = publication(&rv.image, &rv.version)?;
            let at = rv.retirement.retired_at;
            retirements.push((
                at.clone(),
                retired(rv.image, rv.version, r.manifest_digest, &at),
            ));
        }
        out.extend(retirements);
        for k in cat.trusted_keys()? {
            out.push((k.added_at.clone(), key_added(&k)));
            for (state, at) in [
                (crate::sign::KeyState::Retired, &k.retired_at),
                (crate::sign::KeyState::Revoked, &k.revoked_at),
            ] {
                if let Some(at) = at {
                    out.push((at.clone(), key_state(&k.key_id, &k.name, state, at)));
                }
            }
        }
        // RFC 3339 UTC times of one format sort as text; a stable sort keeps a
        // version's publication before its retirement
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out.into_iter().map(|(_, e)| e).collect())
    }

    /// A retirement or revocation (never [`crate::sign::KeyState::Active`]: the
    /// catalog refuses that before it gets here).
    pub fn key_state(key_id: &str, name: &str, state: crate::sign::KeyState, at: &str) -> Entry {
        let (key, name, time) = (key_id.to_string(), name.to_string(), at.to_string());
        match state {
            crate::sign::KeyState::Revoked => Entry::KeyRevoke { key, name, time },
            _ => Entry::KeyRetire { key, name, time },
        }
    }
}

/// What an append writes: the entry's text and the hashes it completes.
pub(crate) struct LogAppend {
    pub index: u64,
    pub text: Vec<u8>,
    pub kind: &'static str,
    pub image: Option<String>,
    pub version: Option<String>,
    pub key_id: Option<String>,
    pub hashes: Vec<(crate::tlog::tree::Node, crate::tlog::tree::Hash)>,
}

/// [`LogAppend`] of `entry` as entry number `size`, reading the stored hashes it
/// needs (at most log2(size)) through `read`.
pub(crate) fn log_append(
    size: u64,
    entry: &crate::tlog::entry::Entry,
    read: &dyn Fn(&[crate::tlog::tree::Node]) -> Result<Vec<crate::tlog::tree::Hash>>,
) -> Result<LogAppend> {
    struct Reader<'a>(
        &'a dyn Fn(&[crate::tlog::tree::Node]) -> Result<Vec<crate::tlog::tree::Hash>>,
    );
    impl crate::tlog::tree::HashReader for Reader<'_> {
        fn read_hashes(
            &self,
            nodes: &[crate::tlog::tree::Node],
        ) -> anyhow::Result<Vec<crate::tlog::tree::Hash>> {
            Ok((self.0)(nodes)?)
        }
    }
    let text = entry
        .text()
        .map_err(|e| CatalogError::Invalid(e.to_string()))?
        .into_bytes();
    let leaf = crate::tlog::tree::leaf_hash(&text);
    let hashes = crate::tlog::tree::hashes_to_store(size, leaf, &Reader(read))
        .map_err(|e| CatalogError::Backend(format!("the log's stored hashes: {e:#}")))?;
    let (image, version) = match entry.version() {
        Some((i, v)) => (Some(i.to_string()), Some(v.to_string())),
        None => (None, None),
    };
    Ok(LogAppend {
        index: size,
        text,
        kind: entry.kind(),
        image,
        version,
        key_id: entry.key().map(str::to_string),
        hashes,
    })
}

/// The append-only audit log.
pub trait AuditCatalog: Send + Sync {
    /// Appends a row. A backend keeps room for these even when its storage
    /// is full (see [`AuditCatalog::room_for_change`]), so that the rows of
    /// refusals and failures are still recorded then.
    fn append_audit(&self, e: &AuditEntry) -> Result<()>;
    /// Ok when a change and, after it, its audit row can both be recorded
    /// now; [`CatalogError::Full`] otherwise, and the caller must refuse the
    /// change before making it. A change that was let through thus always
    /// finds room for its audit row.
    fn room_for_change(&self) -> Result<()>;
    fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>>;
}

/// Held while a maintenance job runs; released when dropped.
pub struct JobLock(Box<dyn HeldLock>);

/// Whether `job` may name a [`MaintCatalog::job_lock`]: 1 to 100 of `[A-Za-z0-9._-]`,
/// not starting with a dot (the SQLite backend makes it a file name).
pub fn job_lock_name_ok(job: &str) -> bool {
    (1..=100).contains(&job.len())
        && !job.starts_with('.')
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl JobLock {
    pub fn new(held: impl HeldLock + 'static) -> JobLock {
        JobLock(Box::new(held))
    }

    /// Ok while the lock is still held. A lock can be lost under its holder when
    /// the backend keeps it in a session (PostgreSQL: a restart of the database, or
    /// an administrator's `pg_terminate_backend`, ends the session and releases it,
    /// and another holder may then have it): a job that must not overlap with
    /// another asks here after each step it took under the lock. A passing check
    /// proves the lock was held without a break from the moment it was granted.
    pub fn check(&self) -> Result<()> {
        self.0.check()
    }
}

/// What a backend keeps for a [`JobLock`] (released when dropped).
pub trait HeldLock: Send + Sync {
    /// [`JobLock::check`].
    fn check(&self) -> Result<()>;
}

/// A flock(2) lock: the kernel keeps it for as long as the descriptor is open, so it
/// is never lost under its holder.
impl HeldLock for std::fs::File {
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// How [`MaintCatalog::job_lock`] takes a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// With other shared holders (a backup copying blobs).
    Shared,
    /// Alone (a GC deleting blobs).
    Exclusive,
}

/// Taking versions out of service: deleting drafts, retiring published
/// versions (append-only), and marking retired versions collected.
pub trait LifecycleCatalog: Send + Sync {
    /// Deletes a draft with its artifacts, attachments and metadata;
    /// [`CatalogError::Precondition`] for a published version.
    fn delete_draft(&self, image: &str, version: &str) -> Result<()>;
    /// Retires a published version. [`CatalogError::Conflict`] while an
    /// alias points at it; [`CatalogError::AlreadyExists`] if it is retired.
    fn retire(
        &self,
        version_id: &str,
        reason: &str,
        principal_id: Option<&str>,
        principal_name: Option<&str>,
    ) -> Result<Retirement>;
    fn retirement(&self, version_id: &str) -> Result<Option<Retirement>>;
    /// Every retirement, oldest first.
    fn retirements(&self) -> Result<Vec<RetiredVersion>>;
    /// Stops keeping a retired version's bytes (idempotent).
    fn collect_version(&self, version_id: &str) -> Result<()>;
}

/// The last run of a maintenance job ([`MaintCatalog::record_job_run`]).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JobRun {
    pub job: String,
    pub last_attempt_at: String,
    /// `success` or `error`.
    pub last_outcome: String,
    pub last_success_at: Option<String>,
    pub last_error_at: Option<String>,
    pub detail: String,
}

/// One blob as one version cites it (see [`MaintCatalog::cited_blobs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CitedBlob {
    pub image: String,
    pub version: String,
    pub version_id: String,
    /// Published (else a draft, or being published).
    pub published: bool,
    pub digest: Digest,
    /// The size the version declares.
    pub size: u64,
    /// The citing artifact: `variant architecture format`.
    pub artifact: String,
    /// The attachment's name when an attachment cites it (else the
    /// artifact's primary blob).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
}

/// What maintenance jobs (gc, scrub, backup) need from the catalog beyond
/// the content and blob rows.
pub trait MaintCatalog: Send + Sync {
    /// Records the outcome of a run of `job` (wherever it ran: inside a
    /// server or from the command line), replacing the previous one.
    fn record_job_run(&self, job: &str, ok: bool, detail: &str) -> Result<()>;
    /// The last run of every job that has run.
    fn job_runs(&self) -> Result<Vec<JobRun>>;
    /// Every blob row.
    fn blob_rows(&self) -> Result<Vec<Blob>>;
    /// The claims on `digest` (on every digest with `None`), read now.
    fn blob_claims(&self, digest: Option<&Digest>) -> Result<Vec<(Digest, Claim)>>;
    /// In one transaction: reads the row of each of `digests` and its
    /// claims, and deletes the row unless `keep(row, claims)`; returns the
    /// rows deleted. Nothing can claim a digest between the check and the
    /// delete.
    fn delete_blob_rows(
        &self,
        digests: &[Digest],
        keep: &mut dyn FnMut(&Blob, &[Claim]) -> bool,
    ) -> Result<Vec<Blob>>;
    /// Keeps `digest` from being collected until `expires_at` or
    /// [`MaintCatalog::release_pins`] (idempotent; a later expiry wins).
    fn pin_blob(&self, digest: &Digest, holder: &str, expires_at: &str) -> Result<()>;
    /// Removes the pins of `holder`, and every pin that has expired.
    fn release_pins(&self, holder: &str) -> Result<()>;
    /// Upload sessions that expired before `before` (any state).
    fn expired_uploads(&self, before: &str) -> Result<Vec<UploadSession>>;
    /// Deletes an upload session and its part rows if it expired before
    /// `before`; `true` if it was deleted.
    fn delete_upload(&self, id: &str, before: &str) -> Result<bool>;
    /// Every blob every version cites (artifacts' primary blobs and
    /// attachments), drafts included, one entry per citation, ordered by
    /// image and version: what a scrub checks the store against.
    fn cited_blobs(&self) -> Result<Vec<CitedBlob>>;

    /// A lock named `job`, held by every process and every instance sharing
    /// this catalog (a file lock beside the SQLite file; an advisory lock in
    /// a shared database). `wait`: block until it can be had; else `None`
    /// when another holder has it. Locks named alike exclude each other by
    /// mode (shared holders together, an exclusive one alone).
    fn job_lock(&self, job: &str, mode: LockMode, wait: bool) -> Result<Option<JobLock>>;
    /// Blobs recorded and the sum of their sizes (the metrics read it at each scrape,
    /// so it must stay cheap).
    fn blob_totals(&self) -> Result<(u64, u64)>;
    /// Ok when the catalog can be written now (`/readyz`): its storage is writable (a
    /// read-only filesystem or database fails here) and has room for a change
    /// ([`AuditCatalog::room_for_change`], [`CatalogError::Full`] otherwise). Changes
    /// nothing.
    fn probe_writable(&self) -> Result<()>;

    /// Writes a consistent copy of the whole catalog, as it was at one
    /// moment, to the new file `dest` (which must not exist), while others
    /// go on reading and writing: the catalog half of an online backup.
    /// [`open_file`] opens the copy as a catalog. The file is durable when
    /// this returns.
    fn snapshot_to(&self, dest: &Path) -> Result<()>;

    /// Checks the catalog's storage for damage (SQLite: `PRAGMA
    /// integrity_check`): the problems found, none when it is sound.
    fn check_integrity(&self) -> Result<Vec<String>>;

    /// Every blob row, in digest order, one at a time to `each` (which
    /// returns `false` to stop). No read stays open while `each` runs, so a
    /// slow `each` (a backup copying the blob) holds nothing up.
    fn each_blob(&self, each: &mut dyn FnMut(Blob) -> bool) -> Result<()>;
}

/// Opens the catalog file at `path` (a data directory's `catalog.db`, or a
/// copy written by [`MaintCatalog::snapshot_to`]), applying pending
/// migrations and repairs.
pub fn open_file(path: &Path) -> Result<Box<dyn Catalog>> {
    Ok(Box::new(SqliteCatalog::open(path)?))
}

/// Everything a server needs from its catalog (and `imgsrv migrate`, the
/// [`TransferCatalog`] loads).
pub trait Catalog:
    ContentCatalog
    + BlobCatalog
    + AuthCatalog
    + AuditCatalog
    + LifecycleCatalog
    + MaintCatalog
    + TransferCatalog
    + KeyCatalog
    + LogCatalog
{
}
impl<T> Catalog for T where
    T: ContentCatalog
        + BlobCatalog
        + AuthCatalog
        + AuditCatalog
        + LifecycleCatalog
        + MaintCatalog
        + TransferCatalog
        + KeyCatalog
        + LogCatalog
{
}

/// RFC 3339 UTC timestamp with nanoseconds.
/// `imgsrv VERSION` plus the versions of the storage engines built in (for
/// `imgsrv --version` and the server's start line).
pub fn versions() -> String {
    format!(
        "{} (SQLite {} bundled)",
        env!("CARGO_PKG_VERSION"),
        rusqlite::version()
    )
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
