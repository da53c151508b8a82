//! Continuous mirroring: `imgsrv serve` runs the `[[mirror]]` entries of
//! `DATA/imgsrv.toml` on their interval, into its own data directory.
//!
//! ```toml
//! [[mirror]]
//! name = "debian"                       # unique; names the job in logs, status and audit
//! upstream = "https://images.linuxcontainers.org"
//! key = "/etc/imgsrv/mirror.key"        # the mirror operator's minisign secret key
//! interval = "6h"                       # s, m, h, d; default 6h
//! os = "debian"                         # any `imgsrv mirror` filter: release, variant,
//! latest = 2                            # arch, type, image, latest, jobs, upstream_ca
//! ```
//!
//! Each run's outcome is logged and kept in `DATA/mirror-status.json`, which
//! `imgsrv mirrors --data DIR` and `GET /v1/mirrors` show. Runs publish
//! through the server's own publish code as principal `mirror:<name>`, so the
//! server's verification mode and trusted keys apply to what a job mirrors.

use crate::app::App;
use crate::mirror::MirrorOptions;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod scrub;
pub use scrub::{read_scrub_status, spawn_scrub, PeriodicScrub, ScrubStatus, SCRUB_STATUS_FILE};

pub const STATUS_FILE: &str = "mirror-status.json";
const DEFAULT_INTERVAL: &str = "6h";

/// One `[[mirror]]` entry, validated.
#[derive(Debug, Clone)]
pub struct MirrorJob {
    pub name: String,
    pub interval: Duration,
    pub options: MirrorOptions,
}

/// Parses `30s`, `15m`, `6h`, `1d`.
pub fn parse_interval(s: &str) -> Result<Duration> {
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num
        .parse()
        .with_context(|| format!("interval {s:?}: expected e.g. 30m, 6h, 1d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("interval {s:?}: unit must be s, m, h or d"),
    };
    if secs < 60 {
        bail!("interval {s:?}: at least 1m");
    }
    Ok(Duration::from_secs(secs))
}

/// Validates the `[[mirror]]` tables; relative paths are resolved against
/// the data directory (`join` keeps absolute paths as they are). An invalid entry stops the server from starting.
pub fn parse_jobs(tables: &[toml::Table], data_dir: &Path) -> Result<Vec<MirrorJob>> {
    let mut jobs: Vec<MirrorJob> = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let mut t = t.clone();
        let name = match t.remove("name") {
            Some(toml::Value::String(n)) if crate::names::principal_name(&n) => n,
            Some(v) => bail!(
                "[[mirror]] #{}: name {v} must be 1 to 64 of [a-z0-9._-]",
                i + 1
            ),
            None => bail!("[[mirror]] #{}: needs a name", i + 1),
        };
        if jobs.iter().any(|j| j.name == name) {
            bail!("[[mirror]] {name}: the name is used twice");
        }
        let interval = match t.remove("interval") {
            None => parse_interval(DEFAULT_INTERVAL)?,
            Some(toml::Value::String(s)) => {
                parse_interval(&s).with_context(|| format!("[[mirror]] {name}"))?
            }
            Some(v) => bail!("[[mirror]] {name}: interval {v} must be a string such as \"6h\""),
        };
        let mut options: MirrorOptions = toml::Value::Table(t)
            .try_into()
            .with_context(|| format!("[[mirror]] {name}: invalid options"))?;
        options.key = data_dir.join(&options.key);
        options.upstream_ca = options.upstream_ca.as_ref().map(|p| data_dir.join(p));
        options.progress = false;
        options.staging_dir = Some(data_dir.join("tmp").join(format!("mirror-{name}")));
        if !options.key.is_file() {
            bail!(
                "[[mirror]] {name}: key {} is not a file",
                options.key.display()
            );
        }
        jobs.push(MirrorJob {
            name,
            interval,
            options,
        });
    }
    Ok(jobs)
}

/// What `imgsrv mirrors` and `GET /v1/mirrors` show for a job.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JobStatus {
    pub name: String,
    pub upstream: String,
    pub interval_seconds: u64,
    /// `running` or `idle`.
    pub state: String,
    pub runs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_started: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_finished: Option<String>,
    /// `ok`, `failed` (some versions failed), `error` (the run could not run) or
    /// `skipped` (another instance held the job's lock: `last_error` says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Counts from the last run's report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_summary: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<String>,
}

/// Reads `DATA/mirror-status.json` (empty when no job ever ran).
pub fn read_status(data_dir: &Path) -> Result<Vec<JobStatus>> {
    let path = data_dir.join(STATUS_FILE);
    match std::fs::read(&path) {
        Ok(b) => Ok(serde_json::from_slice::<BTreeMap<String, JobStatus>>(&b)
            .with_context(|| format!("reading {}", path.display()))?
            .into_values()
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Runs the jobs on their intervals until `stop` is set.
pub struct Scheduler {
    data_dir: PathBuf,
    status: Mutex<BTreeMap<String, JobStatus>>,
    stop: Arc<AtomicBool>,
}

impl Scheduler {
    /// Starts one thread per job; each runs at once, then every interval.
    pub fn start(app: Arc<App>, jobs: Vec<MirrorJob>) -> Arc<Scheduler> {
        let data_dir = app.config.data_dir.clone();
        let mut status: BTreeMap<String, JobStatus> = read_status(&data_dir)
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        status.retain(|name, _| jobs.iter().any(|j| &j.name == name));
        for j in &jobs {
            let s = status.entry(j.name.clone()).or_default();
            s.name = j.name.clone();
            s.upstream = j.options.upstream.clone();
            s.interval_seconds = j.interval.as_secs();
            s.state = "idle".into();
        }
        let sched = Arc::new(Scheduler {
            data_dir,
            status: Mutex::new(status),
            stop: Arc::new(AtomicBool::new(false)),
        });
        sched.save();
        for job in jobs {
            let (sched, app) = (sched.clone(), app.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("mirror-{}", job.name))
                .spawn(move || {
                    while !sched.stop.load(Ordering::Relaxed) {
                        sched.run_once(&app, &job);
                        let wake = std::time::Instant::now() + job.interval;
                        while std::time::Instant::now() < wake
                            && !sched.stop.load(Ordering::Relaxed)
                        {
                            std::thread::sleep(Duration::from_millis(250));
                        }
                    }
                });
            if let Err(e) = spawned {
                log::error!("mirror jobs: cannot start a thread: {e}");
            }
        }
        sched
    }

    /// Asks the jobs to stop after their current run.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut JobStatus)) {
        if let Ok(mut m) = self.status.lock() {
            if let Some(s) = m.get_mut(name) {
                f(s);
            }
        }
        self.save();
    }

    fn save(&self) {
        let Ok(m) = self.status.lock() else { return };
        let bytes = match serde_json::to_vec_pretty(&*m) {
            Ok(b) => b,
            Err(e) => return log::error!("mirror status: {e}"),
        };
        drop(m);
        let path = self.data_dir.join(STATUS_FILE);
        let write = || -> std::io::Result<()> {
            let mut tmp = tempfile::NamedTempFile::new_in(&self.data_dir)?;
            std::io::Write::write_all(&mut tmp, &bytes)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        };
        if let Err(e) = write() {
            log::error!("writing {}: {e}", path.display());
        }
    }

    /// One run of a job, recorded in the status file and the log.
    ///
    /// Instances of a full deployment share their catalog, and each of them has the
    /// same `[[mirror]]` jobs: a run holds the job lock `mirror-NAME`
    /// ([`crate::catalog::MaintCatalog::job_lock`]), so that one instance at a time
    /// runs a job; the others find it taken and skip their turn (`skipped`). The lock
    /// is checked before each version is stored: one lost under the run (a database
    /// restart ends the session that held it) stops the run, and the next run, here
    /// or elsewhere, takes up what is left.
    pub fn run_once(&self, app: &Arc<App>, job: &MirrorJob) {
        let lock_name = format!("mirror-{}", job.name);
        let lock =
            match app
                .catalog
                .job_lock(&lock_name, crate::catalog::LockMode::Exclusive, false)
            {
                Ok(Some(l)) => l,
                taken => {
                    let (outcome, why) = match taken {
                        Err(e) => (
                            "error",
                            format!("could not take the job lock {lock_name}: {e}"),
                        ),
                        _ => (
                            "skipped",
                            format!(
                                "another instance (or another server on this catalog) is \
                                 running it: the job lock {lock_name} is taken"
                            ),
                        ),
                    };
                    log::info!("mirror {}: {outcome}, {why}", job.name);
                    let next = chrono::Utc::now()
                        + chrono::Duration::from_std(job.interval).unwrap_or_default();
                    self.update(&job.name, |s| {
                        s.state = "idle".into();
                        s.last_outcome = Some(outcome.into());
                        s.last_error = Some(why);
                        s.next_run = Some(next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                    });
                    return;
                }
            };
        let guard = || -> Result<()> {
            lock.check().with_context(|| {
                format!(
                    "the job lock {lock_name} was lost (another instance may be running \
                     this job now)"
                )
            })
        };
        self.update(&job.name, |s| {
            s.state = "running".into();
            s.last_started = Some(now());
            s.next_run = None;
        });
        log::info!(
            "mirror {}: run started from {}",
            job.name,
            job.options.upstream
        );
        let target =
            crate::target::LocalTarget::with_app(app.clone(), &format!("mirror:{}", job.name));
        let mut out = Vec::new();
        let result = crate::mirror::run_guarded(&job.options, &target, &mut out, &guard);
        for line in String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            log::info!("mirror {}: {line}", job.name);
        }
        // (before the status says the run is over: who reads one sees the other)
        let ok = matches!(&result, Ok(r) if r.failed.is_empty());
        crate::metrics::job_finished(crate::metrics::JOB_MIRROR, ok);
        let next =
            chrono::Utc::now() + chrono::Duration::from_std(job.interval).unwrap_or_default();
        self.update(&job.name, |s| {
            s.state = "idle".into();
            s.runs += 1;
            s.last_finished = Some(now());
            s.next_run = Some(next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            match &result {
                Ok(r) => {
                    let failed = !r.failed.is_empty();
                    s.last_outcome = Some(if failed { "failed" } else { "ok" }.into());
                    s.last_error = failed.then(|| {
                        r.failed
                            .iter()
                            .map(|f| format!("{f:?}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    });
                    s.last_summary = Some(serde_json::json!({
                        "mirrored": r.mirrored.len(),
                        "already_present": r.already_present.len(),
                        "failed": r.failed.len(),
                        "skipped_by_filter": r.skipped_by_filter,
                        "bytes_downloaded": r.bytes_downloaded,
                    }));
                }
                Err(e) => {
                    s.last_outcome = Some("error".into());
                    s.last_error = Some(format!("{e:#}"));
                    s.last_summary = None;
                }
            }
        });
        match &result {
            Ok(r) if r.failed.is_empty() => log::info!(
                "mirror {}: ok, {} mirrored, {} already present, {} bytes",
                job.name,
                r.mirrored.len(),
                r.already_present.len(),
                r.bytes_downloaded
            ),
            Ok(r) => log::error!("mirror {}: {} version(s) failed", job.name, r.failed.len()),
            Err(e) => log::error!("mirror {}: could not run: {e:#}", job.name),
        }
    }
}

/// `imgsrv mirrors --data DIR`: the jobs' last outcomes as a table.
pub fn print_status(data_dir: &Path) -> Result<()> {
    let jobs = read_status(data_dir)?;
    if jobs.is_empty() {
        println!(
            "no mirror job has run (configure [[mirror]] entries in {})",
            data_dir.join("imgsrv.toml").display()
        );
        return Ok(());
    }
    println!(
        "{:<16} {:<8} {:<8} {:<21} {:<21} {:>5}  UPSTREAM / DETAIL",
        "NAME", "STATE", "OUTCOME", "LAST FINISHED", "NEXT RUN", "RUNS"
    );
    for s in jobs {
        println!(
            "{:<16} {:<8} {:<8} {:<21} {:<21} {:>5}  {}",
            s.name,
            s.state,
            s.last_outcome.as_deref().unwrap_or("-"),
            s.last_finished.as_deref().unwrap_or("-"),
            s.next_run.as_deref().unwrap_or("-"),
            s.runs,
            s.upstream
        );
        if let Some(sum) = &s.last_summary {
            println!("{:<16} {sum}", "");
        }
        if let Some(e) = &s.last_error {
            println!("{:<16} error: {e}", "");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("6h").unwrap(), Duration::from_secs(21600));
        assert_eq!(parse_interval("2m").unwrap(), Duration::from_secs(120));
        for bad in ["", "6", "10s", "1y", "-1h", "h"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
