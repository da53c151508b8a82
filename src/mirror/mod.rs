//! `imgsrv mirror`: bring the images of an upstream Simple Streams tree
//! (images.linuxcontainers.org, an `incus-simplestreams` tree, another
//! imgsrv's `/streams/v1/`) into a server or a data directory.
//!
//! [`run`] reads the upstream ([`streams`]), maps its products to imgsrv
//! versions ([`plan`]), skips what the target already has (published
//! versions, blobs), downloads the rest into a staging directory ([`fetch`])
//! checking every file's sha256 and size against the upstream JSON, and
//! stores each file in the [`Target`] as soon as it is in. Then, per version
//! and in order, it checks every Incus fingerprint against the upstream's
//! `combined_*` hash, stages the [`Manifest`], signs the target's canonical
//! manifest with the mirror operator's key, publishes it and sets its
//! aliases. Publishing overlaps with the downloads of later versions.
//!
//! One imgsrv version per upstream version name of an image: the products of
//! one release for several architectures (images.linuxcontainers.org has one
//! product per architecture) share it, one artifact per root each. Published
//! versions are immutable, so mirror every architecture you want in the same
//! run; a later run skips a version that is already published.
//!
//! A failed version does not stop the others: it is counted and listed in
//! the [`MirrorReport`]. [`run`] returns an error only when it could not run
//! at all (bad options, unreadable key, upstream unreachable).

pub mod command;
pub mod fetch;
pub mod plan;
pub mod streams;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::manifest::{Manifest, ManifestArtifact, ManifestAttachment};
use crate::target::{Target, VersionStatus};
use fetch::{Fetched, Job, Staging};
use plan::{Filters, VersionPlan};
use streams::Upstream;

/// The attachment name of the Incus metadata tarball.
const METADATA_ATTACHMENT: &str = crate::fingerprint::INCUS_METADATA;
/// Parallel downloads by default.
pub const DEFAULT_JOBS: usize = 4;
const MAX_JOBS: usize = 64;

/// Instance type of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageType {
    Container,
    #[serde(alias = "virtual-machine")]
    Vm,
}

impl ImageType {
    /// The name Incus uses.
    pub fn incus_name(self) -> &'static str {
        match self {
            ImageType::Container => "container",
            ImageType::Vm => "virtual-machine",
        }
    }
}

impl std::str::FromStr for ImageType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "container" => Ok(ImageType::Container),
            "vm" | "virtual-machine" => Ok(ImageType::Vm),
            _ => Err(format!("{s:?}: expected container or vm")),
        }
    }
}

fn default_jobs() -> usize {
    DEFAULT_JOBS
}

/// What to mirror. The fields a `[[mirror]]` config table may set are the
/// serde ones; unknown keys are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorOptions {
    /// Base URL of the upstream tree (`…/streams/v1/index.json` is below it).
    pub upstream: String,
    /// PEM certificate(s) to trust for an https upstream instead of the
    /// system store.
    #[serde(default)]
    pub upstream_ca: Option<PathBuf>,
    /// The mirror operator's minisign secret key (its public key must be
    /// trusted by the target: `imgsrv key add`).
    pub key: PathBuf,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub release: Option<String>,
    #[serde(default)]
    pub variant: Option<String>,
    /// `amd64` ≡ `x86_64`, `arm64` ≡ `aarch64`.
    #[serde(default)]
    pub arch: Option<String>,
    #[serde(default, rename = "type")]
    pub image_type: Option<ImageType>,
    /// Image-name glob (`debian-*`).
    #[serde(default)]
    pub image: Option<String>,
    /// Only the newest N versions of each upstream product.
    #[serde(default)]
    pub latest: Option<usize>,
    /// Parallel downloads.
    #[serde(default = "default_jobs")]
    pub jobs: usize,
    /// Where downloads are staged (default: [`default_staging_dir`]).
    #[serde(skip)]
    pub staging_dir: Option<PathBuf>,
    /// Draw a progress bar on stderr.
    #[serde(skip)]
    pub progress: bool,
}

impl MirrorOptions {
    /// Options with everything but the upstream and the key at its default.
    pub fn new(upstream: &str, key: &Path) -> MirrorOptions {
        MirrorOptions {
            upstream: upstream.to_string(),
            upstream_ca: None,
            key: key.to_path_buf(),
            os: None,
            release: None,
            variant: None,
            arch: None,
            image_type: None,
            image: None,
            latest: None,
            jobs: DEFAULT_JOBS,
            staging_dir: None,
            progress: false,
        }
    }

    fn filters(&self) -> Filters {
        Filters {
            os: self.os.clone(),
            release: self.release.clone(),
            variant: self.variant.clone(),
            arch: self.arch.clone(),
            kind: self.image_type,
            image: self.image.clone(),
            latest: self.latest,
        }
    }

    fn check(&self) -> Result<()> {
        if !(1..=MAX_JOBS).contains(&self.jobs) {
            bail!("jobs must be between 1 and {MAX_JOBS}, not {}", self.jobs);
        }
        if self.latest == Some(0) {
            bail!("latest must be at least 1");
        }
        if let Some(g) = &self.image {
            if !crate::names::scope(g) {
                bail!("invalid image glob {g:?}: an image-name glob such as debian-* or *");
            }
        }
        Ok(())
    }
}

/// Where downloads are staged when no directory is given:
/// `$XDG_CACHE_HOME/imgsrv/mirror`, else `~/.cache/imgsrv/mirror`, else
/// `imgsrv-mirror` in the temporary directory.
pub fn default_staging_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        });
    match cache {
        Some(c) => c.join("imgsrv").join("mirror"),
        None => std::env::temp_dir().join("imgsrv-mirror"),
    }
}

/// An image of a mirrored version, as Incus sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MirroredImage {
    #[serde(rename = "type")]
    pub image_type: ImageType,
    pub architecture: String,
    /// The Incus fingerprint (the upstream's, recomputed).
    pub fingerprint: String,
}

/// A version published by this run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MirroredVersion {
    pub image: String,
    pub version: String,
    pub products: Vec<String>,
    pub images: Vec<MirroredImage>,
}

/// A version the target already had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionRef {
    pub image: String,
    pub version: String,
}

/// Something that failed: a version (`{image} {version}`) or an upstream product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub what: String,
    pub error: String,
}

/// Upstream items of the selected versions that imgsrv does not hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IgnoredItems {
    /// `*.vcdiff` delta items.
    pub deltas: usize,
    /// Unified `incus_combined.tar.gz` / `lxd_combined.tar.gz` images.
    pub unified: usize,
    /// Legacy VM disks (`disk1.img`, `uefi1.img`).
    pub other: usize,
}

/// What [`run`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MirrorReport {
    pub upstream: String,
    pub target: String,
    /// The upstream was read over plain http.
    pub insecure_upstream: bool,
    pub mirrored: Vec<MirroredVersion>,
    pub already_present: Vec<VersionRef>,
    /// Published on the target already, but some of their files were lost
    /// there (a scrub quarantined them): fetched and stored again.
    pub repaired: Vec<VersionRef>,
    /// Upstream (product, version)s left out by the filters (and `latest`).
    pub skipped_by_filter: usize,
    /// Upstream (product, version)s with no image imgsrv can hold.
    pub unsupported: usize,
    pub failed: Vec<Failure>,
    pub ignored_items: IgnoredItems,
    pub warnings: Vec<String>,
    /// File bytes received from the upstream (index and products documents
    /// not counted).
    pub bytes_downloaded: u64,
    pub files_downloaded: usize,
    /// Files taken from the staging directory (an earlier, interrupted run).
    pub files_reused: usize,
    /// Files resumed from a partial download.
    pub files_resumed: usize,
    /// Files the target already had (not downloaded).
    pub files_on_target: usize,
    pub seconds: f64,
    pub bytes_per_second: f64,
}

impl MirrorReport {
    /// Nothing failed.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Human-readable byte count (binary units).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Writes a line to `out` without tearing the progress bar.
fn say(out: &mut dyn Write, pb: Option<&ProgressBar>, line: &str) {
    match pb {
        Some(pb) => pb.suspend(|| {
            let _ = writeln!(out, "{line}");
        }),
        None => {
            let _ = writeln!(out, "{line}");
        }
    }
}

/// Mirrors the upstream in `opts` into `target`, writing one line per
/// version and a summary to `out`. `Err` only when it could not run; a
/// version that failed is in [`MirrorReport::failed`].
pub fn run(
    opts: &MirrorOptions,
    target: &(dyn Target + Sync),
    out: &mut dyn Write,
) -> Result<MirrorReport> {
    run_guarded(opts, target, out, &|| Ok(()))
}

/// [`run`], asking `guard` before each version is stored on the target: an `Err` from
/// it stops the run there (a scheduled job whose lock was lost: another instance may
/// be running the same job now). What was stored before stays, and the error is the
/// run's.
pub fn run_guarded(
    opts: &MirrorOptions,
    target: &(dyn Target + Sync),
    out: &mut dyn Write,
    guard: &dyn Fn() -> Result<()>,
) -> Result<MirrorReport> {
    let started = Instant::now();
    opts.check()?;
    let upstream = Upstream::new(&opts.upstream, opts.upstream_ca.as_deref())?;
    let mut report = MirrorReport {
        upstream: upstream.base().to_string(),
        target: target.describe(),
        insecure_upstream: upstream.insecure(),
        ..Default::default()
    };
    // the key first: a wrong password should fail before anything moves
    let sk = crate::sign::load_secret_key(&opts.key)
        .with_context(|| format!("loading the signing key {}", opts.key.display()))?;
    // and whether the target trusts it, before anything is downloaded
    if let Some(why) = target
        .signer_refused(&crate::sign::secret_key_id(&sk))
        .with_context(|| format!("reading the trusted keys of {}", target.describe()))?
    {
        bail!("{why}");
    }
    writeln!(out, "mirror {} -> {}", report.upstream, report.target)?;
    if report.insecure_upstream {
        let w = format!(
            "the upstream {} is plain http: its JSON, and so every sha256 and fingerprint checked against it, can be changed on the way; use https",
            report.upstream
        );
        log::warn!("{w}");
        writeln!(out, "WARNING: {w}")?;
        report.warnings.push(w);
    }

    // 1. the upstream's products
    let index = upstream
        .get_json(streams::INDEX_PATH)
        .context("reading the upstream index")?;
    let files = streams::index_paths(&index).context("reading the upstream index")?;
    if files.is_empty() {
        bail!(
            "the upstream index {}/{} has no image-downloads entry",
            report.upstream,
            streams::INDEX_PATH
        );
    }
    let mut products = Vec::new();
    for f in &files {
        let doc = upstream
            .get_json(f)
            .with_context(|| format!("reading the upstream products file {f}"))?;
        products.extend(streams::parse_products(&doc, f)?);
    }

    // 2. the plan
    let plan = plan::plan(&products, &opts.filters(), upstream.base());
    report.skipped_by_filter = plan.filtered;
    report.unsupported = plan.unsupported;
    report.ignored_items = IgnoredItems {
        deltas: plan.ignored_deltas,
        unified: plan.ignored_unified,
        other: plan.ignored_other,
    };
    for f in &plan.failures {
        writeln!(out, "FAILED   {}: {}", f.what, f.error)?;
        report.failed.push(Failure {
            what: f.what.clone(),
            error: f.error.clone(),
        });
    }

    // 3. what the target has: published versions are skipped without a
    // download, unless the target lost some of their files (then those are
    // fetched again: a repair)
    let mut todo: Vec<VersionPlan> = Vec::new();
    let mut repair: Vec<bool> = Vec::new();
    for v in plan.versions {
        let st = target
            .status(&v.image, &v.version)
            .with_context(|| format!("asking {} about {}", report.target, v.label()))?;
        if st != VersionStatus::Published {
            todo.push(v);
            repair.push(false);
            continue;
        }
        let mut lost = 0;
        if target.checks_blobs() {
            for f in v.files() {
                if !target
                    .has_blob(&f.sha256, f.size)
                    .with_context(|| format!("asking {} for {}", report.target, f.sha256))?
                {
                    lost += 1;
                }
            }
        }
        if lost > 0 {
            writeln!(
                out,
                "repair   {}: {lost} of its files are missing on the target",
                v.label()
            )?;
            todo.push(v);
            repair.push(true);
        } else {
            writeln!(out, "present  {}", v.label())?;
            report.already_present.push(VersionRef {
                image: v.image,
                version: v.version,
            });
        }
    }

    if !todo.is_empty() {
        let staging_dir = opts.staging_dir.clone().unwrap_or_else(default_staging_dir);
        let staging = match Staging::try_open(&staging_dir)? {
            Some(s) => s,
            None => {
                writeln!(
                    out,
                    "waiting for another mirror run using {}",
                    staging_dir.display()
                )?;
                Staging::open(&staging_dir)?
            }
        };
        mirror_versions(
            opts,
            target,
            &upstream,
            &staging,
            &sk,
            (todo, &repair),
            &mut report,
            out,
            guard,
        )?;
    }

    report.seconds = started.elapsed().as_secs_f64();
    report.bytes_per_second = report.bytes_downloaded as f64 / report.seconds.max(1e-9);
    write_summary(&report, out)?;
    Ok(report)
}

fn write_summary(r: &MirrorReport, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "summary: {} mirrored, {} already present, {} skipped by filter, {} failed; {} downloaded ({}) in {:.1} s, {}/s",
        plural(r.mirrored.len(), "version", "versions"),
        r.already_present.len(),
        r.skipped_by_filter,
        r.failed.len(),
        bytes(r.bytes_downloaded),
        plural(r.files_downloaded, "file", "files"),
        r.seconds,
        bytes(r.bytes_per_second as u64),
    )?;
    if !r.repaired.is_empty() {
        writeln!(
            out,
            "repaired: {} already published, whose files the target had lost, stored again",
            plural(r.repaired.len(), "version", "versions")
        )?;
    }
    if r.files_reused + r.files_resumed + r.files_on_target > 0 {
        writeln!(
            out,
            "files: {} resumed, {} taken from the staging directory, {} already on the target",
            r.files_resumed, r.files_reused, r.files_on_target
        )?;
    }
    let i = &r.ignored_items;
    if i.deltas + i.unified + i.other + r.unsupported > 0 {
        writeln!(
            out,
            "not mirrored: {}, {}, {} (imgsrv holds split images only), {} with nothing else",
            plural(i.deltas, "delta item", "delta items"),
            plural(i.unified, "unified image item", "unified image items"),
            plural(i.other, "legacy disk item", "legacy disk items"),
            plural(r.unsupported, "upstream version", "upstream versions"),
        )?;
    }
    Ok(())
}

/// Per-file state while versions are mirrored.
enum FileState {
    /// On the target already; not downloaded.
    OnTarget,
    Pending,
    Ready(Fetched),
    Failed(String),
}

/// Downloads what `todo` needs (in parallel) and publishes each version as
/// soon as its files are in, in order; a version marked in `repair` is
/// published already, and only its lost files are stored again.
#[allow(clippy::too_many_arguments)]
fn mirror_versions(
    opts: &MirrorOptions,
    target: &(dyn Target + Sync),
    upstream: &Upstream,
    staging: &Staging,
    sk: &minisign::SecretKey,
    (todo, repair): (Vec<VersionPlan>, &[bool]),
    report: &mut MirrorReport,
    out: &mut dyn Write,
    guard: &dyn Fn() -> Result<()>,
) -> Result<()> {
    // every distinct file, and which versions still need it
    let mut files: HashMap<Digest, FileState> = HashMap::new();
    let mut users: HashMap<Digest, usize> = HashMap::new();
    let mut meta_jobs: Vec<Job> = Vec::new();
    let mut root_jobs: Vec<Job> = Vec::new();
    let mut metas: HashSet<Digest> = HashSet::new();
    for v in &todo {
        for p in &v.pairs {
            metas.insert(p.meta.sha256);
        }
    }
    for v in &todo {
        for f in v.files() {
            *users.entry(f.sha256).or_default() += 1;
            if files.contains_key(&f.sha256) {
                continue;
            }
            let local = staging.complete(&f.sha256).is_file();
            let on_target = !local
                && target
                    .has_blob(&f.sha256, f.size)
                    .with_context(|| format!("asking {} for {}", report.target, f.sha256))?;
            if on_target {
                files.insert(f.sha256, FileState::OnTarget);
                report.files_on_target += 1;
                continue;
            }
            files.insert(f.sha256, FileState::Pending);
            let is_meta = metas.contains(&f.sha256);
            let job = Job {
                file: f.clone(),
                metas: Vec::new(),
                is_meta,
                media_type: v
                    .pairs
                    .iter()
                    .find(|p| p.root.sha256 == f.sha256)
                    .map(|p| p.media_type),
            };
            if is_meta {
                meta_jobs.push(job);
            } else {
                root_jobs.push(job);
            }
        }
    }
    // a root continues the hash of each metadata file it pairs with, when
    // that file is fetched too
    let fetched_metas: HashSet<Digest> = meta_jobs.iter().map(|j| j.file.sha256).collect();
    for j in &mut root_jobs {
        for v in &todo {
            for p in v.pairs.iter().filter(|p| p.root.sha256 == j.file.sha256) {
                if fetched_metas.contains(&p.meta.sha256) && !j.metas.contains(&p.meta.sha256) {
                    j.metas.push(p.meta.sha256);
                }
            }
        }
    }
    let total: u64 = meta_jobs
        .iter()
        .chain(root_jobs.iter())
        .map(|j| j.file.size)
        .sum();
    let njobs = meta_jobs.len() + root_jobs.len();
    let pb = (opts.progress && njobs > 0).then(|| {
        let pb = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(
            "mirror [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} {msg}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb
    });
    let mut jobs = meta_jobs;
    jobs.extend(root_jobs);

    let downloaded = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let mut ctx = fetch::Ctx::new(upstream, staging, pb.as_ref(), &downloaded, &stop);
    ctx.target = Some(target);
    let (tx, rx) = mpsc::channel();
    let workers = opts.jobs.min(njobs.max(1));
    let result: Result<()> = std::thread::scope(|s| {
        let ctx = &ctx;
        s.spawn(move || fetch::run_jobs(ctx, jobs, workers, tx));
        let mut next = 0;
        let r = (|| -> Result<()> {
            while next < todo.len() {
                let v = &todo[next];
                let ready = v
                    .files()
                    .iter()
                    .all(|f| !matches!(files.get(&f.sha256), Some(FileState::Pending)));
                if !ready {
                    match rx.recv() {
                        Ok((sha, outcome)) => {
                            let st = match outcome {
                                Ok(f) => {
                                    if f.reused {
                                        report.files_reused += 1;
                                    } else {
                                        report.files_downloaded += 1;
                                    }
                                    if f.resumed {
                                        report.files_resumed += 1;
                                    }
                                    FileState::Ready(f)
                                }
                                Err(e) => FileState::Failed(e),
                            };
                            files.insert(sha, st);
                        }
                        Err(_) => bail!("the download threads stopped early"),
                    }
                    continue;
                }
                guard().with_context(|| format!("stopped before {}", v.label()))?;
                if repair[next] {
                    let lost: Vec<String> = v
                        .files()
                        .iter()
                        .filter_map(|f| match files.get(&f.sha256) {
                            Some(FileState::Failed(e)) => Some(e.clone()),
                            _ => None,
                        })
                        .collect();
                    if lost.is_empty() {
                        say(out, pb.as_ref(), &format!("repaired {}", v.label()));
                        release_staged(v, &mut users, &files);
                        report.repaired.push(VersionRef {
                            image: v.image.clone(),
                            version: v.version.clone(),
                        });
                    } else {
                        say(
                            out,
                            pb.as_ref(),
                            &format!("FAILED   {}: {}", v.label(), lost.join("; ")),
                        );
                        report.failed.push(Failure {
                            what: v.label(),
                            error: lost.join("; "),
                        });
                    }
                    next += 1;
                    continue;
                }
                let outcome = mirror_one(v, &files, target, sk, report, pb.as_ref(), out);
                match outcome {
                    Ok(m) => {
                        let imgs: Vec<String> = m
                            .images
                            .iter()
                            .map(|i| {
                                format!(
                                    "{} {} {}",
                                    i.architecture,
                                    i.image_type.incus_name(),
                                    &i.fingerprint[..12]
                                )
                            })
                            .collect();
                        say(
                            out,
                            pb.as_ref(),
                            &format!("mirrored {}: {}", v.label(), imgs.join(", ")),
                        );
                        report.mirrored.push(m);
                        release_staged(v, &mut users, &files);
                    }
                    Err(e) => {
                        say(out, pb.as_ref(), &format!("FAILED   {}: {e}", v.label()));
                        report.failed.push(Failure {
                            what: v.label(),
                            error: e,
                        });
                    }
                }
                next += 1;
            }
            Ok(())
        })();
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // dropping the receiver ends the workers' sends
        drop(rx);
        r
    });
    report.bytes_downloaded = downloaded.load(Ordering::Relaxed);
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    result
}

/// Removes the staged files of `v` (stored on the target now) that no
/// version still to come needs.
fn release_staged(
    v: &VersionPlan,
    users: &mut HashMap<Digest, usize>,
    files: &HashMap<Digest, FileState>,
) {
    for f in v.files() {
        let n = users.entry(f.sha256).or_default();
        *n = n.saturating_sub(1);
        if *n == 0 {
            if let Some(FileState::Ready(x)) = files.get(&f.sha256) {
                let _ = std::fs::remove_file(&x.path);
            }
        }
    }
}

/// Media type of a metadata tarball that was on the target already (not
/// read here): the usual xz.
const DEFAULT_METADATA_MEDIA_TYPE: &str = "application/x-xz";

/// Checks the fingerprints, stages, signs and publishes one version (its
/// blobs are stored already), then points its aliases at it.
fn mirror_one(
    v: &VersionPlan,
    files: &HashMap<Digest, FileState>,
    target: &dyn Target,
    sk: &minisign::SecretKey,
    report: &mut MirrorReport,
    pb: Option<&ProgressBar>,
    out: &mut dyn Write,
) -> Result<MirroredVersion, String> {
    // every file in, and right
    let mut errors = Vec::new();
    for f in v.files() {
        if let Some(FileState::Failed(e)) = files.get(&f.sha256) {
            errors.push(e.clone());
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let local = |d: &Digest| match files.get(d) {
        Some(FileState::Ready(f)) => Some(f),
        _ => None,
    };
    // the Incus fingerprints, before anything is published
    let mut images = Vec::new();
    let mut known = crate::fingerprint::Known::new();
    for p in &v.pairs {
        let computed = local(&p.root.sha256).and_then(|f| f.fingerprints.get(&p.meta.sha256));
        match computed {
            Some(fp) if *fp == p.fingerprint => {
                // computed while both files' sha256 were checked: the
                // target need not read them again for it
                known.insert((p.meta.sha256, p.root.sha256), *fp);
            }
            Some(fp) => {
                return Err(format!(
                    "fingerprint mismatch for the {} {} ({} + {}): the upstream declares {}, the files give {}",
                    p.arch,
                    p.kind.incus_name(),
                    p.meta.item_key,
                    p.root.item_key,
                    p.fingerprint.hex(),
                    fp.hex()
                ))
            }
            None => {
                let w = format!(
                    "{}: the fingerprint of the {} {} was not recomputed (its files were already on the target)",
                    v.label(),
                    p.arch,
                    p.kind.incus_name()
                );
                say(out, pb, &format!("note: {w}"));
                report.warnings.push(w);
            }
        }
        images.push(MirroredImage {
            image_type: p.kind,
            architecture: p.arch.clone(),
            fingerprint: p.fingerprint.hex(),
        });
    }
    let err = |what: &str, e: anyhow::Error| format!("{what}: {e:#}");

    // the blobs are stored (by the download workers); their media types
    let mut media: BTreeMap<Digest, &'static str> = BTreeMap::new();
    for p in &v.pairs {
        media.insert(p.root.sha256, p.media_type);
        let m = local(&p.meta.sha256).map_or(DEFAULT_METADATA_MEDIA_TYPE, |f| f.media_type);
        media.insert(p.meta.sha256, m);
    }

    // the manifest: one artifact per root, with its metadata tarball
    let artifacts = v
        .pairs
        .iter()
        .map(|p| ManifestArtifact {
            variant: p.variant.clone(),
            operating_system: p.os.clone(),
            architecture: p.arch.clone(),
            format: p.format.to_string(),
            digest: p.root.sha256,
            size: p.root.size,
            media_type: p.media_type.to_string(),
            attachments: vec![ManifestAttachment {
                name: METADATA_ATTACHMENT.to_string(),
                media_type: media[&p.meta.sha256].to_string(),
                digest: p.meta.sha256,
                size: p.meta.size,
            }],
        })
        .collect();
    let manifest = Manifest {
        schema: crate::manifest::SCHEMA.to_string(),
        image: v.image.clone(),
        version: v.version.clone(),
        metadata: v.metadata.clone(),
        artifacts,
    };
    let staged = target
        .stage(&manifest, false)
        .map_err(|e| err("staging the version", e))?;
    if staged != manifest.canonical() {
        return Err(format!(
            "the target's manifest for {} differs from the mirrored one; not signed",
            v.label()
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let tc = crate::sign::manifest_trusted_comment(&v.image, &v.version, &Digest::of(&staged), now);
    let sig = crate::sign::sign(sk, &staged, &tc).map_err(|e| err("signing", e.into()))?;
    target
        .publish_with_fingerprints(&v.image, &v.version, Some(&sig), &known)
        .map_err(|e| err("publishing", e))?;
    for a in &v.aliases {
        if let Err(e) = target.set_alias(&v.image, a, &v.version) {
            let w = format!("{}: alias {a}: {e:#}", v.label());
            say(out, pb, &format!("warning: {w}"));
            report.warnings.push(w);
        }
    }
    images.sort_by(|x, y| {
        (&x.architecture, x.image_type.incus_name())
            .cmp(&(&y.architecture, y.image_type.incus_name()))
    });
    Ok(MirroredVersion {
        image: v.image.clone(),
        version: v.version.clone(),
        products: v.products.clone(),
        images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_a_config_table_and_refuse_unknown_keys() {
        let o: MirrorOptions = toml::from_str(
            r#"
            upstream = "https://images.linuxcontainers.org"
            upstream_ca = "/etc/ssl/up.pem"
            key = "/etc/imgsrv/mirror.key"
            os = "Debian"
            release = "bookworm"
            variant = "default"
            arch = "amd64"
            type = "vm"
            image = "debian-*"
            latest = 2
            jobs = 8
            "#,
        )
        .unwrap();
        assert_eq!(o.image_type, Some(ImageType::Vm));
        assert_eq!((o.latest, o.jobs), (Some(2), 8));
        assert_eq!(o.upstream_ca.as_deref(), Some(Path::new("/etc/ssl/up.pem")));
        o.check().unwrap();
        let min: MirrorOptions = toml::from_str("upstream = \"https://x\"\nkey = \"k\"\n").unwrap();
        assert_eq!(min.jobs, DEFAULT_JOBS);
        assert!(min.image_type.is_none() && !min.progress);
        let e = toml::from_str::<MirrorOptions>(
            "upstream = \"https://x\"\nkey = \"k\"\nstaging_dir = \"/x\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(
            toml::from_str::<MirrorOptions>("upstream = \"x\"\nkey = \"k\"\ntype = \"lxc\"\n")
                .is_err()
        );
        let mut bad = min.clone();
        bad.jobs = 0;
        assert!(bad.check().is_err());
        bad.jobs = 1;
        bad.image = Some("[x]".into());
        assert!(bad.check().is_err());
    }

    #[test]
    fn report_serializes_with_its_counts() {
        let r = MirrorReport {
            upstream: "https://u".into(),
            bytes_downloaded: 5,
            failed: vec![Failure {
                what: "a 1".into(),
                error: "x".into(),
            }],
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["bytes_downloaded"], 5);
        assert_eq!(v["failed"][0]["what"], "a 1");
        assert!(!r.ok());
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3), "3 B");
    }
}
