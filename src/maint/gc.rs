//! Garbage collection: reclaims what nothing needs any more, and applies the
//! retention policy.
//!
//! # What is live
//!
//! The rule is [`keeps`], and nothing else decides it. A blob is kept while
//! any of these claims it:
//! * a draft (or a version being published) cites it: a publisher is working
//!   on it;
//! * a published version cites it that is not collected: a retired version
//!   keeps its bytes until garbage collection collects it, `grace` after its
//!   retirement; every other published version keeps them forever;
//! * an upload session that has not expired expects it: one still uploading,
//!   or one that is ready and whose blob no version has cited since;
//! * a job pinned it and the pin has not expired ([`crate::app::Lease`]: a
//!   mirror run or a bundle import between the ingest and the draft).
//!
//! A blob nothing claims is collected once it is older than `grace` (its row,
//! or its file when it has no row). With any grace, including 0, the rule
//! never takes a blob something still needs, because the claim and the
//! deletion cannot interleave:
//! * the row is deleted in one catalog transaction that reads the claims
//!   again ([`crate::catalog::MaintCatalog::delete_blob_rows`]): a draft, session or pin
//!   committed before it keeps the blob, one committed after it finds no row
//!   (and the writer stores the bytes again);
//! * every write to the store checks what is stored, stores, records and
//!   claims it while holding the `blobs` job lock shared
//!   ([`App::blob_write_lock`]); the collector deletes rows and files only
//!   while holding it exclusively. So a writer never sees a file that is
//!   about to go, and a temp file the collector sees is one no write is using.
//!
//! The row goes first, then the file: a crash in between leaves a file with
//! no row (collected by the next run), never a row without its file.
//!
//! # Order
//!
//! Plan (read only, printed): retirements the retention policy asks for,
//! retired versions past their grace, expired upload sessions, leftovers,
//! blob rows and files nothing claims. Apply, in that order, each item on its
//! own: a failure is counted and the next item goes on.

use crate::app::App;
use crate::cas::{Leftover, LeftoverKind};
use crate::catalog::{
    Blob, Claim, LockMode, RetiredVersion, UploadSession, UploadState, VersionState,
};
use crate::config::RetentionRule;
use crate::digest::Digest;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

/// The job lock every blob write holds shared and the collector exclusively.
pub const BLOBS_LOCK: &str = "blobs";
/// One garbage collection at a time (per catalog: across processes).
const GC_LOCK: &str = "gc";
/// Blob rows deleted per catalog transaction.
const BATCH: usize = 256;
/// The collector gives writers a turn this often.
const LOCK_SLICE: Duration = Duration::from_millis(200);

/// What to run with.
#[derive(Debug, Clone)]
pub struct GcOptions {
    pub grace: Duration,
    pub retention: Vec<RetentionRule>,
    /// Who the retention policy retires as (audit log, retirement records).
    pub actor: String,
}

/// Whether `claims` keep a blob at time `now` (RFC 3339, the catalog's
/// format), when the versions in `collecting` are (about to be) collected.
/// The one rule for what is live: see the module documentation.
pub fn keeps(claims: &[Claim], now: &str, collecting: &HashSet<String>) -> bool {
    claims.iter().any(|c| match c {
        Claim::Version {
            version_id,
            state,
            collected,
            ..
        } => *state != VersionState::Published || !(*collected || collecting.contains(version_id)),
        Claim::Upload {
            state: UploadState::Created | UploadState::Uploading,
            expires_at,
            ..
        } => expires_at.as_str() > now,
        // A finished upload bridges the time from its blob's arrival to the
        // draft that cites it: once a version cited the blob after that, the
        // version's claim is what counts (a retired version's bytes are not
        // kept for a day by the session that uploaded them).
        Claim::Upload {
            state: UploadState::Ready,
            expires_at,
            updated_at,
            ..
        } => {
            expires_at.as_str() > now
                && !claims
                    .iter()
                    .any(|c| matches!(c, Claim::Version { cited_at, .. } if cited_at >= updated_at))
        }
        Claim::Upload { .. } => false,
        Claim::Pin { expires_at, .. } => expires_at.as_str() > now,
    })
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn ago(d: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// A retirement the retention policy asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRetirement {
    pub image: String,
    pub version: String,
    pub reason: String,
}

/// What a run would do.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// When the plan was made (RFC 3339): claims are judged at this time.
    pub now: String,
    /// Rows and files stored before this are old enough to collect.
    pub cutoff: String,
    pub retire: Vec<PlannedRetirement>,
    /// Retired versions whose grace is over.
    pub collect: Vec<RetiredVersion>,
    pub uploads: Vec<UploadSession>,
    pub leftovers: Vec<Leftover>,
    /// Blob rows nothing claims (their files go with them).
    pub blobs: Vec<Blob>,
    /// Files with no row that nothing claims.
    pub files: Vec<(Digest, u64)>,
}

impl Plan {
    /// Bytes the blobs and files of the plan hold.
    pub fn blob_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.size_bytes).sum::<u64>()
            + self.files.iter().map(|f| f.1).sum::<u64>()
    }
    pub fn leftover_bytes(&self) -> u64 {
        self.leftovers.iter().map(|l| l.bytes).sum()
    }
    /// The plan as lines for a person (counts, bytes, names).
    pub fn describe(&self) -> Vec<String> {
        let mut out = vec![format!(
            "plan: retire {} version(s), collect {} retired version(s), remove {} expired \
             upload(s), {} leftover(s) ({} bytes), {} blob(s) and {} stray file(s) ({} bytes)",
            self.retire.len(),
            self.collect.len(),
            self.uploads.len(),
            self.leftovers.len(),
            self.leftover_bytes(),
            self.blobs.len(),
            self.files.len(),
            self.blob_bytes()
        )];
        for r in &self.retire {
            out.push(format!("  retire {}@{}: {}", r.image, r.version, r.reason));
        }
        for c in &self.collect {
            out.push(format!(
                "  collect {}@{} (retired {})",
                c.image, c.version, c.retirement.retired_at
            ));
        }
        for u in &self.uploads {
            out.push(format!(
                "  expired upload {} ({}, expired {})",
                u.id,
                u.state.as_str(),
                u.expires_at
            ));
        }
        for l in &self.leftovers {
            let kind = match l.kind {
                LeftoverKind::Temp => "temp file",
                LeftoverKind::Staged => "staged parts of upload",
            };
            out.push(format!("  {kind} {} ({} bytes)", l.name, l.bytes));
        }
        for b in &self.blobs {
            out.push(format!("  blob {} ({} bytes)", b.digest, b.size_bytes));
        }
        for (d, n) in &self.files {
            out.push(format!("  stray blob file {d} ({n} bytes, no catalog row)"));
        }
        out
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub retired: usize,
    pub collected_versions: usize,
    pub uploads_removed: usize,
    pub leftovers_removed: usize,
    pub blobs_removed: usize,
    pub files_removed: usize,
    /// Blobs of the plan something claimed by the time they were reached.
    pub kept: usize,
    pub bytes_freed: u64,
    pub failures: Vec<String>,
}

impl Report {
    pub fn describe(&self) -> String {
        format!(
            "gc: retired {}, collected {} retired version(s), removed {} expired upload(s), \
             {} leftover(s), {} blob(s), {} stray file(s); {} bytes freed; {} kept (claimed \
             since the plan); {} failure(s)",
            self.retired,
            self.collected_versions,
            self.uploads_removed,
            self.leftovers_removed,
            self.blobs_removed,
            self.files_removed,
            self.bytes_freed,
            self.kept,
            self.failures.len()
        )
    }
}

/// Computes what a run would do now; changes nothing.
pub fn plan(app: &App, opts: &GcOptions) -> anyhow::Result<Plan> {
    let now = rfc3339(chrono::Utc::now());
    let cutoff = rfc3339(ago(opts.grace));
    let retire = retention_plan(app, &opts.retention)?;
    let collect: Vec<RetiredVersion> = app
        .catalog
        .retirements()?
        .into_iter()
        .filter(|r| r.retirement.collected_at.is_none() && r.retirement.retired_at <= cutoff)
        .collect();
    let mut collecting: HashSet<String> = collect
        .iter()
        .map(|r| r.retirement.version_id.clone())
        .collect();
    if opts.grace.is_zero() {
        // retired by this run and collected by it at once
        for r in &retire {
            collecting.insert(app.catalog.get_version(&r.image, &r.version)?.id);
        }
    }
    let uploads = app.catalog.expired_uploads(&now)?;
    let gone: HashSet<&str> = uploads.iter().map(|u| u.id.as_str()).collect();
    let mut leftovers = Vec::new();
    for l in app.blobs.leftovers()? {
        let orphan = match l.kind {
            LeftoverKind::Temp => true,
            // the parts of an expired session go with it
            LeftoverKind::Staged => {
                gone.contains(l.name.as_str()) || !session_exists(app, &l.name)?
            }
        };
        if orphan {
            leftovers.push(l);
        }
    }
    let mut claims: HashMap<Digest, Vec<Claim>> = HashMap::new();
    for (d, c) in app.catalog.blob_claims(None)? {
        claims.entry(d).or_default().push(c);
    }
    let unclaimed = |d: &Digest| !keeps(claims.get(d).map_or(&[][..], |v| v), &now, &collecting);
    let rows = app.catalog.blob_rows()?;
    let with_row: HashSet<Digest> = rows.iter().map(|b| b.digest).collect();
    let blobs: Vec<Blob> = rows
        .into_iter()
        .filter(|b| b.created_at <= cutoff && unclaimed(&b.digest))
        .collect();
    let file_cutoff = SystemTime::now()
        .checked_sub(opts.grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut files = Vec::new();
    app.blobs.list(&mut |b| {
        if !with_row.contains(&b.digest) && b.stored_at <= file_cutoff && unclaimed(&b.digest) {
            files.push((b.digest, b.size));
        }
        true
    })?;
    Ok(Plan {
        now,
        cutoff,
        retire,
        collect,
        uploads,
        leftovers,
        blobs,
        files,
    })
}

fn session_exists(app: &App, id: &str) -> anyhow::Result<bool> {
    match app.catalog.get_upload(id) {
        Ok(_) => Ok(true),
        Err(crate::catalog::CatalogError::NotFound(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The versions the retention rules retire: per image, the first rule
/// matching its name; of its published, unretired versions (newest first),
/// those beyond the newest `keep_latest` that were published longer than
/// `min_age` ago and that no alias points at.
fn retention_plan(app: &App, rules: &[RetentionRule]) -> anyhow::Result<Vec<PlannedRetirement>> {
    let mut out = Vec::new();
    if rules.is_empty() {
        return Ok(out);
    }
    let patterns: Vec<glob::Pattern> = rules
        .iter()
        .map(|r| glob::Pattern::new(&r.images))
        .collect::<Result<_, _>>()?;
    for image in app.catalog.list_images(false)? {
        let Some(i) = patterns.iter().position(|p| p.matches(&image.name)) else {
            continue;
        };
        let rule = &rules[i];
        let aliased: HashSet<String> = app
            .catalog
            .list_aliases(&image.name)?
            .into_iter()
            .map(|a| a.version_id)
            .collect();
        let mut versions = app.catalog.list_versions(&image.name, false)?;
        // newest publication first
        versions.sort_by(|a, b| b.published_at.cmp(&a.published_at));
        let old = rfc3339(ago(rule.min_age));
        for v in versions.into_iter().skip(rule.keep_latest) {
            let published = v.published_at.clone().unwrap_or_default();
            if published > old || aliased.contains(&v.id) {
                continue;
            }
            out.push(PlannedRetirement {
                image: image.name.clone(),
                version: v.version,
                reason: format!(
                    "retention policy (images = {:?}, keep_latest = {}, min_age = {}s)",
                    rule.images,
                    rule.keep_latest,
                    rule.min_age.as_secs()
                ),
            });
        }
    }
    Ok(out)
}

/// Applies `plan`: every item on its own, failures counted. Claims are judged
/// again, at the time each blob is reached.
pub fn apply(app: &App, plan: &Plan, opts: &GcOptions) -> anyhow::Result<Report> {
    let _one = app
        .catalog
        .job_lock(GC_LOCK, LockMode::Exclusive, true)?
        .ok_or_else(|| anyhow::anyhow!("the gc lock was not granted"))?;
    let mut report = Report::default();
    let audit = |action: &str, target: &str, detail: serde_json::Value| {
        crate::admin_cli::record_as(app.catalog.as_ref(), &opts.actor, action, target, detail)
    };
    let fail = |report: &mut Report, what: String, e: &dyn std::fmt::Display| {
        log::warn!("gc: {what}: {e}");
        report.failures.push(format!("{what}: {e}"));
    };
    let mut collecting: HashSet<String> = HashSet::new();
    for r in &plan.retire {
        match app.retire(&r.image, &r.version, &r.reason, None, Some(&opts.actor)) {
            Ok(t) => {
                report.retired += 1;
                let _ = audit(
                    "version.retire",
                    &format!("{}@{}", r.image, r.version),
                    serde_json::json!({ "reason": r.reason }),
                );
                if opts.grace.is_zero() {
                    collecting.insert(t.version_id);
                }
            }
            Err(e) => fail(
                &mut report,
                format!("retiring {}@{}", r.image, r.version),
                &e,
            ),
        }
    }
    let mut to_collect: Vec<(String, String)> = plan
        .collect
        .iter()
        .map(|c| {
            (
                c.retirement.version_id.clone(),
                format!("{}@{}", c.image, c.version),
            )
        })
        .collect();
    for r in &plan.retire {
        if let Ok(v) = app.catalog.get_version(&r.image, &r.version) {
            if collecting.contains(&v.id) {
                to_collect.push((v.id, format!("{}@{}", r.image, r.version)));
            }
        }
    }
    for (id, name) in to_collect {
        match app.catalog.collect_version(&id) {
            Ok(()) => {
                report.collected_versions += 1;
                collecting.insert(id);
                let _ = audit("version.collect", &name, serde_json::json!({}));
            }
            Err(e) => fail(&mut report, format!("collecting {name}"), &e),
        }
    }
    for u in &plan.uploads {
        // the row only: its staged parts are a leftover of the plan
        match app.catalog.delete_upload(&u.id, &plan.now) {
            Ok(true) => report.uploads_removed += 1,
            Ok(false) => {}
            Err(e) => fail(&mut report, format!("removing upload {}", u.id), &e),
        }
    }
    let mut slice = Slice::new(app)?;
    for l in &plan.leftovers {
        slice.turn(app, &mut report)?;
        if l.kind == LeftoverKind::Staged && session_exists(app, &l.name)? {
            continue;
        }
        match app.blobs.remove_leftover(l) {
            Ok(n) => {
                slice.removed(format!("leftover {}", l.name));
                report.leftovers_removed += 1;
                report.bytes_freed += n;
            }
            Err(e) => fail(&mut report, format!("removing leftover {}", l.name), &e),
        }
    }
    let now = rfc3339(chrono::Utc::now());
    for batch in plan.blobs.chunks(BATCH) {
        slice.turn(app, &mut report)?;
        let mut keep = |row: &Blob, claims: &[Claim]| {
            row.created_at > plan.cutoff || keeps(claims, &now, &collecting)
        };
        let digests: Vec<Digest> = batch.iter().map(|b| b.digest).collect();
        let deleted = match app.catalog.delete_blob_rows(&digests, &mut keep) {
            Ok(d) => d,
            Err(e) => {
                fail(
                    &mut report,
                    format!("removing {} blob row(s)", batch.len()),
                    &e,
                );
                continue;
            }
        };
        report.kept += batch.len() - deleted.len();
        for b in deleted {
            match app.blobs.delete(&b.digest) {
                Ok(_) => {
                    slice.removed(format!("blob {}", b.digest));
                    report.blobs_removed += 1;
                    report.bytes_freed += b.size_bytes;
                }
                // the row is gone: the file is a stray one for the next run
                Err(e) => fail(&mut report, format!("removing blob file {}", b.digest), &e),
            }
        }
    }
    for (d, size) in &plan.files {
        slice.turn(app, &mut report)?;
        let claimed = app.catalog.get_blob(d)?.is_some()
            || keeps(
                &app.catalog
                    .blob_claims(Some(d))?
                    .into_iter()
                    .map(|c| c.1)
                    .collect::<Vec<_>>(),
                &now,
                &collecting,
            );
        if claimed {
            report.kept += 1;
            continue;
        }
        match app.blobs.delete(d) {
            Ok(true) => {
                slice.removed(format!("stray file {d}"));
                report.files_removed += 1;
                report.bytes_freed += size;
            }
            Ok(false) => {}
            Err(e) => fail(&mut report, format!("removing stray file {d}"), &e),
        }
    }
    slice.check(&mut report);
    drop(slice);
    if let Err(e) = app.catalog.release_pins("") {
        fail(&mut report, "removing expired pins".into(), &e);
    }
    Ok(report)
}

/// The `blobs` lock held exclusively, given back to writers every
/// [`LOCK_SLICE`] so that uploads and mirrors are only ever held up briefly.
///
/// A lock kept in a database session is lost when the database restarts, and a writer
/// may then check for a blob, find it, and record it while it is being deleted. So the
/// lock is checked after every step ([`crate::catalog::JobLock::check`]): a check that
/// passes proves no writer came in between, and one that fails names what was deleted
/// since the last good check (for `imgsrv scrub` to confirm), then the lock is taken
/// anew and the run goes on (every deletion after that is judged again under it).
struct Slice {
    held: Option<crate::catalog::JobLock>,
    since: Instant,
    /// Deleted since the lock was last checked.
    unconfirmed: Vec<String>,
}

impl Slice {
    fn new(app: &App) -> anyhow::Result<Slice> {
        let mut s = Slice {
            held: None,
            since: Instant::now(),
            unconfirmed: Vec::new(),
        };
        s.take(app)?;
        Ok(s)
    }

    fn removed(&mut self, what: String) {
        self.unconfirmed.push(what);
    }

    /// Checks the lock: `false`, and a failure in `report`, if it was lost.
    fn check(&mut self, report: &mut Report) -> bool {
        let Some(Err(e)) = self.held.as_ref().map(|l| l.check()) else {
            self.unconfirmed.clear();
            return true;
        };
        let n = self.unconfirmed.len();
        let mut named: Vec<&str> = self
            .unconfirmed
            .iter()
            .take(10)
            .map(String::as_str)
            .collect();
        let more = format!("and {} more", n.saturating_sub(10));
        if n > 10 {
            named.push(&more);
        }
        let what = match n {
            0 => "nothing was deleted since it was last checked".to_string(),
            _ => format!(
                "{n} item(s) deleted since it was last checked may have been stored and \
                 recorded again by a writer meanwhile ({}): run `imgsrv scrub` to find a \
                 catalog row whose bytes are gone",
                named.join(", ")
            ),
        };
        log::warn!("gc: {e}; {what}");
        report.failures.push(format!("{e}; {what}"));
        self.unconfirmed.clear();
        self.held = None;
        false
    }

    fn take(&mut self, app: &App) -> anyhow::Result<()> {
        self.held = Some(
            app.catalog
                .job_lock(BLOBS_LOCK, LockMode::Exclusive, true)?
                .ok_or_else(|| anyhow::anyhow!("the blobs lock was not granted"))?,
        );
        self.since = Instant::now();
        Ok(())
    }

    fn turn(&mut self, app: &App, report: &mut Report) -> anyhow::Result<()> {
        if !self.check(report) {
            return self.take(app);
        }
        if self.since.elapsed() >= LOCK_SLICE {
            self.held = None;
            self.take(app)?;
        }
        Ok(())
    }
}

/// A run: its plan, and its report unless it was a dry run.
pub struct Run {
    pub plan: Plan,
    pub report: Option<Report>,
}

/// Plans and, unless `dry_run`, applies; prints the plan and the report
/// through `say`, and records the outcome of a run that was not a dry run
/// (failed too) in the catalog, for `/metrics` wherever it ran (the command
/// line and `serve` alike).
pub fn run(
    app: &App,
    opts: &GcOptions,
    dry_run: bool,
    say: &mut dyn FnMut(&str),
) -> anyhow::Result<Run> {
    let done = plan_and_apply(app, opts, dry_run, say);
    if !dry_run {
        let (ok, detail) = match &done {
            Ok(Run {
                report: Some(r), ..
            }) => (r.failures.is_empty(), r.describe()),
            Ok(_) => (true, String::new()),
            Err(e) => (false, format!("{e:#}")),
        };
        if let Err(e) = app
            .catalog
            .record_job_run(crate::metrics::JOB_GC, ok, &detail)
        {
            log::warn!("gc: recording the run's outcome: {e}");
        }
    }
    done
}

fn plan_and_apply(
    app: &App,
    opts: &GcOptions,
    dry_run: bool,
    say: &mut dyn FnMut(&str),
) -> anyhow::Result<Run> {
    let plan = plan(app, opts)?;
    for line in plan.describe() {
        say(&line);
    }
    if dry_run {
        say("dry run: nothing changed");
        return Ok(Run { plan, report: None });
    }
    let report = apply(app, &plan, opts)?;
    say(&report.describe());
    for f in &report.failures {
        say(&format!("  failed: {f}"));
    }
    Ok(Run {
        plan,
        report: Some(report),
    })
}

/// Summaries for `imgsrv gc --json`.
pub fn plan_json(plan: &Plan) -> serde_json::Value {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &plan.leftovers {
        *kinds
            .entry(match l.kind {
                LeftoverKind::Temp => "temp",
                LeftoverKind::Staged => "staged",
            })
            .or_default() += 1;
    }
    serde_json::json!({
        "retire": plan.retire.iter().map(|r| format!("{}@{}", r.image, r.version)).collect::<Vec<_>>(),
        "collect": plan.collect.iter().map(|r| format!("{}@{}", r.image, r.version)).collect::<Vec<_>>(),
        "uploads": plan.uploads.len(),
        "leftovers": kinds,
        "leftover_bytes": plan.leftover_bytes(),
        "blobs": plan.blobs.len(),
        "files": plan.files.len(),
        "blob_bytes": plan.blob_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(state: VersionState, collected: bool) -> Claim {
        Claim::Version {
            version_id: "v".into(),
            state,
            collected,
            cited_at: "2026-12-01T11:30:00.000000000Z".into(),
        }
    }

    #[test]
    fn the_rule() {
        let now = "2026-12-01T12:00:00.000000000Z";
        let later = "2026-12-01T13:00:00.000000000Z";
        let earlier = "2026-12-01T11:00:00.000000000Z";
        let none = HashSet::new();
        let collecting: HashSet<String> = ["v".to_string()].into();
        assert!(!keeps(&[], now, &none), "nothing claims it");
        assert!(keeps(&[v(VersionState::Draft, false)], now, &collecting));
        assert!(keeps(
            &[v(VersionState::Publishing, false)],
            now,
            &collecting
        ));
        assert!(keeps(&[v(VersionState::Published, false)], now, &none));
        assert!(!keeps(&[v(VersionState::Published, true)], now, &none));
        assert!(!keeps(
            &[v(VersionState::Published, false)],
            now,
            &collecting
        ));
        let up = |state, expires_at: &str, updated_at: &str| Claim::Upload {
            id: "u".into(),
            state,
            expires_at: expires_at.into(),
            updated_at: updated_at.into(),
        };
        assert!(keeps(&[up(UploadState::Ready, later, earlier)], now, &none));
        assert!(keeps(
            &[up(UploadState::Uploading, later, earlier)],
            now,
            &none
        ));
        assert!(!keeps(
            &[up(UploadState::Ready, earlier, earlier)],
            now,
            &none
        ));
        assert!(!keeps(
            &[up(UploadState::Aborted, later, earlier)],
            now,
            &none
        ));
        assert!(!keeps(
            &[up(UploadState::Failed, later, earlier)],
            now,
            &none
        ));
        // a ready upload cited since by a version that is now collected: nothing keeps it
        assert!(!keeps(
            &[
                v(VersionState::Published, true),
                up(UploadState::Ready, later, earlier)
            ],
            now,
            &none
        ));
        // ready after the (collected) citation: the upload is for a new draft, kept
        assert!(keeps(
            &[
                v(VersionState::Published, true),
                up(UploadState::Ready, later, now)
            ],
            now,
            &none
        ));
        let pin = |expires_at: &str| Claim::Pin {
            holder: "h".into(),
            expires_at: expires_at.into(),
        };
        assert!(keeps(&[pin(later)], now, &none));
        assert!(!keeps(&[pin(earlier)], now, &none));
        assert!(keeps(
            &[v(VersionState::Published, true), pin(later)],
            now,
            &none
        ));
    }
}
