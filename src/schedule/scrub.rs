//! The periodic scrub inside `imgsrv serve` (`[scrub]` in `imgsrv.toml`,
//! [`crate::config::ScrubSchedule`]): one thread that runs
//! [`crate::maint::scrub::scrub`] when it is due, rate-limited, and logs its
//! outcome; `DATA/scrub-status.json` keeps the last run, so a restart does
//! not start a scrub again (a scrub that never ran runs at start).

use crate::app::App;
use crate::maint::scrub::{ScrubError, ScrubOptions};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const SCRUB_STATUS_FILE: &str = "scrub-status.json";
/// When another scrub (`imgsrv scrub` beside the server) holds the lock.
const BUSY_RETRY: Duration = Duration::from_secs(600);

/// The last periodic scrub, in `DATA/scrub-status.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ScrubStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_started: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_finished: Option<String>,
    /// `ok`, `problems`, `stopped` (the server shut down) or `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The last report's counts and problem count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_summary: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<String>,
}

/// Reads `DATA/scrub-status.json` (the default when missing or unreadable).
pub fn read_scrub_status(data_dir: &Path) -> ScrubStatus {
    std::fs::read(data_dir.join(SCRUB_STATUS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_scrub_status(data_dir: &Path, s: &ScrubStatus) {
    let path = data_dir.join(SCRUB_STATUS_FILE);
    let write = || -> anyhow::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(data_dir)?;
        serde_json::to_writer_pretty(&mut tmp, s)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    };
    if let Err(e) = write() {
        log::error!("writing {}: {e:#}", path.display());
    }
}

fn stamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The running periodic scrub; [`PeriodicScrub::stop`] ends it.
pub struct PeriodicScrub {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeriodicScrub {
    /// Stops a scrub in progress within about a second and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the periodic scrub of `app` unless `[scrub] interval = "off"`.
pub fn spawn_scrub(app: Arc<App>) -> Option<PeriodicScrub> {
    let cfg = app.config.scrub.clone();
    let interval = cfg.interval?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let rate = cfg.rate.map_or("no rate limit".into(), |r| {
        format!("at most {:.1} MB/s", r as f64 / 1e6)
    });
    log::info!(
        "scrub: every {} s, {}% of the blobs, {rate}",
        interval.as_secs(),
        cfg.sample_percent
    );
    let thread = std::thread::Builder::new()
        .name("scrub".into())
        .spawn(move || {
            let data_dir = app.config.data_dir.clone();
            let last = read_scrub_status(&data_dir)
                .last_started
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            let step = chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
            // never ran: at once; else one interval after the last start
            let mut due = last.map_or_else(chrono::Utc::now, |t| t + step);
            while !flag.load(Ordering::Relaxed) {
                if chrono::Utc::now() < due {
                    std::thread::sleep(Duration::from_millis(250));
                    continue;
                }
                let opts = ScrubOptions {
                    sample_percent: cfg.sample_percent,
                    rate: cfg.rate,
                    dry_run: false,
                    actor: "scrub".into(),
                    stop: Some(flag.clone()),
                };
                let busy = run_once(&app, &opts, &data_dir, step);
                due = chrono::Utc::now()
                    + if busy {
                        chrono::Duration::from_std(BUSY_RETRY).unwrap_or(step)
                    } else {
                        step
                    };
            }
        });
    match thread {
        Ok(t) => Some(PeriodicScrub {
            stop,
            thread: Some(t),
        }),
        Err(e) => {
            log::error!("scrub: cannot start its thread: {e}");
            None
        }
    }
}

/// One periodic run, logged and recorded; `true` when another scrub held
/// the lock (nothing ran).
fn run_once(app: &App, opts: &ScrubOptions, data_dir: &Path, step: chrono::Duration) -> bool {
    let before = read_scrub_status(data_dir);
    let mut status = before.clone();
    let started = chrono::Utc::now();
    status.last_started = Some(stamp(started));
    status.next_run = None;
    write_scrub_status(data_dir, &status);
    log::info!("scrub: started");
    let mut out = Vec::new();
    let result = crate::maint::scrub::scrub(app, opts, &mut out);
    match &result {
        Ok(r) if !r.stopped => crate::metrics::job_finished(crate::metrics::JOB_SCRUB, r.ok()),
        Err(ScrubError::Failed(_)) => {
            crate::metrics::job_finished(crate::metrics::JOB_SCRUB, false)
        }
        _ => {}
    }
    for line in String::from_utf8_lossy(&out).lines() {
        if line.starts_with("PROBLEM") || line.starts_with("    affects") {
            log::warn!("scrub: {line}");
        } else {
            log::info!("scrub: {line}");
        }
    }
    status.last_finished = Some(stamp(chrono::Utc::now()));
    status.next_run = Some(stamp(chrono::Utc::now() + step));
    let busy = match result {
        Ok(r) => {
            let outcome = match (r.stopped, r.ok()) {
                (true, _) => "stopped",
                (false, true) => "ok",
                (false, false) => "problems",
            };
            status.last_outcome = Some(outcome.into());
            status.last_error = None;
            status.last_summary = Some(serde_json::json!({
                "problems": r.problems.len(),
                "counts": r.counts,
            }));
            match outcome {
                "problems" => log::error!(
                    "scrub: {} problem(s) found (listed above); damaged blobs are quarantined",
                    r.problems.len()
                ),
                o => log::info!("scrub: finished, {o}"),
            }
            false
        }
        Err(ScrubError::Busy) => {
            log::info!("scrub: another scrub is running on this data directory; retrying later");
            // nothing ran: the last run stays the last one
            write_scrub_status(data_dir, &before);
            return true;
        }
        Err(ScrubError::Failed(e)) => {
            log::error!("scrub: could not run: {e:#}");
            status.last_outcome = Some("error".into());
            status.last_error = Some(format!("{e:#}"));
            false
        }
    };
    write_scrub_status(data_dir, &status);
    busy
}
