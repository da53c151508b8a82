//! Issue 10, point 7: faults of the full deployment. Two `imgsrv serve` instances (the
//! real binary, built with `--features full`) share one PostgreSQL database (a
//! throwaway cluster from tests/fixtures/pg-harness) and one S3 bucket (a real Garage
//! from tests/fixtures/garage-harness), and then:
//! * PostgreSQL stops and starts again, and restarts, during a publish loop: requests
//!   in between answer 503 with Retry-After and `/readyz` says why, both instances
//!   reconnect by themselves, and every version the loop publishes (retrying) is
//!   published whole, none lost;
//! * Garage stops and starts again: 503 while it is down, nothing half stored (no row
//!   cites bytes that are not in the bucket), an upload begun before is finished after;
//! * a blob deleted or overwritten in the bucket behind imgsrv's back is never served,
//!   `imgsrv scrub` finds it (exit 1, naming the version) and quarantines it, and an
//!   upload of the right bytes repairs it;
//! * one instance is killed (SIGKILL) in the middle of an upload: the upload is finished
//!   through the other.
//!
//! The tests that stop PostgreSQL or Garage have a cluster or a server of their own, so
//! the others in this file run beside them undisturbed.
#![cfg(all(feature = "postgres", feature = "s3"))]

#[path = "support/garage.rs"]
mod garage;
#[path = "support/pg.rs"]
mod pg;
mod support;

use imgsrv::digest::Digest;
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

// ---------------------------------------------------------------------------------------
// The deployment

/// The `imgsrv.toml` of an instance of the deployment.
fn deployment_config(url: &str, raw: &garage::Raw, secret_file: &Path) -> String {
    let o = raw.options();
    format!(
        "metrics_listen = \"\"\n\
         [storage]\ncatalog = \"postgres\"\npostgres_url = \"{url}\"\nblobs = \"s3\"\n\
         [storage.s3]\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\n\
         access_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\npath_style = true\n",
        o.endpoint,
        o.bucket,
        o.region,
        o.access_key_id,
        secret_file.display()
    )
}

/// Two instances on one database and one bucket, a trusted publisher key, and the
/// admin token in both data directories.
struct Deployment {
    a: TestServer,
    b: TestServer,
    raw: garage::Raw,
    url: String,
    token: String,
    /// The publisher's minisign secret key (trusted).
    sk: PathBuf,
    work: tempfile::TempDir,
}

fn deployment_on(test: &str, url: String, raw: garage::Raw) -> Deployment {
    let work = temp_dir(test);
    let secret = work.path().join("s3.secret");
    fs::write(&secret, format!("{}\n", raw.options().secret_access_key)).unwrap();
    let config = deployment_config(&url, &raw, &secret);
    let a = TestServer::start_configured(&config);
    let b = TestServer::start_configured(&config);
    fs::copy(a.admin_token_file(), b.admin_token_file()).unwrap();
    let token = a.admin_token();
    let (pubkey, sk) = minisign_keypair(work.path().join("ci"));
    trust_key(a.data_dir(), Some("ci"), &pubkey);
    Deployment {
        a,
        b,
        raw,
        url,
        token,
        sk,
        work,
    }
}

/// A fresh database in the shared cluster and a fresh bucket in the shared Garage.
fn deployment(test: &str) -> Deployment {
    let url = pg::database(pg::shared());
    let (_store, raw) = garage::store_and_raw(test);
    deployment_on(test, url, raw)
}

// ---------------------------------------------------------------------------------------
// Requests

/// An answer: status, header block (lower-case names), body.
struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.text()))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
    /// A 503 that tells the client when to come back.
    #[track_caller]
    fn assert_retry_later(&self, what: &str) {
        assert_eq!(self.status, 503, "{what}: {}", self.text());
        let after = self.header("retry-after");
        assert!(
            after
                .as_deref()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some(),
            "{what}: a 503 without Retry-After: {}",
            self.headers
        );
    }
}

/// One request with curl (the real client side of the wire): `token` if given, `body`
/// sent from stdin when not empty, `extra` curl arguments.
fn request(
    server: &TestServer,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
    extra: &[&str],
) -> Reply {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (head, out) = (dir.path().join("head"), dir.path().join("body"));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--cacert"])
        .arg(server.cert())
        .args(["-X", method, "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&out)
        .args(["-w", "%{http_code}"])
        .args(extra);
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    if !body.is_empty() {
        cmd.args(["--data-binary", "@-"]);
        if body.first() == Some(&b'{') {
            cmd.args(["-H", "Content-Type: application/json"]);
        } else {
            cmd.args(["-H", "Content-Type: application/octet-stream"]);
        }
    }
    let mut child = cmd
        .arg(format!("{}{path}", server.url()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    let mut stdin = child.stdin.take().unwrap();
    // (curl may stop reading when the server answers early)
    let _ = stdin.write_all(body);
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let status = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    Reply {
        status,
        // the last header block (after any 100 Continue)
        headers: fs::read_to_string(&head)
            .unwrap_or_default()
            .rsplit("\r\n\r\n")
            .find(|b| !b.trim().is_empty())
            .unwrap_or_default()
            .to_string(),
        body: fs::read(&out).unwrap_or_default(),
    }
}

fn api(server: &TestServer, token: &str, method: &str, path: &str, body: &[u8]) -> Reply {
    request(server, Some(token), method, path, body, &[])
}

fn anon_get(server: &TestServer, path: &str) -> Reply {
    request(server, None, "GET", path, b"", &[])
}

/// `cas/sha256/ab/cd/<hex>`: where the store keeps a blob.
fn cas_key(hex: &str) -> String {
    format!("cas/sha256/{}/{}/{hex}", &hex[..2], &hex[2..4])
}

fn blob_path(hex: &str) -> String {
    format!("/v1/blobs/sha256:{hex}")
}

/// `psql -At URL -c SQL`: its stdout, trimmed.
fn psql(url: &str, sql: &str) -> String {
    let out = run_ok(Command::new("psql").args([
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-At",
        url,
        "-c",
        sql,
    ]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `imgsrv publish` of `img` as `image`@`version` through `server`, not asserting.
fn try_publish(
    server: &TestServer,
    sk: &Path,
    img: &TestImage,
    image: &str,
    version: &str,
) -> Output {
    run_any(
        Command::new(IMGSRV)
            .args([
                "publish",
                "--server",
                &server.url(),
                "--ca",
                s(&server.cert()),
            ])
            .arg("--token-file")
            .arg(server.admin_token_file())
            .arg("--key")
            .arg(sk)
            .args(["--image", image, "--version", version])
            .arg(&img.metadata)
            .arg(img.rootfs()),
    )
}

/// `imgsrv scrub --data DATA`: (exit code, stdout and stderr).
fn scrub(data: &Path) -> (i32, String) {
    let out = run_any(Command::new(IMGSRV).args(["scrub", "--data", s(data)]));
    (out.status.code().unwrap_or(-1), text(&out))
}

/// Polls `f` until it is true, for at most `limit`.
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The published versions of `image` in the catalog, `version state` a line, in order.
fn version_states(url: &str, image: &str) -> String {
    psql(
        url,
        &format!(
            "SELECT v.version || ' ' || v.state FROM image_versions v \
             JOIN images i ON i.id = v.image_id WHERE i.name = '{image}' \
             ORDER BY length(v.version), v.version"
        ),
    )
}

/// Every blob the catalog knows (rows, artifacts, attachments, finished upload
/// sessions), each with the bucket checked: the digests whose bytes are not there.
fn rows_without_bytes(url: &str, raw: &garage::Raw) -> Vec<String> {
    let all = psql(
        url,
        "SELECT digest FROM cas_blobs UNION SELECT primary_blob_digest FROM release_artifacts \
         UNION SELECT blob_digest FROM artifact_attachments \
         UNION SELECT expected_digest FROM upload_sessions WHERE state = 'ready'",
    );
    let stored: std::collections::BTreeSet<String> = raw.keys("cas/").into_iter().collect();
    all.lines()
        .filter(|d| {
            let hex = d.trim_start_matches("sha256:");
            !stored.contains(&cas_key(hex))
        })
        .map(str::to_string)
        .collect()
}

/// Begins an upload session of `bytes` on `server`: its id.
fn begin(server: &TestServer, token: &str, bytes: &[u8]) -> String {
    let body = json!({
        "expected_digest": Digest::of(bytes).to_string(),
        "expected_size_bytes": bytes.len(),
    });
    let r = api(
        server,
        token,
        "POST",
        "/v1/uploads",
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// `PUT /v1/uploads/ID/parts/N`.
fn put_part(server: &TestServer, token: &str, id: &str, n: u32, bytes: &[u8]) -> Reply {
    api(
        server,
        token,
        "PUT",
        &format!("/v1/uploads/{id}/parts/{n}"),
        bytes,
    )
}

/// `POST /v1/uploads/ID/complete` with `parts` (number, etag, size).
fn complete(server: &TestServer, token: &str, id: &str, parts: &[(u32, String, usize)]) -> Reply {
    let parts: Vec<Value> = parts
        .iter()
        .map(|(n, e, z)| json!({"number": n, "etag": e, "size_bytes": z}))
        .collect();
    api(
        server,
        token,
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        json!({ "parts": parts }).to_string().as_bytes(),
    )
}

/// A whole upload of `bytes` in one session part: the session's state.
fn upload(server: &TestServer, token: &str, bytes: &[u8]) -> String {
    let id = begin(server, token, bytes);
    let p = put_part(server, token, &id, 1, bytes);
    assert_eq!(p.status, 200, "{}", p.text());
    let etag = p.json()["etag"].as_str().unwrap().to_string();
    let c = complete(server, token, &id, &[(1, etag, bytes.len())]);
    assert_eq!(c.status, 200, "{}", c.text());
    c.json()["state"].as_str().unwrap().to_string()
}

/// Deterministic bytes that do not compress.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// PostgreSQL stopped for a few seconds, and later restarted at once, while a client
/// publishes version after version through both instances and retries what fails.
#[test]
fn postgres_restarted_during_a_publish_loop_loses_no_version() {
    const VERSIONS: usize = 6;
    let cluster = pg::cluster();
    let url = pg::database(&cluster);
    let (_store, raw) = garage::store_and_raw("faults-pg");
    let d = deployment_on("faults-pg", url.clone(), raw);
    let images: Vec<TestImage> = (0..VERSIONS)
        .map(|i| {
            make_test_image(
                d.work.path().join(format!("img{i}")),
                &["--serial", &format!("2026010{}_0000", i + 1)],
            )
        })
        .collect();

    // the publisher: each version through A or B in turn, again until it is published
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (published, images, sk) = (published.clone(), images.clone(), d.sk.clone());
        let servers = [d.a.url(), d.b.url()];
        let certs = [d.a.cert(), d.b.cert()];
        let tokens = [d.a.admin_token_file(), d.b.admin_token_file()];
        std::thread::spawn(move || {
            let (mut failures, mut rode_out) = (Vec::new(), Vec::new());
            let deadline = Instant::now() + Duration::from_secs(120);
            for (i, img) in images.iter().enumerate() {
                let mut attempt = 0;
                loop {
                    let k = (i + attempt) % 2;
                    let out = run_any(
                        Command::new(IMGSRV)
                            .args(["publish", "--server", &servers[k], "--ca", s(&certs[k])])
                            .arg("--token-file")
                            .arg(&tokens[k])
                            .arg("--key")
                            .arg(&sk)
                            .args(["--image", "looped", "--version", &(i + 1).to_string()])
                            .arg(&img.metadata)
                            .arg(img.rootfs()),
                    );
                    if out.status.success() {
                        // (the client sends a request answered 503 again, for a while)
                        if text(&out).contains("answered 503") {
                            rode_out.push(text(&out));
                        }
                        break;
                    }
                    failures.push(text(&out));
                    assert!(
                        Instant::now() < deadline,
                        "version {} never published: {failures:#?}",
                        i + 1
                    );
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(300));
                }
                published.fetch_add(1, Ordering::SeqCst);
            }
            (failures, rode_out)
        })
    };

    wait_for("two versions published", Duration::from_secs(60), || {
        published.load(Ordering::SeqCst) >= 2
    });
    pg::stop(&cluster);
    let down_at = published.load(Ordering::SeqCst);
    for (name, server) in [("A", &d.a), ("B", &d.b)] {
        let r = anon_get(server, "/readyz");
        r.assert_retry_later(&format!("{name} /readyz"));
        assert!(
            r.text().contains("catalog database cannot be reached"),
            "{name}: /readyz does not say why: {}",
            r.text()
        );
        api(server, &d.token, "GET", "/v1/images", b"")
            .assert_retry_later(&format!("{name} GET /v1/images"));
        let r = api(
            server,
            &d.token,
            "POST",
            "/v1/images",
            json!({"name": "while-down"}).to_string().as_bytes(),
        );
        r.assert_retry_later(&format!("{name} POST /v1/images"));
    }
    // the publisher meets the outage
    std::thread::sleep(Duration::from_secs(3));
    pg::start(&cluster);
    // both come back by themselves, without a restart
    for (name, server) in [("A", &d.a), ("B", &d.b)] {
        wait_for(
            &format!("{name} ready again"),
            Duration::from_secs(20),
            || anon_get(server, "/readyz").status == 204,
        );
        assert_eq!(api(server, &d.token, "GET", "/v1/images", b"").status, 200);
    }
    // a restart with no gap: the pooled sessions the restart ended are replaced
    // by themselves; a request in between may meet one (503, Retry-After), the
    // next ones are served
    wait_for("a version published since", Duration::from_secs(60), || {
        published.load(Ordering::SeqCst) > down_at
    });
    pg::restart(&cluster);
    for (name, server) in [("A", &d.a), ("B", &d.b)] {
        wait_for(
            &format!("{name} serving after a restart"),
            Duration::from_secs(20),
            || {
                let r = api(server, &d.token, "GET", "/v1/images", b"");
                if r.status != 200 {
                    r.assert_retry_later(&format!("{name} right after a restart"));
                }
                r.status == 200
            },
        );
    }

    let (failures, rode_out) = publisher.join().expect("the publisher");
    assert!(
        !failures.is_empty() || !rode_out.is_empty(),
        "the publisher never met the outage: the test proves nothing"
    );
    for r in &rode_out {
        assert!(r.contains("trying again"), "{r}");
    }
    for f in &failures {
        assert!(
            f.contains("HTTP 503") && f.contains("retry"),
            "a publish that failed otherwise than with a 503 saying to retry: {f}"
        );
    }

    // every version published, whole: rows, manifests, signatures, bytes
    let want: String = (1..=VERSIONS)
        .map(|v| format!("{v} published"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(version_states(&url, "looped"), want);
    assert_eq!(
        psql(
            &url,
            "SELECT count(*) FROM release_artifacts a JOIN image_versions v ON v.id = a.version_id"
        ),
        VERSIONS.to_string(),
        "artifacts"
    );
    assert_eq!(
        psql(&url, "SELECT count(*) FROM publish_records"),
        VERSIONS.to_string(),
        "publish records"
    );
    let (code, out) = scrub(d.a.data_dir());
    assert_eq!(code, 0, "{out}");
    let mut fps: Vec<String> = images.iter().map(|i| i.container_fingerprint()).collect();
    fps.sort();
    for server in [&d.a, &d.b] {
        assert_eq!(stream_fingerprints(server), fps);
    }
    for img in &images {
        let hex = sha256_file(img.rootfs());
        let r = anon_get(&d.b, &blob_path(&hex));
        assert_eq!(r.status, 200);
        assert!(r.body == fs::read(img.rootfs()).unwrap(), "other bytes");
    }
    assert!(rows_without_bytes(&url, &d.raw).is_empty());
}

/// The fingerprints of `server`'s Simple Streams index, sorted.
fn stream_fingerprints(server: &TestServer) -> Vec<String> {
    let ij: Value = serde_json::from_slice(&server.get_ok("/streams/v1/images.json")).unwrap();
    let mut out = Vec::new();
    for p in ij["products"].as_object().unwrap().values() {
        for v in p["versions"].as_object().unwrap().values() {
            for it in v["items"].as_object().unwrap().values() {
                if let Some(fp) = it["combined_squashfs_sha256"].as_str() {
                    out.push(fp.to_string());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

// ---------------------------------------------------------------------------------------
// Garage

/// Garage stopped (once in the middle of a whole upload) and started again.
#[test]
fn garage_stopped_and_started_stores_nothing_half_and_finishes_uploads_after() {
    let g = garage::private();
    let (_store, raw) = garage::store_and_raw_on(g, "faults-garage");
    let d = deployment_on("faults-garage", pg::database(pg::shared()), raw);
    let (a, b, token) = (&d.a, &d.b, d.token.as_str());
    let one = make_test_image(d.work.path().join("one"), &["--serial", "20260101_0000"]);
    let two = make_test_image(d.work.path().join("two"), &["--serial", "20260102_0000"]);
    let out = try_publish(a, &d.sk, &one, "stored", "1");
    assert!(out.status.success(), "{}", text(&out));
    let one_hex = sha256_file(one.rootfs());
    let one_bytes = fs::read(one.rootfs()).unwrap();

    // an upload begun before: part 1 of 2 stored
    let bytes = noise(3_000_000, 1);
    let (p1, p2) = bytes.split_at(2_000_000);
    let id = begin(a, token, &bytes);
    let r = put_part(a, token, &id, 1, p1);
    assert_eq!(r.status, 200, "{}", r.text());
    let etag1 = r.json()["etag"].as_str().unwrap().to_string();

    g.stop();
    for (name, server) in [("A", a), ("B", b)] {
        let r = anon_get(server, "/readyz");
        r.assert_retry_later(&format!("{name} /readyz"));
        assert!(
            r.text().contains("the blob store cannot be reached"),
            "{name}: /readyz does not say why: {}",
            r.text()
        );
        anon_get(server, &blob_path(&one_hex)).assert_retry_later(&format!("{name} download"));
        request(server, None, "HEAD", &blob_path(&one_hex), b"", &["-I"])
            .assert_retry_later(&format!("{name} HEAD"));
        api(server, token, "POST", "/v1/blobs", &noise(100_000, 2))
            .assert_retry_later(&format!("{name} POST /v1/blobs"));
    }
    put_part(b, token, &id, 2, p2).assert_retry_later("part 2 while the store is down");
    let out = try_publish(b, &d.sk, &two, "stored", "2");
    assert!(!out.status.success(), "published with the store down");
    assert!(
        text(&out).contains("HTTP 503") && text(&out).contains("retry"),
        "{}",
        text(&out)
    );
    g.start();
    for (name, server) in [("A", a), ("B", b)] {
        wait_for(
            &format!("{name} ready again"),
            Duration::from_secs(20),
            || anon_get(server, "/readyz").status == 204,
        );
    }
    assert!(
        rows_without_bytes(&d.url, &d.raw).is_empty(),
        "rows citing bytes the bucket does not have"
    );

    // Garage stopped in the middle of a whole upload: nothing of it stays
    let big = noise(24 << 20, 3);
    let big_hex = Digest::of(&big).hex().to_string();
    let sending = {
        let (url, cert, token) = (b.url(), b.cert(), token.to_string());
        let big = big.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut child = Command::new("curl")
                .args(["-sS", "--http1.1", "--cacert", s(&cert)])
                .args([
                    "--limit-rate",
                    "6M",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .args(["-H", &format!("Authorization: Bearer {token}")])
                .args(["-H", "Content-Type: application/octet-stream"])
                .args(["--data-binary", "@-"])
                .arg(format!("{url}/v1/blobs"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let _ = child.stdin.take().unwrap().write_all(&big);
            let o = child.wait_with_output().unwrap();
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    g.stop();
    let status = sending.join().unwrap();
    assert!(
        status == "503" || status == "000",
        "a whole upload cut by the store's outage answered {status}"
    );
    g.start();
    for server in [a, b] {
        wait_for("ready again", Duration::from_secs(20), || {
            anon_get(server, "/readyz").status == 204
        });
    }
    assert!(
        d.raw.keys(&cas_key(&big_hex)).is_empty(),
        "half a blob stored"
    );
    assert_eq!(
        psql(
            &d.url,
            &format!("SELECT count(*) FROM cas_blobs WHERE digest = 'sha256:{big_hex}'")
        ),
        "0"
    );
    assert!(rows_without_bytes(&d.url, &d.raw).is_empty());
    // what the cut upload left (an unfinished multipart upload of its staging key)
    // is garbage collection's; the staged part of the live session is not
    run_ok(Command::new(IMGSRV).args(["gc", "--data", s(a.data_dir()), "--grace", "0"]));
    assert_eq!(d.raw.unfinished_uploads(), Vec::<String>::new());
    assert_eq!(
        d.raw.keys("uploads/"),
        [format!("uploads/{id}/1.part")],
        "the staged parts"
    );

    // the upload begun before the outage is finished after it, across instances
    let r = put_part(b, token, &id, 2, p2);
    assert_eq!(r.status, 200, "{}", r.text());
    let etag2 = r.json()["etag"].as_str().unwrap().to_string();
    let c = complete(a, token, &id, &[(1, etag1, p1.len()), (2, etag2, p2.len())]);
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["state"], "ready");
    assert!(d.raw.get(&cas_key(&Digest::of(&bytes).hex())) == bytes);
    // the publish refused during the outage goes through now; the whole upload too
    let out = try_publish(b, &d.sk, &two, "stored", "2");
    assert!(out.status.success(), "{}", text(&out));
    let r = api(a, token, "POST", "/v1/blobs", &big);
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
    assert!(d.raw.get(&cas_key(&big_hex)) == big);
    assert_eq!(version_states(&d.url, "stored"), "1 published\n2 published");
    for server in [a, b] {
        for img in [&one, &two] {
            let r = anon_get(server, &blob_path(&sha256_file(img.rootfs())));
            assert_eq!(r.status, 200);
            assert!(r.body == fs::read(img.rootfs()).unwrap(), "other bytes");
        }
    }
    assert!(anon_get(a, &blob_path(&one_hex)).body == one_bytes);
    assert!(rows_without_bytes(&d.url, &d.raw).is_empty());
    let (code, out) = scrub(a.data_dir());
    assert_eq!(code, 0, "{out}");
}

// ---------------------------------------------------------------------------------------
// Damage behind imgsrv's back

/// One blob overwritten in the bucket with other bytes of the same size, another
/// deleted: neither is served, scrub finds both and names their versions, quarantines
/// the damaged one, and uploads of the right bytes repair both.
#[test]
fn a_blob_damaged_or_deleted_in_the_bucket_is_found_quarantined_and_repaired() {
    let d = deployment("faults-scrub");
    let (a, b, token) = (&d.a, &d.b, d.token.as_str());
    let one = make_test_image(d.work.path().join("one"), &["--serial", "20260101_0000"]);
    let two = make_test_image(d.work.path().join("two"), &["--serial", "20260102_0000"]);
    for (img, v) in [(&one, "1"), (&two, "2")] {
        let out = try_publish(a, &d.sk, img, "damaged", v);
        assert!(out.status.success(), "{}", text(&out));
    }
    let (hex1, hex2) = (sha256_file(one.rootfs()), sha256_file(two.rootfs()));
    let (right1, right2) = (
        fs::read(one.rootfs()).unwrap(),
        fs::read(two.rootfs()).unwrap(),
    );
    let (key1, key2) = (cas_key(&hex1), cas_key(&hex2));
    assert!(d.raw.get(&key1) == right1);

    // behind imgsrv's back: one byte changed (same size), and a blob removed
    let mut wrong1 = right1.clone();
    let mid = wrong1.len() / 2;
    wrong1[mid] ^= 0xff;
    d.raw.put(&key1, &wrong1);
    d.raw.delete(&key2);
    assert!(d.raw.get(&key1) == wrong1);

    // never served as complete: not the wrong bytes, not in part either
    for (name, server) in [("A", a), ("B", b)] {
        for (hex, what) in [(&hex1, "overwritten"), (&hex2, "deleted")] {
            let r = anon_get(server, &blob_path(hex));
            assert_eq!(r.status, 503, "{name}: the {what} blob: {}", r.text());
            assert!(r.body != wrong1);
            let r = request(server, None, "GET", &blob_path(hex), b"", &["-r", "0-99"]);
            assert_eq!(r.status, 503, "{name}: a range of the {what} blob");
        }
    }

    let (code, out) = scrub(b.data_dir());
    assert_eq!(code, 1, "{out}");
    let problem = |hex: &str| {
        out.lines()
            .skip_while(|l| !(l.starts_with("PROBLEM") && l.contains(hex)))
            .take(2)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let p1 = problem(&hex1);
    assert!(p1.starts_with("PROBLEM damaged"), "{out}");
    assert!(p1.contains("affects damaged@1"), "{p1}");
    let p2 = problem(&hex2);
    assert!(p2.starts_with("PROBLEM missing"), "{out}");
    assert!(p2.contains("affects damaged@2"), "{p2}");
    // the damaged copy kept in quarantine, out of cas/
    assert!(d.raw.keys(&key1).is_empty(), "still under cas/");
    assert!(d.raw.get(&format!("quarantine/{hex1}")) == wrong1);
    let note =
        String::from_utf8_lossy(&d.raw.get(&format!("quarantine/{hex1}.reason"))).into_owned();
    assert!(note.contains("hash"), "{note}");
    for (name, server) in [("A", a), ("B", b)] {
        let r = anon_get(server, &blob_path(&hex1));
        assert_eq!(r.status, 503, "{name}");
        assert!(r.text().contains("quarantined"), "{name}: {}", r.text());
        let r = anon_get(server, &blob_path(&hex2));
        assert_eq!(r.status, 503, "{name}");
        assert!(r.text().contains("missing"), "{name}: {}", r.text());
    }
    // scrub again: still both, the quarantined one said so
    let (code, out) = scrub(a.data_dir());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("PROBLEM quarantined sha256:{hex1}")),
        "{out}"
    );

    // the right bytes put back, one in a session, one sent whole
    assert_eq!(upload(a, token, &right1), "ready");
    let r = api(b, token, "POST", "/v1/blobs", &right2);
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
    assert!(d.raw.get(&key1) == right1 && d.raw.get(&key2) == right2);
    for server in [a, b] {
        for (hex, right) in [(&hex1, &right1), (&hex2, &right2)] {
            let r = anon_get(server, &blob_path(hex));
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(&r.body == right, "other bytes after the repair");
        }
    }
    let (code, out) = scrub(a.data_dir());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("its right bytes are back"), "{out}");

    // the right bytes copied in by another tool (no stamp of imgsrv's): not served
    // until a scrub has read them, then served again
    d.raw.put(&key2, &right2);
    assert_eq!(anon_get(b, &blob_path(&hex2)).status, 503);
    let (code, out) = scrub(b.data_dir());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("note: sha256:{hex2}: its bytes are right")),
        "{out}"
    );
    assert!(out.contains("1 stamped again"), "{out}");
    let r = anon_get(a, &blob_path(&hex2));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == right2);
}

// ---------------------------------------------------------------------------------------
// An instance killed

/// One instance killed with SIGKILL while a part streams into it: the upload is
/// finished through the other, and what the killed one left is cleaned up.
#[test]
fn an_upload_cut_by_kill_9_of_one_instance_is_finished_through_the_other() {
    let mut d = deployment("faults-kill");
    let token = d.token.clone();
    let p1 = noise(5 << 20, 11);
    let p2 = noise(20 << 20, 12);
    let whole: Vec<u8> = [p1.as_slice(), p2.as_slice()].concat();
    let digest = Digest::of(&whole);
    let id = begin(&d.a, &token, &whole);
    let r = put_part(&d.a, &token, &id, 1, &p1);
    assert_eq!(r.status, 200, "{}", r.text());
    let etag1 = r.json()["etag"].as_str().unwrap().to_string();

    // part 2 into A, slowly; A is killed on the way
    let body = d.work.path().join("p2");
    fs::write(&body, &p2).unwrap();
    let mut sending = Command::new("curl")
        .args(["-sS", "--http1.1", "--cacert", s(&d.a.cert())])
        .args([
            "--limit-rate",
            "8M",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-X", "PUT", "-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", "Content-Type: application/octet-stream"])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!("{}/v1/uploads/{id}/parts/2", d.a.url()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A began staging it in the bucket (a multipart upload: the part is over 16 MiB)
    wait_for("part 2 staging", Duration::from_secs(10), || {
        !d.raw.unfinished_uploads().is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    let pid = d.a.pid().expect("A runs");
    // SAFETY: kill(2) of our own child, not reaped yet.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    d.a.kill(); // (reaps it)
    let o = sending.wait().unwrap();
    let mut status = String::new();
    std::io::Read::read_to_string(&mut sending.stdout.take().unwrap(), &mut status).unwrap();
    assert!(
        !o.success() || status != "200",
        "part 2 was finished before the kill ({status}): the test proves nothing"
    );
    assert_eq!(
        d.raw.unfinished_uploads(),
        [format!("uploads/{id}/2.part")],
        "what the killed instance left"
    );

    // B knows the session and its first part; part 2 again, and complete, through B
    let s = api(&d.b, &token, "GET", &format!("/v1/uploads/{id}"), b"");
    assert_eq!(s.status, 200, "{}", s.text());
    assert!(
        matches!(s.json()["state"].as_str(), Some("created" | "uploading")),
        "{}",
        s.text()
    );
    let r = put_part(&d.b, &token, &id, 2, &p2);
    assert_eq!(r.status, 200, "{}", r.text());
    let etag2 = r.json()["etag"].as_str().unwrap().to_string();
    let c = complete(
        &d.b,
        &token,
        &id,
        &[(1, etag1, p1.len()), (2, etag2, p2.len())],
    );
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["state"], "ready");
    let key = cas_key(&digest.hex());
    assert!(d.raw.get(&key) == whole, "the bucket holds other bytes");
    assert!(d.raw.keys("uploads/").is_empty(), "staged parts left");
    assert!(
        d.raw.unfinished_uploads().is_empty(),
        "the killed instance's multipart upload left: {:?}",
        d.raw.unfinished_uploads()
    );
    assert_eq!(
        psql(
            &d.url,
            &format!("SELECT size_bytes FROM cas_blobs WHERE digest = '{digest}'")
        ),
        whole.len().to_string()
    );
    // served whole through B (to a writer: no version cites it yet), and through A
    // once it is started again on the same data directory
    let r = api(&d.b, &token, "GET", &blob_path(&digest.hex()), b"");
    assert_eq!(r.status, 200);
    assert!(r.body == whole, "B served other bytes");
    d.a.spawn();
    let r = api(&d.a, &token, "GET", &blob_path(&digest.hex()), b"");
    assert_eq!(r.status, 200);
    assert!(r.body == whole, "A served other bytes");
}

/// An App in-process on a fresh PostgreSQL database (blobs in its data directory,
/// `WORK/data`): the database's URL, the work directory, the App.
fn app_on_postgres(test: &str) -> (String, tempfile::TempDir, imgsrv::app::App) {
    let url = pg::database(pg::shared());
    let work = temp_dir(test);
    let data = work.path().join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(
        data.join("imgsrv.toml"),
        format!(
            "metrics_listen = \"\"\n[storage]\ncatalog = \"postgres\"\npostgres_url = \"{url}\"\n"
        ),
    )
    .unwrap();
    imgsrv::app::init(&data, &[]).unwrap();
    let app = imgsrv::app::App::open(imgsrv::config::Config::load(&data, None).unwrap()).unwrap();
    (url, work, app)
}

/// Ends the database sessions of `url` that hold an advisory lock (of `mode`:
/// `ExclusiveLock` or `ShareLock`), as a restart of the database does to every
/// session: how many.
fn end_lock_sessions(admin: &mut ::postgres::Client, mode: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND mode = $1 \
             AND pid <> pg_backend_pid() \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&mode],
        )
        .unwrap()
        .get(0)
}

/// A collection whose `blobs` lock is lost under it (its database session ended, as in a
/// restart: writers may have come in between) says so: the run names what it deleted
/// since it last knew it held the lock (for `imgsrv scrub` to confirm), takes the lock
/// anew, and finishes the job under it. Without the check it went on believing it held
/// the lock, and reported a clean run.
#[test]
fn a_gc_whose_lock_was_lost_mid_run_names_what_it_deleted_and_goes_on_under_a_new_one() {
    use imgsrv::cas::hooked::{Call, Hooked};
    use imgsrv::maint::gc;
    use std::sync::Mutex;

    let (url, _work, mut app) = app_on_postgres("gc-lock-lost");
    // 600 blobs nothing cites: three batches of the collection
    let mut orphans = Vec::new();
    for i in 0..600u32 {
        let bytes = format!("orphan {i}");
        let d = Digest::of(bytes.as_bytes());
        app.blobs
            .put(&d, bytes.len() as u64, &mut bytes.as_bytes())
            .unwrap();
        app.catalog
            .insert_blob(&d, bytes.len() as u64, None)
            .unwrap();
        orphans.push(d);
    }
    // at the first deletion, the database ends every session holding an advisory lock
    let admin = Mutex::new(::postgres::Client::connect(&url, ::postgres::NoTls).unwrap());
    let first = Arc::new(Mutex::new(None::<Digest>));
    let seen = first.clone();
    app.blobs = Arc::new(Hooked {
        inner: app.blobs.clone(),
        hook: move |call| {
            let Call::Delete(d) = call else { return };
            let mut first = seen.lock().unwrap();
            if first.is_some() {
                return;
            }
            *first = Some(*d);
            let ended = end_lock_sessions(&mut admin.lock().unwrap(), "ExclusiveLock");
            assert!(ended >= 1, "the collection holds its locks: {ended}");
        },
    });
    let opts = gc::GcOptions {
        grace: Duration::ZERO,
        retention: Vec::new(),
        actor: "test".into(),
    };
    let mut said = Vec::new();
    let run = gc::run(&app, &opts, false, &mut |l| said.push(l.to_string())).unwrap();
    let report = run.report.unwrap();
    let first = first.lock().unwrap().expect("gc deleted something");
    assert_eq!(report.failures.len(), 1, "{:#?}", report.failures);
    let f = &report.failures[0];
    assert!(
        f.contains("job lock blobs was lost")
            && f.contains("item(s) deleted since it was last checked")
            && f.contains(&format!("blob {first}"))
            && f.contains("imgsrv scrub"),
        "{f}"
    );
    // the rest was deleted under the lock taken anew
    assert_eq!(report.blobs_removed, 600, "{}", said.join("\n"));
    for d in &orphans {
        assert!(app.catalog.get_blob(d).unwrap().is_none(), "{d}");
        assert_eq!(app.blobs.stat(d).unwrap(), None, "{d}");
    }
    assert!(said.iter().any(|l| l.contains("1 failure(s)")), "{said:?}");
}

/// Issue 10, point 4: a scrub whose lock is lost under it (a database restart) takes
/// it again and goes on; if another scrub took it meanwhile, it stops and says so, and
/// does not go on beside the other one.
#[test]
fn a_scrub_whose_lock_was_lost_takes_it_again_or_stops_for_the_scrub_that_has_it() {
    use imgsrv::cas::hooked::{Call, Hooked};
    use imgsrv::maint::scrub::{self, NoteKind, ScrubOptions};
    use std::sync::Mutex;

    let (url, work, mut app) = app_on_postgres("scrub-lock-lost");
    for i in 0..20u32 {
        let bytes = format!("blob {i}");
        let d = Digest::of(bytes.as_bytes());
        app.blobs
            .put(&d, bytes.len() as u64, &mut bytes.as_bytes())
            .unwrap();
        app.catalog
            .insert_blob(&d, bytes.len() as u64, None)
            .unwrap();
    }
    let other = imgsrv::admin_cli::open_catalog(&work.path().join("data")).unwrap();
    let admin = Mutex::new(::postgres::Client::connect(&url, ::postgres::NoTls).unwrap());
    // at the 5th blob read, the database ends the scrub's session; with `rival`, another
    // scrub takes the lock at once
    let rival = Arc::new(Mutex::new((false, None::<imgsrv::catalog::JobLock>)));
    let reads = Arc::new(AtomicUsize::new(0));
    let (r, n) = (rival.clone(), reads.clone());
    let inner = app.blobs.clone();
    app.blobs = Arc::new(Hooked {
        inner,
        hook: move |call| {
            let Call::Open(_) = call else { return };
            if n.fetch_add(1, Ordering::SeqCst) != 4 {
                return;
            }
            assert_eq!(
                end_lock_sessions(&mut admin.lock().unwrap(), "ExclusiveLock"),
                1,
                "the scrub holds its lock"
            );
            let mut r = r.lock().unwrap();
            if r.0 {
                r.1 = Some(
                    other
                        .job_lock(scrub::LOCK, imgsrv::catalog::LockMode::Exclusive, false)
                        .unwrap()
                        .expect("the lost lock is free"),
                );
            }
        },
    });
    let opts = ScrubOptions {
        actor: "test".into(),
        ..Default::default()
    };
    let lost = |r: &scrub::ScrubReport| -> Vec<String> {
        r.notes
            .iter()
            .filter(|n| matches!(n.kind, NoteKind::LockLost))
            .map(|n| n.detail.clone())
            .collect()
    };

    // lost and free: taken again, every blob read, a clean run
    let mut out = Vec::new();
    let r = scrub::scrub(&app, &opts, &mut out).unwrap();
    let said = String::from_utf8_lossy(&out).to_string();
    assert_eq!(lost(&r).len(), 1, "{said}");
    assert!(lost(&r)[0].contains("taken again"), "{said}");
    assert!(!r.stopped, "{said}");
    assert_eq!(r.counts.blobs_read, 20, "{said}");
    assert!(r.ok(), "{said}");

    // lost and taken by another scrub: this one stops, having read 5 of them
    reads.store(0, Ordering::SeqCst);
    rival.lock().unwrap().0 = true;
    let mut out = Vec::new();
    let r = scrub::scrub(&app, &opts, &mut out).unwrap();
    let said = String::from_utf8_lossy(&out).to_string();
    assert_eq!(lost(&r).len(), 1, "{said}");
    assert!(lost(&r)[0].contains("another scrub holds it"), "{said}");
    assert!(r.stopped, "{said}");
    assert_eq!(r.counts.blobs_read, 5, "{said}");
    assert!(said.contains("STOPPED before the end"), "{said}");
    // while the other holds it, no scrub starts here
    assert!(matches!(
        scrub::scrub(&app, &opts, &mut Vec::new()),
        Err(scrub::ScrubError::Busy)
    ));
    rival.lock().unwrap().1 = None;
    assert!(scrub::scrub(&app, &opts, &mut Vec::new()).unwrap().ok());
}

/// Issue 10, point 4: the instances of a deployment share their catalog and each has
/// the same `[[mirror]]` jobs, and a job runs on one of them at a time: an instance
/// finds the job's lock taken and skips its turn (`skipped`, nothing fetched). A run
/// whose lock is lost under it (a database restart) stores no version after that, and
/// the next run takes up the rest.
#[test]
fn a_scheduled_mirror_runs_on_one_instance_at_a_time_and_stops_when_its_lock_is_lost() {
    use imgsrv::cas::hooked::{Call, Hooked};
    use imgsrv::schedule::{read_status, MirrorJob, Scheduler};
    use std::sync::Mutex;

    // the upstream: an embedded imgsrv with two versions
    let upstream = TestServer::start();
    let (url, work, mut app) = app_on_postgres("mirror-lock");
    let (pubkey, secret) = minisign_keypair(work.path().join("publisher"));
    trust_key(upstream.data_dir(), None, &pubkey);
    let serials = ["20260601_0000", "20260602_0000"];
    for s in serials {
        let img = make_test_image(work.path().join(s), &["--serial", s]);
        publish_image(&upstream, &secret, &img, &[]);
    }
    let data = work.path().join("data");
    let (mirror_pub, mirror_secret) = minisign_keypair(work.path().join("mirror"));
    trust_key(&data, Some("mirror"), &mirror_pub);
    let mut options = imgsrv::mirror::MirrorOptions::new(&upstream.url(), &mirror_secret);
    options.upstream_ca = Some(upstream.cert().to_path_buf());
    options.staging_dir = Some(data.join("tmp").join("mirror-up.stream"));
    let job = MirrorJob {
        name: "up.stream".into(),
        interval: Duration::from_secs(3600),
        options,
    };
    let published = |app: &imgsrv::app::App| -> Vec<String> {
        serials
            .iter()
            .filter(|s| {
                app.catalog
                    .get_version("debian-bookworm", s)
                    .is_ok_and(|v| v.state == imgsrv::catalog::VersionState::Published)
            })
            .map(|s| s.to_string())
            .collect()
    };
    let status = || {
        read_status(&data)
            .unwrap()
            .into_iter()
            .find(|s| s.name == "up.stream")
            .expect("the job's status")
    };

    // another instance holds the job's lock: this one's turn is skipped
    let other = imgsrv::admin_cli::open_catalog(&data).unwrap();
    let held = other
        .job_lock(
            "mirror-up.stream",
            imgsrv::catalog::LockMode::Exclusive,
            false,
        )
        .unwrap()
        .unwrap();
    let twin = imgsrv::app::App::open(imgsrv::config::Config::load(&data, None).unwrap()).unwrap();
    let sched = Scheduler::start(Arc::new(twin), vec![job.clone()]);
    let t = Instant::now();
    while status().last_outcome.is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", status());
        std::thread::sleep(Duration::from_millis(100));
    }
    sched.stop();
    let st = status();
    assert_eq!(st.last_outcome.as_deref(), Some("skipped"), "{st:?}");
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("job lock mirror-up.stream is taken")),
        "{st:?}"
    );
    assert_eq!(st.runs, 0, "{st:?}");
    assert!(published(&app).is_empty());
    drop(held);

    // the lock lost at the run's first look at the store: nothing stored after it
    let admin = Mutex::new(::postgres::Client::connect(&url, ::postgres::NoTls).unwrap());
    let fired = Arc::new(AtomicUsize::new(0));
    let f = fired.clone();
    let inner = app.blobs.clone();
    app.blobs = Arc::new(Hooked {
        inner,
        hook: move |call| {
            if matches!(call, Call::Stat(_)) && f.fetch_add(1, Ordering::SeqCst) == 0 {
                assert_eq!(
                    end_lock_sessions(&mut admin.lock().unwrap(), "ExclusiveLock"),
                    1,
                    "the run holds the job's lock"
                );
            }
        },
    });
    let app = Arc::new(app);
    // (the stopped scheduler's thread is gone; its runs are the ones asked for here)
    sched.run_once(&app, &job);
    let st = status();
    assert!(fired.load(Ordering::SeqCst) > 0);
    assert_eq!(st.last_outcome.as_deref(), Some("error"), "{st:?}");
    let err = st.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("the job lock mirror-up.stream was lost") && err.contains("stopped before"),
        "{st:?}"
    );
    let first = published(&app);
    assert!(first.len() < 2, "stored after the lock was lost: {first:?}");
    assert!(
        serials
            .iter()
            .filter(|s| !first.contains(&s.to_string()))
            .any(|s| err.contains(s)),
        "{err}"
    );
    // the next run takes up the rest
    sched.run_once(&app, &job);
    let st = status();
    assert_eq!(st.last_outcome.as_deref(), Some("ok"), "{st:?}");
    assert_eq!(published(&app), serials.to_vec());
}
