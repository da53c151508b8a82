//! Shared helpers for imgsrv's integration tests. Each `tests/*.rs` file does `mod support;`
//! and uses what it needs (hence the `dead_code` allowance).
//!
//! * [`TestServer`]: a real `imgsrv serve` on 127.0.0.1 with a fresh data dir.
//! * [`Incus`]: the `incus` client with a fresh config/cache, trusting a server's cert.
//! * [`IncusDaemon`]: the machine's single throwaway `incusd` (tests/fixtures/incusd-harness),
//!   serialised across threads and test processes by [`incus_lock`].
//! * [`make_test_image`], [`minisign_keypair`], [`minisign_sign`], [`minisign_key_id`],
//!   [`sha256_file`], [`sha256_concat`].
//! * Small helpers the test files share: [`text`], [`s`], [`last_line`], [`run_within`],
//!   [`trust_key`], [`publish_image`], [`publish_files`], [`catalog_sql`], [`single_file`].
//!
//! Set `IMGSRV_TEST_KEEP=1` to keep temporary directories (their paths are printed).
#![allow(dead_code)]

pub mod inproc;
pub mod tmpfs;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// Path of the `imgsrv` binary that cargo built for these tests.
pub const IMGSRV: &str = env!("CARGO_BIN_EXE_imgsrv");

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests").join("fixtures").join(name)
}

/// A fresh temporary directory (kept on disk when `IMGSRV_TEST_KEEP=1`).
/// `imgsrv backup --data DATA --out OUT`.
pub fn backup_to(data: &Path, out: &Path) {
    run_ok(Command::new(IMGSRV).args(["backup", "--data", s(data), "--out", s(out)]));
}

/// `imgsrv restore --from BACKUP` into a fresh data directory, served: the directory
/// (removed when dropped) and the server on it.
pub fn serve_restored(backup: &Path, prefix: &str) -> (TempDir, TestServer) {
    let root = temp_dir(prefix);
    let restored = root.path().join("data");
    run_ok(Command::new(IMGSRV).args(["restore", "--from", s(backup), "--data", s(&restored)]));
    let server = TestServer::start_in(&restored);
    (root, server)
}

pub fn temp_dir(prefix: &str) -> TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix(&format!("imgsrv-{prefix}-"))
        .tempdir()
        .expect("create temp dir");
    if keep_temp() {
        dir.disable_cleanup(true);
        eprintln!("[support] keeping {}", dir.path().display());
    }
    dir
}

fn keep_temp() -> bool {
    std::env::var_os("IMGSRV_TEST_KEEP").is_some_and(|v| v != "0" && !v.is_empty())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, panicking with its command line, status, stdout and stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run_any(cmd);
    if !out.status.success() {
        panic!(
            "command failed ({}): {}\n--- stdout:\n{}\n--- stderr:\n{}",
            out.status,
            describe(cmd),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A `script` (util-linux) command that runs `argv` on a fresh pty, so the
/// program sees a terminal; its output comes back on `script`'s stdout.
#[allow(dead_code)]
pub fn on_pty(argv: &[&str]) -> Command {
    let line = argv
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut c = Command::new("script");
    c.args(["-q", "-e", "-c", &line, "/dev/null"]);
    c
}

/// Runs `cmd` and returns its output whatever its exit status (panics only if it cannot start).
pub fn run_any(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)))
}

/// Runs `cmd` like [`run_any`], but panics (after killing it) if it has not exited within
/// `limit`: for commands that hang instead of failing when the code under test is wrong.
/// Its output is collected only after it exits: meant for commands that print little.
pub fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)));
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let out = child.wait_with_output();
                let (stdout, stderr) = match &out {
                    Ok(o) => (
                        String::from_utf8_lossy(&o.stdout).into_owned(),
                        String::from_utf8_lossy(&o.stderr).into_owned(),
                    ),
                    Err(_) => Default::default(),
                };
                panic!(
                    "{} did not exit within {limit:?}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
                    describe(cmd)
                );
            }
        }
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{}: {e}", describe(cmd)))
}

/// `imgsrv ARGS...`, asserting success.
pub fn imgsrv(args: &[&str]) -> Output {
    run_ok(Command::new(IMGSRV).args(args))
}

/// A command's stdout followed by its stderr, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The last line of a command's stdout, trimmed (e.g. the token `imgsrv token issue`
/// prints); panics if it printed nothing.
pub fn last_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no output line: {}", text(o)))
        .trim()
        .to_string()
}

/// A path as `&str` (the tests' temporary paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `imgsrv key add --data DATA [--name NAME] PUBLIC`: trust a publisher key; asserts success.
pub fn trust_key(data: impl AsRef<Path>, name: Option<&str>, public: impl AsRef<Path>) -> Output {
    let mut cmd = Command::new(IMGSRV);
    cmd.arg("key").arg("add").arg("--data").arg(data.as_ref());
    if let Some(name) = name {
        cmd.arg("--name").arg(name);
    }
    run_ok(cmd.arg(public.as_ref()))
}

/// `sqlite3 DATA/catalog.db SQL`, asserting success: its stdout.
pub fn catalog_sql(data: &Path, sql: &str) -> String {
    let out = run_ok(
        Command::new("sqlite3")
            .arg(data.join("catalog.db"))
            .arg(sql),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The contents of the single file in `dir` whose name ends with `suffix` (what
/// `incus image export` wrote), asserting there is exactly one.
pub fn single_file(dir: &Path, suffix: &str) -> Vec<u8> {
    let files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(
        files.len(),
        1,
        "{suffix} files in {}: {files:?}",
        dir.display()
    );
    fs::read(&files[0]).unwrap_or_else(|e| panic!("read {}: {e}", files[0].display()))
}

// ---------------------------------------------------------------------------------------
// Hashes

/// Lowercase hex SHA-256 of a file's bytes (no `sha256:` prefix).
pub fn sha256_file(path: impl AsRef<Path>) -> String {
    let mut h = Sha256::new();
    hash_into(&mut h, path.as_ref());
    hex::encode(h.finalize())
}

/// Lowercase hex SHA-256 of `a`'s bytes followed by `b`'s: the Incus fingerprint of a split
/// image is `sha256_concat(metadata_tarball, rootfs_or_disk)`.
pub fn sha256_concat(a: impl AsRef<Path>, b: impl AsRef<Path>) -> String {
    let mut h = Sha256::new();
    hash_into(&mut h, a.as_ref());
    hash_into(&mut h, b.as_ref());
    hex::encode(h.finalize())
}

fn hash_into(h: &mut Sha256, path: &Path) {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
}

// ---------------------------------------------------------------------------------------
// Test images and signing keys

/// What `tests/fixtures/make-test-image` produced.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub dir: PathBuf,
    /// `incus.tar.xz`
    pub metadata: PathBuf,
    /// `rootfs.squashfs` (container or both)
    pub rootfs: Option<PathBuf>,
    /// `disk.qcow2` (vm or both)
    pub disk: Option<PathBuf>,
}

impl TestImage {
    /// The rootfs, panicking if the image was built with `--type vm`.
    pub fn rootfs(&self) -> &Path {
        self.rootfs
            .as_deref()
            .expect("image has no rootfs.squashfs")
    }
    /// The VM disk, panicking if the image was built with `--type container`.
    pub fn disk(&self) -> &Path {
        self.disk.as_deref().expect("image has no disk.qcow2")
    }
    /// Incus fingerprint of the container image: sha256(incus.tar.xz ‖ rootfs.squashfs).
    pub fn container_fingerprint(&self) -> String {
        sha256_concat(&self.metadata, self.rootfs())
    }
    /// Incus fingerprint of the VM image: sha256(incus.tar.xz ‖ disk.qcow2).
    pub fn vm_fingerprint(&self) -> String {
        sha256_concat(&self.metadata, self.disk())
    }
}

/// Builds a real Incus image into `dir` with `tests/fixtures/make-test-image DIR ARGS...`
/// (e.g. `&["--serial", "20260101_0000", "--type", "both"]`).
pub fn make_test_image(dir: impl AsRef<Path>, args: &[&str]) -> TestImage {
    let dir = dir.as_ref().to_path_buf();
    run_ok(
        Command::new(fixture("make-test-image"))
            .arg(&dir)
            .args(args),
    );
    let opt = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
    TestImage {
        metadata: dir.join("incus.tar.xz"),
        rootfs: opt("rootfs.squashfs"),
        disk: opt("disk.qcow2"),
        dir,
    }
}

/// Creates an unencrypted minisign key pair in `dir`: returns (public key, secret key) paths.
pub fn minisign_keypair(dir: impl AsRef<Path>) -> (PathBuf, PathBuf) {
    let dir = dir.as_ref();
    fs::create_dir_all(dir).expect("create key dir");
    let (public, secret) = (dir.join("minisign.pub"), dir.join("minisign.key"));
    run_ok(
        Command::new("minisign")
            .args(["-G", "-W", "-f", "-p"])
            .arg(&public)
            .arg("-s")
            .arg(&secret),
    );
    (public, secret)
}

/// A self-signed certificate and its key made by the stock openssl recipe
/// (`openssl req -x509 -newkey rsa:2048 -nodes ... -addext subjectAltName=IP:HOST`,
/// so with basicConstraints CA:TRUE): `DIR/NAME.crt`, `DIR/NAME.key`.
pub fn openssl_self_signed(dir: &Path, name: &str, host: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .args(["-days", "30", "-subj", &format!("/CN={host}")])
            .args(["-addext", &format!("subjectAltName=IP:{host}")]),
    );
    (cert, key)
}

/// Signs `file` with an unencrypted minisign secret key; returns the `.minisig` path
/// (`FILE.minisig`).
pub fn minisign_sign(secret: impl AsRef<Path>, file: impl AsRef<Path>) -> PathBuf {
    let file = file.as_ref();
    let sig = PathBuf::from(format!("{}.minisig", file.display()));
    run_ok(
        Command::new("minisign")
            .arg("-S")
            .arg("-s")
            .arg(secret.as_ref())
            .arg("-m")
            .arg(file)
            .arg("-x")
            .arg(&sig),
    );
    sig
}

/// The key id minisign wrote at the end of a public key file's first line.
pub fn minisign_key_id(public: impl AsRef<Path>) -> String {
    let public = public.as_ref();
    let text =
        fs::read_to_string(public).unwrap_or_else(|e| panic!("read {}: {e}", public.display()));
    text.lines()
        .next()
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no key id in {}", public.display()))
        .to_string()
}

/// `imgsrv publish` of a test image to `server` with its admin token, signed
/// with `secret`; asserts success and returns stdout.
pub fn publish_image(
    server: &TestServer,
    secret: &Path,
    img: &TestImage,
    extra: &[&str],
) -> String {
    let roots: Vec<&Path> = img
        .rootfs
        .iter()
        .chain(img.disk.iter())
        .map(|p| p.as_path())
        .collect();
    publish_files(server, secret, &img.metadata, &roots, extra)
}

/// `imgsrv publish` of a metadata tarball and root file(s) (rootfs, disk) to `server` with
/// its admin token, signed with `secret`; asserts success and returns stdout.
pub fn publish_files(
    server: &TestServer,
    secret: &Path,
    metadata: &Path,
    roots: &[&Path],
    extra: &[&str],
) -> String {
    let mut cmd = Command::new(IMGSRV);
    cmd.arg("publish")
        .arg("--server")
        .arg(server.url())
        .arg("--ca")
        .arg(server.cert())
        .arg("--token-file")
        .arg(server.admin_token_file())
        .arg("--key")
        .arg(secret)
        .args(extra)
        .arg(metadata)
        .args(roots);
    String::from_utf8_lossy(&run_ok(&mut cmd).stdout).into_owned()
}

// ---------------------------------------------------------------------------------------
// The imgsrv server

/// A running `imgsrv serve` on 127.0.0.1 with its own data directory. Stopped on drop; its
/// log is printed when the test is panicking.
pub struct TestServer {
    root: TempDir,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    /// The metrics listener's port, from the `imgsrv metrics on http://ADDR` line.
    metrics_port: Option<u16>,
    /// Pass `--metrics-listen 127.0.0.1:0` (unless the test's config sets `metrics_listen`).
    metrics_flag: bool,
    child: Option<Child>,
    agent: ureq::Agent,
}

impl TestServer {
    /// `imgsrv init` on a fresh data dir, then `imgsrv serve`, waiting until `/healthz` is 204.
    pub fn start() -> TestServer {
        Self::start_inner(None, None)
    }

    /// Like [`TestServer::start`], but after `imgsrv init` replaces `DATA/imgsrv.toml` with
    /// `config_toml`, in which `{data}` stands for the data directory's path. The metrics
    /// listener is on port 0 (`--metrics-listen 127.0.0.1:0`, as for every test server)
    /// unless `config_toml` sets `metrics_listen`: then the file decides.
    pub fn start_with(config_toml: &str) -> TestServer {
        Self::start_inner(Some(config_toml), None)
    }

    /// Like [`TestServer::start`], with the data directory at `data` (created if missing;
    /// e.g. on a filesystem the test mounted). The log and scratch space stay in a
    /// temporary directory elsewhere.
    pub fn start_in(data: &Path) -> TestServer {
        Self::start_inner(None, Some(data))
    }

    /// Like [`TestServer::start_with`], but the configuration is written before
    /// `imgsrv init`, which then sets up the stores it names (a `[storage]` section:
    /// the bootstrap token goes into that catalog).
    pub fn start_configured(config_toml: &str) -> TestServer {
        Self::start_full(Some(config_toml), None, true)
    }

    /// [`TestServer::start_configured`] with the data directory at `data`, which may
    /// hold files already (the deployment instance `imgsrv migrate --to
    /// DATA/imgsrv.toml` filled: `init` then makes no second admin).
    pub fn start_configured_in(data: &Path, config_toml: &str) -> TestServer {
        Self::start_full(Some(config_toml), Some(data), true)
    }

    fn start_inner(config: Option<&str>, data: Option<&Path>) -> TestServer {
        Self::start_full(config, data, false)
    }

    fn start_full(config: Option<&str>, data: Option<&Path>, config_first: bool) -> TestServer {
        let root = temp_dir("server");
        let data = data.map_or_else(|| root.path().join("data"), Path::to_path_buf);
        fs::create_dir_all(&data).expect("create data dir");
        let data_s = data.to_str().expect("utf-8 temp path").to_owned();
        let write_config = || {
            if let Some(cfg) = config {
                fs::write(data.join("imgsrv.toml"), cfg.replace("{data}", &data_s))
                    .expect("write imgsrv.toml");
            }
        };
        if config_first {
            write_config();
        }
        imgsrv(&["init", "--data", &data_s]);
        if !config_first {
            write_config();
        }
        let cert = data.join("tls").join("cert.pem");
        let agent = https_agent(&cert);
        let mut server = TestServer {
            log: root.path().join("serve.log"),
            root,
            data,
            port: 0,
            metrics_port: None,
            metrics_flag: !config.is_some_and(|c| c.contains("metrics_listen")),
            child: None,
            agent,
        };
        server.spawn();
        server
    }

    /// Starts `imgsrv serve` on 127.0.0.1, port 0 (again, after [`TestServer::kill`];
    /// the data directory is kept), and reads the port it got from its start line.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open server log");
        let offset = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(IMGSRV);
        cmd.arg("serve")
            .arg("--data")
            .arg(&self.data)
            .arg("--listen")
            .arg("127.0.0.1:0");
        if self.metrics_flag {
            // never the default 9464, which every test server would contend for
            cmd.arg("--metrics-listen").arg("127.0.0.1:0");
        }
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {IMGSRV} serve: {e}"));
        self.child = Some(child);
        let ready = self
            .wait_port(offset, Duration::from_secs(20))
            .and_then(|()| self.wait_healthy(Duration::from_secs(20)));
        if let Err(e) = ready {
            self.kill();
            panic!(
                "imgsrv serve did not become healthy: {e}\n--- {}:\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }

    /// Waits for `imgsrv serving https://ADDR` in the log after `offset`; sets the port,
    /// and the metrics port from `imgsrv metrics on http://ADDR/metrics` (printed before
    /// it, when there is a metrics listener).
    fn wait_port(&mut self, offset: u64, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let port_after = |text: &str, prefix: &str| {
            text.lines()
                .find_map(|l| l.split_once(prefix))
                .and_then(|(_, rest)| rest.split(|c: char| c.is_whitespace() || c == '/').next())
                .and_then(|addr| addr.rsplit_once(':'))
                .and_then(|(_, p)| p.parse::<u16>().ok())
        };
        while Instant::now() < deadline {
            let log = fs::read(&self.log).unwrap_or_default();
            let new = String::from_utf8_lossy(log.get(offset as usize..).unwrap_or(&[]));
            if let Some(p) = port_after(&new, "imgsrv serving https://") {
                self.port = p;
                self.metrics_port = port_after(&new, "imgsrv metrics on http://");
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("imgsrv serve exited early with {status}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("no \"imgsrv serving\" line after {timeout:?}"))
    }

    fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/healthz", self.url());
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("imgsrv serve exited early with {status}"));
            }
            // The cert is written by `imgsrv init`; rebuild the agent if it changed since.
            self.agent = https_agent(&self.cert());
            match self.agent.get(&url).call() {
                Ok(resp) if resp.status().as_u16() == 204 => return Ok(()),
                Ok(resp) => last = format!("GET /healthz answered {}", resp.status()),
                Err(e) => last = format!("GET /healthz: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("not healthy after {timeout:?}; last: {last}"))
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// `http://127.0.0.1:PORT/metrics`, if the server has a metrics listener.
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics_port
            .map(|p| format!("http://127.0.0.1:{p}/metrics"))
    }
    /// `GET /metrics` on the metrics listener (asserting 200): the exposition as text.
    #[track_caller]
    pub fn scrape(&self) -> String {
        let url = self
            .metrics_url()
            .expect("this server has no metrics listener");
        let mut resp = self
            .agent
            .get(&url)
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(resp.status().as_u16(), 200, "GET {url}");
        resp.body_mut()
            .read_to_string()
            .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"))
    }
    pub fn data_dir(&self) -> &Path {
        &self.data
    }
    /// The server's self-signed certificate (`DATA/tls/cert.pem`).
    pub fn cert(&self) -> PathBuf {
        self.data.join("tls").join("cert.pem")
    }
    /// The bootstrap admin token (`DATA/admin.token`, trimmed).
    pub fn admin_token(&self) -> String {
        let p = self.data.join("admin.token");
        fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
            .trim()
            .to_owned()
    }
    pub fn admin_token_file(&self) -> PathBuf {
        self.data.join("admin.token")
    }
    /// A ureq agent trusting the server's certificate; HTTP error statuses are returned as
    /// responses, not errors.
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }
    /// Scratch space beside the data dir, removed with the server.
    pub fn scratch(&self) -> &Path {
        self.root.path()
    }
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Anonymous `GET PATH`: (status, body).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let mut resp = self
            .agent
            .get(format!("{}{path}", self.url()))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap_or_else(|e| panic!("GET {path}: reading the body: {e}"));
        (status, body)
    }

    /// Anonymous `GET PATH`, asserting 200: the body.
    #[track_caller]
    pub fn get_ok(&self, path: &str) -> Vec<u8> {
        let (status, body) = self.get(path);
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        body
    }

    /// Stops the server: SIGTERM, then SIGKILL after 5 s.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(5));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- imgsrv serve log ({}):\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// One request with the real `curl` over TLS (trusting `server`'s certificate), with a
/// bearer `token` if given and `extra` curl arguments (`-X DELETE`, `-d BODY`, `-r 0-9`,
/// ...): (status, body).
pub fn curl(server: &TestServer, url: &str, token: Option<&str>, extra: &[&str]) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = dir.path().join("body");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "-o"])
        .arg(&body)
        .args(["-w", "%{http_code}", "--cacert"])
        .arg(server.cert())
        .args(extra);
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    let out = run_any(cmd.arg(url));
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (code, fs::read(&body).unwrap_or_default())
}

/// Stops a child process: SIGTERM, then SIGKILL after `grace`.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A free TCP port on 127.0.0.1 (bound then released: another process may take it first).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A ureq agent that trusts the PEM certificate(s) in `cert` (if the file exists yet) as
/// imgsrv's own `--ca` does (pinned: a self-signed CA:TRUE certificate too), with a 30 s
/// overall timeout and HTTP error statuses returned as responses.
pub fn https_agent(cert: &Path) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build();
    if cert.is_file() {
        if let Ok(agent) = imgsrv::tls::pinned::agent(config.clone(), cert) {
            return agent;
        }
    }
    config.into()
}

// ---------------------------------------------------------------------------------------
// The incus client

/// The `incus` command-line client with its own config dir (`INCUS_CONF`) and `HOME` (so
/// remotes and caches start empty), trusting `cert` for HTTPS via `SSL_CERT_FILE` (or, made
/// with [`Incus::system_trust`], only the system CAs). It talks to the local daemon (if any)
/// over /var/lib/incus/unix.socket.
pub struct Incus {
    dir: TempDir,
    cert: Option<PathBuf>,
}

impl Incus {
    pub fn new(cert: impl AsRef<Path>) -> Incus {
        let mut i = Incus::system_trust();
        i.cert = Some(cert.as_ref().to_path_buf());
        i
    }

    /// A client with no `SSL_CERT_FILE`: it trusts the system CAs and what `incus remote
    /// add` pins (`INCUS_CONF/servercerts/NAME.crt`), as a user's client does.
    pub fn system_trust() -> Incus {
        let dir = temp_dir("incus-client");
        fs::create_dir_all(dir.path().join("conf")).expect("mkdir conf");
        fs::create_dir_all(dir.path().join("home")).expect("mkdir home");
        Incus { dir, cert: None }
    }

    /// The client's config dir (`INCUS_CONF`).
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    /// A `Command` for `incus` with this client's environment (add args yourself).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("incus");
        match &self.cert {
            Some(cert) => cmd.env("SSL_CERT_FILE", cert),
            None => cmd.env_remove("SSL_CERT_FILE"),
        };
        cmd.env("INCUS_CONF", self.conf_dir())
            .env("HOME", self.dir.path().join("home"))
            .env("SSL_CERT_DIR", "/etc/ssl/certs")
            .env_remove("INCUS_REMOTE")
            .env_remove("INCUS_PROJECT")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null());
        cmd
    }

    /// `incus remote add NAME URL --protocol=simplestreams`
    pub fn remote_add(&self, name: &str, url: &str) {
        self.run(&["remote", "add", name, url, "--protocol=simplestreams"]);
    }

    /// `incus remote add NAME URL --accept-certificate`: the Incus protocol, the server's
    /// certificate fetched, accepted and pinned (what answering `y` does).
    pub fn remote_add_incus(&self, name: &str, url: &str) -> Output {
        self.run(&["remote", "add", name, url, "--accept-certificate"])
    }

    /// `incus ARGS...`, asserting success (the panic message has stdout and stderr).
    pub fn run(&self, args: &[&str]) -> Output {
        run_ok(self.command().args(args))
    }

    /// `incus ARGS...` whatever its exit status.
    pub fn try_run(&self, args: &[&str]) -> Output {
        run_any(self.command().args(args))
    }

    /// `incus ARGS... --format=json`, asserting success, parsed.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = run_ok(self.command().args(args).arg("--format=json"));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "incus {args:?} --format=json printed invalid JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `incus ARGS...` stdout as a string, asserting success.
    pub fn stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.run(args).stdout).into_owned()
    }

    /// The fingerprints `incus image list REMOTE --format=json` lists, in its order
    /// (`REMOTE` as incus takes it: `r:`, `local:`).
    pub fn fingerprints(&self, remote: &str) -> Vec<String> {
        self.json(&["image", "list", remote])
            .as_array()
            .expect("incus image list: a JSON array")
            .iter()
            .map(|i| i["fingerprint"].as_str().unwrap().to_string())
            .collect()
    }

    /// The `Fingerprint:` line of `incus image info ARGS...`.
    pub fn info_fingerprint(&self, args: &[&str]) -> String {
        let mut a = vec!["image", "info"];
        a.extend_from_slice(args);
        let out = self.stdout(&a);
        out.lines()
            .find_map(|l| l.strip_prefix("Fingerprint: "))
            .unwrap_or_else(|| panic!("no fingerprint in incus image info {args:?}:\n{out}"))
            .trim()
            .to_string()
    }
}

// ---------------------------------------------------------------------------------------
// The single Incus daemon

const INCUS_LOCK_PATH: &str = "/tmp/imgsrv-tests-incusd.lock";

/// Holds an exclusive `flock` on /tmp/imgsrv-tests-incusd.lock: at most one holder per
/// machine, across threads and test processes (nextest too). Released on drop or exit.
pub struct IncusLock {
    file: File,
}

/// Blocks until this test may use the machine's single Incus daemon.
pub fn incus_lock() -> IncusLock {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(INCUS_LOCK_PATH)
        .unwrap_or_else(|e| panic!("open {INCUS_LOCK_PATH}: {e}"));
    loop {
        // SAFETY: flock(2) on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            panic!("flock {INCUS_LOCK_PATH}: {err}");
        }
    }
    let mut f = &file;
    let _ = f.write_all(format!("{}\n", std::process::id()).as_bytes());
    IncusLock { file }
}

impl Drop for IncusLock {
    fn drop(&mut self) {
        // SAFETY: flock(2) on a descriptor we own; closing it would release the lock too.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// The harness's pid/log/client-config dir: `$IMGSRV_INCUSD_DIR`, else
/// /tmp/imgsrv-incusd-harness (the harness's own default, which contrib/test-all.sh uses).
pub fn incusd_state_dir() -> PathBuf {
    std::env::var_os("IMGSRV_INCUSD_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/imgsrv-incusd-harness"))
}

/// The machine's throwaway Incus daemon (tests/fixtures/incusd-harness), trusting one CA
/// certificate. `up` takes [`incus_lock`], clears any leftover daemon state and starts a
/// fresh daemon; drop deletes instances and images and stops it (printing its log if the
/// test is panicking). Needs root.
pub struct IncusDaemon {
    state: PathBuf,
    // Declared last: released after the daemon is down.
    _lock: IncusLock,
}

impl IncusDaemon {
    pub fn up(cert: impl AsRef<Path>) -> IncusDaemon {
        Self::start(Some(cert.as_ref()))
    }

    /// A daemon trusting only the system CAs (and what a client hands it, such as the
    /// certificate `incus remote add` pinned).
    pub fn up_system_trust() -> IncusDaemon {
        Self::start(None)
    }

    fn start(cert: Option<&Path>) -> IncusDaemon {
        let lock = incus_lock();
        let state = incusd_state_dir();
        let harness = || {
            let mut c = Command::new(fixture("incusd-harness"));
            // the daemon trusts `cert` (the harness sets SSL_CERT_FILE to it), or nothing
            // but the system CAs and what clients hand it: never this process's setting
            c.env("IMGSRV_INCUSD_DIR", &state)
                .env_remove("SSL_CERT_FILE");
            c
        };
        // A crashed earlier run may have left a daemon behind: start clean.
        run_any(harness().arg("down"));
        let out = run_any(harness().arg("up").args(cert));
        if !out.status.success() {
            panic!(
                "incusd-harness up failed ({}):\n{}{}\n--- daemon log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                fs::read_to_string(state.join("daemon.log")).unwrap_or_default()
            );
        }
        IncusDaemon { state, _lock: lock }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.state.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for IncusDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- incusd log:\n{}", self.log_text());
        }
        let out = Command::new(fixture("incusd-harness"))
            .arg("down")
            .env("IMGSRV_INCUSD_DIR", &self.state)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "incusd-harness down failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cannot run incusd-harness down: {e}"),
        }
    }
}
