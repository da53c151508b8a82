//! `imgsrv publish`: upload an Incus image (metadata tarball + squashfs
//! and/or qcow2), describe it as a draft version, sign the server's canonical
//! manifest with the publisher's minisign key, publish, and set aliases.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{ApiClient, ClientError, NewArtifact, NewAttachment};
use crate::digest::{Digest, Hasher};
use crate::image::{self, ImageMetadata, RootFormat};
use crate::sign;

mod local;

/// The attachment name under which the metadata tarball is stored.
pub const METADATA_ATTACHMENT: &str = crate::fingerprint::INCUS_METADATA;

/// Inputs of [`publish`] (the CLI fills them from flags and environment).
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Make the image private (only principals with reader or more on it
    /// see it) before anything of this version can appear.
    pub private: bool,
    /// Where to publish.
    pub destination: Destination,
    /// minisign secret key file.
    pub key: PathBuf,
    /// Default: `{os}-{release}` from metadata.yaml, sanitized.
    pub image: Option<String>,
    /// Default: the `serial` property, else creation_date as `YYYYMMDD_HHMM` UTC.
    pub version: Option<String>,
    pub aliases: Vec<String>,
    pub metadata_tarball: PathBuf,
    /// At most one squashfs and one qcow2.
    pub roots: Vec<PathBuf>,
    /// Show progress bars on stderr.
    pub progress: bool,
}

/// Where [`publish`] publishes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A server, through its API.
    Server {
        /// `https://host[:port]`.
        server: String,
        /// PEM file of the CA (or self-signed certificate) to trust.
        ca: Option<PathBuf>,
        token: String,
    },
    /// A data directory on this machine, through the server's own code
    /// (its verification mode and trusted keys apply; audited as the local
    /// user): no TLS round trip, and each file is read twice, not three times.
    Data(PathBuf),
}

/// One published root file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedRoot {
    pub path: PathBuf,
    pub format: RootFormat,
    pub digest: Digest,
    pub size: u64,
    pub artifact_id: String,
    /// Incus fingerprint: sha256(metadata tarball || root), 64 hex digits.
    pub fingerprint: String,
}

/// What [`publish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    pub image: String,
    pub version: String,
    pub manifest_digest: Digest,
    /// Key id of the signing key (upper-case hex, as minisign prints it).
    pub signer_key_id: String,
    /// The server's verdict: `verified`, `unverified` or `skipped`.
    pub verification: String,
    pub metadata_digest: Digest,
    pub metadata_size: u64,
    pub roots: Vec<PublishedRoot>,
    pub aliases: Vec<String>,
}

pub use crate::names::{
    alias as valid_alias, image_name as valid_image_name, token as valid_token,
    version as valid_version,
};

/// `{os}-{release}` lower-cased, characters outside `[a-z0-9._-]` replaced by `-`.
pub fn default_image_name(meta: &ImageMetadata) -> anyhow::Result<String> {
    let (Some(os), Some(release)) = (meta.os(), meta.release()) else {
        bail!("metadata.yaml has no os and release properties to name the image: pass the image name explicitly");
    };
    let name: String = format!("{os}-{release}")
        .to_lowercase()
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '-',
        })
        .collect();
    if !valid_image_name(&name) {
        bail!("the image name {name:?} derived from os/release is not valid: pass the image name explicitly");
    }
    Ok(name)
}

/// The `serial` property, else creation_date formatted `YYYYMMDD_HHMM` (UTC).
pub fn default_version(meta: &ImageMetadata) -> anyhow::Result<String> {
    let v = match meta.serial() {
        Some(s) => s.to_string(),
        None => chrono::DateTime::from_timestamp(meta.creation_date, 0)
            .with_context(|| format!("creation_date {} is out of range", meta.creation_date))?
            .format("%Y%m%d_%H%M")
            .to_string(),
    };
    if !valid_version(&v) {
        bail!(
            "the version {v:?} taken from metadata.yaml is not valid: pass the version explicitly"
        );
    }
    Ok(v)
}

/// Incus fingerprint of a split image: sha256(metadata bytes || root bytes).
pub fn incus_fingerprint(metadata: &[u8], root: &[u8]) -> String {
    let mut h = Hasher::new();
    h.update(metadata);
    h.update(root);
    h.finish().hex()
}

/// Reads `root` once, returning its own digest and size and the Incus
/// fingerprint (the metadata hasher state continued with the root bytes).
fn hash_root(
    path: &Path,
    meta_state: &Hasher,
    pb: Option<&ProgressBar>,
) -> anyhow::Result<(Digest, u64, String)> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // the fingerprint on a second thread: both hashes in the time of one
    let (own, fp, size) =
        crate::digest::hash_twice(&mut f, Hasher::new(), meta_state.clone(), |n| {
            if let Some(pb) = pb {
                pb.inc(n);
            }
        })
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok((own.finish(), size, fp.finish().hex()))
}

fn progress_bar(show: bool, path: &Path, len: u64, msg: &'static str) -> Option<ProgressBar> {
    if !show {
        return None;
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:20!} {msg:10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    pb.set_message(msg);
    Some(pb)
}

fn file_len(p: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("cannot read {}", p.display()))?
        .len())
}

struct Root {
    path: PathBuf,
    format: RootFormat,
    digest: Digest,
    size: u64,
    fingerprint: String,
}

/// Checks that the manifest the server returned describes what we built:
/// the image, the version and every root with its metadata attachment.
fn check_manifest(
    bytes: &[u8],
    image: &str,
    version: &str,
    roots: &[Root],
    meta: (Digest, u64),
) -> anyhow::Result<()> {
    let m: serde_json::Value =
        serde_json::from_slice(bytes).context("the server's manifest is not JSON")?;
    if m["image"] != image || m["version"] != version {
        bail!(
            "the server's manifest names image {} version {}, expected {image} {version}",
            m["image"],
            m["version"]
        );
    }
    let arts = m["artifacts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if arts.len() != roots.len() {
        bail!(
            "the server's manifest lists {} artifacts, this publish added {}",
            arts.len(),
            roots.len()
        );
    }
    for r in roots {
        let found = arts.iter().any(|a| {
            a["digest"] == r.digest.to_string()
                && a["size"] == r.size
                && a["format"] == r.format.format_str()
                && a["attachments"].as_array().is_some_and(|atts| {
                    atts.iter().any(|t| {
                        t["name"] == METADATA_ATTACHMENT
                            && t["digest"] == meta.0.to_string()
                            && t["size"] == meta.1
                    })
                })
        });
        if !found {
            bail!(
                "the server's manifest does not list {} ({}) with its metadata attachment",
                r.path.display(),
                r.digest
            );
        }
    }
    Ok(())
}

/// What every publish works out before any byte moves: the files, the
/// names, the signing key.
struct Prepared {
    meta: image::ImageMetadata,
    formats: Vec<(PathBuf, RootFormat)>,
    image_name: String,
    version: String,
    variant: String,
    os: String,
    sk: minisign::SecretKey,
    key_id: String,
}

/// The files hashed: the metadata's digest and hasher state (continued per
/// root for its fingerprint), and each root with its own digest and
/// fingerprint.
struct Hashed {
    meta_digest: Digest,
    meta_size: u64,
    meta_media: &'static str,
    roots: Vec<Root>,
}

/// Runs the whole publish flow, printing a summary to `out`.
pub fn publish(opts: &PublishOptions, out: &mut dyn Write) -> anyhow::Result<PublishOutcome> {
    let p = prepare(opts)?;
    match &opts.destination {
        Destination::Server { server, ca, token } => {
            let client = ApiClient::new(server, ca.as_deref(), Some(token.clone()))?;
            publish_remote(opts, p, &client, out)
        }
        Destination::Data(dir) => local::publish_local(opts, p, dir, out),
    }
}

/// Steps 1-2: the files, the names, and the key (a wrong password fails
/// before gigabytes move).
fn prepare(opts: &PublishOptions) -> anyhow::Result<Prepared> {
    // 1. Inspect the files.
    let meta = image::read_metadata(&opts.metadata_tarball)?;
    if opts.roots.is_empty() {
        bail!("no root file given: pass a squashfs (container) and/or a qcow2 (virtual machine)");
    }
    let mut formats: Vec<(PathBuf, RootFormat)> = Vec::new();
    for p in &opts.roots {
        let f = image::detect_root_format(p)?;
        if let Some((other, _)) = formats.iter().find(|(_, g)| *g == f) {
            bail!(
                "{} and {} are both {}: give at most one squashfs and one qcow2",
                other.display(),
                p.display(),
                f.format_str()
            );
        }
        formats.push((p.clone(), f));
    }

    // 2. Names.
    let image_name = match &opts.image {
        Some(i) if !valid_image_name(i) => {
            bail!("invalid image name {i:?}: expected ^[a-z0-9][a-z0-9._-]{{0,127}}$")
        }
        Some(i) => i.clone(),
        None => default_image_name(&meta)?,
    };
    let version = match &opts.version {
        Some(v) if !valid_version(v) => {
            bail!("invalid version {v:?}: expected ^[A-Za-z0-9][A-Za-z0-9._+:-]{{0,127}}$")
        }
        Some(v) => v.clone(),
        None => default_version(&meta)?,
    };
    if let Some(a) = opts.aliases.iter().find(|a| !valid_alias(a)) {
        bail!("invalid alias {a:?}: expected ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$");
    }
    let variant = meta.variant().to_string();
    let os = meta.os().unwrap_or("unknown").to_lowercase();
    for (what, v) in [
        ("variant", &variant),
        ("os", &os),
        ("architecture", &meta.architecture),
    ] {
        if !valid_token(v) {
            bail!("metadata.yaml {what} {v:?} is not accepted by the server (expected ^[A-Za-z0-9][A-Za-z0-9._+-]{{0,63}}$)");
        }
    }

    // The key first: a wrong password should fail before gigabytes move.
    let sk = sign::load_secret_key(&opts.key)?;
    let key_id = sign::secret_key_id(&sk);
    Ok(Prepared {
        meta,
        formats,
        image_name,
        version,
        variant,
        os,
        sk,
        key_id,
    })
}

/// Steps 3-8 through a server's API: hash and upload each file, create the
/// draft, sign the canonical manifest the server returns, publish, check the
/// fingerprints, set the aliases.
fn publish_remote(
    opts: &PublishOptions,
    p: Prepared,
    client: &ApiClient,
    out: &mut dyn Write,
) -> anyhow::Result<PublishOutcome> {
    let Prepared {
        meta,
        formats,
        image_name,
        version,
        variant,
        os,
        sk,
        key_id,
    } = p;

    // 3. Hash (metadata once; its state is continued per root for the
    //    fingerprint) and upload what the server does not have yet.
    let mpath = &opts.metadata_tarball;
    let pb = progress_bar(opts.progress, mpath, file_len(mpath)?, "hashing");
    let meta_state = crate::client::hash_file_state(mpath, pb.as_ref())?;
    let meta_size = meta_state.len();
    let meta_digest = meta_state.clone().finish();
    let meta_media = meta.compression.media_type();
    upload(
        client,
        mpath,
        meta_media,
        (meta_digest, meta_size),
        None,
        pb,
    )?;

    let mut roots = Vec::new();
    for (path, format) in formats {
        let pb = progress_bar(opts.progress, &path, file_len(&path)?, "hashing");
        let (digest, size, fingerprint) = hash_root(&path, &meta_state, pb.as_ref())?;
        let hint = Some(meta_digest);
        upload(client, &path, format.media_type(), (digest, size), hint, pb)?;
        roots.push(Root {
            path,
            format,
            digest,
            size,
            fingerprint,
        });
    }

    // 4. Image and draft version.
    client.create_image(&image_name, None, None)?;
    if opts.private {
        client.set_visibility(&image_name, "private")?;
    }
    let mut metadata: BTreeMap<String, String> = meta.properties.clone();
    metadata.insert("architecture".into(), meta.architecture.clone());
    match client.create_version(&image_name, &version, &metadata) {
        Ok(_) => {}
        Err(e) if e.status() == Some(409) => {
            // A draft left by an earlier run that did not get to publish (a
            // refused signature, a lost connection) is taken over: its
            // artifacts are replaced by this run's. Published is forever.
            let existing = client.get_version(&image_name, &version)?;
            if existing.version.state != "draft" {
                bail!(
                    "version {version} of image {image_name} is already {} on {}: publish under another version (--version)",
                    existing.version.state,
                    client.server()
                )
            }
            if existing.version.metadata != metadata {
                bail!(
                    "a draft {version} of image {image_name} exists on {} with other metadata; publish under another version (--version)",
                    client.server()
                )
            }
            for a in &existing.artifacts {
                client.delete_artifact(&image_name, &version, &a.artifact.id)?;
            }
            writeln!(out, "resuming the existing draft {image_name} {version}")?;
        }
        Err(e) => return Err(e.into()),
    }

    // 5. One artifact per root, each with the metadata tarball attached.
    let mut artifact_ids = Vec::new();
    for r in &roots {
        let art = client.add_artifact(
            &image_name,
            &version,
            &NewArtifact {
                variant: variant.clone(),
                operating_system: os.clone(),
                architecture: meta.architecture.clone(),
                format: r.format.format_str().into(),
                primary_blob_digest: r.digest,
                primary_blob_size_bytes: r.size,
                primary_media_type: r.format.media_type().into(),
            },
        )?;
        client.add_attachment(
            &image_name,
            &version,
            &art.id,
            &NewAttachment {
                name: METADATA_ATTACHMENT.into(),
                media_type: meta_media.into(),
                blob_digest: meta_digest,
                blob_size_bytes: meta_size,
            },
        )?;
        artifact_ids.push(art.id);
    }

    // 6. Sign exactly the canonical bytes the server returned, then publish.
    let manifest = client.get_manifest_bytes(&image_name, &version)?;
    check_manifest(
        &manifest,
        &image_name,
        &version,
        &roots,
        (meta_digest, meta_size),
    )?;
    let manifest_digest = Digest::of(&manifest);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let tc = sign::manifest_trusted_comment(&image_name, &version, &manifest_digest, now);
    let signature = sign::sign(&sk, &manifest, &tc)?;
    let record = client
        .publish(&image_name, &version, Some(&signature))
        .map_err(|e| match e.status() {
            Some(412) => anyhow::Error::new(e).context(format!(
                "the server refused to publish {image_name} {version} signed with key {key_id} \
                 (the version stays a draft)"
            )),
            _ => e.into(),
        })?;
    if record.manifest_digest != manifest_digest {
        bail!(
            "the server published manifest {} but the signed manifest is {manifest_digest}",
            record.manifest_digest
        );
    }
    if let Some(id) = &record.signer_key_id {
        if !id.eq_ignore_ascii_case(&key_id) {
            bail!("the server attributes the signature to key {id}, but it was made with key {key_id}");
        }
    }

    // 8 (checked before aliases). Fingerprints must match the local ones.
    let mut published = Vec::new();
    for (r, id) in roots.into_iter().zip(artifact_ids) {
        let Some(fp) = record.fingerprints.iter().find(|f| f.artifact_id == id) else {
            bail!(
                "the server returned no fingerprint for {} (artifact {id})",
                r.path.display()
            );
        };
        if !fp.fingerprint.eq_ignore_ascii_case(&r.fingerprint) {
            bail!(
                "fingerprint mismatch for {}: server {}, local sha256(metadata || root) {}",
                r.path.display(),
                fp.fingerprint,
                r.fingerprint
            );
        }
        published.push(PublishedRoot {
            path: r.path,
            format: r.format,
            digest: r.digest,
            size: r.size,
            artifact_id: id,
            fingerprint: r.fingerprint,
        });
    }

    // 7. Aliases.
    for a in &opts.aliases {
        client
            .put_alias(&image_name, a, &version)
            .with_context(|| {
                format!("{image_name} {version} is published, but setting alias {a} failed")
            })?;
    }

    let outcome = PublishOutcome {
        image: image_name,
        version,
        manifest_digest,
        signer_key_id: key_id,
        verification: record.verification,
        metadata_digest: meta_digest,
        metadata_size: meta_size,
        roots: published,
        aliases: opts.aliases.clone(),
    };
    print_outcome(&outcome, out).context("cannot write the publish summary")?;
    Ok(outcome)
}

/// Uploads one input (`incus_metadata`: for a root, the metadata tarball's digest).
fn upload(
    client: &ApiClient,
    path: &Path,
    media_type: &str,
    (digest, size): (Digest, u64),
    incus_metadata: Option<Digest>,
    pb: Option<ProgressBar>,
) -> Result<(), ClientError> {
    if let Some(pb) = &pb {
        pb.set_position(0);
        pb.set_message("uploading");
    }
    let sent = client.upload_root(path, media_type, digest, size, pb.as_ref(), incus_metadata);
    if let Some(pb) = &pb {
        match &sent {
            Ok(true) => pb.finish_with_message("uploaded"),
            Ok(false) => pb.finish_with_message("on server"),
            Err(_) => pb.abandon_with_message("failed"),
        }
    }
    sent.map(|_| ())
}

fn print_outcome(o: &PublishOutcome, out: &mut dyn Write) -> io::Result<()> {
    writeln!(out, "published {} {}", o.image, o.version)?;
    writeln!(out, "  manifest      {}", o.manifest_digest)?;
    writeln!(
        out,
        "  signed by     {} (server verification: {})",
        o.signer_key_id, o.verification
    )?;
    writeln!(
        out,
        "  metadata      {} ({} bytes)",
        o.metadata_digest, o.metadata_size
    )?;
    for r in &o.roots {
        let kind = match r.format {
            RootFormat::Squashfs => "container",
            RootFormat::Qcow2 => "virtual-machine",
        };
        writeln!(
            out,
            "  {:<13} fingerprint {} ({} {}, {} bytes)",
            kind,
            r.fingerprint,
            r.format.format_str(),
            r.digest,
            r.size
        )?;
    }
    for a in &o.aliases {
        writeln!(out, "  alias         {a} -> {}", o.version)?;
    }
    if o.verification != "verified" {
        writeln!(
            out,
            "  warning: the server did not verify the signature ({})",
            o.verification
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::{json, problem, upload_routes, Mock, Recorded, Reply};
    use crate::image::tests::{make_qcow2, make_squashfs, make_tarball, SAMPLE_YAML};
    use crate::image::Compression;
    use std::sync::{Arc, Mutex};

    fn meta(props: &[(&str, &str)], creation_date: i64) -> ImageMetadata {
        ImageMetadata {
            architecture: "x86_64".into(),
            creation_date,
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            compression: Compression::Xz,
        }
    }

    #[test]
    fn fingerprint_test_vector() {
        assert_eq!(
            incus_fingerprint(b"META", b"ROOT"),
            "20571674193b3c85da6c0fff589a37adc93f4e23fa923feed99dab1f66076603"
        );
        // Continuing a cloned metadata state gives the same value.
        let t = tempfile::tempdir().unwrap();
        let (m, r) = (t.path().join("m"), t.path().join("r"));
        std::fs::write(&m, b"META").unwrap();
        std::fs::write(&r, b"ROOT").unwrap();
        let state = crate::client::hash_file_state(&m, None).unwrap();
        let (d, n, fp) = hash_root(&r, &state, None).unwrap();
        assert_eq!((d, n), (Digest::of(b"ROOT"), 4));
        assert_eq!(fp, incus_fingerprint(b"META", b"ROOT"));
        assert_eq!(
            state.finish(),
            Digest::of(b"META"),
            "the metadata state was consumed"
        );
    }

    #[test]
    fn default_names() {
        let m = meta(
            &[
                ("os", "Debian"),
                ("release", "bookworm"),
                ("serial", "20261122_2343"),
            ],
            0,
        );
        assert_eq!(default_image_name(&m).unwrap(), "debian-bookworm");
        assert_eq!(default_version(&m).unwrap(), "20261122_2343");

        let m = meta(
            &[("os", "Alpine Linux"), ("release", "3.20/edge")],
            1_795_391_000,
        );
        assert_eq!(default_image_name(&m).unwrap(), "alpine-linux-3.20-edge");
        // 1795391000 = 2026-11-22 23:43:20 UTC
        assert_eq!(default_version(&m).unwrap(), "20261122_2343");

        assert!(default_image_name(&meta(&[("os", "Debian")], 0)).is_err());
        assert!(default_image_name(&meta(&[("os", "_x"), ("release", "1")], 0)).is_err());
        assert!(default_version(&meta(&[("serial", "bad serial")], 0)).is_err());
        assert_eq!(
            default_version(&meta(&[("serial", "")], 0)).unwrap(),
            "19700101_0000"
        );
    }

    #[test]
    fn name_validation() {
        assert!(
            valid_image_name("debian-bookworm")
                && !valid_image_name("Debian")
                && !valid_image_name("-x")
        );
        assert!(valid_image_name(&"a".repeat(128)) && !valid_image_name(&"a".repeat(129)));
        assert!(valid_version("1.0+b1:2") && !valid_version(".1") && !valid_version("a b"));
        assert!(valid_alias("stable") && !valid_alias("a:b") && !valid_alias(&"a".repeat(65)));
        assert!(valid_token("x86_64") && valid_token("debian") && !valid_token("Alpine Linux"));
    }

    /// A fake server following docs/api.md for the publish routes: it stores
    /// uploads, builds a manifest, verifies the signature against `keys_dir`
    /// and computes fingerprints from the stored blobs.
    struct FakeServer {
        mock: Mock,
        stored: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
        _keys: tempfile::TempDir,
        keys_dir: PathBuf,
    }

    #[derive(Default)]
    struct Version {
        metadata: BTreeMap<String, String>,
        /// Artifact JSON with its one attachment under "_att".
        artifacts: Vec<serde_json::Value>,
        published: bool,
    }

    #[derive(Default)]
    struct State {
        images: Vec<String>,
        /// Key: "image version".
        versions: BTreeMap<String, Version>,
        next_id: u32,
    }

    /// Compact JSON with sorted keys (serde_json maps are sorted).
    fn manifest(img: &str, ver: &str, v: &Version) -> Vec<u8> {
        let arts: Vec<_> = v
            .artifacts
            .iter()
            .map(|a| {
                let t = &a["_att"];
                serde_json::json!({"architecture": a["architecture"],
                    "attachments": [{"digest": t["blob_digest"], "media_type": t["media_type"],
                        "name": t["name"], "size": t["blob_size_bytes"]}],
                    "digest": a["primary_blob_digest"], "format": a["format"],
                    "media_type": a["primary_media_type"], "operating_system": a["operating_system"],
                    "size": a["primary_blob_size_bytes"], "variant": a["variant"]})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"artifacts": arts, "image": img,
            "metadata": v.metadata, "schema": "imgsrv.manifest.v1", "version": ver}))
        .unwrap()
    }

    impl FakeServer {
        /// The fake trusts `pubkey` (a key file in its keys directory).
        fn trust(&self, pubkey: &std::path::Path) {
            std::fs::copy(pubkey, self.keys_dir.join(pubkey.file_name().unwrap())).unwrap();
        }
    }

    fn fake_server(corrupt_fingerprint: bool) -> FakeServer {
        let keys = tempfile::tempdir().unwrap();
        let keys_dir = keys.path().to_path_buf();
        let stored = Arc::new(Mutex::new(BTreeMap::new()));
        let staged = Arc::new(Mutex::new(BTreeMap::new()));
        let state = Arc::new(Mutex::new(State::default()));
        let (st, sg, kd) = (stored.clone(), staged, keys_dir.clone());
        let mock = Mock::start(move |r: &Recorded| -> Reply {
            if let Some(reply) = upload_routes(r, &st, &sg) {
                return reply;
            }
            let mut s = state.lock().unwrap();
            s.next_id += 1;
            let id = format!("id{}", s.next_id);
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            let segs: Vec<&str> = r.path.split('/').skip(3).collect();
            match (r.method.as_str(), segs.as_slice()) {
                ("POST", []) if r.path == "/v1/images" => {
                    let n = body["name"].as_str().unwrap().to_string();
                    if s.images.contains(&n) {
                        return problem(409, "image exists");
                    }
                    s.images.push(n.clone());
                    json(
                        201,
                        serde_json::json!({"id": id, "name": n, "created_at": "t", "updated_at": "t"}),
                    )
                }
                ("POST", [img, "versions"]) => {
                    let v = body["version"].as_str().unwrap();
                    let key = format!("{img} {v}");
                    if s.versions.contains_key(&key) {
                        return problem(409, "version exists");
                    }
                    let metadata: BTreeMap<String, String> =
                        serde_json::from_value(body["metadata"].clone()).unwrap();
                    let md = metadata.clone();
                    s.versions.insert(
                        key,
                        Version {
                            metadata,
                            ..Default::default()
                        },
                    );
                    json(
                        201,
                        serde_json::json!({"id": id, "image_id": "i", "image_name": img, "version": v,
                        "state": "draft", "metadata": md, "created_at": "t", "updated_at": "t"}),
                    )
                }
                ("POST", [img, "versions", ver, "artifacts"]) => {
                    let mut a = body.clone();
                    a["id"] = id.into();
                    a["version_id"] = "v".into();
                    let v = s.versions.get_mut(&format!("{img} {ver}")).unwrap();
                    v.artifacts.push(a.clone());
                    json(201, a)
                }
                ("POST", [img, "versions", ver, "artifacts", art, "attachments"]) => {
                    let mut t = body.clone();
                    t["id"] = id.into();
                    t["artifact_id"] = art.to_string().into();
                    let v = s.versions.get_mut(&format!("{img} {ver}")).unwrap();
                    let a = v.artifacts.iter_mut().find(|a| a["id"] == *art).unwrap();
                    a["_att"] = t.clone();
                    json(201, t)
                }
                ("GET", [img, "versions", ver, "manifest"]) => (
                    200,
                    "application/json",
                    manifest(img, ver, &s.versions[&format!("{img} {ver}")]),
                ),
                ("POST", [img, "versions", ver, "publish"]) => {
                    let v = s.versions.get_mut(&format!("{img} {ver}")).unwrap();
                    let m = manifest(img, ver, v);
                    let keys = sign::load_keys_from(&kd).unwrap();
                    let sig = body["signature"].as_str().unwrap_or("");
                    let verified = match sign::verify_signature(&keys, &m, sig) {
                        Ok(x) => x,
                        Err(e) => return problem(412, &e.to_string()),
                    };
                    v.published = true;
                    let stored = st.lock().unwrap();
                    let fps: Vec<_> = v
                        .artifacts
                        .iter()
                        .map(|a| {
                            let meta = &stored[a["_att"]["blob_digest"].as_str().unwrap()];
                            let root = &stored[a["primary_blob_digest"].as_str().unwrap()];
                            let fp = if corrupt_fingerprint {
                                incus_fingerprint(root, meta)
                            } else {
                                incus_fingerprint(meta, root)
                            };
                            let kind = if a["format"] == "qcow2" { "virtual-machine" } else { "container" };
                            serde_json::json!({"artifact_id": a["id"], "type": kind, "fingerprint": fp})
                        })
                        .collect();
                    json(
                        200,
                        serde_json::json!({"image": img, "version": ver, "state": "published",
                        "published_at": "t", "manifest_digest": Digest::of(&m), "verification": "verified",
                        "signer_key_id": verified.key_id, "fingerprints": fps}),
                    )
                }
                ("PUT", [img, "aliases", alias]) => {
                    let ver = body["version"].as_str().unwrap();
                    if !s
                        .versions
                        .get(&format!("{img} {ver}"))
                        .is_some_and(|v| v.published)
                    {
                        return problem(412, "not published");
                    }
                    json(
                        200,
                        serde_json::json!({"id": id, "image_id": "i", "alias": alias,
                        "version_id": "v", "version": ver}),
                    )
                }
                _ => problem(404, &format!("no route {} {}", r.method, r.path)),
            }
        });
        FakeServer {
            mock,
            stored,
            _keys: keys,
            keys_dir,
        }
    }

    struct Files {
        _dir: tempfile::TempDir,
        meta: PathBuf,
        squashfs: PathBuf,
        qcow2: PathBuf,
        pubkey: PathBuf,
        seckey: PathBuf,
    }

    fn files() -> Files {
        let t = tempfile::tempdir().unwrap();
        let meta = make_tarball(t.path(), "incus.tar.xz", "-cJf", Some(SAMPLE_YAML), false);
        let squashfs = make_squashfs(t.path(), "rootfs.squashfs");
        let qcow2 = make_qcow2(t.path(), "disk.qcow2");
        let (pubkey, seckey) = crate::sign::tests::minisign_keygen(t.path(), "publisher", None);
        Files {
            _dir: t,
            meta,
            squashfs,
            qcow2,
            pubkey,
            seckey,
        }
    }

    fn options(srv: &FakeServer, f: &Files) -> PublishOptions {
        PublishOptions {
            private: false,
            destination: Destination::Server {
                server: srv.mock.url(),
                ca: Some(srv.mock.ca.clone()),
                token: "imgsrv_x_y".into(),
            },
            key: f.seckey.clone(),
            image: None,
            version: None,
            aliases: vec!["stable".into()],
            metadata_tarball: f.meta.clone(),
            roots: vec![f.squashfs.clone(), f.qcow2.clone()],
            progress: false,
        }
    }

    #[test]
    fn publish_flow_against_a_fake_server() {
        let srv = fake_server(false);
        let f = files();
        // The server does not trust the key yet: 412, the draft stays.
        let mut out = Vec::new();
        let e = publish(&options(&srv, &f), &mut out).unwrap_err();
        assert!(
            format!("{e:#}").contains("not a trusted publisher key"),
            "{e:#}"
        );

        srv.trust(&f.pubkey);
        let mut opts = options(&srv, &f);
        opts.version = Some("2".into());
        let o = publish(&opts, &mut out).unwrap();
        assert_eq!(
            (o.image.as_str(), o.version.as_str()),
            ("debian-bookworm", "2")
        );
        assert_eq!(o.verification, "verified");
        let meta_bytes = std::fs::read(&f.meta).unwrap();
        assert_eq!(o.roots.len(), 2);
        for r in &o.roots {
            let root = std::fs::read(&r.path).unwrap();
            assert_eq!(r.fingerprint, incus_fingerprint(&meta_bytes, &root));
            assert_eq!(r.digest, Digest::of(&root));
        }
        assert_eq!(
            o.signer_key_id,
            sign::secret_key_id(&sign::load_secret_key(&f.seckey).unwrap())
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(&o.roots[0].fingerprint) && text.contains(&o.manifest_digest.to_string()),
            "{text}"
        );

        let reqs = srv.mock.requests();
        // Blobs were sent once: the second run found them on the server.
        assert_eq!(
            reqs.iter()
                .filter(|r| r.method == "PUT" && r.path.contains("/parts/"))
                .count(),
            3
        );
        assert_eq!(srv.stored.lock().unwrap().len(), 3);
        let art: Vec<serde_json::Value> = reqs
            .iter()
            .filter(|r| r.path.ends_with("/artifacts"))
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect();
        assert_eq!(art[2]["variant"], "cloud");
        assert_eq!(art[2]["operating_system"], "debian");
        assert_eq!(art[3]["format"], "qcow2");
        assert_eq!(art[3]["primary_media_type"], "application/x-qemu-disk");
        let ver = reqs
            .iter()
            .rfind(|r| r.path.ends_with("/versions"))
            .unwrap();
        let ver: serde_json::Value = serde_json::from_slice(&ver.body).unwrap();
        assert_eq!(ver["metadata"]["architecture"], "x86_64");
        assert_eq!(ver["metadata"]["os"], "Debian");
        assert!(reqs
            .iter()
            .any(|r| r.method == "PUT" && r.path == "/v1/images/debian-bookworm/aliases/stable"));
        // Re-running against an existing version is covered against the
        // real server in tests/cli.rs.
    }

    #[test]
    fn publish_detects_fingerprint_mismatch_and_bad_inputs() {
        let srv = fake_server(true);
        let f = files();
        srv.trust(&f.pubkey);
        let e = publish(&options(&srv, &f), &mut Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("fingerprint mismatch"), "{e:#}");

        let mut o = options(&srv, &f);
        o.roots = vec![f.squashfs.clone(), f.squashfs.clone()];
        assert!(format!("{:#}", publish(&o, &mut Vec::new()).unwrap_err())
            .contains("at most one squashfs"));
        o.roots = vec![f.meta.clone()];
        assert!(publish(&o, &mut Vec::new()).is_err());
        o.roots = vec![f.qcow2.clone()];
        o.aliases = vec!["bad:alias".into()];
        assert!(
            format!("{:#}", publish(&o, &mut Vec::new()).unwrap_err()).contains("invalid alias")
        );
        o.aliases.clear();
        if let Destination::Server { server, .. } = &mut o.destination {
            *server = server.replace("https://", "http://");
        }
        assert!(format!("{:#}", publish(&o, &mut Vec::new()).unwrap_err()).contains("http://"));
    }
}
