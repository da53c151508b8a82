//! Upload sessions, the way blobs come in over HTTP: begin (declaring the
//! digest and size), parts, complete, abort. They span the catalog
//! (sessions, parts, blob rows) and the blob store (staged bytes), so they
//! live on [`App`]; the HTTP routes only translate. Contract: docs/api.md.
//!
//! On a full disk (HTTP 507; the request was not carried out):
//! * a begin that declares more than the store can take is refused before
//!   a byte is sent, and so is a part whose `Content-Length` does not fit;
//! * a part that meets a full disk on its way in leaves no temporary file
//!   and no part row; a part the catalog cannot record is removed from the
//!   store as well, so no staged bytes exist that the catalog does not
//!   count (and a re-sent part never hides behind an older one's etag);
//! * a multi-part `complete` that cannot fit the assembled blob keeps the
//!   parts: the same `complete` succeeds once space is freed;
//! * a blob row is written only once the blob is stored, and a `complete`
//!   that failed after that finds the blob on retry and records it.
//!
//! That every change also has room for its audit row is checked before any
//! of this runs ([`App::room_for_change`]).

use crate::app::App;
use crate::cas::{CasError, StagedPart};
use crate::catalog::{self, CatalogError, UploadPart, UploadSession, UploadState};
use crate::digest::{Digest, Hasher};
use crate::metrics::UploadOutcome;
use std::io::Read;

/// The largest part.
pub const MAX_PART: u64 = 5 << 30;
/// How long a session accepts parts.
pub const UPLOAD_TTL_HOURS: i64 = 24;

/// Why an upload step was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The request is wrong (listed parts, sizes): 400.
    #[error("{0}")]
    Invalid(String),
    /// The session or what is stored refuses it (finished, expired, size,
    /// digest): 412.
    #[error("{0}")]
    Refused(String),
    /// Larger than allowed: 413.
    #[error("{0}")]
    TooLarge(String),
    /// The part's body ended before its declared length: 400, and the
    /// connection cannot carry another request.
    #[error("truncated part: Content-Length {expected}, received {actual} bytes")]
    Truncated { expected: u64, actual: u64 },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] CasError),
}

/// What a client declares when it begins an upload.
pub struct NewUpload {
    pub digest: Digest,
    pub size: u64,
    pub media_type_hint: Option<String>,
    pub filename_hint: Option<String>,
    pub principal_id: String,
    /// The Incus metadata tarball this blob (a root) will be published with, when
    /// the client says so: its fingerprint is then taken as the blob arrives
    /// ([`crate::fingerprint::Seen`]).
    pub incus_metadata: Option<Digest>,
}

/// What a client says of a blob it sends whole ([`App::upload_whole`]).
pub struct WholeUpload {
    pub size: u64,
    pub media_type_hint: Option<String>,
    pub filename_hint: Option<String>,
    pub principal_id: String,
    pub incus_metadata: Option<Digest>,
}

/// A part as the client lists it at `complete`.
pub struct ListedPart {
    pub number: u32,
    pub etag: String,
    pub size_bytes: u64,
}

/// `s` if parts may still be added to it (neither finished nor expired).
fn writable(s: UploadSession) -> Result<UploadSession, UploadError> {
    let id = &s.id;
    if !matches!(s.state, UploadState::Created | UploadState::Uploading) {
        return Err(UploadError::Refused(format!(
            "upload {id} is {}",
            s.state.as_str()
        )));
    }
    if chrono::DateTime::parse_from_rfc3339(&s.expires_at)
        .map(|t| t < chrono::Utc::now())
        .unwrap_or(true)
    {
        return Err(UploadError::Refused(format!(
            "upload {id} expired at {}",
            s.expires_at
        )));
    }
    Ok(s)
}

/// A new session's row: expiring [`UPLOAD_TTL_HOURS`] from now.
fn new_session(
    digest: Digest,
    size: u64,
    state: UploadState,
    (media_type_hint, filename_hint): (Option<String>, Option<String>),
    principal_id: String,
) -> UploadSession {
    let now = chrono::Utc::now();
    let ts =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    UploadSession {
        id: catalog::new_id(),
        expected_digest: digest,
        expected_size_bytes: size,
        state,
        expires_at: ts(now + chrono::Duration::hours(UPLOAD_TTL_HOURS)),
        media_type_hint,
        filename_hint,
        failure_message: None,
        principal_id: Some(principal_id),
        created_at: ts(now),
        updated_at: ts(now),
    }
}

/// A store error met while a request body was read: a body shorter than declared
/// is the request's fault ([`UploadError::Truncated`]).
fn body_error(e: CasError) -> UploadError {
    match e {
        CasError::Truncated { expected, actual } => UploadError::Truncated { expected, actual },
        e => e.into(),
    }
}

impl App {
    /// Opens a session. `true`: the blob is already stored with that size,
    /// and the session is `ready` at once. Otherwise the store must have
    /// room for the declared size now ([`CasError::Full`] before any byte
    /// is sent).
    pub fn begin_upload(&self, u: NewUpload) -> Result<(UploadSession, bool), UploadError> {
        if u.size > i64::MAX as u64 {
            return Err(UploadError::Invalid("expected_size_bytes too large".into()));
        }
        let mut s = new_session(
            u.digest,
            u.size,
            UploadState::Created,
            (u.media_type_hint, u.filename_hint),
            u.principal_id,
        );
        let mut ready = false;
        // from the check of what is stored to the session that claims it
        let _writing = self.blob_write_lock()?;
        if let Some(blob) = self.catalog.get_blob(&u.digest)? {
            if blob.size_bytes != u.size {
                return Err(UploadError::Refused(format!(
                    "{} is already stored with size {} (not {})",
                    u.digest, blob.size_bytes, u.size
                )));
            }
            ready = self.blobs.stat(&u.digest)? == Some(blob.size_bytes);
        }
        if ready {
            s.state = UploadState::Ready;
        } else {
            self.blobs.ensure_room(u.size)?;
        }
        self.catalog.create_upload(&s)?;
        if ready {
            crate::metrics::upload_finished(UploadOutcome::AlreadyStored);
        } else if let Some(meta) = u.incus_metadata {
            self.seen_fingerprints.hint(&s.id, meta);
        }
        Ok((s, ready))
    }

    /// Stages part `n` of session `id` from `body` (exactly `len` bytes).
    pub fn put_part(
        &self,
        id: &str,
        n: u32,
        len: u64,
        body: &mut dyn Read,
    ) -> Result<UploadPart, UploadError> {
        if len > MAX_PART {
            return Err(UploadError::TooLarge(format!(
                "a part is at most {MAX_PART} bytes"
            )));
        }
        let _writing = self.blob_write_lock()?;
        let s = writable(self.catalog.get_upload(id)?)?;
        if len > s.expected_size_bytes {
            return Err(UploadError::TooLarge(
                "part is larger than the whole upload".into(),
            ));
        }
        let staged = self
            .stage_part_fingerprinting(&s, n, len, body)
            .map_err(body_error)?;
        let part = UploadPart {
            upload_id: s.id,
            part_number: n,
            etag: staged.digest.to_string(),
            size_bytes: staged.size,
        };
        if let Err(e) = self.catalog.put_upload_part(&part) {
            // staged bytes the catalog does not count must not stay to be committed
            if let Err(d) = self.blobs.discard_part(id, n) {
                log::error!("upload {id}: part {n} could not be recorded ({e}) nor removed: {d}");
            }
            return Err(e.into());
        }
        Ok(part)
    }

    /// A blob sent whole in one request, its digest not declared: the bytes are
    /// hashed as they are stored (one read on the client, one pass here), and a
    /// `ready` session for the digest they make is recorded, the same claim a
    /// completed upload leaves, so garbage collection keeps the blob until the
    /// session expires or a draft cites it. With `incus_metadata` (a stored
    /// metadata tarball) the Incus fingerprint `sha256(metadata || root)` is taken
    /// from the same bytes on a second thread, kept for the publish and returned.
    /// `true`: stored now; `false`: it was stored already.
    pub fn upload_whole(
        &self,
        u: WholeUpload,
        body: &mut dyn Read,
    ) -> Result<(UploadSession, bool, Option<Digest>), UploadError> {
        if u.size > MAX_PART {
            return Err(UploadError::TooLarge(format!(
                "a blob sent whole is at most {MAX_PART} bytes: send a larger one in parts (POST /v1/uploads)"
            )));
        }
        self.room_for_change()?;
        // held until the session claims the blob: a collection cannot come in between
        let writing = self.blob_write_lock()?;
        self.blobs.ensure_room(u.size)?;
        let store = |r: &mut dyn Read, side: Option<&mut Hasher>| match self
            .store_new::<UploadError>(u.size, r, side)
        {
            Err(UploadError::Store(e)) => Err(body_error(e)),
            other => other,
        };
        let (digest, fingerprint) =
            self.fingerprinting(u.incus_metadata, body, store, |d| (*d, u.size))?;
        let fresh = self.catalog.get_blob(&digest)?.is_none();
        self.catalog
            .insert_blob(&digest, u.size, u.media_type_hint.as_deref())?;
        let s = new_session(
            digest,
            u.size,
            UploadState::Ready,
            (u.media_type_hint, u.filename_hint),
            u.principal_id,
        );
        self.catalog.create_upload(&s)?;
        writing.check()?;
        crate::metrics::upload_finished(if fresh {
            UploadOutcome::Stored
        } else {
            UploadOutcome::AlreadyStored
        });
        log::info!("stored blob {digest} ({} bytes), sent whole", u.size);
        Ok((s, fresh, fingerprint))
    }

    /// Stages a part; when it is the whole blob of a session that named its
    /// metadata tarball (stored already), the Incus fingerprint
    /// `sha256(metadata || root)` is taken from the same bytes on a second thread
    /// and kept for the publish.
    fn stage_part_fingerprinting(
        &self,
        s: &UploadSession,
        n: u32,
        len: u64,
        body: &mut dyn Read,
    ) -> Result<StagedPart, CasError> {
        let meta = self
            .seen_fingerprints
            .hinted(&s.id)
            .filter(|_| n == 1 && len == s.expected_size_bytes);
        let stage = |r: &mut dyn Read, side: Option<&mut Hasher>| {
            self.blobs.stage_part_hashing(&s.id, n, len, r, side)
        };
        let (staged, _) = self.fingerprinting(meta, body, stage, |p| (p.digest, p.size))?;
        Ok(staged)
    }

    /// Runs `store` over `body`. With `meta` (a metadata tarball stored whole) the
    /// Incus fingerprint `sha256(meta || what store stored)` is taken beside it
    /// (`store` feeds the bytes to the hash it is given, on a thread of its
    /// own), recorded for the publish and returned, when that was all of the blob
    /// (`stored`: the digest and size of what it stored).
    fn fingerprinting<T, E>(
        &self,
        meta: Option<Digest>,
        body: &mut dyn Read,
        store: impl FnOnce(&mut dyn Read, Option<&mut Hasher>) -> Result<T, E>,
        stored: impl FnOnce(&T) -> (Digest, u64),
    ) -> Result<(T, Option<Digest>), E> {
        let Some((meta, mut fp)) = meta.and_then(|m| Some((m, self.metadata_state(&m)?))) else {
            return Ok((store(body, None)?, None));
        };
        let before = fp.len();
        let out = store(body, Some(&mut fp))?;
        let (digest, size) = stored(&out);
        let fp = (fp.len() == before + size).then(|| fp.finish());
        if let Some(fp) = fp {
            self.seen_fingerprints.record(meta, digest, fp);
        }
        Ok((out, fp))
    }

    /// The hash state over a stored metadata tarball, `None` when it is not
    /// stored (whole) or cannot be read: the fingerprint is then read at publish.
    fn metadata_state(&self, meta: &Digest) -> Option<crate::digest::Hasher> {
        let size = self.catalog.get_blob(meta).ok()??.size_bytes;
        if self.blobs.stat(meta).ok()? != Some(size) || size > 64 << 20 {
            return None;
        }
        let mut r = self.blobs.open_range(meta, 0, size).ok()?;
        let mut h = crate::digest::Hasher::new();
        crate::digest::read_chunks(&mut r, |c| h.update(c)).ok()?;
        (h.len() == size && h.clone().finish() == *meta).then_some(h)
    }

    /// Checks the listed parts against the staged ones, assembles and
    /// stores the blob, records it, and marks the session `ready`. A
    /// session already `ready` is returned as it is.
    pub fn complete_upload(
        &self,
        id: &str,
        listed: &[ListedPart],
    ) -> Result<UploadSession, UploadError> {
        let _writing = self.blob_write_lock()?;
        let s = self.catalog.get_upload(id)?;
        if s.state == UploadState::Ready {
            return Ok(s);
        }
        let s = writable(s)?;
        let parts = self.listed_parts(id, listed)?;
        // (a refused request above leaves the session as it was: no outcome yet)
        let result = self.store_upload(id, s, &parts);
        self.seen_fingerprints.forget_hint(id);
        crate::metrics::upload_finished(match &result {
            Ok(_) => UploadOutcome::Stored,
            Err(UploadError::Refused(_)) => UploadOutcome::Failed,
            Err(_) => UploadOutcome::Error,
        });
        result
    }

    /// The part of [`App::complete_upload`] that joins the parts and stores the blob:
    /// [`UploadError::Refused`] when they do not make the declared digest and size (the
    /// session has failed then).
    fn store_upload(
        &self,
        id: &str,
        s: UploadSession,
        parts: &[(u32, StagedPart)],
    ) -> Result<UploadSession, UploadError> {
        let total: u64 = parts.iter().map(|(_, p)| p.size).sum();
        if total != s.expected_size_bytes {
            return Err(self.fail_upload(
                id,
                format!(
                    "parts add up to {total} bytes, expected {}",
                    s.expected_size_bytes
                ),
            ));
        }
        let key = self.digest_write_lock(&s.expected_digest)?;
        let committed =
            self.blobs
                .commit_upload(id, parts, &s.expected_digest, s.expected_size_bytes);
        drop(key);
        match committed {
            Ok(()) => {}
            Err(e @ (CasError::Mismatch { .. } | CasError::Truncated { .. })) => {
                return Err(self.fail_upload(id, e.to_string()))
            }
            Err(e) => return Err(e.into()),
        }
        self.catalog.insert_blob(
            &s.expected_digest,
            s.expected_size_bytes,
            s.media_type_hint.as_deref(),
        )?;
        let s = self
            .catalog
            .set_upload_state(id, UploadState::Ready, None)?;
        log::info!(
            "stored blob {} ({} bytes)",
            s.expected_digest,
            s.expected_size_bytes
        );
        Ok(s)
    }

    /// The listed parts, which must be in ascending order and match the
    /// staged ones (etag and size).
    fn listed_parts(
        &self,
        id: &str,
        listed: &[ListedPart],
    ) -> Result<Vec<(u32, StagedPart)>, UploadError> {
        if listed.is_empty() {
            return Err(UploadError::Invalid(
                "parts must list at least one part".into(),
            ));
        }
        let stored = self.catalog.upload_parts(id)?;
        let mut parts = Vec::with_capacity(listed.len());
        let mut last = 0;
        for p in listed {
            if p.number <= last {
                return Err(UploadError::Invalid(
                    "parts must be in ascending order without duplicates".into(),
                ));
            }
            last = p.number;
            let sp = stored
                .iter()
                .find(|x| x.part_number == p.number)
                .ok_or_else(|| {
                    UploadError::Invalid(format!("part {} was not uploaded", p.number))
                })?;
            if sp.etag != p.etag || sp.size_bytes != p.size_bytes {
                return Err(UploadError::Invalid(format!(
                    "part {} does not match the uploaded part (etag or size)",
                    p.number
                )));
            }
            let digest = sp.etag.parse().map_err(|_| {
                CatalogError::Backend(format!(
                    "upload {id} part {} has a malformed etag {:?}",
                    p.number, sp.etag
                ))
            })?;
            parts.push((
                p.number,
                StagedPart {
                    digest,
                    size: sp.size_bytes,
                },
            ));
        }
        Ok(parts)
    }

    /// Discards the staged parts and marks the session failed with `msg`:
    /// [`UploadError::Refused`], or the catalog's error if it cannot.
    fn fail_upload(&self, id: &str, msg: String) -> UploadError {
        let _ = self.blobs.discard_upload(id);
        match self
            .catalog
            .set_upload_state(id, UploadState::Failed, Some(&msg))
        {
            Ok(_) => UploadError::Refused(msg),
            Err(e) => e.into(),
        }
    }

    /// Discards what was staged and marks the session `aborted` (again: it
    /// is returned as it is).
    pub fn abort_upload(&self, id: &str) -> Result<UploadSession, UploadError> {
        let s = self.catalog.get_upload(id)?;
        match s.state {
            UploadState::Aborted => return Ok(s),
            UploadState::Created | UploadState::Uploading => {}
            other => {
                return Err(UploadError::Refused(format!(
                    "upload {id} is {}",
                    other.as_str()
                )))
            }
        }
        self.blobs.discard_upload(id)?;
        self.seen_fingerprints.forget_hint(id);
        let s = self
            .catalog
            .set_upload_state(id, UploadState::Aborted, None)?;
        crate::metrics::upload_finished(UploadOutcome::Aborted);
        Ok(s)
    }
}
