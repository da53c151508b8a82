//! Downloading upstream files into a staging directory: in parallel, each
//! checked against the sha256 and size the upstream JSON gives, resumable
//! across runs, retried with backoff.
//!
//! A file is written to `STAGING/<sha256>.partial` and renamed to
//! `STAGING/<sha256>` once its whole content hashed right. The name is the
//! expected content, so a partial file left by an interrupted run is resumed
//! with a `Range` request from its size (and a changed upstream file has
//! another name). A mismatch deletes the file and starts over from byte 0.
//!
//! While a root file streams in, it is also hashed as the continuation of
//! each metadata tarball it pairs with, which gives the Incus fingerprint
//! `sha256(metadata || root)` without reading the root a second time.
//!
//! A worker stores the file in the target (`put_hashed_blob`) as soon as it
//! is in, so downloads and ingest overlap; nothing is published before the
//! version's fingerprints are checked. A data directory target takes the
//! staged file in place (fsynced and hard-linked, not copied, and not hashed
//! again: the hash computed here while the bytes were written is the store's
//! check, see `BlobStore::adopt_hashed`) and is handed the fingerprints
//! computed here instead of reading the blobs again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;

use super::plan::FileRef;
use super::streams::{body_error, FetchError, Upstream};
use crate::digest::{Digest, Hasher};
use crate::target::Target;

/// Tries per file (network errors, 5xx, a wrong hash).
pub const ATTEMPTS: u32 = 3;
const BUF: usize = 1 << 20;

/// The staging directory, locked for one mirror run at a time (runs that
/// share it take turns).
pub struct Staging {
    dir: PathBuf,
    _lock: File,
}

impl Staging {
    /// Creates (mode 0700) and locks `dir`; `None` when another mirror run
    /// holds it.
    pub fn try_open(dir: &Path) -> Result<Option<Staging>> {
        Self::lock(dir, false)
    }

    /// Like [`Staging::try_open`], waiting for the other run to finish.
    pub fn open(dir: &Path) -> Result<Staging> {
        Self::lock(dir, true)?.context("the staging directory lock")
    }

    fn lock(dir: &Path, wait: bool) -> Result<Option<Staging>> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the staging directory {}", dir.display()))?;
        let lock_path = dir.join(crate::cas::fs::IN_USE_LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        let op = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        loop {
            // SAFETY: flock(2) on a descriptor we own.
            if unsafe { libc::flock(lock.as_raw_fd(), op) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock if !wait => return Ok(None),
                _ => bail!("locking {}: {e}", lock_path.display()),
            }
        }
        Ok(Some(Staging {
            dir: dir.to_path_buf(),
            _lock: lock,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a verified file is kept until its version is published.
    pub fn complete(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    /// Where a download in progress (or interrupted) is.
    pub fn partial(&self, d: &Digest) -> PathBuf {
        self.dir.join(format!("{}.partial", d.hex()))
    }
}

/// One file to bring into the staging directory.
#[derive(Debug, Clone)]
pub struct Job {
    pub file: FileRef,
    /// Metadata files (also jobs) whose hash state this file continues:
    /// one Incus fingerprint each.
    pub metas: Vec<Digest>,
    /// Other jobs continue this file's hash state (it is a metadata file).
    pub is_meta: bool,
    /// Media type to store it under; `None`: a metadata tarball, by its
    /// magic bytes.
    pub media_type: Option<&'static str>,
}

/// A file in the staging directory whose content matched.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub path: PathBuf,
    /// Bytes received over the network for it in this run.
    pub network_bytes: u64,
    /// Taken from an earlier run's complete file, nothing downloaded.
    pub reused: bool,
    /// Resumed from a partial file of an earlier attempt or run.
    pub resumed: bool,
    /// metadata sha256 → sha256(metadata || this file).
    pub fingerprints: BTreeMap<Digest, Digest>,
    pub media_type: &'static str,
}

/// What the workers share.
pub struct Ctx<'a> {
    pub upstream: &'a Upstream,
    /// Where each file is stored once it is in (`None`: only staged).
    pub target: Option<&'a (dyn Target + Sync)>,
    pub staging: &'a Staging,
    pub progress: Option<&'a ProgressBar>,
    pub downloaded: &'a AtomicU64,
    pub stop: &'a AtomicBool,
    /// Backoff before the second try; doubled after that.
    pub backoff: Duration,
    /// Hash states of metadata files: `None` when the file failed.
    states: Mutex<HashMap<Digest, Option<Hasher>>>,
    states_cv: Condvar,
}

impl<'a> Ctx<'a> {
    pub fn new(
        upstream: &'a Upstream,
        staging: &'a Staging,
        progress: Option<&'a ProgressBar>,
        downloaded: &'a AtomicU64,
        stop: &'a AtomicBool,
    ) -> Ctx<'a> {
        Ctx {
            upstream,
            target: None,
            staging,
            progress,
            downloaded,
            stop,
            backoff: Duration::from_secs(1),
            states: Mutex::new(HashMap::new()),
            states_cv: Condvar::new(),
        }
    }

    fn publish_state(&self, d: Digest, s: Option<Hasher>) {
        let mut m = self.states.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(d, s);
        self.states_cv.notify_all();
    }

    /// Waits until every metadata file in `metas` is done; returns the
    /// states of those that succeeded.
    fn wait_states(&self, metas: &[Digest]) -> Vec<(Digest, Hasher)> {
        let mut m = self.states.lock().unwrap_or_else(|e| e.into_inner());
        while !metas.iter().all(|d| m.contains_key(d)) {
            m = self.states_cv.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        metas
            .iter()
            .filter_map(|d| m.get(d).cloned().flatten().map(|h| (*d, h)))
            .collect()
    }
}

/// Runs `jobs` on `workers` threads; every outcome is sent on `tx` as soon
/// as it is known. Returns when all jobs are done (or `ctx.stop` is set).
pub fn run_jobs(
    ctx: &Ctx<'_>,
    jobs: Vec<Job>,
    workers: usize,
    tx: mpsc::Sender<(Digest, Result<Fetched, String>)>,
) {
    let queue = Mutex::new(VecDeque::from(jobs));
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            let tx = tx.clone();
            let queue = &queue;
            s.spawn(move || loop {
                let job = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some(job) = job else { break };
                let sha = job.file.sha256;
                let outcome = if ctx.stop.load(Ordering::Relaxed) {
                    Err("stopped".to_string())
                } else {
                    fetch(ctx, &job)
                };
                if job.is_meta {
                    ctx.publish_state(sha, outcome.as_ref().ok().map(|(_, s)| s.clone()));
                }
                let outcome = outcome.and_then(|(f, _)| store(ctx, &job, &f).map(|()| f));
                if tx.send((sha, outcome)).is_err() {
                    break;
                }
            });
        }
    });
}

/// Stores a fetched file in the target (if any). Not asked first whether it
/// has it: the mirror asked before downloading, and storing a blob a target
/// has is cheap (a data directory keeps its copy, a server answers the
/// upload of a known digest at once).
fn store(ctx: &Ctx<'_>, job: &Job, f: &Fetched) -> Result<(), String> {
    let Some(target) = ctx.target else {
        return Ok(());
    };
    let d = &job.file;
    // hashed against the upstream sha256 as it was written (or re-read from
    // the staging directory) in this run
    target
        .put_hashed_blob(&d.sha256, d.size, f.media_type, &f.path)
        .map_err(|e| format!("{}: storing it in the target: {e:#}", d.item_key))
}

/// Hashes of one file: its own, and its continuation of each metadata state.
struct Hashes {
    own: Hasher,
    fps: Vec<(Digest, Hasher)>,
}

impl Hashes {
    fn new(states: &[(Digest, Hasher)]) -> Hashes {
        Hashes {
            own: Hasher::new(),
            fps: states.to_vec(),
        }
    }
    fn update(&mut self, b: &[u8]) {
        self.own.update(b);
        for (_, h) in &mut self.fps {
            h.update(b);
        }
    }
    fn fingerprints(&self) -> BTreeMap<Digest, Digest> {
        self.fps
            .iter()
            .map(|(d, h)| (*d, h.clone().finish()))
            .collect()
    }
}

/// Hashes a whole local file.
fn hash_file(path: &Path, h: &mut Hashes) -> std::io::Result<u64> {
    let mut f = File::open(path)?;
    crate::digest::read_chunks(&mut f, |c| h.update(c))
}

/// Brings one file into the staging directory; also returns its hash state
/// (for a metadata file's dependents).
fn fetch(ctx: &Ctx<'_>, job: &Job) -> Result<(Fetched, Hasher), String> {
    let states = ctx.wait_states(&job.metas);
    let done = ctx.staging.complete(&job.file.sha256);
    let (h, network_bytes, reused, resumed) = match reuse(ctx, &job.file, &done, &states) {
        Some(h) => (h, 0, true, false),
        None => {
            let (h, network, resumed) = download(ctx, &job.file, &states)?;
            (h, network, false, resumed)
        }
    };
    let media_type = match job.media_type {
        Some(m) => m,
        None => {
            crate::image::detect_compression(&done).map_or("application/x-xz", |c| c.media_type())
        }
    };
    let fetched = Fetched {
        path: done,
        network_bytes,
        reused,
        resumed,
        fingerprints: h.fingerprints(),
        media_type,
    };
    Ok((fetched, h.own))
}

/// A complete file from an earlier run: checked again, not downloaded.
/// `None` (and the file removed) when it is not right.
fn reuse(ctx: &Ctx<'_>, f: &FileRef, done: &Path, states: &[(Digest, Hasher)]) -> Option<Hashes> {
    if !done.is_file() {
        return None;
    }
    let mut h = Hashes::new(states);
    match hash_file(done, &mut h) {
        Ok(n) if n == f.size && h.own.clone().finish() == f.sha256 => {
            if let Some(pb) = ctx.progress {
                pb.inc(f.size);
            }
            Some(h)
        }
        _ => {
            let _ = fs::remove_file(done);
            None
        }
    }
}

/// Downloads one file with retries: its hashes, the bytes received over the
/// network and whether it resumed a partial file.
fn download(
    ctx: &Ctx<'_>,
    f: &FileRef,
    states: &[(Digest, Hasher)],
) -> Result<(Hashes, u64, bool), String> {
    let mut last = String::new();
    let mut network = 0u64;
    let mut resumed = false;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(ctx.backoff * 2u32.pow(attempt - 1));
        }
        if ctx.stop.load(Ordering::Relaxed) {
            return Err("stopped".into());
        }
        match attempt_download(ctx, f, states, &mut network, &mut resumed) {
            Ok(h) => return Ok((h, network, resumed)),
            Err(e) => {
                log::warn!(
                    "mirror: {} (try {} of {ATTEMPTS}): {e}",
                    f.path,
                    attempt + 1
                );
                last = e.message;
                if !e.retryable {
                    break;
                }
            }
        }
    }
    Err(format!("{}: {last}", f.item_key))
}

fn io_fail(what: &str, path: &Path, e: std::io::Error) -> FetchError {
    FetchError {
        message: format!("{what} {}: {e}", path.display()),
        retryable: false,
    }
}

/// `Content-Range: bytes START-END/TOTAL` → START.
fn range_start(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// One try: resume the partial file (or start it), stream the rest in,
/// check size and sha256, rename into place.
fn attempt_download(
    ctx: &Ctx<'_>,
    f: &FileRef,
    states: &[(Digest, Hasher)],
    network: &mut u64,
    resumed: &mut bool,
) -> Result<Hashes, FetchError> {
    let partial = ctx.staging.partial(&f.sha256);
    let mut have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    if have > f.size {
        let _ = fs::remove_file(&partial);
        have = 0;
    }
    let mut h = Hashes::new(states);
    if have > 0 {
        // the bytes already here count towards the hash
        let n = hash_file(&partial, &mut h).map_err(|e| io_fail("reading", &partial, e))?;
        if n != have {
            let _ = fs::remove_file(&partial);
            return Err(FetchError {
                message: "the partial file changed while it was read".into(),
                retryable: true,
            });
        }
        if let Some(pb) = ctx.progress {
            pb.inc(have);
        }
    }
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)
        .map_err(|e| io_fail("opening", &partial, e))?;
    let mut received = 0u64;
    if have < f.size {
        let url = ctx.upstream.url(&f.path).unwrap_or_default();
        let mut resp = ctx.upstream.get(&f.path, have)?;
        let status = resp.status().as_u16();
        match status {
            206 if have > 0 => {
                let start = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(range_start);
                if start != Some(have) {
                    let _ = fs::remove_file(&partial);
                    return Err(FetchError {
                        message: format!(
                            "GET {url}: asked for bytes from {have}, got Content-Range {start:?}"
                        ),
                        retryable: true,
                    });
                }
                *resumed = true;
            }
            200 => {
                if have > 0 {
                    // the server ignored the range: start over
                    out.set_len(0)
                        .map_err(|e| io_fail("truncating", &partial, e))?;
                    if let Some(pb) = ctx.progress {
                        pb.dec(have);
                    }
                    have = 0;
                    h = Hashes::new(states);
                }
            }
            416 => {
                let _ = fs::remove_file(&partial);
                return Err(FetchError {
                    message: format!("GET {url}: range from {have} not satisfiable"),
                    retryable: true,
                });
            }
            s => {
                return Err(FetchError {
                    message: format!("GET {url}: HTTP {s}"),
                    retryable: s >= 500,
                })
            }
        }
        // one byte more than expected shows a longer file
        let mut body = resp.body_mut().as_reader().take(f.size - have + 1);
        let mut buf = vec![0u8; BUF];
        loop {
            let mut filled = 0;
            let mut eof = false;
            while filled < buf.len() {
                match body.read(&mut buf[filled..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // keep what arrived: the next try resumes from it
                        // (and hashes it again from the file)
                        let kept = out.write_all(&buf[..filled]).and_then(|_| out.flush());
                        if kept.is_ok() {
                            *network += filled as u64;
                            ctx.downloaded.fetch_add(filled as u64, Ordering::Relaxed);
                        }
                        if let Some(pb) = ctx.progress {
                            pb.dec(received);
                        }
                        return Err(body_error(&url, e));
                    }
                }
                if ctx.stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            if filled > 0 {
                out.write_all(&buf[..filled])
                    .map_err(|e| io_fail("writing", &partial, e))?;
                h.update(&buf[..filled]);
                received += filled as u64;
                *network += filled as u64;
                ctx.downloaded.fetch_add(filled as u64, Ordering::Relaxed);
                if let Some(pb) = ctx.progress {
                    pb.inc(filled as u64);
                }
            }
            if eof {
                break;
            }
            if ctx.stop.load(Ordering::Relaxed) {
                return Err(FetchError {
                    message: "stopped".into(),
                    retryable: false,
                });
            }
        }
    }
    out.flush().map_err(|e| io_fail("writing", &partial, e))?;
    drop(out);
    let len = have + received;
    if len < f.size {
        return Err(FetchError {
            message: format!("the connection ended after {len} of {} bytes", f.size),
            retryable: true,
        });
    }
    let reset = |msg: String| {
        let _ = fs::remove_file(&partial);
        if let Some(pb) = ctx.progress {
            pb.dec(len);
        }
        FetchError {
            message: msg,
            retryable: true,
        }
    };
    if len > f.size {
        return Err(reset(format!(
            "longer than the {} bytes the upstream declares",
            f.size
        )));
    }
    let got = h.own.clone().finish();
    if got != f.sha256 {
        return Err(reset(format!(
            "sha256 mismatch: the upstream declares {}, the downloaded file is {}",
            f.sha256.hex(),
            got.hex()
        )));
    }
    let done = ctx.staging.complete(&f.sha256);
    fs::rename(&partial, &done).map_err(|e| io_fail("renaming", &partial, e))?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::Arc;

    /// A tiny HTTP/1.1 file server on 127.0.0.1 that honours `Range: bytes=N-`,
    /// records every request's Range header and, for the first `cut`
    /// requests, closes the connection after `cut_at` body bytes.
    struct Server {
        port: u16,
        ranges: Arc<Mutex<Vec<Option<String>>>>,
    }

    fn serve(content: Vec<u8>, cuts: usize, cut_at: usize) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let seen = ranges.clone();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { return };
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut range = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(v) = l.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = Some(v.trim_end_matches('-').to_string());
                    }
                }
                seen.lock().unwrap().push(range.clone());
                let from: usize = range.as_deref().map_or(0, |r| r.parse().unwrap());
                let body = &content[from..];
                let head = if from > 0 {
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
                        body.len(),
                        content.len() - 1,
                        content.len()
                    )
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                };
                let _ = conn.write_all(head.as_bytes());
                let send = if n < cuts {
                    &body[..cut_at.min(body.len())]
                } else {
                    body
                };
                let _ = conn.write_all(send);
                let _ = conn.flush();
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        });
        Server { port, ranges }
    }

    fn job(content: &[u8]) -> Job {
        Job {
            file: FileRef {
                item_key: "root".into(),
                path: "images/root.squashfs".into(),
                sha256: Digest::of(content),
                size: content.len() as u64,
            },
            metas: Vec::new(),
            is_meta: false,
            media_type: Some("application/octet-stream"),
        }
    }

    fn run_one(up: &Upstream, staging: &Staging, j: Job) -> Result<Fetched, String> {
        let downloaded = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let mut ctx = Ctx::new(up, staging, None, &downloaded, &stop);
        ctx.backoff = Duration::from_millis(10);
        let (tx, rx) = mpsc::channel();
        run_jobs(&ctx, vec![j], 2, tx);
        rx.recv().unwrap().1
    }

    #[test]
    fn a_cut_download_resumes_with_a_range_request() {
        let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let srv = serve(content.clone(), 1, 100_000);
        let up = Upstream::new(&format!("http://127.0.0.1:{}", srv.port), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(dir.path()).unwrap();
        let j = job(&content);
        let f = run_one(&up, &staging, j.clone()).unwrap();
        assert_eq!(fs::read(&f.path).unwrap(), content);
        assert!(f.resumed && !f.reused);
        assert_eq!(
            f.network_bytes,
            content.len() as u64,
            "no byte fetched twice"
        );
        assert_eq!(
            *srv.ranges.lock().unwrap(),
            [None, Some("100000".to_string())]
        );
        assert!(!staging.partial(&j.file.sha256).exists());

        // a second run takes the complete file without a request
        let f2 = run_one(&up, &staging, j).unwrap();
        assert!(f2.reused && f2.network_bytes == 0);
        assert_eq!(srv.ranges.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_partial_file_from_an_earlier_run_is_resumed() {
        let content: Vec<u8> = (0..50_000u32).map(|i| (i % 13) as u8).collect();
        let meta = b"META".to_vec();
        let srv = serve(content.clone(), 0, 0);
        let up = Upstream::new(&format!("http://127.0.0.1:{}/", srv.port), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(dir.path()).unwrap();
        let mut j = job(&content);
        fs::write(staging.partial(&j.file.sha256), &content[..12_345]).unwrap();
        // the fingerprint continues a metadata state
        let downloaded = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let ctx = Ctx::new(&up, &staging, None, &downloaded, &stop);
        let mut mh = Hasher::new();
        mh.update(&meta);
        ctx.publish_state(Digest::of(&meta), Some(mh));
        j.metas = vec![Digest::of(&meta)];
        let (tx, rx) = mpsc::channel();
        run_jobs(&ctx, vec![j], 1, tx);
        let f = rx.recv().unwrap().1.unwrap();
        assert_eq!(*srv.ranges.lock().unwrap(), [Some("12345".to_string())]);
        assert_eq!(f.network_bytes, (content.len() - 12_345) as u64);
        assert_eq!(downloaded.load(Ordering::Relaxed), f.network_bytes);
        let mut both = meta.clone();
        both.extend(&content);
        assert_eq!(f.fingerprints[&Digest::of(&meta)], Digest::of(&both));
    }

    #[test]
    fn a_wrong_file_is_deleted_and_retried_from_zero_then_refused() {
        let content = b"the real content".to_vec();
        let srv = serve(b"the evil content".to_vec(), 0, 0);
        let up = Upstream::new(&format!("http://127.0.0.1:{}", srv.port), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(dir.path()).unwrap();
        let j = job(&content);
        let e = run_one(&up, &staging, j.clone()).unwrap_err();
        assert!(e.contains("sha256 mismatch"), "{e}");
        assert_eq!(
            *srv.ranges.lock().unwrap(),
            [None, None, None],
            "three tries, each from 0"
        );
        assert!(!staging.partial(&j.file.sha256).exists());
        assert!(!staging.complete(&j.file.sha256).exists());
    }

    #[test]
    fn not_found_is_not_retried_and_the_staging_dir_is_exclusive() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicU64::new(0));
        let h2 = hits.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                h2.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        let up = Upstream::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(dir.path()).unwrap();
        assert!(
            Staging::try_open(dir.path()).unwrap().is_none(),
            "second lock taken"
        );
        let e = run_one(&up, &staging, job(b"x")).unwrap_err();
        assert!(e.contains("HTTP 404"), "{e}");
        assert_eq!(hits.load(Ordering::Relaxed), 1);
        assert_eq!(range_start("bytes 10-19/20"), Some(10));
    }
}
