//! What the web catalog shows, read from the catalog for one caller: the
//! published versions of the images the caller may read, each with its
//! artifacts, Incus fingerprints, aliases, retirement, and its signature
//! checked again now against the trusted keys ([`crate::sign`]), so that a key
//! revoked since the publication shows as such.

use crate::app::App;
use crate::catalog::{Image, ProjectionRow, PublishRecord, Retirement, VersionState, VersionView};
use crate::sign::{KeyState, SignError, TrustedKey};
use std::collections::HashMap;

/// An image as the pages name it.
pub struct ImageHead {
    pub name: String,
    /// The display name, else the name.
    pub title: String,
    pub description: Option<String>,
    pub private: bool,
}

impl ImageHead {
    pub fn of(img: &Image) -> ImageHead {
        ImageHead {
            name: img.name.clone(),
            title: img.display_name.clone().unwrap_or_else(|| img.name.clone()),
            description: img.description.clone(),
            private: img.is_private(),
        }
    }
}

/// A size: the exact byte count and a short IEC form (`12.3 MiB`).
pub struct Size {
    pub bytes: u64,
    pub text: String,
}

impl Size {
    pub fn of(bytes: u64) -> Size {
        Size {
            bytes,
            text: bytesize::ByteSize::b(bytes).display().iec().to_string(),
        }
    }
}

/// A time: RFC 3339 for `<time datetime>`, and `2026-03-01 12:00 UTC` to read.
pub struct Stamp {
    pub iso: String,
    pub text: String,
}

impl Stamp {
    pub fn of(rfc3339: &str) -> Stamp {
        let text = chrono::DateTime::parse_from_rfc3339(rfc3339)
            .map(|t| {
                t.with_timezone(&chrono::Utc)
                    .format("%Y-%m-%d %H:%M UTC")
                    .to_string()
            })
            .unwrap_or_else(|_| rfc3339.to_string());
        Stamp {
            iso: rfc3339.to_string(),
            text,
        }
    }
}

/// The signature of a publication as checked now: a CSS class (`ok`, `warn`,
/// `bad`) and the words shown.
pub struct Signature {
    pub class: &'static str,
    pub text: String,
}

/// An Incus fingerprint: 64 hex digits, and the 12 `incus image list` shows.
pub struct Fingerprint {
    pub full: String,
    pub short: String,
}

/// One artifact of a version.
pub struct Artifact {
    pub variant: String,
    pub arch: String,
    /// `container` or `virtual-machine`.
    pub kind: &'static str,
    pub format: String,
    pub size: Size,
    /// The Incus fingerprint (sha256 of the metadata tarball and the root).
    pub fingerprint: Option<Fingerprint>,
    /// The metadata tarball's size.
    pub metadata_size: Option<Size>,
}

pub struct Retired {
    pub at: Stamp,
    pub reason: String,
    pub by: Option<String>,
    /// When garbage collection stopped keeping its bytes.
    pub collected: Option<Stamp>,
}

/// A published version.
pub struct Version {
    pub version: String,
    pub published: Stamp,
    pub os: String,
    pub release: String,
    pub signature: Signature,
    /// The check made at publication (`verified`, `unverified`, `skipped`).
    pub checked_at_publish: String,
    pub manifest_digest: String,
    pub retired: Option<Retired>,
    /// Why its bytes are not served (its signer's key was revoked).
    pub withheld: Option<String>,
    pub artifacts: Vec<Artifact>,
    /// The catalog's aliases pointing at it.
    pub aliases: Vec<String>,
}

impl Version {
    pub fn has_vm(&self) -> bool {
        self.artifacts.iter().any(|a| a.kind == "virtual-machine")
    }
}

/// An alias and the version it names.
pub struct AliasRow {
    pub alias: String,
    pub version: String,
}

/// A line of the front page: an image with its newest version.
pub struct Summary {
    pub image: ImageHead,
    /// The newest version that is served (else the newest there is).
    pub latest: Version,
    /// Published versions not retired.
    pub current: usize,
}

/// The page of one image.
pub struct Detail {
    pub image: ImageHead,
    /// Newest first, retired ones included.
    pub versions: Vec<Version>,
    pub aliases: Vec<AliasRow>,
}

impl Detail {
    /// The newest version that is neither retired nor withheld.
    pub fn latest(&self) -> Option<&Version> {
        self.versions
            .iter()
            .find(|v| v.retired.is_none() && v.withheld.is_none())
    }
}

/// The trusted keys, read once per page (a revoked key takes effect at the
/// next page view); `Err` when they cannot be read: then no signature is
/// called verified.
pub struct Keys(Result<Vec<TrustedKey>, String>);

impl Keys {
    pub fn load(app: &App) -> Keys {
        Keys(app.trusted_keys().map_err(|e| {
            log::error!("web catalog: reading the trusted keys: {e}");
            e.to_string()
        }))
    }

    fn revoked(&self, key_id: &str) -> Option<&TrustedKey> {
        self.0.as_ref().ok().and_then(|keys| {
            keys.iter()
                .find(|k| k.key_id == key_id && k.policy.state == KeyState::Revoked)
        })
    }

    /// The publication's signature checked now against these keys.
    fn check(&self, rec: &PublishRecord) -> Signature {
        let Some(sig) = rec.signature.as_deref() else {
            return Signature {
                class: "warn",
                text: "unsigned".into(),
            };
        };
        let keys = match &self.0 {
            Ok(k) => k,
            Err(_) => {
                return Signature {
                    class: "bad",
                    text: "not checked: this server cannot read its trusted keys".into(),
                }
            }
        };
        match crate::sign::verify_signed_by(keys, &rec.manifest, sig) {
            Ok((k, _)) => match k.policy.state {
                KeyState::Revoked => Signature {
                    class: "bad",
                    text: format!("signer key revoked: {} ({})", k.name, k.key_id),
                },
                KeyState::Retired => Signature {
                    class: "ok",
                    text: format!("verified by {} ({}, a retired key)", k.name, k.key_id),
                },
                KeyState::Active => Signature {
                    class: "ok",
                    text: format!("verified by {} ({})", k.name, k.key_id),
                },
            },
            Err(SignError::UnknownKey(id)) => Signature {
                class: "bad",
                text: format!("signed by key {id}, which this server does not trust"),
            },
            Err(e) => Signature {
                class: "bad",
                text: format!("the signature does not verify: {e}"),
            },
        }
    }
}

/// Reads version `ver` of `img` as published, with its retirement.
fn version(
    app: &App,
    keys: &Keys,
    view: &VersionView,
    aliases: &[AliasRow],
) -> crate::catalog::Result<Version> {
    let rec = app.catalog.publish_record(&view.version.id)?;
    let rows: HashMap<String, ProjectionRow> = app
        .catalog
        .projection_rows(&view.version.id)?
        .into_iter()
        .map(|r| (r.artifact_id.clone(), r))
        .collect();
    let retired = app.catalog.retirement(&view.version.id)?.map(retired);
    let withheld = rec
        .signer_key_id
        .as_deref()
        .and_then(|id| keys.revoked(id))
        .map(|k| {
            format!(
                "signed by key {} ({}), which the operator has revoked: not served",
                k.name, k.key_id
            )
        });
    let meta = |k: &str| view.version.metadata.get(k).filter(|s| !s.is_empty());
    let first_os = view
        .artifacts
        .first()
        .map(|a| a.artifact.operating_system.clone())
        .unwrap_or_default();
    let mut artifacts: Vec<Artifact> = view
        .artifacts
        .iter()
        .map(|a| {
            let row = rows.get(&a.artifact.id);
            let kind = match row.map(|r| r.ftype.as_str()) {
                Some("disk-kvm.img") => "virtual-machine",
                Some(_) => "container",
                None if a.artifact.format == "qcow2" => "virtual-machine",
                None => "container",
            };
            let metadata_size = row
                .and_then(|r| {
                    a.attachments
                        .iter()
                        .find(|t| t.id == r.metadata_attachment_id)
                })
                .map(|t| Size::of(t.blob_size_bytes));
            Artifact {
                variant: a.artifact.variant.clone(),
                arch: a.artifact.architecture.clone(),
                kind,
                format: a.artifact.format.clone(),
                size: Size::of(a.artifact.primary_blob_size_bytes),
                fingerprint: row.map(|r| {
                    let full = r.combined_sha256.hex();
                    Fingerprint {
                        short: full[..12].to_string(),
                        full,
                    }
                }),
                metadata_size,
            }
        })
        .collect();
    artifacts.sort_by(|a, b| (&a.arch, &a.variant, a.kind).cmp(&(&b.arch, &b.variant, b.kind)));
    Ok(Version {
        version: view.version.version.clone(),
        published: Stamp::of(&rec.published_at),
        os: meta("os").cloned().unwrap_or(first_os),
        release: meta("release")
            .cloned()
            .unwrap_or_else(|| view.version.version.clone()),
        signature: keys.check(&rec),
        checked_at_publish: rec.verification.as_str().to_string(),
        manifest_digest: rec.manifest_digest.to_string(),
        retired,
        withheld,
        artifacts,
        aliases: aliases
            .iter()
            .filter(|a| a.version == view.version.version)
            .map(|a| a.alias.clone())
            .collect(),
    })
}

fn retired(t: Retirement) -> Retired {
    Retired {
        at: Stamp::of(&t.retired_at),
        reason: t.reason,
        by: t.principal_name,
        collected: t.collected_at.as_deref().map(Stamp::of),
    }
}

fn alias_rows(app: &App, name: &str) -> crate::catalog::Result<Vec<AliasRow>> {
    Ok(app
        .catalog
        .list_aliases(name)?
        .into_iter()
        .map(|a| AliasRow {
            alias: a.alias,
            version: a.version,
        })
        .collect())
}

/// The front page: each image `readable` lets the caller see that has a
/// published version not retired, by name.
pub fn catalog(
    app: &App,
    readable: &dyn Fn(&Image) -> bool,
) -> crate::catalog::Result<Vec<Summary>> {
    let keys = Keys::load(app);
    let mut out = Vec::new();
    for img in app.catalog.list_images(false)? {
        if !readable(&img) {
            continue;
        }
        // published, not retired, newest first
        let versions = app.catalog.list_versions(&img.name, false)?;
        if versions.is_empty() {
            continue;
        }
        let aliases = alias_rows(app, &img.name)?;
        let mut latest = None;
        for v in &versions {
            let view = app.catalog.version_view(&img.name, &v.version)?;
            let v = version(app, &keys, &view, &aliases)?;
            let served = v.withheld.is_none();
            if latest.is_none() || served {
                latest = Some(v);
            }
            if served {
                break;
            }
        }
        let Some(latest) = latest else { continue };
        out.push(Summary {
            image: ImageHead::of(&img),
            latest,
            current: versions.len(),
        });
    }
    out.sort_by(|a, b| a.image.name.cmp(&b.image.name));
    Ok(out)
}

/// The page of image `img` (which the caller may read): every published
/// version, retired ones too; `None` when it has none.
pub fn detail(app: &App, img: &Image) -> crate::catalog::Result<Option<Detail>> {
    let keys = Keys::load(app);
    let aliases = alias_rows(app, &img.name)?;
    let mut names: Vec<String> = app
        .catalog
        .list_versions(&img.name, false)?
        .into_iter()
        .map(|v| v.version)
        .collect();
    names.extend(
        app.catalog
            .retirements()?
            .into_iter()
            .filter(|r| r.image == img.name)
            .map(|r| r.version),
    );
    let mut versions = Vec::new();
    for name in names {
        let view = app.catalog.version_view(&img.name, &name)?;
        if view.version.state != VersionState::Published {
            continue;
        }
        versions.push(version(app, &keys, &view, &aliases)?);
    }
    if versions.is_empty() {
        return Ok(None);
    }
    versions.sort_by(|a, b| (&b.published.iso, &b.version).cmp(&(&a.published.iso, &a.version)));
    Ok(Some(Detail {
        image: ImageHead::of(img),
        versions,
        aliases,
    }))
}
