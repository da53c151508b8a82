//! A real Garage for the tests: one server per test binary, started by
//! tests/fixtures/garage-harness on first use and stopped by it once this
//! process is gone (the harness watches our pid); a fresh bucket per test.
//! [`Raw`] reaches the bucket without imgsrv's code (curl `--aws-sigv4`), to
//! plant objects behind imgsrv's back and to check what is really there.

#![allow(dead_code)]

use imgsrv::cas::s3::{S3Options, S3Store};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

pub struct Garage {
    dir: PathBuf,
    env: HashMap<String, String>,
}

fn harness() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/garage-harness")
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The server of this test binary.
pub fn garage() -> &'static Garage {
    static GARAGE: OnceLock<Garage> = OnceLock::new();
    GARAGE.get_or_init(up)
}

/// A server of its own, for a test that stops it ([`Garage::stop`]) while others
/// run beside it; stopped and removed like the shared one when this process ends.
pub fn private() -> &'static Garage {
    Box::leak(Box::new(up()))
}

fn up() -> Garage {
    let dir = tempfile::Builder::new()
        .prefix("imgsrv-garage-")
        .tempdir()
        .expect("a temp dir")
        .keep();
    let out = Command::new("sh")
        .arg(harness())
        .arg("up")
        .arg(&dir)
        .arg(std::process::id().to_string())
        .output()
        .expect("run tests/fixtures/garage-harness");
    assert!(out.status.success(), "garage-harness up: {}", show(&out));
    let text = std::fs::read_to_string(dir.join("env")).expect("the harness's env file");
    let env = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Garage { dir, env }
}

impl Garage {
    /// Stops the server (SIGTERM, as a service manager does), keeping its data, its
    /// metadata and its ports for [`Garage::start`].
    pub fn stop(&self) {
        self.harness_ok("stop", &[]);
    }

    /// Starts the server stopped by [`Garage::stop`] again: same ports, same data;
    /// returns once it answers S3 requests.
    pub fn start(&self) {
        self.harness_ok("start", &[]);
    }

    fn harness_ok(&self, cmd: &str, args: &[&str]) {
        let out = Command::new("sh")
            .arg(harness())
            .arg(cmd)
            .arg(&self.dir)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run garage-harness {cmd}: {e}"));
        assert!(out.status.success(), "garage-harness {cmd}: {}", show(&out));
    }

    fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the harness's env"))
    }
}

/// A bucket of its own for one test, reached without imgsrv's code.
pub struct Raw {
    garage: &'static Garage,
    bucket: String,
}

/// A new bucket named after `test` (and random: tests may run twice).
pub fn store_and_raw(test: &str) -> (S3Store, Raw) {
    store_and_raw_on(garage(), test)
}

/// [`store_and_raw`] on server `g` (e.g. one of [`private`]).
pub fn store_and_raw_on(g: &'static Garage, test: &str) -> (S3Store, Raw) {
    let mut name: String = format!("t-{}", test.replace('_', "-"));
    name.truncate(40);
    let name = format!(
        "{}-{}",
        name.trim_end_matches('-'),
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let out = Command::new("sh")
        .arg(harness())
        .arg("bucket")
        .arg(&g.dir)
        .arg(&name)
        .output()
        .expect("run garage-harness bucket");
    assert!(
        out.status.success(),
        "garage-harness bucket: {}",
        show(&out)
    );
    let raw = Raw {
        garage: g,
        bucket: name,
    };
    (
        S3Store::open(&raw.options()).expect("open the S3 store"),
        raw,
    )
}

pub fn store(test: &str) -> S3Store {
    store_and_raw(test).0
}

/// `<Tag>…</Tag>` values of an XML document, in order.
fn tags(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|s| s.split_once(&close).map(|(v, _)| v.to_string()))
        .collect()
}

impl Raw {
    /// The server the bucket is on.
    pub fn garage(&self) -> &'static Garage {
        self.garage
    }

    /// Removes `key` (whether or not it is there).
    pub fn delete(&self, key: &str) {
        let (body, status) = self.curl(&["-X", "DELETE"], &self.url(key));
        assert!(
            status == 204 || status == 200,
            "DELETE {key}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn options(&self) -> S3Options {
        let g = self.garage;
        S3Options {
            endpoint: g.var("IMGSRV_S3_ENDPOINT").to_string(),
            bucket: self.bucket.clone(),
            region: g.var("IMGSRV_S3_REGION").to_string(),
            access_key_id: g.var("IMGSRV_S3_ACCESS_KEY_ID").to_string(),
            secret_access_key: g.var("IMGSRV_S3_SECRET_ACCESS_KEY").to_string(),
            path_style: true,
            ca_file: None,
        }
    }

    fn url(&self, key_and_query: &str) -> String {
        format!(
            "{}/{}/{key_and_query}",
            self.garage.var("IMGSRV_S3_ENDPOINT"),
            self.bucket
        )
    }

    /// curl, signed; the body and the HTTP status.
    fn curl(&self, args: &[&str], url: &str) -> (Vec<u8>, u16) {
        let g = self.garage;
        let user = format!(
            "{}:{}",
            g.var("IMGSRV_S3_ACCESS_KEY_ID"),
            g.var("IMGSRV_S3_SECRET_ACCESS_KEY")
        );
        let out = Command::new("curl")
            // (curl 7.88 does not send x-amz-content-sha256 itself; Garage wants it)
            .args([
                "-sS",
                "-H",
                "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                "--aws-sigv4",
            ])
            .arg(format!("aws:amz:{}:s3", g.var("IMGSRV_S3_REGION")))
            .args(["--user", &user, "-w", "\n%{http_code}"])
            .args(args)
            .arg(url)
            .output()
            .expect("run curl (contrib/install-test-deps.sh installs it)");
        assert!(out.status.success(), "curl {url}: {}", show(&out));
        let mut body = out.stdout;
        let nl = body
            .iter()
            .rposition(|&b| b == b'\n')
            .expect("the status line");
        let status = String::from_utf8_lossy(&body[nl + 1..])
            .trim()
            .parse()
            .unwrap();
        body.truncate(nl);
        (body, status)
    }

    pub fn put(&self, key: &str, bytes: &[u8]) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let (body, status) = self.curl(&["-T", &path], &self.url(key));
        assert_eq!(status, 200, "PUT {key}: {}", String::from_utf8_lossy(&body));
    }

    pub fn get(&self, key: &str) -> Vec<u8> {
        let (body, status) = self.curl(&[], &self.url(key));
        assert_eq!(status, 200, "GET {key}");
        body
    }

    /// The ETag HEAD reports, `None` if there is no such object.
    pub fn etag(&self, key: &str) -> Option<String> {
        let (head, status) = self.curl(&["-I"], &self.url(key));
        if status == 404 {
            return None;
        }
        assert_eq!(status, 200, "HEAD {key}");
        String::from_utf8_lossy(&head).lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("etag")
                .then(|| value.trim().to_string())
        })
    }

    /// Every key under `prefix` (one listing page: tests store few).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        // (encoded as S3 signs it: curl sends the query as written)
        let prefix = prefix.replace('/', "%2F");
        let (body, status) = self.curl(&[], &self.url(&format!("?list-type=2&prefix={prefix}")));
        assert_eq!(status, 200);
        tags(&String::from_utf8_lossy(&body), "Key")
    }

    /// The keys of the unfinished multipart uploads.
    pub fn unfinished_uploads(&self) -> Vec<String> {
        let (body, status) = self.curl(&[], &self.url("?uploads="));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        tags(&String::from_utf8_lossy(&body), "Upload")
            .iter()
            .flat_map(|u| tags(u, "Key"))
            .collect()
    }

    /// Begins a multipart upload of `key` with one small part, and leaves it
    /// unfinished (what a crash mid-upload leaves).
    pub fn start_upload(&self, key: &str) {
        let (body, status) = self.curl(&["-X", "POST"], &self.url(&format!("{key}?uploads=")));
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "{body}");
        let id = tags(&body, "UploadId").pop().expect("an upload id");
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"part").unwrap();
        let path = f.path().to_str().unwrap().to_string();
        let (body, status) = self.curl(
            &["-T", &path],
            &self.url(&format!("{key}?partNumber=1&uploadId={id}")),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// The garage CLI against the server.
    pub fn cli(&self, args: &[&str]) {
        let out = Command::new("sh")
            .arg(harness())
            .arg("cli")
            .arg(&self.garage.dir)
            .args(args)
            .output()
            .expect("run garage-harness cli");
        assert!(out.status.success(), "garage {args:?}: {}", show(&out));
    }
}

/// Debian's nginx terminating TLS in front of the Garage (a certificate for
/// `127.0.0.1` and `localhost`, self-signed, made here). nginx cannot listen
/// on port 0, so it gets a free port and is started again on another should
/// it lose that port to someone else meanwhile. Stopped on drop.
pub struct TlsProxy {
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    pub port: u16,
    pub cert: PathBuf,
}

impl TlsProxy {
    pub fn start() -> TlsProxy {
        use std::time::{Duration, Instant};
        let g = garage();
        let upstream = g.var("IMGSRV_S3_ENDPOINT").to_string();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        let (cert, key) = (d.join("cert.pem"), d.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            // SAFETY: geteuid(2) has no preconditions.
            let user = if unsafe { libc::geteuid() } == 0 {
                "user root;"
            } else {
                ""
            };
            let conf = format!(
                r#"{user}
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp-body;
  proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fastcgi;
  uwsgi_temp_path {d}/tmp-uwsgi;
  scgi_temp_path {d}/tmp-scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size 0;
    location / {{
      proxy_pass {upstream};
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      proxy_set_header Connection "";
      proxy_request_buffering off;
      proxy_buffering off;
    }}
  }}
}}
"#,
                d = d.display(),
                cert = cert.display(),
                key = key.display(),
            );
            std::fs::write(d.join("nginx.conf"), conf).unwrap();
            let _ = std::fs::remove_file(d.join("error.log"));
            let mut child = Command::new("nginx")
                .arg("-c")
                .arg(d.join("nginx.conf"))
                .arg("-e")
                .arg(d.join("error.log"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("run nginx (contrib/install-test-deps.sh installs it)");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    let log = std::fs::read_to_string(d.join("error.log")).unwrap_or_default();
                    if log.contains("in use") {
                        break; // lost the port: again
                    }
                    panic!("nginx exited with {st}:\n{log}");
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return TlsProxy {
                        dir,
                        child: Some(child),
                        port,
                        cert,
                    };
                }
                assert!(Instant::now() < deadline, "nginx did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("nginx: no free port after 3 tries");
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
