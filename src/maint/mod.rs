//! Maintenance jobs: garbage collection, scrub, backup and restore.
//!
//! Every job is plan-then-apply: it first computes what it would do (counts,
//! bytes, names) and prints that plan; with `--dry-run` it stops there. Then
//! it applies the plan item by item, keeps going past an item that fails, and
//! counts the failures (a job with failures exits non-zero). Jobs reach the
//! data only through the storage traits ([`crate::catalog::Catalog`],
//! [`crate::cas::BlobStore`]) and [`crate::app::App`], so every backend gets
//! them.
//!
//! Jobs that must not overlap take a [`crate::catalog::MaintCatalog::job_lock`]:
//! `blobs` is held exclusive by a GC while it deletes and shared by a backup
//! while it copies, so a GC never deletes a blob a running backup still needs.

pub mod backup;
/// A job's report, for [`record_run`]: failures make the run an error.
pub trait RunSummary {
    fn summary(&self) -> String;
    fn failed(&self) -> usize;
}

impl RunSummary for gc::Report {
    fn summary(&self) -> String {
        self.describe()
    }
    fn failed(&self) -> usize {
        self.failures.len()
    }
}

/// Records the outcome of a run in the catalog (for `/metrics`, wherever the
/// job ran); a catalog that cannot take it is logged, never fatal.
pub fn record_run<R: RunSummary>(app: &crate::app::App, job: &str, outcome: &anyhow::Result<R>) {
    let (ok, detail) = match outcome {
        Ok(r) => (r.failed() == 0, r.summary()),
        Err(e) => (false, format!("{e:#}")),
    };
    if let Err(e) = app.catalog.record_job_run(job, ok, &detail) {
        log::warn!("{job}: recording the run's outcome: {e}");
    }
}

pub mod gc;
pub mod periodic;
pub mod restore;
pub mod scrub;
