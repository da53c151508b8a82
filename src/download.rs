//! The one rule for serving stored bytes. Every download route (an artifact, an
//! attachment, a blob by digest; over TLS or plain HTTP; full, ranged or HEAD) asks
//! [`App::download_verdict`] before it opens a blob, so what may be downloaded is
//! decided here and nowhere else.
//!
//! Bytes are served through a version that cites them, when the caller may see that
//! version and it is not withheld:
//! * a published version: anyone if its image is public, else a caller with
//!   `content.read` on the image; withheld when the key that signed it was revoked
//!   (its bytes answer `410 Gone`, as it already left the Simple Streams index: an
//!   Incus daemon may have cached the index for an hour and would still install it);
//!   also withheld once it was retired and garbage collection collected it (after the
//!   grace, during which a retired version still downloads for clients whose cached
//!   index still names it);
//! * a draft (or a version being published): a caller with `content.write` on its
//!   image;
//! * a blob no version cites yet (a fresh upload): a caller with `content.write`
//!   somewhere.
//!
//! A blob cited by several versions is served if any one of them allows it (the bytes
//! are the same). What the caller may not see is `404`, never a hint that it exists.
//!
//! Once the rule allows it, the bytes are opened through [`App::open_download`], which
//! checks that the store has the blob with the size the catalog gives (one
//! [`crate::cas::BlobStore::stat_served`]). A blob a scrub quarantined, one missing or
//! of the wrong size, and one the store can tell was replaced behind imgsrv's back
//! (the S3 store's objects carry the digest they were checked against) answer `503`
//! with what repairs it ([`ServeError::Unavailable`]): never wrong bytes, never a bare
//! `500`. A blob store that cannot be reached answers `503` with Retry-After. A
//! flipped byte in a local blob of the right size is not caught here: that would
//! mean hashing every download, which costs as much as the download itself; `imgsrv
//! scrub` (and its periodic run in `serve`) is what finds it and quarantines the blob.

use crate::app::App;
use crate::auth::{Caller, ACTION_CONTENT_READ, ACTION_CONTENT_WRITE};
use crate::cas::{CasError, Stored};
use crate::catalog::BlobRef;
use crate::digest::Digest;
use crate::sign::TrustedKey;
use std::io::Read;

/// What to answer a download.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Serve the bytes. `public`: through a published version of a public image, so
    /// shared caches may keep them.
    Serve { public: bool },
    /// Not visible to this caller (or not there): `404`, saying nothing more.
    Hidden,
    /// Visible, but every version that would serve it is withheld: `410`, and why.
    Withheld(String),
}

/// Why bytes the rule allows cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store does not have the blob as the catalog says (quarantined by a scrub,
    /// missing, or of the wrong size): `503`, and what repairs it.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] CasError),
}

/// What the caller may do with the images, for the rule.
fn may_read(caller: Option<&Caller>, r: &BlobRef) -> bool {
    if r.published {
        !r.image.is_private()
            || caller.is_some_and(|c| c.can_on(ACTION_CONTENT_READ, &r.image.name))
    } else {
        caller.is_some_and(|c| c.can_on(ACTION_CONTENT_WRITE, &r.image.name))
    }
}

impl App {
    /// The verdict for downloading bytes cited by `citing` (the versions that cite a
    /// blob, or the one version an artifact route names) for `caller`. `orphan`: the
    /// bytes are a stored blob that no version cites (only the blob route asks).
    pub fn download_verdict(
        &self,
        caller: Option<&Caller>,
        citing: &[BlobRef],
        orphan: bool,
    ) -> anyhow::Result<Verdict> {
        if orphan && citing.is_empty() {
            let writer = caller.is_some_and(|c| c.can_somewhere(ACTION_CONTENT_WRITE));
            return Ok(if writer {
                Verdict::Serve { public: false }
            } else {
                Verdict::Hidden
            });
        }
        let visible: Vec<&BlobRef> = citing.iter().filter(|r| may_read(caller, r)).collect();
        if visible.is_empty() {
            return Ok(Verdict::Hidden);
        }
        // The trust store is read once per download, and fails closed: if it cannot
        // be read, nothing published is served (a revoked key's bytes must not be).
        let revoked = self.revoked_keys()?;
        let mut serve: Option<bool> = None;
        let mut withheld = None;
        for r in visible {
            if r.published {
                if let Some(why) = self.withheld(r, &revoked)? {
                    withheld.get_or_insert(why);
                    continue;
                }
            }
            let public = r.published && !r.image.is_private();
            serve = Some(serve.unwrap_or(false) || public);
        }
        Ok(match (serve, withheld) {
            (Some(public), _) => Verdict::Serve { public },
            (None, Some(why)) => Verdict::Withheld(why),
            (None, None) => Verdict::Hidden,
        })
    }

    /// Why the bytes of published version `r` are withheld, if they are: it was
    /// retired and its grace is over (garbage collection no longer keeps its bytes,
    /// even where another version still does), or its signer's key was revoked.
    fn withheld(&self, r: &BlobRef, revoked: &[TrustedKey]) -> anyhow::Result<Option<String>> {
        if let Some(t) = self.catalog.retirement(&r.version_id)? {
            if let Some(at) = &t.collected_at {
                return Ok(Some(format!(
                    "this version was retired at {} ({}) and its bytes were collected at {at}: \
                     it is no longer served; use a newer version",
                    t.retired_at, t.reason
                )));
            }
        }
        if revoked.is_empty() {
            return Ok(None);
        }
        let record = self.catalog.publish_record(&r.version_id)?;
        let Some(id) = record.signer_key_id else {
            return Ok(None);
        };
        Ok(revoked.iter().find(|k| k.key_id == id).map(|k| {
            format!(
                "signed by key {} ({}), which the operator has revoked: \
                 what it signed is no longer served",
                k.name, k.key_id
            )
        }))
    }
}

impl App {
    /// Ok when the store has blob `digest` with the `size` the catalog gives, so that a
    /// download the rule allowed can be served (for `HEAD`, all there is to check).
    pub fn stored_for_download(&self, digest: &Digest, size: u64) -> Result<(), ServeError> {
        let damaged = |what: String| {
            ServeError::Unavailable(format!(
                "blob {digest} is damaged on this server ({what}) and is not served; \
                 `imgsrv scrub` quarantines it, and re-uploading, re-mirroring or \
                 re-importing it repairs it"
            ))
        };
        match self.blobs.stat_served(digest)? {
            Stored::Blob(s) if s == size => Ok(()),
            Stored::Blob(s) => Err(damaged(format!("{s} bytes stored, {size} expected"))),
            Stored::Disowned { reason, .. } => {
                log::warn!("blob {digest} not served: {reason}");
                Err(damaged(
                    "the object in the blob store is not the one imgsrv stored".into(),
                ))
            }
            Stored::Absent => Err(self.not_stored(digest)),
        }
    }

    /// Opens `len` bytes from `start` of blob `digest` (`size` bytes, as the catalog
    /// says) for a download the rule allowed.
    pub fn open_download(
        &self,
        digest: &Digest,
        size: u64,
        start: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, ServeError> {
        self.stored_for_download(digest, size)?;
        match self.blobs.open_range(digest, start, len) {
            Ok(r) => Ok(r),
            // quarantined (or removed) since the check
            Err(CasError::NotFound(_)) => Err(self.not_stored(digest)),
            Err(e) => Err(e.into()),
        }
    }

    /// Why a blob the catalog has is not in the store.
    fn not_stored(&self, digest: &Digest) -> ServeError {
        match self.blobs.quarantined(digest) {
            Ok(Some(q)) => ServeError::Unavailable(format!(
                "blob {digest} failed a scrub ({}) and is quarantined; it is not served until \
                 the right bytes are put back: re-upload, re-mirror or re-import it",
                q.reason
            )),
            Ok(None) => ServeError::Unavailable(format!(
                "blob {digest} is missing from this server's blob store and cannot be served; \
                 re-upload, re-mirror or re-import it (`imgsrv scrub` lists what it affects)"
            )),
            Err(e) => e.into(),
        }
    }
}
