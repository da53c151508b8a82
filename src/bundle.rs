//! Bundles: published versions in one file, for sites without a network
//! path to the publisher (`imgsrv export`, `imgsrv import`).
//!
//! A bundle is an uncompressed tar, written and read as a stream:
//!
//! 1. `imgsrv-bundle.json`: the [`Index`] (format, creation time, source,
//!    each version with its manifest digest, signature member, aliases and
//!    blobs; the blobs carried; the blobs and versions it relies on from an
//!    earlier bundle when incremental);
//!    `imgsrv-bundle.json.minisig` (with `export --key`): the exporter's
//!    minisign signature over those exact index bytes;
//! 2. `manifests/<image>/<version>.json` and `.json.minisig`: the canonical
//!    manifest and the publisher's signature, the exact published bytes;
//!    `.json.tlog-proof`, `log/checkpoint` and `log/tile/0/...`: the source's
//!    transparency log, when it has one (see [`log`]: an importer that trusts the
//!    log checks them offline);
//! 3. `blobs/sha256/<hex>`: each blob once;
//! 4. `SHA256SUMS`: `sha256sum` lines for every member before it.
//!
//! The manifest signatures are the publishers'. What only the index says
//! (which images are private, where the aliases point) is signed by the
//! exporter when `--key` is given: SHA256SUMS catches accidents, not someone
//! who rewrites the index on the way across the gap (a private image made
//! public, an alias rolled back to an older, vulnerable version). The
//! importer checks every byte against the manifests and SHA256SUMS, and the
//! signatures against ITS OWN trusted keys and verification mode, and
//! publishes nothing unless the whole bundle passed (see [`import`]). In
//! enforce mode an unsigned index still imports the (signed) versions, but
//! sets no alias and creates new images private.

mod log;

use crate::digest::Digest;
use crate::manifest::Manifest;
use crate::replicate::{cannot_run, BlobError, Destination, HashingReader, SiteArgs};
use crate::target::VersionStatus;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub const INDEX_MEMBER: &str = "imgsrv-bundle.json";
pub const INDEX_SIGNATURE_MEMBER: &str = "imgsrv-bundle.json.minisig";
pub const SUMS_MEMBER: &str = "SHA256SUMS";
pub const FORMAT: &str = "imgsrv-bundle";
pub const FORMAT_VERSION: u32 = 1;
const MAX_INDEX: u64 = 64 << 20;
const MAX_MANIFEST: u64 = 4 << 20;
const MAX_SIGNATURE: u64 = 64 << 10;

// ------------------------------------------------------------ format

/// `imgsrv-bundle.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// Always `imgsrv-bundle`.
    pub format: String,
    /// 1. An importer refuses versions it does not know.
    pub format_version: u32,
    pub created_at: String,
    /// The exporting server URL or data directory.
    pub source: String,
    /// `--since`: versions published at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// `--since-bundle`: the earlier bundle this one continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_bundle: Option<BaseBundle>,
    /// Oldest first (the order they are published in on import).
    pub versions: Vec<IndexVersion>,
    /// The blobs this bundle carries, each as `blobs/sha256/<hex>`.
    pub blobs: Vec<IndexBlob>,
    /// Blobs the versions need that this bundle does not carry, because the
    /// earlier bundle did: they must already be on the importing site.
    #[serde(default)]
    pub requires_blobs: Vec<IndexBlob>,
    /// Versions carried by the earlier bundle(s) (not in this one).
    #[serde(default)]
    pub base_versions: Vec<VersionRef>,
    /// The source's transparency log, when it has one ([`log`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<log::IndexLog>,
}

/// The earlier bundle an incremental bundle continues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseBundle {
    pub created_at: String,
    /// sha256 of its `imgsrv-bundle.json`.
    pub index_digest: Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRef {
    pub image: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexVersion {
    pub image: String,
    pub version: String,
    /// The image is private on the source (imported private too).
    #[serde(default)]
    pub private: bool,
    pub published_at: String,
    /// Member name of the canonical manifest.
    pub manifest: String,
    pub manifest_digest: Digest,
    /// Member name of the publisher's minisign signature.
    pub signature: String,
    /// Aliases pointing at this version on the source at export time.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Every blob the version needs (as its manifest says).
    pub blobs: Vec<IndexBlob>,
    /// Member name of its C2SP tlog-proof, when the source's log has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tlog_proof: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexBlob {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

pub fn manifest_member(image: &str, version: &str) -> String {
    format!("manifests/{image}/{version}.json")
}

pub fn signature_member(image: &str, version: &str) -> String {
    format!("{}.minisig", manifest_member(image, version))
}

pub fn blob_member(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

fn blob_list(m: &Manifest) -> Vec<IndexBlob> {
    m.blobs()
        .into_iter()
        .map(|(digest, size, media_type)| IndexBlob {
            digest,
            size,
            media_type,
        })
        .collect()
}

/// Reads the index (the first member) of a bundle, without checking the rest.
pub fn read_index(path: &Path) -> Result<(Index, Digest)> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ar = tar::Archive::new(BufReader::new(f));
    let mut entries = ar.entries()?;
    let mut first = entries
        .next()
        .context("the bundle is empty")?
        .context("not a tar file")?;
    let name = member_name(&first)?;
    if name != INDEX_MEMBER {
        bail!("the first member is {name:?}, not {INDEX_MEMBER}: not an imgsrv bundle");
    }
    let bytes = read_small(&mut first, MAX_INDEX, INDEX_MEMBER)?;
    let index = parse_index(&bytes)?;
    Ok((index, Digest::of(&bytes)))
}

fn parse_index(bytes: &[u8]) -> Result<Index> {
    let index: Index = serde_json::from_slice(bytes)
        .map_err(|e| anyhow::anyhow!("{INDEX_MEMBER}: not a bundle index: {e}"))?;
    if index.format != FORMAT {
        bail!(
            "{INDEX_MEMBER}: format {:?}, expected {FORMAT:?}",
            index.format
        );
    }
    if index.format_version != FORMAT_VERSION {
        bail!(
            "{INDEX_MEMBER}: format version {}, this imgsrv reads {FORMAT_VERSION}",
            index.format_version
        );
    }
    Ok(index)
}

fn member_name<R: Read>(e: &tar::Entry<'_, R>) -> Result<String> {
    let raw = e.path_bytes();
    String::from_utf8(raw.to_vec()).map_err(|_| anyhow::anyhow!("a member name is not UTF-8"))
}

fn read_small(r: &mut dyn Read, max: u64, what: &str) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    r.take(max + 1)
        .read_to_end(&mut v)
        .with_context(|| format!("{what}: read failed"))?;
    if v.len() as u64 > max {
        bail!("{what}: larger than {max} bytes");
    }
    Ok(v)
}

// ------------------------------------------------------------ command line

/// `imgsrv export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub source: SiteArgs,
    /// Only images whose name matches this glob (e.g. debian-*).
    #[arg(long, value_name = "GLOB")]
    pub image: Option<String>,
    /// Only versions published at or after this time (2026-11-01 or RFC 3339).
    #[arg(long, value_name = "DATE", conflicts_with = "since_bundle")]
    pub since: Option<String>,
    /// Only versions not in this earlier bundle, without the blobs it carried.
    #[arg(long, value_name = "OLD_BUNDLE")]
    pub since_bundle: Option<PathBuf>,
    /// The bundle file to write (replaced only once complete).
    #[arg(short = 'o', long = "output", value_name = "BUNDLE")]
    pub output: PathBuf,
    /// minisign secret key (`minisign -G`) that signs the bundle index: the
    /// aliases and which images are private. The importing site must trust
    /// its public key (`imgsrv key add`); without a signed index it imports
    /// the versions but sets no alias and makes new images private.
    #[arg(long, value_name = "SECRET_KEY")]
    pub key: Option<PathBuf>,
}

/// `imgsrv import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    pub target: SiteArgs,
    /// The bundle file made by `imgsrv export`.
    #[arg(value_name = "BUNDLE")]
    pub bundle: PathBuf,
    /// The client config whose `[transparency_log]` keys the bundle's log proofs are
    /// checked against, offline (default: $IMGSRV_CLIENT_CONFIG, else
    /// ~/.config/imgsrv/client.toml, as for `imgsrv verify`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Parses `2026-11-01` (midnight UTC) or an RFC 3339 time.
pub fn parse_since(s: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| anyhow::anyhow!("invalid date {s:?} ({e}): use 2026-11-01 or RFC 3339"))
}

/// Runs `imgsrv export`: exit 0 written, 1 failed, 2 could not run.
pub fn export_command(a: ExportArgs) -> Result<()> {
    let setup = || -> Result<(Source, ExportOptions)> {
        if let Some(g) = &a.image {
            if !crate::names::scope(g) {
                bail!("invalid --image glob {g:?}: an image-name glob such as debian-* or *");
            }
        }
        if let Some(p) = &a.since_bundle {
            read_index(p).with_context(|| format!("reading {}", p.display()))?;
        }
        let key = match &a.key {
            None => None,
            Some(p) => Some(IndexKey(std::sync::Arc::new(
                crate::sign::load_secret_key(p)
                    .with_context(|| format!("loading the secret key {}", p.display()))?,
            ))),
        };
        let opts = ExportOptions {
            image_glob: a.image.clone(),
            since: a.since.as_deref().map(parse_since).transpose()?,
            since_bundle: a.since_bundle.clone(),
            output: a.output.clone(),
            key,
        };
        let source = match (a.source.data_dir()?, a.source.client(false)?) {
            (Some(dir), _) => Source::open_data(&dir)?,
            (None, Some(client)) => Source::Remote(client),
            (None, None) => bail!("give --server URL or --data DIR"),
        };
        Ok((source, opts))
    };
    let (source, opts) = setup().map_err(cannot_run)?;
    export(&source, &opts, &mut io::stdout().lock())?;
    Ok(())
}

/// Runs `imgsrv import`: exit 0 imported (or nothing to do), 1 refused or
/// failed, 2 could not run.
pub fn import_command(a: ImportArgs) -> Result<()> {
    let dest = a.target.destination().map_err(cannot_run)?;
    let log = crate::verify::load_log_policy(crate::verify::config_path(a.config.as_deref()))
        .map_err(cannot_run)?;
    match import(&dest, &a.bundle, log.as_ref(), &mut io::stdout().lock()) {
        Ok(_) => Ok(()),
        Err(ImportError::CannotRun(e)) => Err(cannot_run(e)),
        Err(e) => Err(anyhow::Error::new(e)),
    }
}

// ------------------------------------------------------------ export

/// Where an export reads from.
pub enum Source {
    /// A data directory: the catalog and the blob store, directly.
    Local {
        dir: PathBuf,
        catalog: std::sync::Arc<dyn crate::catalog::Catalog>,
        store: std::sync::Arc<dyn crate::cas::BlobStore>,
    },
    /// A server, through the API (a token shows private images too).
    Remote(crate::client::ApiClient),
}

/// One published version as a source has it.
struct SourceVersion {
    version: String,
    published_at: String,
}

impl Source {
    pub fn open_data(dir: &Path) -> Result<Source> {
        Ok(Source::Local {
            dir: dir.to_path_buf(),
            catalog: crate::admin_cli::open_catalog(dir)?,
            store: crate::cas::open(&crate::config::Config::load(dir, None)?.storage, dir)?,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Local { dir, .. } => std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.clone())
                .display()
                .to_string(),
            Source::Remote(c) => c.server().to_string(),
        }
    }

    /// Images with a published version: (name, private).
    fn images(&self) -> Result<Vec<(String, bool)>> {
        Ok(match self {
            Source::Local { catalog, .. } => catalog
                .list_images(false)?
                .into_iter()
                .map(|i| {
                    let p = i.is_private();
                    (i.name, p)
                })
                .collect(),
            Source::Remote(c) => {
                let mut v = Vec::new();
                for i in c.list_images()? {
                    let private = c.image_visibility(&i.name)? == "private";
                    v.push((i.name, private));
                }
                v
            }
        })
    }

    /// Published versions, oldest first.
    fn versions(&self, image: &str) -> Result<Vec<SourceVersion>> {
        use crate::catalog::VersionState;
        let mut v: Vec<SourceVersion> = match self {
            Source::Local { catalog, .. } => catalog
                .list_versions(image, false)?
                .into_iter()
                .filter(|v| v.state == VersionState::Published)
                .map(|v| SourceVersion {
                    version: v.version,
                    published_at: v.published_at.unwrap_or_default(),
                })
                .collect(),
            Source::Remote(c) => c
                .list_versions(image)?
                .into_iter()
                .filter(|v| v.state == "published")
                .map(|v| SourceVersion {
                    version: v.version,
                    published_at: v.published_at.unwrap_or_default(),
                })
                .collect(),
        };
        v.reverse();
        Ok(v)
    }

    /// The published manifest bytes and signature.
    fn manifest(&self, image: &str, version: &str) -> Result<(Vec<u8>, Option<String>)> {
        match self {
            Source::Local { catalog, .. } => {
                let v = catalog.get_version(image, version)?;
                let rec = catalog.publish_record(&v.id)?;
                Ok((rec.manifest, rec.signature))
            }
            Source::Remote(c) => Ok((
                c.get_manifest_bytes(image, version)?,
                c.get_manifest_signature(image, version)?,
            )),
        }
    }

    /// alias -> version.
    fn aliases(&self, image: &str) -> Result<Vec<(String, String)>> {
        Ok(match self {
            Source::Local { catalog, .. } => catalog
                .list_aliases(image)?
                .into_iter()
                .map(|a| (a.alias, a.version))
                .collect(),
            Source::Remote(c) => c
                .list_aliases(image)?
                .into_iter()
                .map(|a| (a.alias, a.version))
                .collect(),
        })
    }

    fn open_blob(&self, digest: &Digest, size: u64) -> Result<Box<dyn Read + Send>> {
        match self {
            Source::Local { store, .. } => Ok(store.open_range(digest, 0, size)?),
            Source::Remote(c) => Ok(c.open_blob(digest)?),
        }
    }

    /// A data directory's log (`None`: it has none), asking the witnesses its
    /// configuration names for the cosignatures of the checkpoint it exports.
    fn ledger(
        dir: &Path,
        catalog: &std::sync::Arc<dyn crate::catalog::Catalog>,
    ) -> Result<Option<crate::ledger::Ledger>> {
        let witnesses = crate::config::Config::load(dir, None)?.log_witnesses;
        Ok(crate::ledger::Ledger::open(dir, catalog.as_ref())?
            .map(|l| l.with_witnesses(witnesses, catalog.clone())))
    }

    /// The version's C2SP tlog-proof; `None` when the source's log has none.
    fn tlog_proof(&self, image: &str, version: &str) -> Result<Option<String>> {
        match self {
            Source::Local { dir, catalog, .. } => match Self::ledger(dir, catalog)? {
                Some(l) => Ok(l.proof(catalog.as_ref(), image, version)?),
                None => Ok(None),
            },
            Source::Remote(c) => Ok(c.get_tlog_proof(image, version)?),
        }
    }

    /// The log's newest signed checkpoint; `None` when the source has no log.
    fn log_checkpoint(&self) -> Result<Option<String>> {
        match self {
            Source::Local { dir, catalog, .. } => match Self::ledger(dir, catalog)? {
                Some(l) => Ok(Some(l.checkpoint(catalog.as_ref())?.1)),
                None => Ok(None),
            },
            Source::Remote(c) => Ok(c.get_log_checkpoint()?),
        }
    }

    /// The bytes of the log's tile at `path` (`tile/0/000`) in its tree of `size`.
    fn log_tile(&self, path: &str, size: u64) -> Result<Vec<u8>> {
        match self {
            Source::Local { catalog, .. } => {
                crate::ledger::Ledger::tile(catalog.as_ref(), path, size)?
                    .map(|(_, bytes)| bytes)
                    .ok_or_else(|| anyhow::anyhow!("the log has no {path} at {size} entries"))
            }
            Source::Remote(c) => Ok(c.get_log_tile(path)?),
        }
    }
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub image_glob: Option<String>,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub since_bundle: Option<PathBuf>,
    pub output: PathBuf,
    /// Signs the index (`imgsrv-bundle.json.minisig`).
    pub key: Option<IndexKey>,
}

/// The exporter's minisign secret key (its id in `Debug`, never the key).
#[derive(Clone)]
pub struct IndexKey(pub std::sync::Arc<minisign::SecretKey>);

impl std::fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IndexKey({})", crate::sign::secret_key_id(&self.0))
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub index: Index,
    pub bytes: u64,
    pub skipped_unsigned: Vec<String>,
}

/// Writes a bundle of the source's published versions. The file appears at
/// `opts.output` only once complete.
pub fn export(source: &Source, opts: &ExportOptions, out: &mut dyn Write) -> Result<ExportReport> {
    let created_at = crate::catalog::now();
    let (mut known_blobs, mut known_versions) = (BTreeSet::new(), BTreeSet::new());
    let base = match &opts.since_bundle {
        None => None,
        Some(p) => {
            let (old, digest) =
                read_index(p).with_context(|| format!("reading {}", p.display()))?;
            for b in old.blobs.iter().chain(&old.requires_blobs) {
                known_blobs.insert(b.digest);
            }
            for v in &old.versions {
                known_versions.insert(VersionRef {
                    image: v.image.clone(),
                    version: v.version.clone(),
                });
            }
            known_versions.extend(old.base_versions.iter().cloned());
            Some(BaseBundle {
                created_at: old.created_at,
                index_digest: digest,
            })
        }
    };

    // 1. choose the versions and read their manifests and signatures
    let mut chosen: Vec<(IndexVersion, (Vec<u8>, String))> = Vec::new();
    let mut skipped_unsigned = Vec::new();
    for (image, private) in source.images()? {
        if let Some(g) = &opts.image_glob {
            if !crate::names::scope_matches(g, &image) {
                continue;
            }
        }
        let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (alias, version) in source.aliases(&image)? {
            aliases.entry(version).or_default().push(alias);
        }
        for sv in source.versions(&image)? {
            if let Some(since) = opts.since {
                let at = chrono::DateTime::parse_from_rfc3339(&sv.published_at)
                    .with_context(|| format!("{image}@{}: publication time", sv.version))?;
                if at < since {
                    continue;
                }
            }
            let r = VersionRef {
                image: image.clone(),
                version: sv.version.clone(),
            };
            if known_versions.contains(&r) {
                continue;
            }
            let label = format!("{image}@{}", sv.version);
            let (bytes, signature) = source.manifest(&image, &sv.version)?;
            let Some(signature) = signature else {
                writeln!(out, "WARNING: {label} was published unsigned: not exported")?;
                skipped_unsigned.push(label);
                continue;
            };
            let m = crate::replicate::parse_manifest_for(&bytes, &image, &sv.version)
                .map_err(|e| anyhow::anyhow!("{label}: published manifest: {e}"))?;
            let v = IndexVersion {
                manifest: manifest_member(&image, &sv.version),
                manifest_digest: Digest::of(&bytes),
                signature: signature_member(&image, &sv.version),
                aliases: aliases.remove(&sv.version).unwrap_or_default(),
                blobs: blob_list(&m),
                image: image.clone(),
                version: sv.version,
                private,
                published_at: sv.published_at,
                tlog_proof: None,
            };
            chosen.push((v, (bytes, signature)));
        }
    }
    // in publication order across images (a stable sort: ties keep theirs)
    chosen.sort_by(|a, b| a.0.published_at.cmp(&b.0.published_at));
    let (mut versions, manifests): (Vec<IndexVersion>, Vec<(Vec<u8>, String)>) =
        chosen.into_iter().unzip();
    let carried = log::carry(source, &mut versions, out)?;

    // 2. the blobs: each once, in the order the versions need them
    let (mut blobs, mut requires) = (Vec::<IndexBlob>::new(), Vec::<IndexBlob>::new());
    let mut seen = BTreeSet::new();
    for v in &versions {
        for b in &v.blobs {
            if seen.insert(b.digest) {
                if known_blobs.contains(&b.digest) {
                    requires.push(b.clone());
                } else {
                    blobs.push(b.clone());
                }
            }
        }
    }
    let index = Index {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        created_at: created_at.clone(),
        source: source.describe(),
        since: opts.since.map(|t| t.to_rfc3339()),
        since_bundle: base,
        versions,
        blobs,
        requires_blobs: requires,
        base_versions: known_versions.into_iter().collect(),
        log: carried.as_ref().map(|c| c.index.clone()),
    };

    // 3. write the tar next to the output, then move it into place
    let dir = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".imgsrv-bundle-")
        .suffix(".partial")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let mtime = chrono::DateTime::parse_from_rfc3339(&created_at)
        .map(|t| t.timestamp().max(0) as u64)
        .unwrap_or(0);
    let total = {
        let mut w = BundleWriter {
            tar: tar::Builder::new(BufWriter::with_capacity(1 << 20, tmp.as_file())),
            sums: Vec::new(),
            mtime,
        };
        let index_bytes = serde_json::to_vec_pretty(&index)?;
        w.small(INDEX_MEMBER, &index_bytes)?;
        if let Some(k) = &opts.key {
            let comment = format!(
                "imgsrv bundle index sha256={} created_at={created_at}",
                Digest::of(&index_bytes).hex()
            );
            let sig = crate::sign::sign(&k.0, &index_bytes, &comment)
                .context("signing the bundle index")?;
            w.small(INDEX_SIGNATURE_MEMBER, sig.as_bytes())?;
        }
        for (v, (bytes, sig)) in index.versions.iter().zip(&manifests) {
            w.small(&v.manifest, bytes)?;
            w.small(&v.signature, sig.as_bytes())?;
        }
        for (name, bytes) in carried.iter().flat_map(|c| &c.members) {
            w.small(name, bytes)?;
        }
        let mut total = 0u64;
        for b in &index.blobs {
            let name = blob_member(&b.digest);
            let reader = source
                .open_blob(&b.digest, b.size)
                .with_context(|| format!("reading blob {}", b.digest))?;
            w.blob(&name, b, reader)?;
            total += b.size;
        }
        let sums = std::mem::take(&mut w.sums);
        let mut text = String::new();
        for (name, d) in &sums {
            text.push_str(&format!("{}  {name}\n", d.hex()));
        }
        w.small(SUMS_MEMBER, text.as_bytes())?;
        let buf = w.tar.into_inner().context("finishing the tar")?;
        buf.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .context("writing the bundle")?;
        total
    };
    let size = tmp.as_file().metadata()?.len();
    tmp.persist(&opts.output)
        .with_context(|| format!("moving the bundle to {}", opts.output.display()))?;
    writeln!(
        out,
        "wrote {}: {} version(s), {} blob(s) ({total} bytes){}; {size} bytes in all",
        opts.output.display(),
        index.versions.len(),
        index.blobs.len(),
        if index.requires_blobs.is_empty() {
            String::new()
        } else {
            format!(
                ", relying on {} blob(s) from the earlier bundle",
                index.requires_blobs.len()
            )
        }
    )?;
    for v in &index.versions {
        writeln!(out, "  {}@{}", v.image, v.version)?;
    }
    Ok(ExportReport {
        index,
        bytes: size,
        skipped_unsigned,
    })
}

struct BundleWriter<W: Write> {
    tar: tar::Builder<W>,
    sums: Vec<(String, Digest)>,
    mtime: u64,
}

impl<W: Write> BundleWriter<W> {
    fn header(&self, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(self.mtime);
        h
    }

    fn small(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut h = self.header(bytes.len() as u64);
        self.tar
            .append_data(&mut h, name, bytes)
            .with_context(|| format!("writing {name}"))?;
        if name != SUMS_MEMBER {
            self.sums.push((name.to_string(), Digest::of(bytes)));
        }
        Ok(())
    }

    /// Streams a blob into the tar, checking its digest and size on the way.
    fn blob(&mut self, name: &str, b: &IndexBlob, reader: Box<dyn Read + Send>) -> Result<()> {
        let mut h = self.header(b.size);
        let mut r = HashingReader::new(Exact {
            inner: reader,
            left: b.size,
        });
        self.tar
            .append_data(&mut h, name, &mut r)
            .with_context(|| format!("writing {name}"))?;
        let (got, len) = r.finish();
        if got != b.digest || len != b.size {
            bail!(
                "the source's blob {} is corrupt: read {len} bytes hashing to {got}, expected {} bytes",
                b.digest,
                b.size
            );
        }
        self.sums.push((name.to_string(), got));
        Ok(())
    }
}

/// Exactly `left` bytes of `inner`: an error if it ends early.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the blob ended {} bytes early", self.left),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

// ------------------------------------------------------------ import

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A check failed; nothing from the bundle was published (exit 1).
    #[error("bundle {bundle} refused: {reason}; nothing from it was published")]
    Refused { bundle: String, reason: String },
    /// The bundle passed, but the target failed or refused to publish a
    /// version (exit 1). Versions listed as published stay published; the
    /// failed one is left as a draft, which the next run takes over.
    #[error("importing {bundle}: {reason}{}", published_note(.published))]
    Failed {
        bundle: String,
        reason: String,
        published: Vec<String>,
    },
    /// The bundle or the target could not be opened (exit 2).
    #[error("{0:#}")]
    CannotRun(anyhow::Error),
}

fn published_note(p: &[String]) -> String {
    if p.is_empty() {
        "; nothing from the bundle was published".into()
    } else {
        format!(
            "; published before the failure: {} (re-run to resume)",
            p.join(", ")
        )
    }
}

impl ImportError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ImportError::CannotRun(_) => 2,
            _ => 1,
        }
    }
}

/// What an import did.
#[derive(Debug, Default, Clone)]
pub struct ImportReport {
    /// Published by this run.
    pub imported: Vec<String>,
    /// Already published on the target with the same manifest: skipped.
    pub already_present: Vec<String>,
    pub blobs_stored: u64,
    pub bytes_stored: u64,
    /// Of those, blobs of versions already published on the target, which
    /// it had lost (a scrub had quarantined them): repaired.
    pub blobs_restored: u64,
    /// Blobs in the bundle that the target already had (not stored again).
    pub blobs_present: u64,
    pub aliases_set: Vec<String>,
}

/// What one version of the bundle is, as read so far.
struct Pending {
    manifest: Option<(Vec<u8>, Manifest)>,
    signature: Option<String>,
    /// Not yet published on the target.
    to_publish: bool,
}

/// Imports a bundle into `dest`, all or nothing as far as checks go:
///
/// 1. While streaming the tar: the index comes first and is consistent;
///    each manifest member hashes to the index's digest, parses, is
///    canonical, names the image and version the index says and cites the
///    blobs the index lists; once the manifests and signatures are read, each
///    signature is checked under the target's rules (its trusted keys and
///    mode; a key it does not trust is refused) and the blobs the bundle
///    relies on from an earlier bundle must be on the target; each blob
///    member hashes to its name with the size the manifests give (the ones
///    the target lacks are stored as they stream: a content-addressed,
///    unreferenced blob is invisible, and a re-run does not store it again);
///    SHA256SUMS, the last member, matches every other member.
/// 2. Only when all of that passed: each version not yet published there is
///    staged and published with the publisher's signature (the target's own
///    verification decides again), oldest first; then the aliases.
///
/// A failed check publishes nothing. Re-importing skips versions already
/// published there (with the same manifest).
pub fn import(
    dest: &Destination,
    bundle: &Path,
    log_policy: Option<&crate::tlog::consumer::LogPolicy>,
    out: &mut dyn Write,
) -> Result<ImportReport, ImportError> {
    let name = bundle.display().to_string();
    let refused = |reason: String| ImportError::Refused {
        bundle: name.clone(),
        reason,
    };
    let file = File::open(bundle)
        .with_context(|| format!("opening {}", bundle.display()))
        .map_err(ImportError::CannotRun)?;
    let sigs = dest.signature_check().map_err(ImportError::CannotRun)?;
    let mut report = ImportReport::default();

    let mut ar = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let mut entries = ar
        .entries()
        .map_err(|e| refused(format!("not a tar file: {e}")))?;
    let tar_error = |e: io::Error| refused(format!("the tar stream is damaged or truncated: {e}"));

    // the index
    let mut first = match entries.next() {
        None => return Err(refused("the bundle is empty".into())),
        Some(e) => e.map_err(tar_error)?,
    };
    let first_name = member_name(&first).map_err(|e| refused(e.to_string()))?;
    if first_name != INDEX_MEMBER {
        return Err(refused(format!(
            "the first member is {first_name:?}, not {INDEX_MEMBER}: not an imgsrv bundle"
        )));
    }
    regular(&first, INDEX_MEMBER).map_err(&refused)?;
    let index_bytes =
        read_small(&mut first, MAX_INDEX, INDEX_MEMBER).map_err(|e| refused(format!("{e:#}")))?;
    drop(first);
    let index = parse_index(&index_bytes).map_err(|e| refused(format!("{e:#}")))?;
    check_index(&index)
        .and_then(|()| log::check_index(&index))
        .map_err(|e| refused(format!("{INDEX_MEMBER}: {e}")))?;
    let mut computed: Vec<(String, Digest)> = vec![(INDEX_MEMBER.into(), Digest::of(&index_bytes))];

    // where each member belongs
    let mut by_manifest: HashMap<&str, usize> = HashMap::new();
    let mut by_signature: HashMap<&str, usize> = HashMap::new();
    // the log's members (proofs, checkpoint, tiles), for the check before the blobs
    let mut log_members: HashMap<String, Vec<u8>> = HashMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    for (i, v) in index.versions.iter().enumerate() {
        by_manifest.insert(v.manifest.as_str(), i);
        by_signature.insert(v.signature.as_str(), i);
        let status = dest
            .target()
            .status(&v.image, &v.version)
            .map_err(|e| failed(&name, e, &[]))?;
        pending.push(Pending {
            manifest: None,
            signature: None,
            to_publish: status != VersionStatus::Published,
        });
    }
    let carried: HashMap<Digest, &IndexBlob> = index.blobs.iter().map(|b| (b.digest, b)).collect();
    // blobs a version still to publish needs
    let to_publish: BTreeSet<Digest> = index
        .versions
        .iter()
        .zip(&pending)
        .filter(|(_, p)| p.to_publish)
        .flat_map(|(v, _)| v.blobs.iter().map(|b| b.digest))
        .collect();
    // and those of the versions already published there (with the same
    // manifest, which the preflight checks): the target lacks one only when
    // it lost it (a scrub quarantined it), and storing it repairs it
    let needed: BTreeSet<Digest> = index
        .versions
        .iter()
        .flat_map(|v| v.blobs.iter().map(|b| b.digest))
        .collect();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut restored: Vec<(Digest, u64)> = Vec::new();
    let mut sums: Option<Vec<u8>> = None;
    let mut index_signature: Option<String> = None;
    // set by the preflight, once the manifests and signatures are in
    let mut index_trust: Option<IndexTrust> = None;
    let mut run_preflight = |index_signature: Option<&str>,
                             pending: &[Pending],
                             log_members: &HashMap<String, Vec<u8>>| {
        let trust = preflight(
            dest,
            &sigs,
            &index,
            &index_bytes,
            index_signature,
            pending,
            out,
        )
        .map_err(&refused)?;
        log::check(
            log_policy,
            sigs.mode,
            &sigs,
            &index,
            pending,
            log_members,
            out,
        )
        .map_err(&refused)?;
        Ok::<_, ImportError>(trust)
    };

    for entry in entries {
        let mut entry = entry.map_err(tar_error)?;
        let member = member_name(&entry).map_err(|e| refused(e.to_string()))?;
        if sums.is_some() {
            return Err(refused(format!(
                "{member}: a member after {SUMS_MEMBER}, which must be the last"
            )));
        }
        if !seen.insert(member.clone()) || member == INDEX_MEMBER {
            return Err(refused(format!("{member}: appears twice in the bundle")));
        }
        regular(&entry, &member).map_err(&refused)?;
        if member == INDEX_SIGNATURE_MEMBER {
            if index_trust.is_some() {
                return Err(refused(format!(
                    "{member}: after the blobs (it must follow the index)"
                )));
            }
            let bytes = read_small(&mut entry, MAX_SIGNATURE, &member)
                .map_err(|e| refused(format!("{e:#}")))?;
            computed.push((member.clone(), Digest::of(&bytes)));
            index_signature =
                Some(String::from_utf8(bytes).map_err(|_| {
                    refused(format!("{member}: not a minisign signature (not text)"))
                })?);
        } else if let Some(&i) = by_manifest.get(member.as_str()) {
            let v = &index.versions[i];
            let bytes = read_small(&mut entry, MAX_MANIFEST, &member)
                .map_err(|e| refused(format!("{e:#}")))?;
            let got = Digest::of(&bytes);
            if got != v.manifest_digest {
                return Err(refused(format!(
                    "{member}: sha256 is {got}, but the index gives {} (the manifest was altered)",
                    v.manifest_digest
                )));
            }
            let m = crate::replicate::parse_manifest_for(&bytes, &v.image, &v.version)
                .map_err(|e| refused(format!("{member}: {e}")))?;
            if blob_list(&m) != v.blobs {
                return Err(refused(format!(
                    "{member}: the blobs it cites differ from the index's list for {}@{}",
                    v.image, v.version
                )));
            }
            computed.push((member, got));
            pending[i].manifest = Some((bytes, m));
        } else if let Some(&i) = by_signature.get(member.as_str()) {
            let bytes = read_small(&mut entry, MAX_SIGNATURE, &member)
                .map_err(|e| refused(format!("{e:#}")))?;
            computed.push((member.clone(), Digest::of(&bytes)));
            let text = String::from_utf8(bytes)
                .map_err(|_| refused(format!("{member}: not a minisign signature (not text)")))?;
            pending[i].signature = Some(text);
        } else if let Some(limit) = log::member_limit(&index, &member) {
            if index_trust.is_some() {
                return Err(refused(format!(
                    "{member}: after the blobs (the log's members come before them)"
                )));
            }
            let bytes =
                read_small(&mut entry, limit, &member).map_err(|e| refused(format!("{e:#}")))?;
            computed.push((member.clone(), Digest::of(&bytes)));
            log_members.insert(member, bytes);
        } else if let Some(hex) = member.strip_prefix("blobs/sha256/") {
            if index_trust.is_none() {
                index_trust = Some(run_preflight(
                    index_signature.as_deref(),
                    &pending,
                    &log_members,
                )?);
            }
            let digest =
                Digest::from_hex(hex).map_err(|_| refused(format!("{member}: not a blob name")))?;
            let Some(b) = carried.get(&digest) else {
                return Err(refused(format!("{member}: a blob the index does not list")));
            };
            if entry.size() != b.size {
                return Err(refused(format!(
                    "{member}: {} bytes, but the manifests give {}",
                    entry.size(),
                    b.size
                )));
            }
            let store = needed.contains(&digest)
                && !dest
                    .has_blob(&digest, b.size)
                    .map_err(|e| failed(&name, e, &[]))?;
            if store {
                dest.store_blob(&digest, b.size, &b.media_type, &mut entry, &member)
                    .map_err(|e| match e {
                        BlobError::Content(why) => refused(why),
                        BlobError::Target(e) => failed(&name, e.context(member.clone()), &[]),
                    })?;
                report.blobs_stored += 1;
                report.bytes_stored += b.size;
                if !to_publish.contains(&digest) {
                    restored.push((digest, b.size));
                }
            } else {
                let mut r = HashingReader::new(&mut entry);
                io::copy(&mut r, &mut io::sink()).map_err(tar_error)?;
                let (got, len) = r.finish();
                if got != digest || len != b.size {
                    return Err(refused(format!(
                        "{member}: sha256 is {got}, expected {digest} (its name)"
                    )));
                }
                report.blobs_present += 1;
            }
            computed.push((member, digest));
        } else if member == SUMS_MEMBER {
            sums = Some(
                read_small(&mut entry, MAX_INDEX, SUMS_MEMBER)
                    .map_err(|e| refused(format!("{e:#}")))?,
            );
        } else {
            return Err(refused(format!(
                "{member}: not a member an imgsrv bundle has"
            )));
        }
    }
    let index_trust = match index_trust {
        Some(t) => t,
        None => run_preflight(index_signature.as_deref(), &pending, &log_members)?,
    };
    let trusted_index = index_trust == IndexTrust::Trusted;
    for (digest, size) in &restored {
        writeln!(
            out,
            "restored blob {digest} ({size} bytes): a version already published on {} cites it \
             and it was missing there",
            dest.describe()
        )
        .map_err(|e| failed(&name, e.into(), &[]))?;
    }
    report.blobs_restored = restored.len() as u64;
    for b in &index.blobs {
        if !seen.contains(&blob_member(&b.digest)) {
            return Err(refused(format!(
                "{}: listed in the index but missing from the bundle (truncated?)",
                blob_member(&b.digest)
            )));
        }
    }
    let Some(sums) = sums else {
        return Err(refused(format!(
            "{SUMS_MEMBER} is missing (the bundle is truncated?)"
        )));
    };
    check_sums(&sums, &computed).map_err(&refused)?;
    // completeness: every blob of a version to publish is now on the target
    for (v, p) in index.versions.iter().zip(&pending) {
        if !p.to_publish {
            continue;
        }
        for b in &v.blobs {
            let there = dest
                .has_blob(&b.digest, b.size)
                .map_err(|e| failed(&name, e, &[]))?;
            if !there {
                return Err(refused(format!(
                    "{}@{} needs blob {} ({} bytes), which is neither in the bundle nor on {}",
                    v.image,
                    v.version,
                    b.digest,
                    b.size,
                    dest.describe()
                )));
            }
        }
    }

    // a version already published there that still lacks a blob (which an
    // earlier bundle carried): said, not refused; that bundle restores it
    for (v, p) in index.versions.iter().zip(&pending) {
        if p.to_publish {
            continue;
        }
        for b in &v.blobs {
            let there = dest
                .has_blob(&b.digest, b.size)
                .map_err(|e| failed(&name, e, &[]))?;
            if !there {
                writeln!(
                    out,
                    "WARNING: {}@{} is published on {} but lacks blob {} ({} bytes), which this \
                     bundle does not carry: import the bundle that does (or re-upload it)",
                    v.image,
                    v.version,
                    dest.describe(),
                    b.digest,
                    b.size
                )
                .map_err(|e| failed(&name, e.into(), &[]))?;
            }
        }
    }

    // every check passed: publish, oldest first
    for (v, p) in index.versions.iter().zip(&pending) {
        let label = format!("{}@{}", v.image, v.version);
        if !p.to_publish {
            writeln!(out, "{label} is already published on the target: skipped")
                .map_err(|e| failed(&name, e.into(), &report.imported))?;
            report.already_present.push(label);
            continue;
        }
        let (bytes, m) = p.manifest.as_ref().expect("checked above");
        let sig = p.signature.as_deref().expect("checked above");
        // an unsigned index cannot make anything public
        let private = v.private || !trusted_index;
        let staged = dest.target().stage(m, private).map_err(|e| {
            failed(
                &name,
                e.context(format!("staging {label}")),
                &report.imported,
            )
        })?;
        if &staged != bytes {
            return Err(failed(
                &name,
                anyhow::anyhow!(
                    "{label}: the target's staged manifest (sha256 {}) differs from the bundle's ({}); not published",
                    Digest::of(&staged),
                    v.manifest_digest
                ),
                &report.imported,
            ));
        }
        dest.target()
            .publish(&v.image, &v.version, Some(sig))
            .map_err(|e| failed(&name, e, &report.imported))?;
        writeln!(out, "imported {label}").map_err(|e| failed(&name, e.into(), &report.imported))?;
        report.imported.push(label);
    }
    // aliases, for versions now published there; only from a signed index
    let mut images: BTreeMap<&str, Vec<&IndexVersion>> = BTreeMap::new();
    for v in &index.versions {
        images.entry(v.image.as_str()).or_default().push(v);
    }
    if let IndexTrust::Unsigned(why) = &index_trust {
        let skipped: usize = index.versions.iter().map(|v| v.aliases.len()).sum();
        writeln!(
            out,
            "WARNING: {why}: its {skipped} alias(es) were not set and images it created are \
             private (set them with `imgsrv alias set` and `imgsrv image set-visibility`, \
             or re-export with --key)"
        )
        .map_err(|e| failed(&name, e.into(), &report.imported))?;
        images.clear();
    }
    for (image, vs) in images {
        let have = dest
            .aliases(image)
            .map_err(|e| failed(&name, e, &report.imported))?;
        for v in vs {
            for a in &v.aliases {
                if have.get(a) == Some(&v.version) {
                    continue;
                }
                dest.target()
                    .set_alias(image, a, &v.version)
                    .map_err(|e| failed(&name, e, &report.imported))?;
                let label = format!("{image}:{a} -> {}", v.version);
                writeln!(out, "alias {label}")
                    .map_err(|e| failed(&name, e.into(), &report.imported))?;
                report.aliases_set.push(label);
            }
        }
    }
    let summary = if report.imported.is_empty() && report.aliases_set.is_empty() {
        let restored = match report.blobs_restored {
            0 => String::new(),
            n => format!(
                "; restored {n} missing blob(s) of them ({} bytes)",
                report.bytes_stored
            ),
        };
        format!(
            "nothing to import: all {} version(s) of {name} are already published on {}{restored}",
            report.already_present.len(),
            dest.describe()
        )
    } else {
        format!(
            "imported {} version(s) from {name} into {} ({} blob(s), {} bytes stored, {} already there); {} already published; {} alias(es) set",
            report.imported.len(),
            dest.describe(),
            report.blobs_stored,
            report.bytes_stored,
            report.blobs_present,
            report.already_present.len(),
            report.aliases_set.len()
        )
    };
    writeln!(out, "{summary}").map_err(|e| failed(&name, e.into(), &report.imported))?;
    Ok(report)
}

fn failed(bundle: &str, e: anyhow::Error, published: &[String]) -> ImportError {
    ImportError::Failed {
        bundle: bundle.to_string(),
        reason: format!("{e:#}"),
        published: published.to_vec(),
    }
}

fn regular<R: Read>(e: &tar::Entry<'_, R>, member: &str) -> Result<(), String> {
    match e.header().entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => Ok(()),
        t => Err(format!("{member}: a {t:?} member, not a regular file")),
    }
}

/// The index is consistent with itself.
fn check_index(index: &Index) -> Result<(), String> {
    let mut versions = BTreeSet::new();
    let mut sizes: HashMap<Digest, u64> = HashMap::new();
    let carried: BTreeSet<Digest> = index.blobs.iter().map(|b| b.digest).collect();
    if carried.len() != index.blobs.len() {
        return Err("a blob is listed twice".into());
    }
    for b in index.blobs.iter().chain(&index.requires_blobs) {
        if sizes.insert(b.digest, b.size).is_some_and(|s| s != b.size) {
            return Err(format!("blob {} is listed with two sizes", b.digest));
        }
    }
    if let Some(b) = index
        .requires_blobs
        .iter()
        .find(|b| carried.contains(&b.digest))
    {
        return Err(format!(
            "blob {} is both carried and required from an earlier bundle",
            b.digest
        ));
    }
    let mut cited = BTreeSet::new();
    for v in &index.versions {
        let label = format!("{}@{}", v.image, v.version);
        if !crate::names::image_name(&v.image) || !crate::names::version(&v.version) {
            return Err(format!("invalid image or version name {label:?}"));
        }
        if !versions.insert((v.image.clone(), v.version.clone())) {
            return Err(format!("{label} is listed twice"));
        }
        if v.manifest != manifest_member(&v.image, &v.version)
            || v.signature != signature_member(&v.image, &v.version)
        {
            return Err(format!(
                "{label}: unexpected manifest or signature member name"
            ));
        }
        if let Some(a) = v.aliases.iter().find(|a| !crate::names::alias(a)) {
            return Err(format!("{label}: invalid alias {a:?}"));
        }
        for b in &v.blobs {
            match sizes.get(&b.digest) {
                Some(&s) if s == b.size => {}
                Some(_) => return Err(format!("{label}: blob {} with another size", b.digest)),
                None => {
                    return Err(format!(
                        "{label}: blob {} is neither carried nor listed as required",
                        b.digest
                    ))
                }
            }
            cited.insert(b.digest);
        }
    }
    if let Some(b) = index.blobs.iter().find(|b| !cited.contains(&b.digest)) {
        return Err(format!(
            "blob {} is carried but no version cites it",
            b.digest
        ));
    }
    Ok(())
}

/// Whether the index's own claims (aliases, private flags) may be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IndexTrust {
    Trusted,
    /// Unsigned, in enforce mode: the versions are imported, the index's
    /// aliases are not applied and new images are private.
    Unsigned(String),
}

/// Checks the exporter's signature over the index bytes against the
/// importing site's keys and mode; the key must be allowed to sign every
/// image the index names. A signature that is present but does not verify
/// refuses the bundle (it was altered, or signed by a key this site does not
/// trust).
fn check_index_signature(
    sigs: &crate::replicate::SignatureCheck,
    index: &Index,
    index_bytes: &[u8],
    signature: Option<&str>,
    out: &mut dyn Write,
) -> Result<IndexTrust, String> {
    use crate::config::VerificationMode;
    match (signature, sigs.mode) {
        (_, VerificationMode::Off) => return Ok(IndexTrust::Trusted),
        (None, VerificationMode::Warn) => {
            let _ = writeln!(
                out,
                "WARNING: {INDEX_MEMBER} is not signed (the verification mode is warn: \
                 its aliases and private flags are applied anyway)"
            );
            return Ok(IndexTrust::Trusted);
        }
        (None, _) => {
            return Ok(IndexTrust::Unsigned(format!(
                "{INDEX_MEMBER} is not signed (export with --key)"
            )))
        }
        (Some(_), _) => {}
    }
    let images: BTreeSet<&str> = index.versions.iter().map(|v| v.image.as_str()).collect();
    let warnings = sigs
        .check_each(index_bytes, signature, images)
        .map_err(|why| {
            format!("{INDEX_SIGNATURE_MEMBER}: the index signature is refused: {why}")
        })?;
    for warning in warnings {
        let _ = writeln!(out, "WARNING: {INDEX_SIGNATURE_MEMBER}: {warning}");
    }
    Ok(IndexTrust::Trusted)
}

/// Once the manifests and signatures are in: every one present, signatures
/// acceptable to the target, versions already published there identical,
/// and the blobs relied on from an earlier bundle present there.
/// Last, the index signature ([`check_index_signature`]): what may be
/// applied of the index's own claims.
fn preflight(
    dest: &Destination,
    sigs: &crate::replicate::SignatureCheck,
    index: &Index,
    index_bytes: &[u8],
    index_signature: Option<&str>,
    pending: &[Pending],
    out: &mut dyn Write,
) -> Result<IndexTrust, String> {
    for (v, p) in index.versions.iter().zip(pending) {
        let Some((bytes, _)) = &p.manifest else {
            return Err(format!("{}: missing from the bundle", v.manifest));
        };
        let Some(sig) = &p.signature else {
            return Err(format!("{}: missing from the bundle", v.signature));
        };
        if !p.to_publish {
            let there = dest
                .published_manifest(&v.image, &v.version)
                .map_err(|e| format!("{e:#}"))?;
            if there.as_deref() != Some(bytes.as_slice()) {
                return Err(format!(
                    "{}: {}@{} is already published on {} with a different manifest",
                    v.manifest,
                    v.image,
                    v.version,
                    dest.describe()
                ));
            }
            continue;
        }
        match sigs.check(bytes, Some(sig), &v.image) {
            Ok(None) => {}
            Ok(Some(warning)) => {
                let _ = writeln!(out, "WARNING: {}: {warning}", v.signature);
            }
            Err(why) => {
                return Err(format!(
                    "{}: signature refused by {}: {why}",
                    v.signature,
                    dest.describe()
                ))
            }
        }
    }
    let mut missing = Vec::new();
    for b in &index.requires_blobs {
        let needed = index
            .versions
            .iter()
            .zip(pending)
            .any(|(v, p)| p.to_publish && v.blobs.iter().any(|x| x.digest == b.digest));
        if needed
            && !dest
                .has_blob(&b.digest, b.size)
                .map_err(|e| format!("{e:#}"))?
        {
            missing.push(b.digest.to_string());
        }
    }
    if !missing.is_empty() {
        let base = index
            .since_bundle
            .as_ref()
            .map(|b| format!("the earlier bundle (created {})", b.created_at))
            .unwrap_or_else(|| "an earlier bundle".into());
        return Err(format!(
            "incomplete: this bundle relies on {} blob(s) carried by {base}, which {} does not have: import that bundle first (missing: {})",
            missing.len(),
            dest.describe(),
            missing.join(", ")
        ));
    }
    check_index_signature(sigs, index, index_bytes, index_signature, out)
}

/// SHA256SUMS lists every other member exactly once, with its hash.
fn check_sums(text: &[u8], computed: &[(String, Digest)]) -> Result<(), String> {
    let text = std::str::from_utf8(text).map_err(|_| format!("{SUMS_MEMBER}: not text"))?;
    let mut listed: BTreeMap<&str, &str> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (hex, file) = line
            .split_once("  ")
            .or_else(|| line.split_once(" *"))
            .ok_or_else(|| format!("{SUMS_MEMBER}: line {} is not `<sha256>  <name>`", n + 1))?;
        if listed.insert(file, hex).is_some() {
            return Err(format!("{SUMS_MEMBER}: {file} is listed twice"));
        }
    }
    for (member, digest) in computed {
        match listed.remove(member.as_str()) {
            None => return Err(format!("{member}: not listed in {SUMS_MEMBER}")),
            Some(hex) if hex != digest.hex() => {
                return Err(format!(
                    "{member}: sha256 is {}, but {SUMS_MEMBER} gives {hex}",
                    digest.hex()
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(name) = listed.keys().next() {
        return Err(format!(
            "{SUMS_MEMBER} lists {name}, which is not in the bundle"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_must_cover_every_member_exactly() {
        let d = Digest::of(b"x");
        let computed = vec![("a".to_string(), d)];
        let good = format!("{}  a\n", d.hex());
        check_sums(good.as_bytes(), &computed).unwrap();
        let e = check_sums(
            format!("{}  a\n", Digest::of(b"y").hex()).as_bytes(),
            &computed,
        )
        .unwrap_err();
        assert!(e.starts_with("a: sha256 is"), "{e}");
        let e = check_sums(b"", &computed).unwrap_err();
        assert!(e.contains("not listed"), "{e}");
        let extra = format!("{good}{}  b\n", d.hex());
        assert!(check_sums(extra.as_bytes(), &computed)
            .unwrap_err()
            .contains("lists b"));
        assert!(check_sums(b"junk\n", &computed)
            .unwrap_err()
            .contains("line 1"));
    }

    fn index_with(blobs: Vec<IndexBlob>, version_blobs: Vec<IndexBlob>) -> Index {
        Index {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            created_at: "t".into(),
            source: "s".into(),
            since: None,
            since_bundle: None,
            versions: vec![IndexVersion {
                image: "demo".into(),
                version: "1".into(),
                private: false,
                published_at: "t".into(),
                manifest: manifest_member("demo", "1"),
                manifest_digest: Digest::of(b"m"),
                signature: signature_member("demo", "1"),
                aliases: vec!["stable".into()],
                blobs: version_blobs,
                tlog_proof: None,
            }],
            blobs,
            requires_blobs: vec![],
            base_versions: vec![],
            log: None,
        }
    }

    #[test]
    fn index_consistency() {
        let b = |s: &[u8], n| IndexBlob {
            digest: Digest::of(s),
            size: n,
            media_type: "x".into(),
        };
        check_index(&index_with(vec![b(b"a", 1)], vec![b(b"a", 1)])).unwrap();
        assert!(check_index(&index_with(vec![b(b"a", 1)], vec![b(b"a", 2)]))
            .unwrap_err()
            .contains("another size"));
        assert!(check_index(&index_with(vec![], vec![b(b"a", 1)]))
            .unwrap_err()
            .contains("neither carried"));
        assert!(
            check_index(&index_with(vec![b(b"a", 1), b(b"b", 1)], vec![b(b"a", 1)]))
                .unwrap_err()
                .contains("no version cites")
        );
        let mut i = index_with(vec![b(b"a", 1)], vec![b(b"a", 1)]);
        i.versions[0].manifest = "../../etc/passwd".into();
        assert!(check_index(&i).unwrap_err().contains("member name"));
        let mut i = index_with(vec![b(b"a", 1)], vec![b(b"a", 1)]);
        i.versions[0].image = "../x".into();
        assert!(check_index(&i).unwrap_err().contains("invalid"));
        let json = serde_json::to_vec(&index_with(vec![], vec![])).unwrap();
        assert_eq!(parse_index(&json).unwrap().versions.len(), 1);
        let v2 = String::from_utf8(json)
            .unwrap()
            .replace("\"format_version\":1", "\"format_version\":2");
        assert!(parse_index(v2.as_bytes()).is_err());
    }

    #[test]
    fn since_dates() {
        assert_eq!(
            parse_since("2026-11-01").unwrap().to_rfc3339(),
            "2026-11-01T00:00:00+00:00"
        );
        assert!(parse_since("2026-11-01T12:00:00Z").is_ok());
        assert!(parse_since("yesterday").is_err());
    }
}
