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

use crate::app::App;
use crate::auth::{Caller, ACTION_CONTENT_READ, ACTION_CONTENT_WRITE};
use crate::catalog::BlobRef;
use crate::sign::TrustedKey;

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
