//! A throwaway PostgreSQL 15 cluster for the tests (one per test binary, through
//! tests/fixtures/pg-harness, purged by the harness's watcher when this process
//! ends) and fresh databases in it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const HARNESS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pg-harness");

/// `pg-harness ARGS...`: its stdout, trimmed; panics with its stderr on failure.
pub fn harness(args: &[&str]) -> String {
    let out = Command::new(HARNESS)
        .args(args)
        .output()
        .expect("running pg-harness");
    assert!(
        out.status.success(),
        "pg-harness {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A new cluster in a fresh directory, purged when this process ends.
pub fn cluster() -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("imgsrv-pg-")
        .tempdir_in("/tmp")
        .unwrap()
        .keep();
    harness(&[
        "up",
        dir.to_str().unwrap(),
        "--watch",
        &std::process::id().to_string(),
    ]);
    dir
}

/// The cluster shared by the tests that do not stop it.
pub fn shared() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(cluster)
}

/// A fresh database in `dir`'s cluster: its URL.
pub fn database(dir: &Path) -> String {
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    harness(&["createdb", dir.to_str().unwrap(), &name])
}

/// `pg_ctl stop -m fast` of `dir`'s cluster: every session ends, connections are refused
/// until [`start`].
pub fn stop(dir: &Path) {
    harness(&["stop", dir.to_str().unwrap()]);
}

/// Starts `dir`'s cluster again after [`stop`] (same socket, same data).
pub fn start(dir: &Path) {
    harness(&["start", dir.to_str().unwrap()]);
}

/// Stops and starts `dir`'s cluster: what a database restart does to its clients.
pub fn restart(dir: &Path) {
    harness(&["restart", dir.to_str().unwrap()]);
}
