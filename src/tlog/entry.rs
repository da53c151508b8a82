//! What an entry of the log says: one event, as canonical text that anyone can read
//! back without imgsrv (a line `imgsrv-log/1`, then `key value` lines in a fixed
//! order, each ended by a newline):
//!
//! ```text
//! imgsrv-log/1
//! kind publish
//! image debian-bookworm
//! version 20260101_0000
//! manifest sha256:<hex>
//! signer <minisign key id, hex> | none
//! time 2026-01-01T00:00:00.000000000Z
//! ```
//!
//! Kinds: `publish` (above), `retire` (image, version, manifest, time), and the
//! publisher key changes `key-add` (key, name, public-key, time), `key-retire` and
//! `key-revoke` (key, name, time). Every value is a single token: image names,
//! versions, key names and ids, digests and times hold no blank or newline (the
//! catalog refuses them), which [`Entry::text`] checks again. A retirement's reason
//! is free text and stays in the audit log: the log says what was served, not why.

use crate::digest::Digest;

/// The first line of every entry.
pub const HEADER: &str = "imgsrv-log/1";

/// One event of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Publish {
        image: String,
        version: String,
        manifest: Digest,
        /// The minisign key id that signed it (`None` for a publication the
        /// server's verification mode let through unsigned).
        signer: Option<String>,
        time: String,
    },
    Retire {
        image: String,
        version: String,
        manifest: Digest,
        time: String,
    },
    KeyAdd {
        key: String,
        name: String,
        public_key: String,
        time: String,
    },
    KeyRetire {
        key: String,
        name: String,
        time: String,
    },
    KeyRevoke {
        key: String,
        name: String,
        time: String,
    },
}

impl Entry {
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Publish { .. } => "publish",
            Entry::Retire { .. } => "retire",
            Entry::KeyAdd { .. } => "key-add",
            Entry::KeyRetire { .. } => "key-retire",
            Entry::KeyRevoke { .. } => "key-revoke",
        }
    }

    /// The image and version an entry is about (publications and retirements).
    pub fn version(&self) -> Option<(&str, &str)> {
        match self {
            Entry::Publish { image, version, .. } | Entry::Retire { image, version, .. } => {
                Some((image, version))
            }
            _ => None,
        }
    }

    /// The key id an entry is about (publications: the signer's).
    pub fn key(&self) -> Option<&str> {
        match self {
            Entry::Publish { signer, .. } => signer.as_deref(),
            Entry::KeyAdd { key, .. }
            | Entry::KeyRetire { key, .. }
            | Entry::KeyRevoke { key, .. } => Some(key),
            Entry::Retire { .. } => None,
        }
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        match self {
            Entry::Publish {
                image,
                version,
                manifest,
                signer,
                time,
            } => vec![
                ("image", image.clone()),
                ("version", version.clone()),
                ("manifest", manifest.to_string()),
                ("signer", signer.clone().unwrap_or_else(|| "none".into())),
                ("time", time.clone()),
            ],
            Entry::Retire {
                image,
                version,
                manifest,
                time,
            } => vec![
                ("image", image.clone()),
                ("version", version.clone()),
                ("manifest", manifest.to_string()),
                ("time", time.clone()),
            ],
            Entry::KeyAdd {
                key,
                name,
                public_key,
                time,
            } => vec![
                ("key", key.clone()),
                ("name", name.clone()),
                ("public-key", public_key.clone()),
                ("time", time.clone()),
            ],
            Entry::KeyRetire { key, name, time } | Entry::KeyRevoke { key, name, time } => vec![
                ("key", key.clone()),
                ("name", name.clone()),
                ("time", time.clone()),
            ],
        }
    }

    /// The canonical text: the bytes the log hashes.
    pub fn text(&self) -> anyhow::Result<String> {
        let mut s = format!("{HEADER}\nkind {}\n", self.kind());
        for (k, v) in self.fields() {
            anyhow::ensure!(
                !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c.is_control()),
                "log entry field {k} {v:?} is not a single token"
            );
            s.push_str(&format!("{k} {v}\n"));
        }
        Ok(s)
    }

    /// Reads an entry back from its text (exactly the form [`Entry::text`] writes).
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Entry> {
        let text = std::str::from_utf8(bytes)?;
        let mut lines = text
            .strip_suffix('\n')
            .ok_or_else(|| anyhow::anyhow!("a log entry ends with a newline"))?
            .split('\n');
        anyhow::ensure!(lines.next() == Some(HEADER), "not an {HEADER} entry");
        let mut next = |want: &str| -> anyhow::Result<String> {
            let line = lines
                .next()
                .ok_or_else(|| anyhow::anyhow!("log entry: no {want} line"))?;
            let (k, v) = line
                .split_once(' ')
                .ok_or_else(|| anyhow::anyhow!("log entry: {line:?} is not `key value`"))?;
            anyhow::ensure!(k == want, "log entry: {k} where {want} was expected");
            Ok(v.to_string())
        };
        let kind = next("kind")?;
        let e = match kind.as_str() {
            "publish" => Entry::Publish {
                image: next("image")?,
                version: next("version")?,
                manifest: next("manifest")?.parse()?,
                signer: Some(next("signer")?).filter(|s| s != "none"),
                time: next("time")?,
            },
            "retire" => Entry::Retire {
                image: next("image")?,
                version: next("version")?,
                manifest: next("manifest")?.parse()?,
                time: next("time")?,
            },
            "key-add" => Entry::KeyAdd {
                key: next("key")?,
                name: next("name")?,
                public_key: next("public-key")?,
                time: next("time")?,
            },
            "key-retire" | "key-revoke" => {
                let (key, name, time) = (next("key")?, next("name")?, next("time")?);
                if kind == "key-retire" {
                    Entry::KeyRetire { key, name, time }
                } else {
                    Entry::KeyRevoke { key, name, time }
                }
            }
            other => anyhow::bail!("log entry of unknown kind {other:?}"),
        };
        anyhow::ensure!(
            lines.next().is_none(),
            "log entry: lines after the last field"
        );
        anyhow::ensure!(
            e.text()?.as_bytes() == bytes,
            "log entry is not in canonical form"
        );
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_only_their_canonical_text_is_read() {
        let d = Digest::of(b"manifest");
        let all = [
            Entry::Publish {
                image: "debian".into(),
                version: "1".into(),
                manifest: d,
                signer: Some("ABCD".into()),
                time: "2026-01-01T00:00:00Z".into(),
            },
            Entry::Publish {
                image: "debian".into(),
                version: "2".into(),
                manifest: d,
                signer: None,
                time: "t".into(),
            },
            Entry::Retire {
                image: "debian".into(),
                version: "1".into(),
                manifest: d,
                time: "t".into(),
            },
            Entry::KeyAdd {
                key: "ABCD".into(),
                name: "release".into(),
                public_key: "RWQx".into(),
                time: "t".into(),
            },
            Entry::KeyRetire {
                key: "ABCD".into(),
                name: "release".into(),
                time: "t".into(),
            },
            Entry::KeyRevoke {
                key: "ABCD".into(),
                name: "release".into(),
                time: "t".into(),
            },
        ];
        for e in &all {
            let t = e.text().unwrap();
            assert!(t.starts_with("imgsrv-log/1\nkind "), "{t}");
            assert_eq!(&Entry::parse(t.as_bytes()).unwrap(), e);
        }
        let t = all[0].text().unwrap();
        assert_eq!(
            t,
            format!(
                "imgsrv-log/1\nkind publish\nimage debian\nversion 1\nmanifest {d}\nsigner ABCD\n\
                 time 2026-01-01T00:00:00Z\n"
            )
        );
        for bad in [
            t.replace("kind publish", "kind Publish"),
            t.replace("image debian\nversion 1\n", "version 1\nimage debian\n"),
            t.trim_end().to_string(),
            format!("{t}extra x\n"),
            t.replace("image debian", "image  debian"),
        ] {
            assert!(Entry::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let spaced = Entry::KeyRetire {
            key: "AB".into(),
            name: "two words".into(),
            time: "t".into(),
        };
        assert!(spaced.text().is_err());
    }
}
