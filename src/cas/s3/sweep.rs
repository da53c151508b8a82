//! The S3 store's side of garbage collection and scrub: listing the blobs,
//! the leftovers (objects under `tmp/` and `uploads/`, and unfinished
//! multipart uploads anywhere) and removing them.

use super::{S3Store, BLOB_PREFIX, QUARANTINE_PREFIX, TMP_PREFIX, UPLOADS_PREFIX};
use crate::cas::fs::valid_upload_id;
use crate::cas::{CasError, Leftover, LeftoverKind, Result, StoredBlob};
use crate::digest::Digest;
use std::collections::BTreeMap;
use std::time::SystemTime;

/// How an unfinished multipart upload outside `uploads/` is named as a
/// [`LeftoverKind::Temp`]: `<key>?uploadId=<id>`.
const UPLOAD_ID_SEP: &str = "?uploadId=";

/// A listing's `LastModified` (RFC 3339) or HEAD's `Last-Modified` (RFC 7231).
pub(super) fn parse_time(s: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| chrono::DateTime::parse_from_rfc2822(s))
        .ok()
        .map(SystemTime::from)
}

impl S3Store {
    pub(super) fn list_blobs(&self, each: &mut dyn FnMut(StoredBlob) -> bool) -> Result<()> {
        self.client.list(BLOB_PREFIX, &mut |o| {
            let hex = o.key.rsplit('/').next().unwrap_or_default();
            let digest = match Digest::from_hex(hex) {
                Ok(d) if Self::key_of(&d) == o.key => d,
                _ => {
                    log::warn!(
                        "blob store: {} is not a blob; left alone",
                        self.client.location(&o.key)
                    );
                    return true;
                }
            };
            // (a time that cannot be read counts as new: garbage collection
            // spares young blobs, so that errs on the safe side)
            let stored_at = o
                .last_modified
                .as_deref()
                .and_then(parse_time)
                .unwrap_or_else(SystemTime::now);
            each(StoredBlob {
                digest,
                size: o.size,
                stored_at,
            })
        })
    }

    pub(super) fn list_leftovers(&self) -> Result<Vec<Leftover>> {
        let mut out = Vec::new();
        self.client.list(TMP_PREFIX, &mut |o| {
            out.push(Leftover {
                kind: LeftoverKind::Temp,
                name: o.key[TMP_PREFIX.len()..].to_string(),
                bytes: o.size,
            });
            true
        })?;
        let mut staged: BTreeMap<String, u64> = BTreeMap::new();
        let upload_of = |key: &str| -> Option<String> {
            let rest = key.strip_prefix(UPLOADS_PREFIX)?;
            let (id, _) = rest.split_once('/')?;
            valid_upload_id(id).ok().map(|()| id.to_string())
        };
        self.client.list(UPLOADS_PREFIX, &mut |o| {
            match upload_of(&o.key) {
                Some(id) => *staged.entry(id).or_default() += o.size,
                None => log::warn!(
                    "blob store: {} is not an upload; left alone",
                    self.client.location(&o.key)
                ),
            }
            true
        })?;
        for m in self.client.list_multipart("")? {
            let bytes = self.client.multipart_bytes(&m.key, &m.upload_id)?;
            if let Some(id) = upload_of(&m.key) {
                *staged.entry(id).or_default() += bytes;
            } else if is_ours(&m.key) {
                out.push(Leftover {
                    kind: LeftoverKind::Temp,
                    name: format!("{}{UPLOAD_ID_SEP}{}", m.key, m.upload_id),
                    bytes,
                });
            } else {
                log::warn!(
                    "blob store: an unfinished multipart upload of {} is not imgsrv's; left alone",
                    self.client.location(&m.key)
                );
            }
        }
        out.extend(staged.into_iter().map(|(name, bytes)| Leftover {
            kind: LeftoverKind::Staged,
            name,
            bytes,
        }));
        Ok(out)
    }

    pub(super) fn remove_leftover_at(&self, l: &Leftover) -> Result<u64> {
        match l.kind {
            LeftoverKind::Staged => {
                self.discard(&l.name)?;
                Ok(l.bytes)
            }
            LeftoverKind::Temp => {
                if let Some((key, id)) = l.name.split_once(UPLOAD_ID_SEP) {
                    if !is_ours(key) || id.is_empty() {
                        return Err(CasError::Invalid(format!("leftover {:?}", l.name)));
                    }
                    self.client.abort_multipart(key, id)?;
                    return Ok(l.bytes);
                }
                if l.name.is_empty() || l.name.split('/').any(|s| s.is_empty() || s == "..") {
                    return Err(CasError::Invalid(format!("temp object name {:?}", l.name)));
                }
                let key = format!("{TMP_PREFIX}{}", l.name);
                if self.client.head(&key)?.is_none() {
                    return Ok(0);
                }
                self.client.delete(&key)?;
                Ok(l.bytes)
            }
        }
    }
}

/// A key under one of the store's prefixes other than `uploads/`.
fn is_ours(key: &str) -> bool {
    [BLOB_PREFIX, TMP_PREFIX, QUARANTINE_PREFIX]
        .iter()
        .any(|p| key.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_of_listings_and_heads_parse() {
        let a = parse_time("2026-01-02T03:04:05.000Z").unwrap();
        let b = parse_time("Fri, 02 Jan 2026 03:04:05 GMT").unwrap();
        assert_eq!(a, b);
        assert!(parse_time("yesterday").is_none());
    }
}
