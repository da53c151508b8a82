//! A full data disk, as an operator meets it: `imgsrv serve` on a data directory that is
//! a small tmpfs, which something else fills. Writes answer 507 problem+json and leave
//! nothing partial; every write that succeeded and every refusal has its audit row; what
//! was published is still served; once space is freed, writes work again without a
//! restart.
//!
//! Needs root: it mounts a tmpfs (unmounted at the end, also when the test fails).

mod support;

use serde_json::{json, Value};
use std::cell::RefCell;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::tmpfs::Tmpfs;
use support::*;

const MIB: u64 = 1 << 20;

/// An answer: status, Content-Type, body.
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// A 507 problem+json whose detail says what is full and what to do.
    #[track_caller]
    fn assert_insufficient_storage(&self) {
        assert_eq!(self.status, 507, "{}", self.text());
        assert_eq!(self.content_type, "application/problem+json");
        let p = self.json();
        assert_eq!(p["status"], 507);
        assert_eq!(p["title"], "Insufficient Storage");
        let detail = p["detail"].as_str().unwrap().to_lowercase();
        assert!(detail.contains("full"), "what is full: {detail}");
        assert!(
            detail.contains("free space") && detail.contains("retry"),
            "what to do: {detail}"
        );
    }
}

/// The test's requests to the server, each remembered with its answer: every write and
/// every refusal among them must be in the audit log at the end.
struct Client<'a> {
    server: &'a TestServer,
    token: String,
    calls: RefCell<Vec<(String, String, u16)>>,
}

impl Client<'_> {
    fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: ureq::SendBody<'_>,
        len: usize,
    ) -> Answer {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.server.url()))
            .header("Content-Length", len);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = self
            .server
            .agent()
            .run(req.body(body).unwrap())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap();
        self.calls
            .borrow_mut()
            .push((method.to_string(), path.to_string(), status));
        Answer {
            status,
            content_type,
            body,
        }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Answer {
        let b = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(&body).unwrap()
        };
        let len = b.len();
        let token = self.token.clone();
        self.send(
            method,
            path,
            Some(&token),
            ureq::SendBody::from_owned_reader(std::io::Cursor::new(b)),
            len,
        )
    }

    fn begin(&self, data: &[u8]) -> Answer {
        self.call(
            "POST",
            "/v1/uploads",
            json!({"expected_digest": digest(data), "expected_size_bytes": data.len()}),
        )
    }

    fn put_part(&self, id: &str, n: u32, data: &[u8]) -> Answer {
        let token = self.token.clone();
        self.send(
            "PUT",
            &format!("/v1/uploads/{id}/parts/{n}"),
            Some(&token),
            ureq::SendBody::from_owned_reader(std::io::Cursor::new(data.to_vec())),
            data.len(),
        )
    }

    /// Uploads `data` in `parts` parts; asserts it comes back `ready`.
    fn upload(&self, data: &[u8], parts: usize) {
        let b = self.begin(data);
        assert_eq!(b.status, 201, "{}", b.text());
        let id = b.json()["id"].as_str().unwrap().to_string();
        let mut listed = Vec::new();
        for (i, chunk) in data.chunks(data.len().div_ceil(parts)).enumerate() {
            let p = self.put_part(&id, i as u32 + 1, chunk);
            assert_eq!(p.status, 200, "{}", p.text());
            listed.push(
                json!({"number": i + 1, "etag": p.json()["etag"], "size_bytes": chunk.len()}),
            );
        }
        let c = self.call(
            "POST",
            &format!("/v1/uploads/{id}/complete"),
            json!({ "parts": listed }),
        );
        assert_eq!(c.status, 200, "{}", c.text());
        assert_eq!(c.json()["state"], "ready");
    }
}

fn digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Incompressible bytes, different for each `seed`.
fn noise(len: u64, seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A part body that, once `first` bytes have gone out, waits until the server is writing
/// the part (its temporary file exists in `dir`), then lets `fill` take the disk.
struct FillsTheDiskHalfway<'a> {
    data: Vec<u8>,
    sent: usize,
    first: usize,
    dir: PathBuf,
    fill: Option<Box<dyn FnOnce() + 'a>>,
}

impl Read for FillsTheDiskHalfway<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.sent >= self.first {
            if let Some(fill) = self.fill.take() {
                let deadline = Instant::now() + Duration::from_secs(20);
                while !fs::read_dir(&self.dir).is_ok_and(|mut d| d.next().is_some()) {
                    assert!(Instant::now() < deadline, "no part file in {:?}", self.dir);
                    std::thread::sleep(Duration::from_millis(5));
                }
                fill();
            }
        }
        let end = if self.sent < self.first {
            self.first
        } else {
            self.data.len()
        };
        let n = buf.len().min(end - self.sent);
        buf[..n].copy_from_slice(&self.data[self.sent..self.sent + n]);
        self.sent += n;
        Ok(n)
    }
}

/// Files under `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

/// An image published on `server` (signed, alias `stable`), as its downloads serve it.
struct Published {
    version: String,
    root_url: String,
    meta_url: String,
    rootfs: Vec<u8>,
    metadata: Vec<u8>,
}

fn publish_an_image(server: &TestServer) -> Published {
    let (public, secret) = minisign_keypair(server.scratch().join("key"));
    trust_key(server.data_dir(), Some("release"), &public);
    let img = make_test_image(server.scratch().join("img"), &[]);
    publish_image(server, &secret, &img, &["--alias", "stable"]);
    let view: Value =
        serde_json::from_slice(&server.get_ok("/v1/images/debian-bookworm/refs/stable")).unwrap();
    let version = view["version"]["version"].as_str().unwrap().to_string();
    let artifact = &view["artifacts"][0];
    let base = format!(
        "/v1/images/debian-bookworm/versions/{version}/artifacts/{}",
        artifact["artifact"]["id"].as_str().unwrap()
    );
    Published {
        version,
        root_url: format!("{base}/download"),
        meta_url: format!(
            "{base}/attachments/{}/download",
            artifact["attachments"][0]["id"].as_str().unwrap()
        ),
        rootfs: fs::read(img.rootfs()).unwrap(),
        metadata: fs::read(&img.metadata).unwrap(),
    }
}

/// Asserts that every audited call among `calls` (writes, and refused reads) has its
/// audit row, with its method, path and status; returns how many there were.
#[track_caller]
fn assert_audited(api: &Client<'_>, calls: &[(String, String, u16)]) -> usize {
    let audit = api.call("GET", "/v1/audit?limit=100000", Value::Null);
    assert_eq!(audit.status, 200, "{}", audit.text());
    let rows = audit.json()["entries"].as_array().unwrap().clone();
    let mut audited = 0;
    for (method, path, status) in calls {
        if method == "GET" && *status != 401 {
            continue;
        }
        audited += 1;
        assert!(
            rows.iter().any(|r| r["method"] == method.as_str()
                && r["path"] == path.as_str()
                && r["status"] == *status),
            "no audit row for {method} {path} -> {status}: {rows:#?}"
        );
    }
    audited
}

#[test]
fn a_full_disk_answers_507_leaves_nothing_partial_keeps_serving_and_recovers() {
    let disk = Tmpfs::mount("48m");
    let data = disk.path().join("data");
    let server = TestServer::start_in(&data);
    let pid = server.pid();

    // a published image, while there is room
    let Published {
        version,
        root_url,
        meta_url,
        rootfs,
        metadata,
    } = publish_an_image(&server);
    let index = server.get_ok("/streams/v1/index.json");
    let images = server.get_ok("/streams/v1/images.json");

    let api = Client {
        server: &server,
        token: server.admin_token(),
        calls: RefCell::new(Vec::new()),
    };
    assert_eq!(
        api.call("POST", "/v1/images", json!({"name": "before"}))
            .status,
        201
    );

    // 1. an upload that cannot fit is refused up front, before a byte is sent
    disk.fill_to(4 * MIB);
    let big = noise(6 * MIB, 1);
    api.begin(&big).assert_insufficient_storage();

    // 2. an upload that meets a full disk on its way in: 507, and nothing of it stays
    let part = noise(MIB, 2);
    let b = api.begin(&part);
    assert_eq!(b.status, 201, "{}", b.text());
    let id = b.json()["id"].as_str().unwrap().to_string();
    let mut body = FillsTheDiskHalfway {
        data: part.clone(),
        sent: 0,
        first: 256 << 10,
        dir: data.join("uploads").join(&id),
        fill: Some(Box::new(|| disk.fill_to(0))),
    };
    let token = api.token.clone();
    api.send(
        "PUT",
        &format!("/v1/uploads/{id}/parts/1"),
        Some(&token),
        ureq::SendBody::from_reader(&mut body),
        part.len(),
    )
    .assert_insufficient_storage();
    let session = api.call("GET", &format!("/v1/uploads/{id}"), Value::Null);
    assert_eq!(session.status, 200, "{}", session.text());
    assert_eq!(session.json()["state"], "created", "no part was counted");
    let staged = catalog_sql(
        &data,
        &format!("SELECT count(*) FROM upload_parts WHERE upload_id = '{id}'"),
    );
    assert_eq!(staged.trim(), "0");

    // 3. with the disk full, changes answer 507 and change nothing
    disk.fill_to(0);
    api.call("POST", "/v1/images", json!({"name": "during"}))
        .assert_insufficient_storage();
    api.call(
        "PUT",
        "/v1/images/debian-bookworm/aliases/pinned",
        json!({ "version": version }),
    )
    .assert_insufficient_storage();
    api.call(
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        json!({"parts": [
        {"number": 1, "etag": digest(&part), "size_bytes": part.len()}]}),
    )
    .assert_insufficient_storage();
    assert_eq!(
        api.call("GET", "/v1/images/during", Value::Null).status,
        404
    );
    assert_eq!(
        api.call(
            "GET",
            "/v1/images/debian-bookworm/aliases/pinned",
            Value::Null
        )
        .status,
        404
    );

    // ... and refusals are still recorded
    let anonymous = api.send("POST", "/v1/images", None, ureq::SendBody::none(), 0);
    assert_eq!(anonymous.status, 401);
    let bad_token = api.send(
        "GET",
        "/v1/audit",
        Some("imgsrv_00000000_nope"),
        ureq::SendBody::none(),
        0,
    );
    assert_eq!(bad_token.status, 401);

    // 4. what was published is still served: downloads (full, Range, plain HTTP) and
    // the Simple Streams documents
    assert_eq!(server.get_ok(&root_url), rootfs);
    assert_eq!(server.get_ok(&meta_url), metadata);
    let mut ranged = server
        .agent()
        .get(format!("{}{root_url}", server.url()))
        .header("Range", "bytes=10-19")
        .call()
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(
        ranged.body_mut().read_to_vec().unwrap(),
        rootfs[10..20].to_vec()
    );
    let plain: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut clear = plain
        .get(format!("http://127.0.0.1:{}{root_url}", server.port()))
        .call()
        .unwrap();
    assert_eq!(clear.status(), 200);
    assert_eq!(
        clear
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap(),
        rootfs
    );
    assert_eq!(server.get_ok("/streams/v1/index.json"), index);
    assert_eq!(server.get_ok("/streams/v1/images.json"), images);

    // nothing partial anywhere: no temporary file, no staged part, no blob row or file
    // for what was refused
    assert_eq!(files_under(&data.join("tmp")), Vec::<PathBuf>::new());
    assert_eq!(files_under(&data.join("uploads")), Vec::<PathBuf>::new());
    for refused in [&big, &part] {
        let d = digest(refused);
        let rows = catalog_sql(
            &data,
            &format!("SELECT count(*) FROM cas_blobs WHERE digest = '{d}'"),
        );
        assert_eq!(rows.trim(), "0", "{d}");
        let hex = &d["sha256:".len()..];
        assert!(!data
            .join("sha256")
            .join(&hex[..2])
            .join(&hex[2..4])
            .join(hex)
            .exists());
    }

    // 5. space is freed: writes work again, without a restart
    disk.remove_filler();
    api.upload(&part, 1);
    // a multi-part upload whose assembly meets a full disk keeps its parts, and the
    // same `complete` succeeds once there is room again
    let b = api.begin(&big);
    assert_eq!(b.status, 201, "{}", b.text());
    let id = b.json()["id"].as_str().unwrap().to_string();
    let mut listed = Vec::new();
    for (i, chunk) in big.chunks(big.len() / 2).enumerate() {
        let p = api.put_part(&id, i as u32 + 1, chunk);
        assert_eq!(p.status, 200, "{}", p.text());
        listed.push(json!({"number": i + 1, "etag": p.json()["etag"], "size_bytes": chunk.len()}));
    }
    disk.fill_to(3 * MIB);
    let complete = format!("/v1/uploads/{id}/complete");
    api.call("POST", &complete, json!({ "parts": listed }))
        .assert_insufficient_storage();
    assert_eq!(files_under(&data.join("tmp")), Vec::<PathBuf>::new());
    assert_eq!(files_under(&data.join("uploads").join(&id)).len(), 2);
    disk.remove_filler();
    let done = api.call("POST", &complete, json!({ "parts": listed }));
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(done.json()["state"], "ready");
    assert_eq!(
        api.call("GET", &format!("/v1/blobs/{}", digest(&big)), Value::Null)
            .body,
        big
    );
    assert_eq!(
        api.call("POST", "/v1/images", json!({"name": "after"}))
            .status,
        201
    );
    assert_eq!(server.pid(), pid, "the same server process");
    assert_eq!(files_under(&data.join("tmp")), Vec::<PathBuf>::new());

    // 6. every write the test made and every refusal has its audit row, with its answer
    let calls = api.calls.borrow().clone();
    assert!(assert_audited(&api, &calls) >= 18, "{calls:?}");
}

#[test]
fn a_server_restarted_on_a_full_disk_serves_and_still_records_refusals() {
    let disk = Tmpfs::mount("48m");
    let data = disk.path().join("data");
    let mut server = TestServer::start_in(&data);
    let published = publish_an_image(&server);
    // the disk fills while the server runs, and whatever filled it takes any space
    // that frees up while the server restarts
    disk.fill_to(0);
    server.kill();
    server.spawn();
    disk.fill_to(0);

    assert_eq!(server.get_ok(&published.root_url), published.rootfs);
    assert_eq!(server.get_ok(&published.meta_url), published.metadata);
    assert_eq!(server.get("/streams/v1/images.json").0, 200);
    let api = Client {
        server: &server,
        token: server.admin_token(),
        calls: RefCell::new(Vec::new()),
    };
    api.call("POST", "/v1/images", json!({"name": "during"}))
        .assert_insufficient_storage();
    assert_eq!(
        api.send("POST", "/v1/images", None, ureq::SendBody::none(), 0)
            .status,
        401
    );
    let calls = api.calls.borrow().clone();
    assert_eq!(assert_audited(&api, &calls), 2);

    disk.remove_filler();
    assert_eq!(
        api.call("POST", "/v1/images", json!({"name": "after"}))
            .status,
        201
    );
    let calls = api.calls.borrow().clone();
    assert_eq!(assert_audited(&api, &calls), 3);
}
