//! Where mirrored or imported versions go: a running server (`--server URL`,
//! through the HTTP API with a content-writer token) or a data directory
//! (`--data DIR`, through the same [`App`] code the server runs, so the
//! directory's own verification mode and trusted keys apply).
//!
//! A version is described by its [`Manifest`]: staging it creates exactly
//! those artifacts and attachments, so the target's canonical manifest is
//! byte-identical to the source's and a signature over one verifies the other.

use crate::app::App;
use crate::catalog::{
    Artifact, ArtifactWithAttachments, Attachment, Image, ImageVersion, NewArtifact, NewAttachment,
    VersionState, VersionView,
};
use crate::client::ApiClient;
use crate::digest::Digest;
use crate::manifest::Manifest;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// A version's state on a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionStatus {
    Absent,
    Draft,
    Published,
}

/// What mirroring and import need from a destination.
pub trait Target {
    /// Human-readable name for messages (`https://…` or the directory).
    fn describe(&self) -> String;
    /// Whether the blob is stored there with this size.
    fn has_blob(&self, digest: &Digest, size: u64) -> Result<bool>;
    /// Whether [`Target::has_blob`] really asks (a data directory) rather
    /// than leaving it to the upload (a server): only then does a mirror run
    /// check the versions published there already for files lost since (a
    /// scrub quarantined them) and fetch those again.
    fn checks_blobs(&self) -> bool {
        false
    }
    /// Stores a file whose digest and size were already checked; the target
    /// checks them again while storing.
    fn put_blob(&self, digest: &Digest, size: u64, media_type: &str, file: &Path) -> Result<()>;
    /// [`Target::put_blob`] of a file this process hashed to `digest` while
    /// writing it, in a directory nobody else writes: a target in this
    /// process may take it without hashing it again
    /// ([`crate::cas::BlobStore::adopt_hashed`]). A server checks it anyway.
    fn put_hashed_blob(
        &self,
        digest: &Digest,
        size: u64,
        media_type: &str,
        file: &Path,
    ) -> Result<()> {
        self.put_blob(digest, size, media_type, file)
    }
    fn status(&self, image: &str, version: &str) -> Result<VersionStatus>;
    /// Creates (or takes over a draft of) the version with exactly the
    /// manifest's contents, creating the image if needed (private if asked).
    /// Returns the target's canonical manifest bytes.
    fn stage(&self, manifest: &Manifest, private: bool) -> Result<Vec<u8>>;
    /// Publishes the staged draft with `signature` (the .minisig text).
    fn publish(&self, image: &str, version: &str, signature: Option<&str>) -> Result<()>;
    /// [`Target::publish`] with Incus fingerprints computed in this process
    /// while both inputs' sha256 were checked (see
    /// [`crate::fingerprint::Known`]); a target may use them instead of
    /// reading the blobs again. The default ignores them.
    fn publish_with_fingerprints(
        &self,
        image: &str,
        version: &str,
        signature: Option<&str>,
        fingerprints: &crate::fingerprint::Known,
    ) -> Result<()> {
        let _ = fingerprints;
        self.publish(image, version, signature)
    }
    fn set_alias(&self, image: &str, alias: &str, version: &str) -> Result<()>;
    /// Why publications signed with the key `key_id` would be refused there
    /// (not trusted, or not active), saying what to do; `None` when they
    /// would not be (or the target does not require signatures). A mirror
    /// asks before it downloads anything.
    fn signer_refused(&self, key_id: &str) -> Result<Option<String>> {
        let _ = key_id;
        Ok(None)
    }
}

/// [`Target::signer_refused`] from what the target lists: `found` is the
/// (name, state) of the key with that id there, if any; `trust` the command
/// that trusts a public key there.
fn signer_refusal(
    target: &str,
    key_id: &str,
    found: Option<(&str, &str)>,
    trust: &str,
) -> Option<String> {
    match found {
        Some((_, "active")) => None,
        None => Some(format!(
            "{target} does not trust the signing key {key_id} (--key): it would refuse every \
             version, so nothing was downloaded; trust the key's public half there first: \
             {trust}"
        )),
        Some((name, state)) => Some(format!(
            "the signing key {key_id} is {state} on {target} (trusted as {name:?}): it signs no \
             new publications, so nothing was downloaded; mirror with an active key"
        )),
    }
}

impl Manifest {
    /// The catalog view this manifest describes (ids and times are not part
    /// of the manifest and are left empty).
    pub fn to_view(&self) -> VersionView {
        let image = Image {
            id: String::new(),
            name: self.image.clone(),
            display_name: None,
            description: None,
            visibility: "public".into(),
            created_at: String::new(),
            updated_at: String::new(),
        };
        let version = ImageVersion {
            id: String::new(),
            image_id: String::new(),
            image_name: self.image.clone(),
            version: self.version.clone(),
            state: VersionState::Draft,
            metadata: self.metadata.clone(),
            published_at: None,
            created_at: String::new(),
            updated_at: String::new(),
        };
        let artifacts = self
            .artifacts
            .iter()
            .map(|a| ArtifactWithAttachments {
                artifact: Artifact {
                    id: String::new(),
                    version_id: String::new(),
                    variant: a.variant.clone(),
                    operating_system: a.operating_system.clone(),
                    architecture: a.architecture.clone(),
                    format: a.format.clone(),
                    primary_blob_digest: a.digest,
                    primary_blob_size_bytes: a.size,
                    primary_media_type: a.media_type.clone(),
                    created_at: String::new(),
                    updated_at: String::new(),
                },
                attachments: a
                    .attachments
                    .iter()
                    .map(|t| Attachment {
                        id: String::new(),
                        artifact_id: String::new(),
                        name: t.name.clone(),
                        media_type: t.media_type.clone(),
                        blob_digest: t.digest,
                        blob_size_bytes: t.size,
                        created_at: String::new(),
                        updated_at: String::new(),
                    })
                    .collect(),
            })
            .collect();
        VersionView {
            image,
            version,
            artifacts,
        }
    }

    /// Canonical bytes of this manifest (what is signed).
    pub fn canonical(&self) -> Vec<u8> {
        crate::manifest::canonical(&self.to_view())
    }

    /// Every blob the version needs: (digest, size, media type).
    pub fn blobs(&self) -> Vec<(Digest, u64, String)> {
        let mut v: Vec<(Digest, u64, String)> = Vec::new();
        for a in &self.artifacts {
            v.push((a.digest, a.size, a.media_type.clone()));
            for t in &a.attachments {
                v.push((t.digest, t.size, t.media_type.clone()));
            }
        }
        v.sort_by_key(|b| b.0);
        v.dedup_by_key(|b| b.0);
        v
    }
}

/// A data directory, written through the server's own code.
pub struct LocalTarget {
    pub app: std::sync::Arc<App>,
    actor: String,
    /// Pins what this run stores until it is done ([`App::lease`]).
    pub lease: crate::app::Lease,
}

impl LocalTarget {
    /// Opens an initialised data directory with its configuration (its
    /// verification mode and trusted keys decide what may be published).
    pub fn open(data_dir: &Path) -> Result<LocalTarget> {
        crate::admin_cli::open_catalog(data_dir)?;
        let config = crate::config::Config::load(data_dir, None)?;
        for w in &config.warnings {
            eprintln!("WARNING: {w}");
        }
        let app = std::sync::Arc::new(App::open(config)?);
        Ok(LocalTarget {
            lease: app.lease("local"),
            app,
            actor: crate::admin_cli::local_actor(),
        })
    }

    /// A running server's own App (scheduled mirror jobs); `actor` names the
    /// job in the audit log and publish records.
    pub fn with_app(app: std::sync::Arc<App>, actor: &str) -> LocalTarget {
        LocalTarget {
            lease: app.lease(actor),
            app,
            actor: actor.to_string(),
        }
    }

    /// On the data directory's filesystem the store takes the file in place
    /// (fsynced, hard-linked; hashed once more unless `hashed`); elsewhere
    /// it copies ([`App::ingest_file`]).
    fn ingest_file(
        &self,
        digest: &Digest,
        size: u64,
        media_type: &str,
        file: &Path,
        hashed: bool,
    ) -> Result<()> {
        self.app
            .ingest_file(&self.lease, digest, size, Some(media_type), file, hashed)
            .with_context(|| format!("storing {digest}"))
    }

    fn audit(&self, action: &str, target: &str, detail: serde_json::Value) -> Result<()> {
        crate::admin_cli::record_as(
            self.app.catalog.as_ref(),
            &self.actor,
            action,
            target,
            detail,
        )
    }
}

impl Target for LocalTarget {
    fn describe(&self) -> String {
        self.app.config.data_dir.display().to_string()
    }

    fn signer_refused(&self, key_id: &str) -> Result<Option<String>> {
        if self.app.verification() != crate::config::VerificationMode::Enforce {
            return Ok(None);
        }
        let keys = self.app.trusted_keys()?;
        let found = keys.iter().find(|k| k.key_id == key_id);
        Ok(signer_refusal(
            &self.describe(),
            key_id,
            found.map(|k| (k.name.as_str(), k.policy.state.as_str())),
            &format!(
                "`imgsrv key add --data {} --name mirror MIRROR.pub` (the .pub that `minisign \
                 -G` wrote beside the secret key)",
                self.describe()
            ),
        ))
    }

    fn checks_blobs(&self) -> bool {
        true
    }

    fn has_blob(&self, digest: &Digest, size: u64) -> Result<bool> {
        Ok(self
            .app
            .catalog
            .get_blob(digest)?
            .is_some_and(|b| b.size_bytes == size)
            && self.app.blobs.stat(digest)? == Some(size))
    }

    fn put_blob(&self, digest: &Digest, size: u64, media_type: &str, file: &Path) -> Result<()> {
        self.ingest_file(digest, size, media_type, file, false)
    }

    fn put_hashed_blob(
        &self,
        digest: &Digest,
        size: u64,
        media_type: &str,
        file: &Path,
    ) -> Result<()> {
        self.ingest_file(digest, size, media_type, file, true)
    }

    fn status(&self, image: &str, version: &str) -> Result<VersionStatus> {
        match self.app.catalog.get_version(image, version) {
            Ok(v) if v.state == VersionState::Published => Ok(VersionStatus::Published),
            Ok(_) => Ok(VersionStatus::Draft),
            Err(crate::catalog::CatalogError::NotFound(_)) => Ok(VersionStatus::Absent),
            Err(e) => Err(e.into()),
        }
    }

    fn stage(&self, m: &Manifest, private: bool) -> Result<Vec<u8>> {
        let cat = &self.app.catalog;
        if !crate::names::image_name(&m.image) || !crate::names::version(&m.version) {
            bail!("invalid image or version name {}@{}", m.image, m.version);
        }
        match cat.get_image(&m.image) {
            Ok(img) => {
                if private && !img.is_private() {
                    cat.set_visibility(&m.image, "private")?;
                }
            }
            Err(crate::catalog::CatalogError::NotFound(_)) => {
                cat.create_image(
                    &m.image,
                    None,
                    None,
                    if private { "private" } else { "public" },
                )?;
                self.audit(
                    "image.create",
                    &m.image,
                    serde_json::json!({ "private": private }),
                )?;
            }
            Err(e) => return Err(e.into()),
        }
        let v = match cat.get_version(&m.image, &m.version) {
            Ok(v) if v.state == VersionState::Draft => {
                if v.metadata != m.metadata {
                    bail!(
                        "a draft {}@{} exists with other metadata",
                        m.image,
                        m.version
                    );
                }
                for a in cat.version_view(&m.image, &m.version)?.artifacts {
                    cat.delete_artifact(&v.id, &a.artifact.id)?;
                }
                v
            }
            Ok(_) => bail!("{}@{} is already published", m.image, m.version),
            Err(crate::catalog::CatalogError::NotFound(_)) => {
                cat.create_version(&m.image, &m.version, &m.metadata)?
            }
            Err(e) => return Err(e.into()),
        };
        for a in &m.artifacts {
            let art = cat.add_artifact(
                &v.id,
                &NewArtifact {
                    variant: a.variant.clone(),
                    operating_system: a.operating_system.clone(),
                    architecture: a.architecture.clone(),
                    format: a.format.clone(),
                    primary_blob_digest: a.digest,
                    primary_blob_size_bytes: a.size,
                    primary_media_type: a.media_type.clone(),
                },
            )?;
            for t in &a.attachments {
                cat.add_attachment(
                    &v.id,
                    &art.id,
                    &NewAttachment {
                        name: t.name.clone(),
                        media_type: t.media_type.clone(),
                        blob_digest: t.digest,
                        blob_size_bytes: t.size,
                    },
                )?;
            }
        }
        self.audit(
            "version.create",
            &format!("{}@{}", m.image, m.version),
            serde_json::json!({}),
        )?;
        Ok(crate::manifest::canonical(
            &cat.version_view(&m.image, &m.version)?,
        ))
    }

    fn publish(&self, image: &str, version: &str, signature: Option<&str>) -> Result<()> {
        self.publish_with_fingerprints(image, version, signature, &Default::default())
    }

    fn publish_with_fingerprints(
        &self,
        image: &str,
        version: &str,
        signature: Option<&str>,
        fingerprints: &crate::fingerprint::Known,
    ) -> Result<()> {
        let target = format!("{image}@{version}");
        match self.app.publish_version_with(
            image,
            version,
            signature.map(str::to_string),
            Some(&self.actor),
            fingerprints,
        ) {
            Ok(p) => self.audit(
                "publish",
                &target,
                serde_json::json!({
                    "manifest_digest": p.record.manifest_digest.to_string(),
                    "verification": p.record.verification.as_str(),
                    "signer_key_id": p.record.signer_key_id,
                }),
            ),
            Err(e) => {
                let _ = crate::catalog::AuditCatalog::append_audit(
                    self.app.catalog.as_ref(),
                    &crate::catalog::AuditEntry {
                        principal_name: Some(self.actor.clone()),
                        action: "publish".into(),
                        target: target.clone(),
                        outcome: "failed".into(),
                        detail: serde_json::json!({ "refused": e.to_string() }).to_string(),
                        ..Default::default()
                    },
                );
                Err(anyhow::Error::new(e)
                    .context(format!("publishing {target} into {}", self.describe())))
            }
        }
    }

    fn set_alias(&self, image: &str, alias: &str, version: &str) -> Result<()> {
        if !crate::names::alias(alias) {
            bail!("invalid alias {alias:?}");
        }
        self.app.catalog.put_alias(image, alias, version)?;
        self.audit(
            "alias.put",
            &format!("{image}:{alias}"),
            serde_json::json!({ "version": version }),
        )
    }
}

/// A running server, through its HTTP API.
pub struct RemoteTarget {
    pub client: ApiClient,
}

impl Target for RemoteTarget {
    fn describe(&self) -> String {
        self.client.server().to_string()
    }

    fn signer_refused(&self, key_id: &str) -> Result<Option<String>> {
        let keys = self.client.get_keys()?;
        let found = keys.iter().find(|k| k.key_id == key_id);
        Ok(signer_refusal(
            &self.describe(),
            key_id,
            found.map(|k| (k.name.as_str(), k.state.as_str())),
            "`imgsrv key add --data DATA --name mirror MIRROR.pub` on the server's machine (the \
             .pub that `minisign -G` wrote beside the secret key)",
        ))
    }

    fn has_blob(&self, _digest: &Digest, _size: u64) -> Result<bool> {
        // The upload API answers a known digest at once (200, ready): asking
        // is the same round trip as uploading.
        Ok(false)
    }

    fn put_blob(&self, digest: &Digest, size: u64, media_type: &str, file: &Path) -> Result<()> {
        self.client
            .upload_hashed(file, media_type, *digest, size, None)?;
        Ok(())
    }

    fn status(&self, image: &str, version: &str) -> Result<VersionStatus> {
        match self.client.get_version(image, version) {
            Ok(v) if v.version.state == "published" => Ok(VersionStatus::Published),
            Ok(_) => Ok(VersionStatus::Draft),
            Err(e) if e.status() == Some(404) => Ok(VersionStatus::Absent),
            Err(e) => Err(e.into()),
        }
    }

    fn stage(&self, m: &Manifest, private: bool) -> Result<Vec<u8>> {
        let c = &self.client;
        c.create_image(&m.image, None, None)?;
        if private {
            c.set_visibility(&m.image, "private")?;
        }
        match c.create_version(&m.image, &m.version, &m.metadata) {
            Ok(_) => {}
            Err(e) if e.status() == Some(409) => {
                let existing = c.get_version(&m.image, &m.version)?;
                if existing.version.state != "draft" {
                    bail!(
                        "{}@{} is already {}",
                        m.image,
                        m.version,
                        existing.version.state
                    );
                }
                if existing.version.metadata != m.metadata {
                    bail!(
                        "a draft {}@{} exists with other metadata",
                        m.image,
                        m.version
                    );
                }
                for a in &existing.artifacts {
                    c.delete_artifact(&m.image, &m.version, &a.artifact.id)?;
                }
            }
            Err(e) => return Err(e.into()),
        }
        for a in &m.artifacts {
            let art = c.add_artifact(
                &m.image,
                &m.version,
                &crate::client::NewArtifact {
                    variant: a.variant.clone(),
                    operating_system: a.operating_system.clone(),
                    architecture: a.architecture.clone(),
                    format: a.format.clone(),
                    primary_blob_digest: a.digest,
                    primary_blob_size_bytes: a.size,
                    primary_media_type: a.media_type.clone(),
                },
            )?;
            for t in &a.attachments {
                c.add_attachment(
                    &m.image,
                    &m.version,
                    &art.id,
                    &crate::client::NewAttachment {
                        name: t.name.clone(),
                        media_type: t.media_type.clone(),
                        blob_digest: t.digest,
                        blob_size_bytes: t.size,
                    },
                )?;
            }
        }
        Ok(c.get_manifest_bytes(&m.image, &m.version)?)
    }

    fn publish(&self, image: &str, version: &str, signature: Option<&str>) -> Result<()> {
        self.client.publish(image, version, signature)?;
        Ok(())
    }

    fn set_alias(&self, image: &str, alias: &str, version: &str) -> Result<()> {
        self.client.put_alias(image, alias, version)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_a_manifest_locally_reproduces_its_canonical_bytes() {
        let d = tempfile::tempdir().unwrap();
        crate::app::init(d.path(), &[]).unwrap();
        std::fs::write(
            d.path().join("imgsrv.toml"),
            "[image_verification]\nmode = \"off\"\n",
        )
        .unwrap();
        let t = LocalTarget::open(d.path()).unwrap();
        let (meta, root) = (b"META".to_vec(), b"ROOT".to_vec());
        let m = Manifest {
            schema: crate::manifest::SCHEMA.into(),
            image: "demo".into(),
            version: "20250101_0000".into(),
            metadata: [("os".to_string(), "Demo".to_string())]
                .into_iter()
                .collect(),
            artifacts: vec![crate::manifest::ManifestArtifact {
                variant: "default".into(),
                operating_system: "demo".into(),
                architecture: "x86_64".into(),
                format: "squashfs".into(),
                digest: Digest::of(&root),
                size: 4,
                media_type: "application/vnd.squashfs".into(),
                attachments: vec![crate::manifest::ManifestAttachment {
                    name: "incus.tar.xz".into(),
                    media_type: "application/x-xz".into(),
                    digest: Digest::of(&meta),
                    size: 4,
                }],
            }],
        };
        assert_eq!(
            t.status("demo", "20250101_0000").unwrap(),
            VersionStatus::Absent
        );
        for (bytes, name) in [(&meta, "m"), (&root, "r")] {
            let f = d.path().join(name);
            std::fs::write(&f, bytes).unwrap();
            assert!(!t.has_blob(&Digest::of(bytes), 4).unwrap());
            t.put_blob(&Digest::of(bytes), 4, "x", &f).unwrap();
            assert!(t.has_blob(&Digest::of(bytes), 4).unwrap());
            // on the data directory's filesystem: taken in place, not copied
            use std::os::unix::fs::MetadataExt;
            let blob = d.path().join(Digest::of(bytes).cas_path());
            assert_eq!(
                std::fs::metadata(&blob).unwrap().ino(),
                std::fs::metadata(&f).unwrap().ino()
            );
        }
        let staged = t.stage(&m, true).unwrap();
        assert_eq!(staged, m.canonical(), "byte-identical canonical manifest");
        assert_eq!(crate::manifest::parse(&staged).unwrap(), m);
        // staging again takes the draft over
        assert_eq!(t.stage(&m, true).unwrap(), staged);
        t.publish("demo", "20250101_0000", None).unwrap();
        assert_eq!(
            t.status("demo", "20250101_0000").unwrap(),
            VersionStatus::Published
        );
        assert!(t.app.catalog.get_image("demo").unwrap().is_private());
        assert!(t.stage(&m, true).is_err(), "published is forever");
        t.set_alias("demo", "stable", "20250101_0000").unwrap();
        assert_eq!(m.blobs().len(), 2);
    }
}
