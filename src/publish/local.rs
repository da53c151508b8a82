//! `imgsrv publish --data DIR`: publishing into a data directory on this
//! machine through the server's own code, for a publisher on the server's
//! host. Nothing is weaker than through the API: the manifest is staged and
//! its canonical bytes signed with the publisher's key, the data directory's
//! verification mode and trusted keys decide, and the publish is audited (as
//! the local user). What is saved is the TLS round trip and every second read
//! of a file: a root is stored as it is read (the store hashes it on its way
//! in, and it is stored under the digest its bytes make), its Incus
//! fingerprint taken from the same bytes on another thread. A user's file is
//! always copied, never linked: the publisher may rebuild it in place later.

use super::{
    check_manifest, print_outcome, Hashed, Prepared, PublishOptions, PublishOutcome, PublishedRoot,
    Root, METADATA_ATTACHMENT,
};
use crate::digest::Digest;
use crate::manifest::{Manifest, ManifestArtifact, ManifestAttachment};
use crate::target::{LocalTarget, Target};
use anyhow::{bail, Context};
use std::io::Write;
use std::path::Path;

/// Steps 3-8 into the data directory `dir`.
pub(super) fn publish_local(
    opts: &PublishOptions,
    p: Prepared,
    dir: &Path,
    out: &mut dyn Write,
) -> anyhow::Result<PublishOutcome> {
    let target = LocalTarget::open(dir)?;
    let h = store_inputs(opts, &p, &target, dir)?;
    let mut metadata = p.meta.properties.clone();
    metadata.insert("architecture".into(), p.meta.architecture.clone());
    let manifest = Manifest {
        schema: crate::manifest::SCHEMA.to_string(),
        image: p.image_name.clone(),
        version: p.version.clone(),
        metadata,
        artifacts: h
            .roots
            .iter()
            .map(|r| ManifestArtifact {
                variant: p.variant.clone(),
                operating_system: p.os.clone(),
                architecture: p.meta.architecture.clone(),
                format: r.format.format_str().into(),
                digest: r.digest,
                size: r.size,
                media_type: r.format.media_type().into(),
                attachments: vec![ManifestAttachment {
                    name: METADATA_ATTACHMENT.into(),
                    media_type: h.meta_media.into(),
                    digest: h.meta_digest,
                    size: h.meta_size,
                }],
            })
            .collect(),
    };
    let canonical = target.stage(&manifest, opts.private)?;
    check_manifest(
        &canonical,
        &p.image_name,
        &p.version,
        &h.roots,
        (h.meta_digest, h.meta_size),
    )?;
    let manifest_digest = Digest::of(&canonical);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let tc =
        crate::sign::manifest_trusted_comment(&p.image_name, &p.version, &manifest_digest, now);
    let signature = crate::sign::sign(&p.sk, &canonical, &tc)?;
    // the fingerprints this process computed in the pass that took both
    // inputs' sha256, which the store has just checked again
    let mut known = crate::fingerprint::Known::new();
    for r in &h.roots {
        known.insert(
            (h.meta_digest, r.digest),
            Digest::from_hex(&r.fingerprint).context("a fingerprint this process computed")?,
        );
    }
    target.publish_with_fingerprints(&p.image_name, &p.version, Some(&signature), &known)?;
    for a in &opts.aliases {
        target
            .set_alias(&p.image_name, a, &p.version)
            .with_context(|| {
                format!(
                    "{} {} is published, but setting alias {a} failed",
                    p.image_name, p.version
                )
            })?;
    }
    let outcome = outcome(&target, opts, p, h, manifest_digest)?;
    print_outcome(&outcome, out).context("cannot write the publish summary")?;
    Ok(outcome)
}

/// Steps 3-4: each input read once. The metadata (small) is hashed, then stored
/// by that digest; each root is stored as it is read, the store hashing it on
/// its way in, while its fingerprint (`sha256(metadata || root)`) is taken from
/// the same bytes on another thread.
fn store_inputs(
    opts: &PublishOptions,
    p: &Prepared,
    target: &LocalTarget,
    dir: &Path,
) -> anyhow::Result<Hashed> {
    let storing = |path: &Path| format!("storing {} in {}", path.display(), dir.display());
    let open = |path: &Path| {
        let f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = f
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        anyhow::Ok((f, len))
    };
    let mpath = &opts.metadata_tarball;
    let meta_state = crate::client::hash_file_state(mpath, None)?;
    let meta_size = meta_state.len();
    let meta_digest = meta_state.clone().finish();
    let meta_media = p.meta.compression.media_type();
    let (mut f, _) = open(mpath)?;
    target
        .app
        .ingest(
            &target.lease,
            &meta_digest,
            meta_size,
            Some(meta_media),
            &mut f,
        )
        .with_context(|| storing(mpath))?;
    let mut roots = Vec::new();
    for (path, format) in &p.formats {
        let (mut f, size) = open(path)?;
        let (stored, fp) = crate::digest::with_side_hash(&mut f, meta_state.clone(), |r| {
            target
                .app
                .ingest_new(&target.lease, size, Some(format.media_type()), r)
        });
        let digest = stored.with_context(|| storing(path))?;
        roots.push(Root {
            path: path.clone(),
            format: *format,
            digest,
            size,
            fingerprint: fp.finish().hex(),
        });
    }
    Ok(Hashed {
        meta_digest,
        meta_size,
        meta_media,
        roots,
    })
}

/// What was published, read back from the catalog: the record's verdict,
/// and each root's artifact and fingerprint (which must be the ones computed
/// here).
fn outcome(
    target: &LocalTarget,
    opts: &PublishOptions,
    p: Prepared,
    h: Hashed,
    manifest_digest: Digest,
) -> anyhow::Result<PublishOutcome> {
    let cat = &target.app.catalog;
    let view = cat.version_view(&p.image_name, &p.version)?;
    let record = cat.publish_record(&view.version.id)?;
    if record.manifest_digest != manifest_digest {
        bail!(
            "published manifest {} but the signed manifest is {manifest_digest}",
            record.manifest_digest
        );
    }
    let rows = cat.projection_rows(&view.version.id)?;
    let mut roots = Vec::new();
    for r in h.roots {
        let Some(a) = view
            .artifacts
            .iter()
            .find(|a| a.artifact.primary_blob_digest == r.digest)
        else {
            bail!(
                "no artifact for {} in the published version",
                r.path.display()
            );
        };
        let fp = rows
            .iter()
            .find(|row| row.artifact_id == a.artifact.id)
            .map(|row| row.combined_sha256.hex());
        if fp.as_deref() != Some(r.fingerprint.as_str()) {
            bail!(
                "fingerprint mismatch for {}: catalog {fp:?}, local sha256(metadata || root) {}",
                r.path.display(),
                r.fingerprint
            );
        }
        roots.push(PublishedRoot {
            path: r.path,
            format: r.format,
            digest: r.digest,
            size: r.size,
            artifact_id: a.artifact.id.clone(),
            fingerprint: r.fingerprint,
        });
    }
    Ok(PublishOutcome {
        image: p.image_name,
        version: p.version,
        manifest_digest,
        signer_key_id: p.key_id,
        verification: record.verification.as_str().to_string(),
        metadata_digest: h.meta_digest,
        metadata_size: h.meta_size,
        roots,
        aliases: opts.aliases.clone(),
    })
}
