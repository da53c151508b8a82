//! Maintenance jobs: garbage collection, scrub, backup, restore, and the
//! migration of an appliance onto a full deployment.
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
pub mod gc;
pub mod logcheck;
pub mod migrate;
pub mod periodic;
pub mod restore;
pub mod scrub;
