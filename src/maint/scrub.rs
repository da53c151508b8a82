//! `imgsrv scrub`: check the blob store and the publications against what
//! the catalog says, and take damaged blobs out of service.
//!
//! What it checks, in order:
//! 1. **The bytes.** Every stored blob (or a random `--sample` of them, like
//!    restic's `check --read-data-subset`; blobs whose size disagrees with
//!    the catalog are read whatever the sample) is read back and re-hashed,
//!    at most `--rate` bytes per second. A blob whose sha256 is not its name
//!    is moved to quarantine ([`crate::cas::BlobStore::quarantine`]): from
//!    then on its downloads answer `503` saying so ([`crate::download`]),
//!    and putting the right bytes back (an upload, a mirror run, a bundle
//!    import) stores it again like any missing blob.
//! 2. **The catalog against the store.** Every blob a version cites
//!    (artifacts and attachments, drafts too) is stored with the size the
//!    version declares; every blob row has its blob. A blob file without a
//!    row is only noted: garbage collection removes it.
//! 3. **The publications.** Each published version's stored manifest still
//!    hashes to its recorded digest and equals the canonical manifest of its
//!    catalog rows, and its signature verifies with the trusted keys
//!    (`DATA/keys`). A version published unsigned (verification `off`, or
//!    `warn` without a valid signature) is noted as such, not counted as a
//!    failure; one signed by a key revoked since is noted as withheld.
//!
//! Plan first (what it will read, [`Plan`]), then the problems as they are
//! found, each with the images and versions it affects, then the counts.
//! `--dry-run` prints the plan and stops, reading nothing and changing
//! nothing. One scrub at a time per catalog (job lock `scrub`); it runs
//! beside a serving server and beside GC, uploads and imports: a blob removed
//! or a version deleted while it runs is checked again before being reported.

use crate::app::App;
use crate::cas::{CasError, Quarantined, StoredBlob};
use crate::catalog::{Blob, CitedBlob, LockMode, PublishRecord, Verification};
use crate::digest::{Digest, Hasher};
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod report;
pub use report::{
    parse_rate, parse_sample, Counts, Note, NoteKind, Plan, Problem, ProblemKind, ScrubReport,
};
use report::{print_plan, print_summary};

/// The job lock a scrub holds.
pub const LOCK: &str = "scrub";
const CHUNK: usize = 1 << 20;

/// What a scrub does (the command line's or `[scrub]`'s settings).
#[derive(Debug, Clone)]
pub struct ScrubOptions {
    /// Percent of the stored blobs to re-hash, in (0, 100]; 100 reads all.
    pub sample_percent: f64,
    /// Read at most this many bytes per second; `None`: as fast as the disk.
    pub rate: Option<u64>,
    /// Print the plan and stop.
    pub dry_run: bool,
    /// Who quarantines, in the audit log.
    pub actor: String,
    /// Set to stop early (a server shutting down): the report says so.
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for ScrubOptions {
    fn default() -> Self {
        ScrubOptions {
            sample_percent: 100.0,
            rate: None,
            dry_run: false,
            actor: crate::admin_cli::local_actor(),
            stop: None,
        }
    }
}

/// Why a scrub did not run.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error("another scrub is running on this data directory (job lock {LOCK}); try again once it has finished")]
    Busy,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Everything the checks compare, read once at the start.
struct Inventory {
    stored: BTreeMap<Digest, StoredBlob>,
    cited: Vec<CitedBlob>,
    /// Indexes into `cited`, by digest.
    citations: HashMap<Digest, Vec<usize>>,
    rows: HashMap<Digest, Blob>,
    quarantined: BTreeMap<Digest, Quarantined>,
    /// Published versions: (image, version, version id).
    published: Vec<(String, String, String)>,
    drafts: u64,
}

impl Inventory {
    fn take(app: &App) -> Result<Inventory> {
        let mut stored = BTreeMap::new();
        app.blobs
            .list(&mut |b| {
                stored.insert(b.digest, b);
                true
            })
            .context("listing the blob store")?;
        let cited = app.catalog.cited_blobs().context("listing cited blobs")?;
        let mut citations: HashMap<Digest, Vec<usize>> = HashMap::new();
        for (i, c) in cited.iter().enumerate() {
            citations.entry(c.digest).or_default().push(i);
        }
        let rows = app
            .catalog
            .blob_rows()
            .context("listing blob rows")?
            .into_iter()
            .map(|b| (b.digest, b))
            .collect();
        let mut quarantined = BTreeMap::new();
        app.blobs
            .list_quarantined(&mut |q| {
                quarantined.insert(q.digest, q);
                true
            })
            .context("listing the quarantine")?;
        let mut published = Vec::new();
        for image in app.catalog.list_images(true)? {
            for v in app.catalog.list_versions(&image.name, false)? {
                if v.state == crate::catalog::VersionState::Published {
                    published.push((image.name.clone(), v.version, v.id));
                }
            }
        }
        let drafts = cited
            .iter()
            .filter(|c| !c.published)
            .map(|c| c.version_id.as_str())
            .collect::<BTreeSet<_>>()
            .len() as u64;
        Ok(Inventory {
            stored,
            cited,
            citations,
            rows,
            quarantined,
            published,
            drafts,
        })
    }

    /// The versions citing `digest`, for a problem's `affects`.
    fn affects(&self, digest: &Digest) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for &i in self.citations.get(digest).into_iter().flatten() {
            let label = version_label(&self.cited[i]);
            if !out.contains(&label) {
                out.push(label);
            }
        }
        out
    }

    /// Whether the catalog disputes the stored size of `b`.
    fn size_disputed(&self, b: &StoredBlob) -> bool {
        self.rows
            .get(&b.digest)
            .is_some_and(|r| r.size_bytes != b.size)
            || self
                .citations
                .get(&b.digest)
                .into_iter()
                .flatten()
                .any(|&i| self.cited[i].size != b.size)
    }

    /// The blobs to read: a random `percent` of the stored ones (all at
    /// 100), plus every one whose size the catalog disputes.
    fn select(&self, percent: f64, seed: &[u8; 16]) -> Vec<StoredBlob> {
        let all: Vec<&StoredBlob> = self.stored.values().collect();
        if percent >= 100.0 {
            return all.into_iter().cloned().collect();
        }
        let n = ((all.len() as f64) * percent / 100.0).ceil() as usize;
        // a random order, keyed by this run's seed
        let mut keyed: Vec<(Digest, &StoredBlob)> = all
            .into_iter()
            .map(|b| {
                let mut h = Hasher::new();
                h.update(seed);
                h.update(b.digest.as_bytes());
                (h.finish(), b)
            })
            .collect();
        keyed.sort_by_key(|k| k.0);
        let mut chosen: BTreeMap<Digest, StoredBlob> = keyed
            .iter()
            .take(n)
            .map(|(_, b)| (b.digest, (*b).clone()))
            .collect();
        for (_, b) in keyed.iter().skip(n) {
            if self.size_disputed(b) {
                chosen.insert(b.digest, (*b).clone());
            }
        }
        chosen.into_values().collect()
    }
}

fn version_label(c: &CitedBlob) -> String {
    if c.published {
        format!("{}@{}", c.image, c.version)
    } else {
        format!("{}@{} (draft)", c.image, c.version)
    }
}

/// At most `rate` bytes per second on average since `start`.
struct Pace {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Pace {
    fn add(&mut self, n: u64) {
        self.bytes += n;
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            let elapsed = self.start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }
}

/// Runs a scrub of `app`'s stores (see the module doc), writing the plan,
/// the problems and the counts to `out` as it goes.
pub fn scrub(
    app: &App,
    opts: &ScrubOptions,
    out: &mut dyn Write,
) -> Result<ScrubReport, ScrubError> {
    let lock = app
        .catalog
        .job_lock(LOCK, LockMode::Exclusive, false)
        .context("taking the scrub lock")?
        .ok_or(ScrubError::Busy)?;
    let started = Instant::now();
    let inv = Inventory::take(app)?;
    let mut seed = [0u8; 16];
    getrandom::getrandom(&mut seed).map_err(|e| anyhow::anyhow!("choosing the sample: {e}"))?;
    let selected = inv.select(opts.sample_percent, &seed);
    let plan = Plan {
        blobs_stored: inv.stored.len() as u64,
        bytes_stored: inv.stored.values().map(|b| b.size).sum(),
        blobs_to_read: selected.len() as u64,
        bytes_to_read: selected.iter().map(|b| b.size).sum(),
        sample_percent: opts.sample_percent,
        rate_bytes_per_second: opts.rate,
        blob_rows: inv.rows.len() as u64,
        published_versions: inv.published.len() as u64,
        draft_versions: inv.drafts,
        quarantined_before: inv.quarantined.len() as u64,
    };
    print_plan(out, &plan)?;
    let mut s = Scrubber {
        app,
        opts,
        inv,
        handled: BTreeSet::new(),
        read_ok: BTreeSet::new(),
        lock: Some(lock),
        report: ScrubReport {
            plan,
            dry_run: opts.dry_run,
            ..Default::default()
        },
        out,
    };
    if !opts.dry_run {
        let reading = Instant::now();
        s.read_blobs(&selected)?;
        let secs = reading.elapsed().as_secs_f64().max(1e-9);
        s.report.read_mb_per_second = s.report.counts.bytes_read as f64 / secs / 1e6;
        s.hold_lock()?;
        if !s.stopped() {
            s.check_catalog()?;
        }
        s.hold_lock()?;
        if !s.stopped() {
            s.check_publications()?;
        }
        s.report.stopped = s.stopped();
    }
    s.report.seconds = started.elapsed().as_secs_f64();
    print_summary(s.out, &s.report)?;
    if !opts.dry_run && !s.report.stopped {
        // for /metrics: the last clean scrub, wherever it ran
        let detail = format!("{} problem(s)", s.report.problems.len());
        if let Err(e) =
            app.catalog
                .record_job_run(crate::metrics::JOB_SCRUB, s.report.ok(), &detail)
        {
            log::warn!("scrub: recording the run's outcome: {e}");
        }
    }
    Ok(s.report)
}

struct Scrubber<'a> {
    app: &'a App,
    opts: &'a ScrubOptions,
    inv: Inventory,
    /// Blobs already reported (quarantined by this run).
    handled: BTreeSet<Digest>,
    /// Blobs read back whole and right.
    read_ok: BTreeSet<Digest>,
    /// The job lock; `None` once it was lost to another scrub (the run stops).
    lock: Option<crate::catalog::JobLock>,
    report: ScrubReport,
    out: &'a mut dyn Write,
}

impl Scrubber<'_> {
    fn stopped(&self) -> bool {
        self.lock.is_none()
            || self
                .opts
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// Checks the job lock before the next step ([`crate::catalog::JobLock::check`]:
    /// on PostgreSQL a restart of the database frees it under its holder). A lost lock
    /// is taken again if it is free, and the run goes on: what it judged before holds,
    /// since a second scrub at the same time only repeats the same checks. If another
    /// scrub has it now, this one stops (that one does the work) and says why.
    fn hold_lock(&mut self) -> Result<()> {
        let Some(Err(e)) = self.lock.as_ref().map(|l| l.check()) else {
            return Ok(());
        };
        self.lock = None;
        let again = self
            .app
            .catalog
            .job_lock(LOCK, LockMode::Exclusive, false)
            .context("taking the scrub lock again")?;
        let detail = match &again {
            Some(_) => format!("{e}; taken again, the checks go on"),
            None => format!("{e}; another scrub holds it now, so this one stops"),
        };
        self.lock = again;
        self.note(NoteKind::LockLost, format!("job lock {LOCK}"), detail)
    }

    fn problem(
        &mut self,
        kind: ProblemKind,
        subject: String,
        detail: String,
        affects: Vec<String>,
    ) -> Result<()> {
        writeln!(self.out, "PROBLEM {} {subject}: {detail}", kind.as_str())?;
        if !affects.is_empty() {
            writeln!(self.out, "    affects {}", affects.join(", "))?;
        }
        self.report.problems.push(Problem {
            kind,
            subject,
            detail,
            affects,
        });
        Ok(())
    }

    fn note(&mut self, kind: NoteKind, subject: String, detail: String) -> Result<()> {
        writeln!(self.out, "note: {subject}: {detail}")?;
        self.report.notes.push(Note {
            kind,
            subject,
            detail,
        });
        Ok(())
    }

    /// Re-hashes the selected blobs; quarantines the damaged ones.
    fn read_blobs(&mut self, selected: &[StoredBlob]) -> Result<()> {
        let mut pace = Pace {
            rate: self.opts.rate,
            start: Instant::now(),
            bytes: 0,
        };
        for b in selected {
            self.hold_lock()?;
            if self.stopped() {
                return Ok(());
            }
            let (actual, len) = match self.hash(b, &mut pace) {
                Ok(Some(h)) => h,
                Ok(None) => continue,
                Err(e) => {
                    // not quarantined: a failing disk may read it right next time
                    let affects = self.inv.affects(&b.digest);
                    let detail = format!("it cannot be read: {e:#}");
                    self.handled.insert(b.digest);
                    self.problem(
                        ProblemKind::Unreadable,
                        b.digest.to_string(),
                        detail,
                        affects,
                    )?;
                    continue;
                }
            };
            self.report.counts.blobs_read += 1;
            if actual == b.digest && len == b.size {
                self.report.counts.blobs_ok += 1;
                self.read_ok.insert(b.digest);
                self.vouch(&b.digest)?;
                continue;
            }
            // (a quarantine only under the lock: another scrub may have it by now)
            self.hold_lock()?;
            if self.stopped() {
                return Ok(());
            }
            let reason = format!(
                "its {len} bytes hash to {actual}, not to its name (the catalog gives {} bytes)",
                self.inv
                    .rows
                    .get(&b.digest)
                    .map_or("no size: no row".to_string(), |r| r.size_bytes.to_string())
            );
            self.damaged(&b.digest, reason)?;
        }
        Ok(())
    }

    /// Has the store stamp a blob read back right that it could not vouch for
    /// (S3: no `x-amz-meta-sha256`, so not served): it is served again.
    fn vouch(&mut self, digest: &Digest) -> Result<()> {
        match self.app.blobs.vouch(digest) {
            Ok(false) => Ok(()),
            Ok(true) => {
                self.report.counts.restamped += 1;
                self.note(
                    NoteKind::Restamped,
                    digest.to_string(),
                    "its bytes are right, but the store had not stamped the object (put \
                     there by another tool): stamped now, and served again"
                        .to_string(),
                )
            }
            Err(e) => {
                let affects = self.inv.affects(digest);
                self.problem(
                    ProblemKind::Unreadable,
                    digest.to_string(),
                    format!(
                        "its bytes are right, but it is not stamped and could not be \
                         stamped ({e}): it is not served until it is"
                    ),
                    affects,
                )
            }
        }
    }

    /// sha256 and length of a stored blob as read now; `None` when it is
    /// gone (removed since it was listed) or the scrub is stopping.
    fn hash(&mut self, b: &StoredBlob, pace: &mut Pace) -> Result<Option<(Digest, u64)>> {
        let mut r = match self.app.blobs.open_range(&b.digest, 0, b.size) {
            Ok(r) => r,
            Err(CasError::NotFound(_)) => {
                self.report.counts.gone += 1;
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("opening blob {}", b.digest)),
        };
        let mut h = Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            if self.stopped() {
                return Ok(None);
            }
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("reading blob {}", b.digest));
                }
            };
            h.update(&buf[..n]);
            self.report.counts.bytes_read += n as u64;
            pace.add(n as u64);
        }
        let len = h.len();
        Ok(Some((h.finish(), len)))
    }

    /// Quarantines a blob whose bytes are wrong, and reports it.
    fn damaged(&mut self, digest: &Digest, reason: String) -> Result<()> {
        let affects = self.inv.affects(digest);
        match self.app.blobs.quarantine(digest, &reason) {
            Ok(true) => {}
            Ok(false) => {
                self.report.counts.gone += 1;
                return Ok(());
            }
            Err(e) => {
                self.report.counts.damaged += 1;
                self.handled.insert(*digest);
                let detail = format!(
                    "{reason}; it could NOT be quarantined ({e}) and is still served: move it \
                     out of the store by hand"
                );
                return self.problem(ProblemKind::Damaged, digest.to_string(), detail, affects);
            }
        }
        self.report.counts.damaged += 1;
        self.handled.insert(*digest);
        let at = self
            .app
            .blobs
            .quarantined(digest)
            .ok()
            .flatten()
            .map_or_else(String::new, |q| format!(" ({})", q.location));
        if let Err(e) = crate::admin_cli::record_as(
            self.app.catalog.as_ref(),
            &self.opts.actor,
            "blob.quarantine",
            &digest.to_string(),
            serde_json::json!({ "reason": reason, "affects": affects }),
        ) {
            log::error!("scrub: quarantined {digest} but could not audit it: {e:#}");
        }
        let detail = format!("{reason}; moved to quarantine{at}, its downloads now answer 503");
        self.problem(ProblemKind::Damaged, digest.to_string(), detail, affects)
    }

    /// Whether `digest` is still missing from the store and still needed,
    /// asked again now (a GC or a deletion may have run since the listing).
    fn still_missing(&self, digest: &Digest, cited: bool) -> Result<bool> {
        if self.app.blobs.stat(digest)?.is_some() {
            return Ok(false);
        }
        Ok(if cited {
            !self.app.catalog.blob_references(digest)?.is_empty()
        } else {
            self.app.catalog.get_blob(digest)?.is_some()
        })
    }

    /// The catalog against the store: cited blobs and blob rows without
    /// their bytes, sizes that disagree, blob files without a row, blobs
    /// quarantined earlier and repaired since.
    fn check_catalog(&mut self) -> Result<()> {
        let mut digests: Vec<Digest> = self.inv.citations.keys().copied().collect();
        digests.sort();
        for d in &digests {
            // each one may ask the store (an S3 HEAD): a server shutting down
            // does not wait for all of them
            if self.stopped() {
                return Ok(());
            }
            if self.handled.contains(d) {
                continue;
            }
            match self.inv.stored.get(d).map(|b| b.size) {
                None => {
                    if self.still_missing(d, true)? {
                        self.missing(d)?;
                    }
                }
                Some(size) => self.check_sizes(d, size)?,
            }
        }
        let rows: Vec<(Digest, u64)> = self
            .inv
            .rows
            .values()
            .filter(|r| !self.inv.citations.contains_key(&r.digest))
            .map(|r| (r.digest, r.size_bytes))
            .collect();
        for (d, _) in rows {
            if self.stopped() {
                return Ok(());
            }
            if self.handled.contains(&d) || self.inv.stored.contains_key(&d) {
                continue;
            }
            if self.still_missing(&d, false)? {
                self.missing(&d)?;
            }
        }
        let unreferenced: Vec<StoredBlob> = self
            .inv
            .stored
            .values()
            .filter(|b| !self.inv.rows.contains_key(&b.digest) && !self.handled.contains(&b.digest))
            .cloned()
            .collect();
        for b in unreferenced {
            self.report.counts.unreferenced += 1;
            self.note(
                NoteKind::Unreferenced,
                b.digest.to_string(),
                format!(
                    "{} bytes in the store with no catalog row: unreferenced; gc collects it",
                    b.size
                ),
            )?;
        }
        let repaired: Vec<Quarantined> = self
            .inv
            .quarantined
            .values()
            .filter(|q| {
                self.inv.stored.contains_key(&q.digest) && !self.handled.contains(&q.digest)
            })
            .cloned()
            .collect();
        for q in repaired {
            self.report.counts.repaired += 1;
            let checked = if self.read_ok.contains(&q.digest) {
                "read back right by this scrub"
            } else {
                "not in this run's sample"
            };
            self.note(
                NoteKind::Repaired,
                q.digest.to_string(),
                format!(
                    "quarantined {} ({}), its right bytes are back in the store ({checked}); \
                     the damaged copy is kept at {}: inspect it, then remove it and its \
                     .reason note",
                    q.at, q.reason, q.location
                ),
            )?;
        }
        Ok(())
    }

    /// Reports a blob the catalog needs and the store does not have.
    fn missing(&mut self, d: &Digest) -> Result<()> {
        self.report.counts.missing += 1;
        let affects = self.inv.affects(d);
        let cited = if affects.is_empty() {
            "its catalog row has no blob (no version cites it)"
        } else {
            "cited, but not in the blob store"
        };
        match self.inv.quarantined.get(d) {
            Some(q) => {
                let detail = format!(
                    "{cited}: quarantined {} ({}); put the right bytes back to repair it",
                    q.at, q.reason
                );
                self.problem(ProblemKind::Quarantined, d.to_string(), detail, affects)
            }
            None => self.problem(
                ProblemKind::Missing,
                d.to_string(),
                cited.to_string(),
                affects,
            ),
        }
    }

    /// A stored blob's size against its row and its citations.
    fn check_sizes(&mut self, d: &Digest, size: u64) -> Result<()> {
        let row = self.inv.rows.get(d).map(|r| r.size_bytes);
        let declared: BTreeSet<u64> = self
            .inv
            .citations
            .get(d)
            .into_iter()
            .flatten()
            .map(|&i| self.inv.cited[i].size)
            .collect();
        let mut wrong = Vec::new();
        if let Some(r) = row.filter(|&r| r != size) {
            wrong.push(format!("its blob row says {r} bytes"));
        }
        if row.is_none() {
            wrong.push("it has no blob row".to_string());
        }
        for s in declared.iter().filter(|&&s| s != size) {
            wrong.push(format!("a version declares {s} bytes"));
        }
        if wrong.is_empty() {
            return Ok(());
        }
        self.report.counts.wrong_size += 1;
        let state = if self.read_ok.contains(d) {
            "its bytes hash to its name, so the catalog is wrong (edited outside imgsrv?)"
        } else {
            "not read"
        };
        let detail = format!(
            "stored with {size} bytes, but {} ({state})",
            wrong.join(", ")
        );
        let affects = self.inv.affects(d);
        self.problem(ProblemKind::WrongSize, d.to_string(), detail, affects)
    }

    /// Each published version's manifest and signature.
    fn check_publications(&mut self) -> Result<()> {
        let keys = match self.app.trusted_keys() {
            Ok(k) => Some(k),
            Err(e) => {
                self.problem(
                    ProblemKind::Keys,
                    "trusted keys (in the catalog)".to_string(),
                    format!("the trusted keys cannot be read ({e}): no signature was checked"),
                    Vec::new(),
                )?;
                None
            }
        };
        let published = std::mem::take(&mut self.inv.published);
        for (image, version, id) in &published {
            if self.stopped() {
                break;
            }
            let label = format!("{image}@{version}");
            let record = match self.app.catalog.publish_record(id) {
                Ok(r) => r,
                Err(e) => {
                    self.report.counts.manifests_bad += 1;
                    let detail = format!("its publication record cannot be read: {e}");
                    self.problem(ProblemKind::Manifest, label.clone(), detail, vec![label])?;
                    continue;
                }
            };
            self.check_manifest(image, version, &label, &record)?;
            if let Some(keys) = &keys {
                self.check_signature(&label, &record, keys)?;
            }
        }
        self.inv.published = published;
        Ok(())
    }

    /// The stored manifest against its digest and the version's rows.
    fn check_manifest(
        &mut self,
        image: &str,
        version: &str,
        label: &str,
        record: &PublishRecord,
    ) -> Result<()> {
        let mut wrong = Vec::new();
        let actual = Digest::of(&record.manifest);
        if actual != record.manifest_digest {
            wrong.push(format!(
                "the stored manifest hashes to {actual}, not to the {} recorded when it was \
                 published (the record was edited)",
                record.manifest_digest
            ));
        }
        let view = self.app.catalog.version_view(image, version)?;
        if crate::manifest::canonical(&view) != record.manifest {
            wrong.push(
                "the stored manifest differs from the one the version's catalog rows give \
                 (the record or the rows were edited outside imgsrv)"
                    .to_string(),
            );
        }
        if wrong.is_empty() {
            return Ok(());
        }
        self.report.counts.manifests_bad += 1;
        self.problem(
            ProblemKind::Manifest,
            label.to_string(),
            wrong.join("; "),
            vec![label.to_string()],
        )
    }

    /// The signature over the stored manifest, with the trusted keys.
    fn check_signature(
        &mut self,
        label: &str,
        record: &PublishRecord,
        keys: &[crate::sign::TrustedKey],
    ) -> Result<()> {
        let how = match record.verification {
            Verification::Verified => None,
            Verification::Unverified => Some("unverified (verification mode warn)"),
            Verification::Skipped => Some("with verification off"),
        };
        if let Some(how) = how {
            self.report.counts.unsigned += 1;
            return self.note(
                NoteKind::Unsigned,
                label.to_string(),
                format!("published {how}: no signature to check"),
            );
        }
        let Some(sig) = record.signature.as_deref() else {
            self.report.counts.signatures_failed += 1;
            return self.problem(
                ProblemKind::Signature,
                label.to_string(),
                "recorded as verified, but no signature is stored".to_string(),
                vec![label.to_string()],
            );
        };
        let failed = match crate::sign::verify_signed_by(keys, &record.manifest, sig) {
            Ok((k, _)) if Some(&k.key_id) != record.signer_key_id.as_ref() => format!(
                "signed by key {} ({}), but the record names key {}",
                k.name,
                k.key_id,
                record.signer_key_id.as_deref().unwrap_or("-")
            ),
            Ok((k, _)) if k.policy.state == crate::sign::KeyState::Revoked => {
                self.report.counts.withheld += 1;
                return self.note(
                    NoteKind::Withheld,
                    label.to_string(),
                    format!(
                        "signed by key {} ({}), revoked since: withheld (its bytes answer 410)",
                        k.name, k.key_id
                    ),
                );
            }
            Ok(_) => {
                self.report.counts.signatures_verified += 1;
                return Ok(());
            }
            Err(crate::sign::SignError::UnknownKey(id)) => format!(
                "signed by key {id}, which is not in the trusted keys any more (`imgsrv key \
                 add` it back, retired, to keep verifying what it signed)"
            ),
            Err(e @ crate::sign::SignError::BadSignature { .. }) => e.to_string(),
            Err(e) => format!("the signature does not verify: {e}"),
        };
        self.report.counts.signatures_failed += 1;
        self.problem(
            ProblemKind::Signature,
            label.to_string(),
            failed,
            vec![label.to_string()],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::hooked::{Call, Hooked};
    use std::sync::atomic::AtomicUsize;

    /// A scrub told to stop while it checks the catalog against the store
    /// stops there: one question to the store, not one per blob row (each an
    /// S3 HEAD on the full deployment, which a shutting-down server waited
    /// for), and the report says it stopped (so it is not recorded as clean).
    #[test]
    fn a_stop_during_the_catalog_pass_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        crate::app::init(dir.path(), &[]).unwrap();
        let mut app = App::open(crate::config::Config::load(dir.path(), None).unwrap()).unwrap();
        // 50 blob rows whose bytes are not in the store
        for i in 0..50u32 {
            let d = Digest::of(&i.to_be_bytes());
            app.catalog.insert_blob(&d, 4, None).unwrap();
        }
        // the store raises the stop flag at its first `stat` (as a server shutting
        // down would while a scrub asks the store about a missing blob), and counts
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (stop.clone(), stats.clone());
        app.blobs = Arc::new(Hooked {
            inner: app.blobs.clone(),
            hook: move |call| {
                if let Call::Stat(_) = call {
                    count.fetch_add(1, Ordering::SeqCst);
                    flag.store(true, Ordering::SeqCst);
                }
            },
        });
        let opts = ScrubOptions {
            stop: Some(stop),
            ..ScrubOptions::default()
        };
        let report = scrub(&app, &opts, &mut Vec::new()).unwrap();
        assert!(report.stopped);
        assert_eq!(stats.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_pace_holds_the_rate() {
        let mut p = Pace {
            rate: Some(10 << 20),
            start: Instant::now(),
            bytes: 0,
        };
        p.add(2 << 20);
        let t = p.start.elapsed();
        assert!(t >= Duration::from_millis(195), "{t:?}");
        let mut free = Pace {
            rate: None,
            start: Instant::now(),
            bytes: 0,
        };
        free.add(1 << 40);
        assert!(free.start.elapsed() < Duration::from_millis(50));
    }
}
