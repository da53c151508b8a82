//! The application: configuration, catalog, blob store and the Simple Streams
//! cache, built once at start and shared by every request thread. Domain
//! operations that span the catalog and the store (ingest, publish) live here
//! so that the HTTP layer stays a thin translation.

use crate::cas::BlobStore;
use crate::catalog::Catalog;
use crate::config::{Config, VerificationMode};
use crate::simplestreams::StreamsCache;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CATALOG_FILE: &str = crate::catalog::SQLITE_FILE;

pub struct App {
    pub config: Config,
    pub catalog: Arc<dyn Catalog>,
    pub blobs: Arc<dyn BlobStore>,
    pub streams: StreamsCache,
    pub auth_failures: crate::auth::FailureThrottle,
    /// Fingerprints taken while roots were uploaded.
    pub seen_fingerprints: crate::fingerprint::Seen,
    /// The TLS certificate as read at start (the web catalog shows its fingerprint);
    /// `None` when it cannot be read.
    pub served_cert: Option<Arc<crate::tls::ServedCert>>,
    /// The transparency log's key and checkpoints; `None` for a data directory
    /// `imgsrv init` has not seen since imgsrv had a log.
    pub ledger: Option<Arc<crate::ledger::Ledger>>,
    /// `[witness]`: this server as a witness of other logs.
    pub witness: Option<Arc<crate::tlog::witness::Witness>>,
}

/// What `init` made (for printing).
#[derive(Debug, Default)]
pub struct InitReport {
    pub created: Vec<PathBuf>,
    pub bootstrap_principal: Option<String>,
}

/// Creates the data directory layout if missing: config, catalog, CAS, TLS
/// certificate, bootstrap token. Idempotent.
pub fn init(data_dir: &Path, extra_names: &[String]) -> anyhow::Result<InitReport> {
    use std::os::unix::fs::PermissionsExt;
    let mut report = InitReport::default();
    crate::maint::restore::refuse_incomplete(data_dir)?;
    if !data_dir.exists() {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o750))?;
        report.created.push(data_dir.to_path_buf());
    }
    let cfg_path = Config::path(data_dir);
    if !cfg_path.exists() {
        crate::auth::write_secret_file(&cfg_path, &crate::config::default_file())?;
        std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o640))?;
        report.created.push(cfg_path);
    }
    let config = Config::load(data_dir, None)?;
    let db = data_dir.join(CATALOG_FILE);
    if config.storage.catalog == crate::config::CatalogBackend::Sqlite && !db.exists() {
        report.created.push(db.clone());
    }
    let catalog = crate::catalog::open(&config.storage, data_dir)?;
    // a database `imgsrv migrate` has not finished filling gets no bootstrap admin
    crate::maint::migrate::refuse_unfinished(catalog.as_ref())?;
    let cas_dir = data_dir.join("sha256");
    if config.storage.blobs == crate::config::BlobBackend::Fs && !cas_dir.exists() {
        report.created.push(cas_dir);
    }
    crate::cas::open(&config.storage, data_dir)?;
    if !config.tls_configured {
        let mut names = config.tls_names.clone();
        names.extend(extra_names.iter().cloned());
        let (cert, key, created) = crate::tls::ensure_self_signed(&data_dir.join("tls"), &names)?;
        if created {
            report.created.push(cert);
            report.created.push(key);
        }
    }
    let host = config
        .tls_names
        .iter()
        .chain(extra_names)
        .map(|n| n.trim())
        .find(|n| !n.is_empty() && n.parse::<std::net::IpAddr>().is_err())
        .map(str::to_string)
        .or_else(crate::tls::host_name)
        .unwrap_or_else(|| "localhost".into());
    if let Some(key) = crate::ledger::init(data_dir, catalog.as_ref(), &host)? {
        report.created.push(key);
    }
    if let Some(p) = crate::auth::bootstrap(catalog.as_ref(), data_dir)? {
        report
            .created
            .push(data_dir.join(crate::auth::ADMIN_TOKEN_FILE));
        report.bootstrap_principal = Some(p.id);
    }
    Ok(report)
}

impl App {
    /// Opens an initialised data directory with `config`.
    pub fn open(config: Config) -> anyhow::Result<App> {
        let catalog = crate::catalog::open(&config.storage, &config.data_dir)?;
        crate::maint::migrate::refuse_unfinished(catalog.as_ref())?;
        let blobs = crate::cas::open(&config.storage, &config.data_dir)?;
        // the audit log's reserve, before the first request; on a full disk
        // the server still starts and serves what is published
        if let Err(e) = catalog.room_for_change() {
            log::warn!("{e}: changes are refused (507) until space is freed");
        }
        let served_cert = crate::tls::ServedCert::load(&config.tls_cert)
            .map_err(|e| log::debug!("web catalog: no certificate to show: {e:#}"))
            .ok()
            .map(Arc::new);
        let ledger = crate::ledger::Ledger::open(&config.data_dir, catalog.as_ref())?
            .map(|l| Arc::new(l.with_witnesses(config.log_witnesses.clone(), catalog.clone())));
        if config.witness.is_some()
            && config.storage.catalog != crate::config::CatalogBackend::Sqlite
        {
            anyhow::bail!(
                "[witness]: a witness keeps what it saw of each log in its own data directory \
                 (DATA/witness/seen/), so it must be one server: instances of a deployment \
                 sharing its key could each cosign another fork. Serve [witness] from an \
                 embedded imgsrv (the SQLite default) of its own"
            );
        }
        let witness = match &config.witness {
            Some(w) => Some(Arc::new(crate::tlog::witness::Witness::open(
                &config.data_dir,
                w.logs.clone(),
            )?)),
            None => None,
        };
        Ok(App {
            ledger,
            witness,
            served_cert,
            config,
            catalog,
            blobs,
            streams: StreamsCache::default(),
            auth_failures: Default::default(),
            seen_fingerprints: Default::default(),
        })
    }

    /// Ok when the data directory has room for a change and, after it, its
    /// audit row; [`crate::catalog::CatalogError::Full`] (HTTP 507)
    /// otherwise. Every request that changes something asks before it
    /// starts, so no change succeeds without its audit row: the catalog
    /// keeps room for those rows in reserve, and refuses changes while that
    /// reserve is short or the disk is full (see `catalog/space.rs`); the
    /// rows of refusals go into the reserve. Writes of a known
    /// size also ask the blob store ([`crate::cas::BlobStore::ensure_room`],
    /// checked by every store write), so a blob that cannot fit is refused
    /// before a byte is written.
    pub fn room_for_change(&self) -> Result<(), crate::catalog::CatalogError> {
        self.catalog.room_for_change()
    }

    /// What stops this server from taking changes now, for `/readyz`: empty when the
    /// catalog answers and both it and the blob store can be written (a probe of
    /// each, [`crate::catalog::MaintCatalog::probe_writable`] and
    /// [`BlobStore::probe_writable`]: a full disk, a read-only filesystem). Each reason
    /// is a sentence for an anonymous client, without paths; the errors in full go to
    /// the log (when readiness changes, not at every probe).
    pub fn unready_reasons(&self) -> Vec<String> {
        use crate::cas::CasError;
        use crate::catalog::CatalogError;
        let mut reasons = Vec::new();
        let mut errors = Vec::new();
        let catalog = match self.catalog.generation() {
            Ok(_) => self.catalog.probe_writable(),
            Err(e) => Err(e),
        };
        match catalog {
            Ok(()) => {}
            Err(CatalogError::Full(m)) => {
                reasons.push(format!("the catalog's disk is full: {m}"));
            }
            Err(e @ CatalogError::Unavailable(_)) => {
                reasons.push(
                    "the catalog database cannot be reached (down or restarting; the server \
                     log says why)"
                        .into(),
                );
                errors.push(format!("catalog: {e}"));
            }
            Err(e) => {
                reasons.push("the catalog cannot be written (the server log says why)".into());
                errors.push(format!("catalog: {e}"));
            }
        }
        match self.blobs.probe_writable() {
            Ok(()) => {}
            Err(CasError::Full { reason, .. }) => {
                reasons.push(format!("the blob store is full: {reason}"));
            }
            Err(e @ CasError::Unavailable { .. }) => {
                reasons.push(
                    "the blob store cannot be reached (down or restarting; the server log \
                     says why)"
                        .into(),
                );
                errors.push(format!("blob store: {e}"));
            }
            Err(CasError::Io { op, source, .. }) => {
                let why = os_words(&source);
                reasons.push(format!("the blob store cannot be written: {op}: {why}"));
                errors.push(format!("blob store: {op}: {source}"));
            }
            Err(e) => {
                reasons.push("the blob store cannot be written (the server log says why)".into());
                errors.push(format!("blob store: {e}"));
            }
        }
        static WAS_READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
        let ready = reasons.is_empty();
        if WAS_READY.swap(ready, std::sync::atomic::Ordering::Relaxed) != ready {
            if ready {
                log::info!("ready again: the catalog and the blob store can be written");
            } else {
                log::warn!(
                    "NOT READY (/readyz answers 503): {}{}",
                    reasons.join("; "),
                    errors.iter().map(|e| format!("; {e}")).collect::<String>()
                );
            }
        }
        reasons
    }

    pub fn verification(&self) -> VerificationMode {
        self.config.verification
    }

    /// The Simple Streams documents for a caller who may read the private
    /// images in `readable_private`, without the versions signed by a key
    /// the operator has revoked. The trust store is read on every call (a
    /// `key revoke` takes effect at the next request, no restart); when it
    /// cannot be read, nothing is served: serving a revoked key's images
    /// would be silently weaker.
    pub fn streams(
        &self,
        readable_private: &[String],
    ) -> anyhow::Result<Arc<crate::simplestreams::Streams>> {
        let revoked: Vec<String> = self.revoked_keys()?.into_iter().map(|k| k.key_id).collect();
        Ok(self
            .streams
            .get(self.catalog.as_ref(), readable_private, &revoked)?)
    }

    /// The trusted publisher keys with their scopes and states, read from the
    /// catalog now (shared by every instance on it: a key revoked on one is
    /// revoked here at the next call). Fails closed: an unreadable catalog or an
    /// unusable key is an error, never "no keys".
    pub fn trusted_keys(&self) -> Result<Vec<crate::sign::TrustedKey>, crate::sign::SignError> {
        crate::sign::load_trusted_keys(self.catalog.as_ref())
    }

    /// The trusted keys the operator has revoked, read from the trust store
    /// now; an unreadable store is an error (never "none revoked").
    pub(crate) fn revoked_keys(&self) -> anyhow::Result<Vec<crate::sign::TrustedKey>> {
        Ok(self
            .trusted_keys()
            .context("reading the trusted keys (to withhold what revoked keys signed)")?
            .into_iter()
            .filter(|k| k.policy.state == crate::sign::KeyState::Revoked)
            .collect())
    }
}

/// [`App::digest_write_lock`] for a writer that has the stores but no `App`
/// (`imgsrv migrate` filling a deployment's bucket).
pub fn digest_write_lock(
    catalog: &dyn Catalog,
    blobs: &dyn BlobStore,
    digest: &crate::digest::Digest,
) -> Result<Option<crate::catalog::JobLock>, crate::catalog::CatalogError> {
    if !blobs.needs_write_lock() {
        return Ok(None);
    }
    let name = format!("blob-{}", &digest.hex()[..2]);
    catalog
        .job_lock(&name, crate::catalog::LockMode::Exclusive, true)?
        .map(Some)
        .ok_or_else(|| crate::catalog::CatalogError::Backend(format!("{name} not granted")))
}

/// The operating system's words for `e` ("Read-only file system (os error 30)"),
/// without the path an error may carry along: from the first error in its chain that
/// has an OS error code, else its kind.
fn os_words(e: &std::io::Error) -> String {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(code) = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return std::io::Error::from_raw_os_error(code).to_string();
        }
        next = err.source();
    }
    e.kind().to_string()
}

/// Why a version was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A precondition or the signature check refused it; the version stays a draft.
    #[error("{reason}")]
    Refused {
        reason: String,
        manifest_digest: Option<crate::digest::Digest>,
    },
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Store(#[from] crate::cas::CasError),
}

fn refused(reason: impl Into<String>) -> PublishError {
    PublishError::Refused {
        reason: reason.into(),
        manifest_digest: None,
    }
}

/// A publication that went through.
#[derive(Debug, Clone)]
pub struct Published {
    pub record: crate::catalog::PublishRecord,
    pub projection: Vec<crate::catalog::ProjectionRow>,
}

impl App {
    /// Publishes a draft: checks it has artifacts whose blobs are all stored
    /// with their declared sizes, checks `signature` over the canonical
    /// manifest under this server's verification mode and trusted keys,
    /// computes the Incus fingerprints, and moves it to published in one
    /// catalog transaction. The HTTP route, mirroring into a data directory
    /// and bundle import all come through here; on a full disk it is
    /// refused before anything ([`App::room_for_change`]).
    pub fn publish_version(
        &self,
        name: &str,
        ver: &str,
        signature: Option<String>,
        principal_id: Option<&str>,
    ) -> Result<Published, PublishError> {
        let none = crate::fingerprint::Known::new();
        self.publish_version_with(name, ver, signature, principal_id, &none)
    }

    /// [`App::publish_version`] for a caller in this process that computed
    /// some Incus fingerprints in the same pass that checked the sha256 of
    /// both their inputs (the mirror): those are not read from the blob
    /// store again. Every other check is the same.
    pub fn publish_version_with(
        &self,
        name: &str,
        ver: &str,
        signature: Option<String>,
        principal_id: Option<&str>,
        known: &crate::fingerprint::Known,
    ) -> Result<Published, PublishError> {
        use crate::metrics::PublishOutcome;
        let result = self.publish_checked(name, ver, signature, principal_id, known);
        crate::metrics::publish_finished(match &result {
            Ok(_) => PublishOutcome::Published,
            Err(PublishError::Refused { .. }) => PublishOutcome::Refused,
            Err(_) => PublishOutcome::Error,
        });
        result
    }

    /// [`App::publish_version_with`] but for the metrics.
    fn publish_checked(
        &self,
        name: &str,
        ver: &str,
        signature: Option<String>,
        principal_id: Option<&str>,
        known: &crate::fingerprint::Known,
    ) -> Result<Published, PublishError> {
        use crate::catalog::{PublishRecord, VersionState};
        self.room_for_change()?;
        let view = self.catalog.version_view(name, ver)?;
        if view.version.state != VersionState::Draft {
            return Err(refused("version is not a draft"));
        }
        if view.artifacts.is_empty() {
            return Err(refused("version has no artifact"));
        }
        for a in &view.artifacts {
            let cited = std::iter::once((
                &a.artifact.primary_blob_digest,
                a.artifact.primary_blob_size_bytes,
            ))
            .chain(
                a.attachments
                    .iter()
                    .map(|t| (&t.blob_digest, t.blob_size_bytes)),
            );
            for (d, size) in cited {
                match self.catalog.get_blob(d)? {
                    Some(b) if b.size_bytes == size => {}
                    Some(b) => {
                        return Err(refused(format!(
                            "blob {d} is stored with size {} but the draft declares {size}",
                            b.size_bytes
                        )))
                    }
                    None => return Err(refused(format!("blob {d} has not been uploaded"))),
                }
            }
        }
        let manifest = crate::manifest::canonical(&view);
        let manifest_digest = crate::digest::Digest::of(&manifest);
        let (verification, key) = self
            .check_signature(&manifest, signature.as_deref(), name, ver)
            .map_err(|reason| PublishError::Refused {
                reason,
                manifest_digest: Some(manifest_digest),
            })?;
        let known = self.seen_fingerprints.with(known, &view);
        let projection = crate::fingerprint::compute_with(self.blobs.as_ref(), &view, &known)?;
        let record = PublishRecord {
            version_id: view.version.id.clone(),
            manifest,
            manifest_digest,
            signature,
            signer_key_id: key.as_ref().map(|k| k.key_id.clone()),
            signer_key_name: key.as_ref().map(|k| k.key_name.clone()),
            verification,
            principal_id: principal_id.map(str::to_string),
            published_at: crate::catalog::now(),
        };
        self.catalog.publish(&record, &projection)?;
        log::info!(
            "published {name}@{ver} manifest {manifest_digest} verification {} signer {} by {}",
            verification.as_str(),
            record.signer_key_id.as_deref().unwrap_or("-"),
            principal_id.unwrap_or("-")
        );
        Ok(Published { record, projection })
    }

    /// Applies the verification mode. Enforce refuses anything but a valid
    /// signature by a trusted, active key scoped to the image; warn logs and
    /// publishes unverified; off skips the check.
    fn check_signature(
        &self,
        manifest: &[u8],
        signature: Option<&str>,
        name: &str,
        ver: &str,
    ) -> Result<(crate::catalog::Verification, Option<crate::sign::Verified>), String> {
        use crate::catalog::Verification;
        let mode = self.verification();
        if mode == VerificationMode::Off {
            return Ok((Verification::Skipped, None));
        }
        let outcome = match signature {
            None => Err("no signature was supplied".to_string()),
            Some(sig) => self
                .trusted_keys()
                .map_err(|e| format!("trusted keys cannot be read: {e}"))
                .and_then(|keys| {
                    let (k, v) = crate::sign::verify_signed_by(&keys, manifest, sig)
                        .map_err(|e| e.to_string())?;
                    // a valid signature is not enough: the key must be active and
                    // scoped to this image
                    k.may_sign(name).map_err(|e| e.to_string())?;
                    Ok(v)
                }),
        };
        match (outcome, mode) {
            (Ok(v), _) => Ok((Verification::Verified, Some(v))),
            (Err(why), VerificationMode::Warn) => {
                log::warn!("publishing {name}@{ver} UNVERIFIED (verification mode warn): {why}");
                Ok((Verification::Unverified, None))
            }
            (Err(why), _) => {
                log::warn!("refused to publish {name}@{ver}: {why}");
                Err(format!(
                    "publish refused: {why} (image verification mode is enforce); the version stays a draft"
                ))
            }
        }
    }

    /// Held (shared) by every write to the blob store, for as long as it
    /// takes to check what is stored, store and record it: garbage
    /// collection holds it exclusively while it deletes, so it never deletes
    /// a blob between a writer's check and the row that makes it needed
    /// (see [`crate::maint::gc`]). A writer checks it is still held
    /// ([`crate::catalog::JobLock::check`]) once its blob is claimed, and fails
    /// (503, to be retried) when it was lost meanwhile.
    pub fn blob_write_lock(&self) -> Result<crate::catalog::JobLock, crate::catalog::CatalogError> {
        self.catalog
            .job_lock(
                crate::maint::gc::BLOBS_LOCK,
                crate::catalog::LockMode::Shared,
                true,
            )?
            .ok_or_else(|| crate::catalog::CatalogError::Backend("blob lock not granted".into()))
    }

    /// The lock a write of blob `digest` holds when the store asks for one
    /// ([`crate::cas::BlobStore::needs_write_lock`]): one of 256 catalog job locks
    /// (`blob-XY`, by the digest's first byte), held exclusively, so that two
    /// instances never write the same key at once; `None` for a store that needs
    /// none.
    pub fn digest_write_lock(
        &self,
        digest: &crate::digest::Digest,
    ) -> Result<Option<crate::catalog::JobLock>, crate::catalog::CatalogError> {
        digest_write_lock(self.catalog.as_ref(), self.blobs.as_ref(), digest)
    }

    /// A lease for a job that stores blobs and then cites them in a draft
    /// (a mirror run, a bundle import): what it stores is pinned until the
    /// lease is dropped (or, after a crash, expires), so that garbage
    /// collection, whatever its grace, never takes a blob between its
    /// ingest and the draft that cites it.
    pub fn lease(&self, purpose: &str) -> Lease {
        Lease {
            holder: format!("{purpose}:{}", crate::catalog::new_id()),
            catalog: self.catalog.clone(),
        }
    }

    /// Stores a blob that arrives whole (mirroring, bundle import): checks
    /// size and digest while writing, then records it, pinned for `lease`.
    /// Idempotent. On a full disk it is refused before a byte is written
    /// (the catalog, then the store, must have room: [`App::room_for_change`]).
    pub fn ingest(
        &self,
        lease: &Lease,
        digest: &crate::digest::Digest,
        size: u64,
        media_type: Option<&str>,
        reader: &mut dyn std::io::Read,
    ) -> Result<(), PublishError> {
        self.room_for_change()?;
        let writing = self.blob_write_lock()?;
        lease.pin(digest)?;
        let _key = self.digest_write_lock(digest)?;
        if self.blobs.stat(digest)? != Some(size) {
            self.blobs.put(digest, size, reader)?;
        }
        self.catalog.insert_blob(digest, size, media_type)?;
        Ok(writing.check()?)
    }

    /// [`App::ingest`] of bytes whose digest the caller does not know yet: they are
    /// hashed as they are stored ([`crate::cas::BlobStore::put_new`]), and the
    /// digest they make is returned, recorded and pinned for `lease`. One read of
    /// the source instead of two (hash, then store).
    pub fn ingest_new(
        &self,
        lease: &Lease,
        size: u64,
        media_type: Option<&str>,
        reader: &mut dyn std::io::Read,
    ) -> Result<crate::digest::Digest, PublishError> {
        self.room_for_change()?;
        // held until the blob is pinned: a collection cannot come in between
        let writing = self.blob_write_lock()?;
        let digest = self.store_new::<PublishError>(size, reader, None)?;
        lease.pin(&digest)?;
        self.catalog.insert_blob(&digest, size, media_type)?;
        // the lock held throughout, or the blob may have been collected before its
        // pin: a retry stores it again
        writing.check()?;
        Ok(digest)
    }

    /// Stores bytes whose digest is not known yet and returns the digest they
    /// make (not recorded, not claimed). The caller holds the shared blobs lock
    /// ([`App::blob_write_lock`]) until it has claimed the blob. With `side`,
    /// the stored bytes are hashed into it too.
    pub(crate) fn store_new<E>(
        &self,
        size: u64,
        reader: &mut dyn std::io::Read,
        side: Option<&mut crate::digest::Hasher>,
    ) -> Result<crate::digest::Digest, E>
    where
        E: From<crate::cas::CasError> + From<crate::catalog::CatalogError>,
    {
        if !self.blobs.needs_write_lock() {
            return Ok(self.blobs.put_new_hashing(size, reader, side)?);
        }
        // staged first: the key to lock is known once the bytes are
        let id = uuid::Uuid::new_v4().to_string();
        let staged = self.blobs.stage_part_hashing(&id, 1, size, reader, side)?;
        if crate::cas::longer_than_declared(reader) {
            self.blobs.discard_upload(&id)?;
            return Err(crate::cas::CasError::Truncated {
                expected: size,
                actual: size + 1,
            }
            .into());
        }
        let _key = self.digest_write_lock(&staged.digest)?;
        let digest = staged.digest;
        self.blobs
            .commit_upload(&id, &[(1, staged)], &digest, size)?;
        Ok(digest)
    }

    /// [`App::ingest`] of a file the caller wrote and will not write again:
    /// the blob store takes it in place when it can (same filesystem: one
    /// read pass to check it, no copy). The file stays where it is.
    /// `hashed`: the caller computed `digest` over exactly these bytes as
    /// it wrote them ([`crate::cas::BlobStore::adopt_hashed`]).
    pub fn ingest_file(
        &self,
        lease: &Lease,
        digest: &crate::digest::Digest,
        size: u64,
        media_type: Option<&str>,
        path: &Path,
        hashed: bool,
    ) -> Result<(), PublishError> {
        self.room_for_change()?;
        let writing = self.blob_write_lock()?;
        lease.pin(digest)?;
        let _key = self.digest_write_lock(digest)?;
        if self.blobs.stat(digest)? != Some(size) {
            match hashed {
                true => self.blobs.adopt_hashed(path, digest, size)?,
                false => self.blobs.adopt(path, digest, size)?,
            }
        }
        self.catalog.insert_blob(digest, size, media_type)?;
        Ok(writing.check()?)
    }
}

/// How long a pin outlives a job that crashed before releasing it.
const PIN_TTL_HOURS: i64 = 24;

/// Pins on what a job stored ([`App::lease`]); released when dropped.
pub struct Lease {
    holder: String,
    catalog: Arc<dyn Catalog>,
}

impl Lease {
    fn pin(&self, digest: &crate::digest::Digest) -> Result<(), crate::catalog::CatalogError> {
        let until = (chrono::Utc::now() + chrono::Duration::hours(PIN_TTL_HOURS))
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        self.catalog.pin_blob(digest, &self.holder, &until)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Err(e) = self.catalog.release_pins(&self.holder) {
            log::warn!(
                "releasing the blob pins of {}: {e} (they expire within {PIN_TTL_HOURS}h)",
                self.holder
            );
        }
    }
}
