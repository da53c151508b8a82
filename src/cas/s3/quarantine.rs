//! The S3 store's quarantine: `quarantine/<hex>` (the damaged copy) and
//! `quarantine/<hex>.reason` (why, in the filesystem store's note format).
//!
//! S3 has no rename: the note is written first, then the blob is copied
//! (server-side) and deleted from `cas/`. A crash after the note leaves a
//! note beside a blob still in place, which is only read once the blob is
//! gone; a crash after the copy leaves the blob in `cas/` as well, and the
//! next scrub quarantines it again (replacing the copy).

use super::ingest::Verdict;
use super::{Exact, S3Store, QUARANTINE_PREFIX};
use crate::cas::{Quarantined, Result};
use crate::digest::Digest;
use std::collections::BTreeSet;

const NOTE_SUFFIX: &str = ".reason";

fn copy_key(digest: &Digest) -> String {
    format!("{QUARANTINE_PREFIX}{}", digest.hex())
}

fn note_key(digest: &Digest) -> String {
    format!("{QUARANTINE_PREFIX}{}{NOTE_SUFFIX}", digest.hex())
}

impl S3Store {
    /// Copies `src` (of `size` bytes) to `dst`: server-side up to the copy
    /// limit, else read back and uploaded again. `false` if `src` is gone.
    pub(super) fn copy_object(&self, src: &str, dst: &str, size: u64) -> Result<bool> {
        if size <= self.copy_max {
            return self.client.copy(src, dst, None);
        }
        let Some(resp) = self.client.get(src, None)? else {
            return Ok(false);
        };
        let mut body = Exact {
            inner: resp.into_body().into_reader(),
            left: size,
        };
        self.upload(dst, size, &mut body, false, None, &mut |_| {
            Ok(Verdict::Store)
        })?;
        Ok(true)
    }

    pub(super) fn quarantine_blob(&self, digest: &Digest, reason: &str) -> Result<bool> {
        let src = Self::key_of(digest);
        let Some(blob) = self.client.head(&src)? else {
            return Ok(false);
        };
        let note = format!(
            "digest: {digest}\nquarantined_at: {}\nreason: {}\n",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            reason.replace(['\n', '\r'], " ")
        );
        self.client
            .put(&note_key(digest), note.as_bytes(), None, None)?;
        let dst = copy_key(digest);
        if !self.copy_object(&src, &dst, blob.size)? {
            // removed meanwhile (a GC): nothing was quarantined
            self.client.delete(&note_key(digest))?;
            return Ok(false);
        }
        self.client.delete(&src)?;
        log::warn!(
            "blob store: {digest} quarantined to {}: {reason}",
            self.client.location(&dst)
        );
        Ok(true)
    }

    pub(super) fn read_quarantined(&self, digest: &Digest) -> Result<Option<Quarantined>> {
        let key = copy_key(digest);
        let size = self.client.head(&key)?.map(|o| o.size);
        let note = self
            .client
            .get_small(&note_key(digest))?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        if size.is_none() && note.is_none() {
            return Ok(None);
        }
        let field = |name: &str| {
            note.as_deref().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(": ")))
                    .map(str::to_string)
            })
        };
        Ok(Some(Quarantined {
            digest: *digest,
            size,
            reason: field("reason").unwrap_or_else(|| "(no reason note)".into()),
            at: field("quarantined_at").unwrap_or_default(),
            location: self.client.location(&key),
        }))
    }

    pub(super) fn list_quarantine(&self, each: &mut dyn FnMut(Quarantined) -> bool) -> Result<()> {
        let mut digests = BTreeSet::new();
        self.client.list(QUARANTINE_PREFIX, &mut |o| {
            let name = &o.key[QUARANTINE_PREFIX.len()..];
            let hex = name.strip_suffix(NOTE_SUFFIX).unwrap_or(name);
            if let Ok(d) = Digest::from_hex(hex) {
                digests.insert(d);
            }
            true
        })?;
        for d in digests {
            if let Some(q) = self.read_quarantined(&d)? {
                if !each(q) {
                    break;
                }
            }
        }
        Ok(())
    }
}
