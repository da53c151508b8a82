//! Issue 8, points 5 and 7: watching and running a server. The Prometheus metrics on
//! their own listener (counters that move by exactly the requests made, an exposition
//! `promtool check metrics` accepts, a taken port that does not stop `serve`, `""` that
//! turns them off), `/readyz` answering 503 when the catalog or the blob store cannot
//! be written (a read-only filesystem, a full disk), and the systemd unit of
//! `contrib/systemd` (checked with `systemd-analyze`: this machine has no systemd
//! running to start it under).
//!
//! The readiness tests need root: they mount a tmpfs and read-only bind mounts.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::tmpfs::{ReadOnly, Tmpfs};
use support::*;

const DURATION: &str = "imgsrv_http_server_request_duration_seconds";
const BODY_BYTES: &str = "imgsrv_http_server_response_body_bytes_total";
const ACTIVE: &str = "imgsrv_http_server_active_requests";
const DOWNLOAD: &str = "/v1/images/{name}/versions/{version}/artifacts/{artifact}/download";

// --------------------------------------------------------------------- the exposition

/// One scrape: every sample by name and label set.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn of(server: &TestServer) -> Scrape {
        Scrape::parse(server.scrape())
    }

    fn parse(text: String) -> Scrape {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("NAME VALUE");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => (
                    name.to_string(),
                    labels(rest.strip_suffix('}').expect("labels end with }")),
                ),
            };
            samples.push((name, labels, value));
        }
        Scrape { text, samples }
    }

    /// The sample of `name` with exactly `labels`; 0 when there is none yet (a counter
    /// or histogram series appears with its first event).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map_or(0.0, |(_, _, v)| *v)
    }

    /// Requests answered with `method`, `route`, `status` (the histogram's count).
    fn requests(&self, method: &str, route: &str, status: u16) -> f64 {
        let status = status.to_string();
        self.get(
            &format!("{DURATION}_count"),
            &[("method", method), ("route", route), ("status", &status)],
        )
    }
}

/// `k="v",k2="v2"` (values escaped as the text format escapes them).
fn labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label {key} in {s}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.push(chars.next().expect("escaped char")),
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

/// Scrapes until `f` gives `want` (metrics are recorded just after a response is
/// written, so a client can see its answer a moment before), failing at once if it
/// goes past it and after 10 s if it never gets there. The last scrape.
#[track_caller]
fn settles(server: &TestServer, what: &str, want: f64, f: impl Fn(&Scrape) -> f64) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = Scrape::of(server);
        let got = f(&s);
        assert!(got <= want, "{what}: {got}, more than the {want} expected");
        if got == want {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {got} after 10 s, not {want}\n{}",
            s.text
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `promtool check metrics` on `text`: asserts it exits 0.
#[track_caller]
fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (contrib/install-test-deps.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}\n--- the exposition:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// --------------------------------------------------------------------- clients

/// `curl` over HTTPS trusting the server's certificate: (status, body).
fn curl(server: &TestServer, args: &[&str], path: &str) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let out = run_any(
        Command::new("curl")
            .args(["-sS", "--http1.1", "-o"])
            .arg(&body)
            .args(["-w", "%{http_code}", "--cacert"])
            .arg(server.cert())
            .args(args)
            .arg(format!("{}{path}", server.url())),
    );
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (code, fs::read(&body).unwrap_or_default())
}

/// An API call with the admin token: (status, JSON body or null).
fn api(server: &TestServer, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", server.url()))
        .header("Authorization", format!("Bearer {}", server.admin_token()))
        .header("Content-Type", "application/json")
        .body(body.to_vec())
        .unwrap();
    let mut resp = server
        .agent()
        .run(req)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let bytes = resp.body_mut().read_to_vec().unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn begin_upload(server: &TestServer, data: &[u8]) -> (u16, String) {
    let body = json!({
        "expected_digest": format!("sha256:{}", sha256_hex(data)),
        "expected_size_bytes": data.len(),
    });
    let (status, v) = api(server, "POST", "/v1/uploads", body.to_string().as_bytes());
    assert!(status == 200 || status == 201, "begin: {status} {v}");
    (status, v["id"].as_str().expect("upload id").to_string())
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

// --------------------------------------------------------------------- tests

#[test]
fn requests_move_the_counters_by_exactly_what_was_asked_and_promtool_accepts_the_exposition() {
    let server = TestServer::start_with("metrics_listen = \"127.0.0.1:0\"\n");
    assert!(server.metrics_url().is_some(), "port 0 works and is logged");
    let tmp = temp_dir("metrics");
    let (public, secret) = minisign_keypair(tmp.path().join("key"));
    trust_key(server.data_dir(), None, &public);
    let img = make_test_image(tmp.path().join("img"), &["--serial", "20260101_0000"]);
    let before = Scrape::of(&server);
    publish_image(&server, &secret, &img, &["--image", "watched"]);

    // what the catalog holds is what the gauges say; every blob was uploaded once
    let sql = catalog_sql(
        server.data_dir(),
        "SELECT count(*) || ' ' || sum(size_bytes) FROM cas_blobs",
    );
    let (blobs, bytes) = sql.trim().split_once(' ').expect("count and sum");
    let (blobs, bytes): (f64, f64) = (blobs.parse().unwrap(), bytes.parse().unwrap());
    assert!(blobs >= 2.0, "metadata and rootfs at least: {sql}");
    let after_publish = settles(&server, "publishes published", 1.0, |s| {
        s.get("imgsrv_publishes_total", &[("outcome", "published")])
    });
    assert_eq!(after_publish.get("imgsrv_cas_blobs", &[]), blobs);
    assert_eq!(after_publish.get("imgsrv_cas_blob_bytes", &[]), bytes);
    let stored = |s: &Scrape| s.get("imgsrv_uploads_total", &[("outcome", "stored")]);
    assert_eq!(stored(&after_publish) - stored(&before), blobs);

    // requests of several routes, counted under their patterns
    let before = Scrape::of(&server);
    for _ in 0..5 {
        assert_eq!(curl(&server, &[], "/streams/v1/index.json").0, 200);
    }
    for name in ["nope", "other-nope", "third"] {
        assert_eq!(curl(&server, &[], &format!("/v1/images/{name}")).0, 404);
    }
    for _ in 0..2 {
        assert_eq!(curl(&server, &["-I"], "/healthz").0, 204);
    }
    assert_eq!(curl(&server, &["-X", "DELETE"], "/v1/keys").0, 405);
    assert_eq!(curl(&server, &[], "/no/such/route").0, 404);
    let (status, view) = api(
        &server,
        "GET",
        "/v1/images/watched/versions/20260101_0000",
        b"",
    );
    assert_eq!(status, 200, "{view}");
    let artifact = &view["artifacts"][0]["artifact"];
    let id = artifact["id"].as_str().unwrap();
    let size = artifact["primary_blob_size_bytes"].as_u64().unwrap();
    let download = format!("/v1/images/watched/versions/20260101_0000/artifacts/{id}/download");
    let (status, body) = curl(&server, &[], &download);
    assert_eq!((status, body.len() as u64), (200, size));
    // the trailing file name of the Simple Streams paths is the same route
    let (status, body) = curl(&server, &[], &format!("{download}/rootfs.squashfs"));
    assert_eq!((status, body.len() as u64), (200, size));

    // each count settles at exactly what was asked (no more, and not less for long)
    let expect = |method: &'static str, route: &'static str, status: u16, n: f64| {
        let want = before.requests(method, route, status) + n;
        settles(&server, &format!("{method} {route} {status}"), want, |s| {
            s.requests(method, route, status)
        })
    };
    expect("GET", "/streams/v1/index.json", 200, 5.0);
    expect("GET", "/v1/images/{name}", 404, 3.0);
    expect("HEAD", "/healthz", 204, 2.0);
    expect("DELETE", "/v1/keys", 405, 1.0);
    expect("GET", "other", 404, 1.0);
    expect("GET", "/v1/images/{name}/versions/{version}", 200, 1.0);
    let after = expect("GET", DOWNLOAD, 200, 2.0);
    let bytes_of = |s: &Scrape, route: &str| s.get(BODY_BYTES, &[("route", route)]);
    assert_eq!(
        bytes_of(&after, DOWNLOAD) - bytes_of(&before, DOWNLOAD),
        2.0 * size as f64,
        "the download route served exactly its two bodies"
    );
    let index = curl(&server, &[], "/streams/v1/index.json").1.len() as f64;
    let route = "/streams/v1/index.json";
    settles(
        &server,
        "index.json bytes",
        bytes_of(&before, route) + 6.0 * index,
        |s| bytes_of(s, route),
    );
    let inf = after.get(
        &format!("{DURATION}_bucket"),
        &[
            ("method", "GET"),
            ("route", DOWNLOAD),
            ("status", "200"),
            ("le", "+Inf"),
        ],
    );
    assert_eq!(
        inf,
        after.requests("GET", DOWNLOAD, 200),
        "+Inf bucket = count"
    );
    assert_eq!(after.get(ACTIVE, &[]), 0.0, "nothing in flight");

    // a client that refuses the certificate: a failed handshake
    let failures = |s: &Scrape| {
        s.get(
            "imgsrv_tls_handshake_failures_total",
            &[("reason", "error")],
        )
    };
    let was = failures(&after);
    let out = run_any(
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null"])
            .arg(format!("{}/healthz", server.url())),
    );
    assert!(
        !out.status.success(),
        "curl without --cacert refuses the self-signed certificate"
    );
    settles(&server, "handshake failures", was + 1.0, failures);

    // uploads by outcome: already stored, aborted, failed
    let outcome = |s: &Scrape, o: &str| s.get("imgsrv_uploads_total", &[("outcome", o)]);
    let before = Scrape::of(&server);
    let rootfs = fs::read(img.rootfs()).unwrap();
    assert_eq!(
        begin_upload(&server, &rootfs).0,
        200,
        "already stored: ready at once"
    );
    let (_, id) = begin_upload(&server, b"to be aborted");
    assert_eq!(
        api(&server, "POST", &format!("/v1/uploads/{id}/abort"), b"").0,
        200
    );
    let (_, id) = begin_upload(&server, b"declared bytes");
    let (status, part) = api(
        &server,
        "PUT",
        &format!("/v1/uploads/{id}/parts/1"),
        b"other bytes!!!",
    );
    assert_eq!(status, 200, "{part}");
    let complete = json!({"parts": [{"number": 1, "etag": part["etag"], "size_bytes": 14}]});
    let (status, v) = api(
        &server,
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        complete.to_string().as_bytes(),
    );
    assert_eq!(status, 412, "a digest that does not match: {v}");
    // a refused publish (not a draft any more)
    let (status, v) = api(
        &server,
        "POST",
        "/v1/images/watched/versions/20260101_0000/publish",
        b"{}",
    );
    assert_eq!(status, 412, "{v}");
    let after = settles(&server, "refused publishes", 1.0, |s| {
        s.get("imgsrv_publishes_total", &[("outcome", "refused")])
    });
    for (o, n) in [
        ("already_stored", 1.0),
        ("aborted", 1.0),
        ("failed", 1.0),
        ("stored", 0.0),
    ] {
        assert_eq!(outcome(&after, o) - outcome(&before, o), n, "uploads {o}");
    }
    for (method, route, status) in [
        ("POST", "/v1/uploads/{upload}/abort", 200),
        ("PUT", "/v1/uploads/{upload}/parts/{part}", 200),
        ("POST", "/v1/uploads/{upload}/complete", 412),
    ] {
        let moved = after.requests(method, route, status) - before.requests(method, route, status);
        assert_eq!(moved, 1.0, "{method} {route} {status}");
    }

    promtool_accepts(&after.text);
    assert!(after.text.contains("# TYPE imgsrv_uploads_total counter"));
    assert!(
        !after.text.contains("# EOF"),
        "Prometheus text format by default"
    );
}

#[test]
fn the_metrics_listener_speaks_openmetrics_on_request_and_serves_only_get_metrics() {
    let server = TestServer::start();
    let url = server
        .metrics_url()
        .expect("TestServer gives every server a metrics port");
    let call = |method: &str, url: &str, accept: Option<&str>| {
        let mut req = ureq::http::Request::builder().method(method).uri(url);
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        let mut resp = server.agent().run(req.body(()).unwrap()).unwrap();
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let allow = resp
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_string());
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        (resp.status().as_u16(), ctype, allow, body)
    };
    // as Prometheus asks
    let (status, ctype, _, body) = call(
        "GET",
        &url,
        Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    );
    assert_eq!(status, 200);
    assert_eq!(
        ctype,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(body.contains("# TYPE imgsrv_uploads counter"), "{body}");
    // as curl and promtool read it
    let (status, ctype, _, body) = call("GET", &url, None);
    assert_eq!(status, 200);
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    promtool_accepts(&body);
    let (status, _, _, body) = call("HEAD", &url, None);
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, _, allow, _) = call("POST", &url, None);
    assert_eq!((status, allow.as_deref()), (405, Some("GET, HEAD")));
    let root = url.trim_end_matches("metrics");
    assert_eq!(call("GET", root, None).0, 404);
    assert_eq!(call("GET", &format!("{url}/x"), None).0, 404);
    // the metrics listener's own requests are not counted as API requests
    let s = Scrape::of(&server);
    assert!(
        !s.samples
            .iter()
            .any(|(_, l, _)| l.get("route").is_some_and(|r| r.contains("metrics"))),
        "{}",
        s.text
    );
}

#[test]
fn a_request_in_progress_is_active_until_it_ends() {
    let server = TestServer::start();
    let tmp = temp_dir("active");
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = tmp.path().join("part");
    fs::write(&file, &data).unwrap();
    let (_, id) = begin_upload(&server, &data);
    assert_eq!(Scrape::of(&server).get(ACTIVE, &[]), 0.0);
    // a part sent at 4 KiB/s (above the server's minimum rate): about a minute
    let mut slow = Command::new("curl")
        .args(["-sS", "--http1.1", "--limit-rate", "4k", "--cacert"])
        .arg(server.cert())
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", server.admin_token()))
        .arg("-T")
        .arg(&file)
        .arg(format!("{}/v1/uploads/{id}/parts/1", server.url()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    settles(&server, "active requests during the upload", 1.0, |s| {
        s.get(ACTIVE, &[])
    });
    slow.kill().unwrap();
    slow.wait().unwrap();
    // the server meets the end of the body, answers, and the request is over
    let deadline = Instant::now() + Duration::from_secs(20);
    while Scrape::of(&server).get(ACTIVE, &[]) != 0.0 {
        assert!(
            Instant::now() < deadline,
            "still active 20 s after the client left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_taken_metrics_port_is_logged_and_serve_still_serves() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let server = TestServer::start_with(&format!("metrics_listen = \"127.0.0.1:{port}\"\n"));
    assert_eq!(server.get("/healthz").0, 204);
    assert!(!server.get_ok("/streams/v1/index.json").is_empty());
    assert!(
        server.metrics_url().is_none(),
        "no metrics line: {}",
        server.log_text()
    );
    let log = server.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("metrics are NOT served"))
        .unwrap_or_else(|| panic!("a warning: {log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains(&format!("127.0.0.1:{port}")),
        "which address: {warning}"
    );
    assert!(
        warning.contains("metrics_listen"),
        "which key to change: {warning}"
    );
    drop(taken);
}

#[test]
fn an_empty_metrics_listen_turns_metrics_off_and_the_default_is_loopback_9464() {
    let server = TestServer::start_with("metrics_listen = \"\"\n");
    assert_eq!(server.get("/healthz").0, 204);
    assert!(server.metrics_url().is_none());
    let log = server.log_text();
    assert!(!log.contains("imgsrv metrics on"), "{log}");
    assert!(log.contains("metrics listener off"), "{log}");
    // what `imgsrv init` writes
    let fresh = temp_dir("metrics-default");
    imgsrv(&["init", "--data", s(fresh.path())]);
    let cfg = fs::read_to_string(fresh.path().join("imgsrv.toml")).unwrap();
    assert!(
        cfg.contains("\nmetrics_listen = \"127.0.0.1:9464\"\n"),
        "{cfg}"
    );
    // and a bad value stops the start with what to write
    let bad = temp_dir("metrics-bad");
    imgsrv(&["init", "--data", s(bad.path())]);
    fs::write(
        bad.path().join("imgsrv.toml"),
        "metrics_listen = \"9464\"\n",
    )
    .unwrap();
    let out = run_within(
        Command::new(IMGSRV).args(["serve", "--data", s(bad.path()), "--listen", "127.0.0.1:0"]),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics_listen \"9464\" is not IP:PORT"),
        "{err}"
    );
}

/// Every route names its pattern (in process: the real router, no sockets).
#[test]
fn every_route_is_labelled_by_its_pattern() {
    let env = support::inproc::env();
    let v = "/v1/images/{name}/versions/{version}";
    let cases: Vec<(&str, &str, String)> = vec![
        ("GET", "/healthz", "/healthz".into()),
        ("GET", "/readyz", "/readyz".into()),
        (
            "GET",
            "/streams/v1/index.json",
            "/streams/v1/index.json".into(),
        ),
        (
            "GET",
            "/streams/v1/images.json",
            "/streams/v1/images.json".into(),
        ),
        ("POST", "/v1/uploads", "/v1/uploads".into()),
        ("GET", "/v1/uploads/abc", "/v1/uploads/{upload}".into()),
        (
            "PUT",
            "/v1/uploads/abc/parts/1",
            "/v1/uploads/{upload}/parts/{part}".into(),
        ),
        (
            "POST",
            "/v1/uploads/abc/complete",
            "/v1/uploads/{upload}/complete".into(),
        ),
        (
            "POST",
            "/v1/uploads/abc/abort",
            "/v1/uploads/{upload}/abort".into(),
        ),
        ("GET", "/v1/blobs/sha256:00", "/v1/blobs/{digest}".into()),
        ("GET", "/v1/images", "/v1/images".into()),
        ("POST", "/v1/images", "/v1/images".into()),
        ("GET", "/v1/keys", "/v1/keys".into()),
        ("GET", "/v1/mirrors", "/v1/mirrors".into()),
        ("GET", "/v1/audit", "/v1/audit".into()),
        ("GET", "/v1/images/a", "/v1/images/{name}".into()),
        (
            "PUT",
            "/v1/images/a/visibility",
            "/v1/images/{name}/visibility".into(),
        ),
        (
            "GET",
            "/v1/images/a/versions",
            "/v1/images/{name}/versions".into(),
        ),
        (
            "GET",
            "/v1/images/a/aliases",
            "/v1/images/{name}/aliases".into(),
        ),
        (
            "PUT",
            "/v1/images/a/aliases/b",
            "/v1/images/{name}/aliases/{alias}".into(),
        ),
        (
            "GET",
            "/v1/images/a/refs/b",
            "/v1/images/{name}/refs/{ref}".into(),
        ),
        ("GET", "/v1/images/a/versions/1", v.into()),
        (
            "GET",
            "/v1/images/a/versions/1/manifest",
            format!("{v}/manifest"),
        ),
        (
            "GET",
            "/v1/images/a/versions/1/manifest.minisig",
            format!("{v}/manifest.minisig"),
        ),
        (
            "POST",
            "/v1/images/a/versions/1/publish",
            format!("{v}/publish"),
        ),
        (
            "POST",
            "/v1/images/a/versions/1/artifacts",
            format!("{v}/artifacts"),
        ),
        (
            "DELETE",
            "/v1/images/a/versions/1/artifacts/x",
            format!("{v}/artifacts/{{artifact}}"),
        ),
        (
            "GET",
            "/v1/images/a/versions/1/artifacts/x/download",
            DOWNLOAD.into(),
        ),
        (
            "GET",
            "/v1/images/a/versions/1/artifacts/x/download/f.img",
            DOWNLOAD.into(),
        ),
        (
            "POST",
            "/v1/images/a/versions/1/artifacts/x/attachments",
            format!("{v}/artifacts/{{artifact}}/attachments"),
        ),
        (
            "DELETE",
            "/v1/images/a/versions/1/artifacts/x/attachments/y",
            format!("{v}/artifacts/{{artifact}}/attachments/{{attachment}}"),
        ),
        (
            "GET",
            "/v1/images/a/versions/1/artifacts/x/attachments/y/download/f",
            format!("{v}/artifacts/{{artifact}}/attachments/{{attachment}}/download"),
        ),
        ("GET", "/v1/auth/roles", "/v1/auth/roles".into()),
        ("GET", "/v1/auth/matrix", "/v1/auth/matrix".into()),
        ("POST", "/v1/auth/principals", "/v1/auth/principals".into()),
        (
            "GET",
            "/v1/auth/principals/p",
            "/v1/auth/principals/{principal}".into(),
        ),
        (
            "GET",
            "/v1/auth/principals/p/grants",
            "/v1/auth/principals/{principal}/grants".into(),
        ),
        (
            "PUT",
            "/v1/auth/principals/p/grants/r/s",
            "/v1/auth/principals/{principal}/grants/{role}/{scope}".into(),
        ),
        (
            "PUT",
            "/v1/auth/principals/p/roles/r",
            "/v1/auth/principals/{principal}/roles/{role}".into(),
        ),
        (
            "GET",
            "/v1/auth/principals/p/api-tokens",
            "/v1/auth/principals/{principal}/api-tokens".into(),
        ),
        (
            "DELETE",
            "/v1/auth/api-tokens/t",
            "/v1/auth/api-tokens/{token}".into(),
        ),
        // a method the route does not take is still that route
        ("DELETE", "/healthz", "/healthz".into()),
        ("GET", "/v1/nothing", "other".into()),
        ("GET", "/v1/images/a/nothing", "other".into()),
    ];
    let auth = format!("Bearer {}", env.token);
    for (method, path, want) in &cases {
        let mut req = imgsrv::http::message::Request::for_test(
            method,
            path,
            &[("authorization", &auth)],
            Vec::new(),
        );
        imgsrv::http::routes::handle(&env.app, &mut req);
        assert_eq!(req.route, want.as_str(), "{method} {path}");
    }
    // refused before routing: bad credentials; /v1/auth without auth.manage
    let mut req = imgsrv::http::message::Request::for_test(
        "GET",
        "/v1/images",
        &[("authorization", "Bearer nope")],
        Vec::new(),
    );
    assert_eq!(imgsrv::http::routes::handle(&env.app, &mut req).status, 401);
    assert_eq!(req.route, "other");
    let mut req =
        imgsrv::http::message::Request::for_test("GET", "/v1/auth/roles", &[], Vec::new());
    assert_eq!(imgsrv::http::routes::handle(&env.app, &mut req).status, 401);
    assert_eq!(req.route, "/v1/auth/*");
}

// --------------------------------------------------------------------- /readyz

/// `GET /readyz`: (status, problem detail, Retry-After).
fn readyz(server: &TestServer) -> (u16, String, Option<String>) {
    let mut resp = server
        .agent()
        .get(format!("{}/readyz", server.url()))
        .call()
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.body_mut().read_to_vec().unwrap_or_default();
    if status == 204 {
        return (status, String::new(), retry);
    }
    assert_eq!(ctype.as_deref(), Some("application/problem+json"));
    let p: Value = serde_json::from_slice(&body).expect("problem+json");
    assert_eq!(p["status"], status);
    (status, p["detail"].as_str().unwrap().to_string(), retry)
}

#[test]
fn readyz_is_503_while_the_blob_store_or_the_data_directory_is_read_only() {
    let server = TestServer::start();
    let data = server.data_dir().to_path_buf();
    assert_eq!(readyz(&server).0, 204);
    {
        let _ro = ReadOnly::bind(&data.join("tmp"));
        let (status, detail, retry) = readyz(&server);
        assert_eq!(status, 503, "{detail}");
        assert!(
            detail.contains("the blob store cannot be written"),
            "{detail}"
        );
        assert!(detail.to_lowercase().contains("read-only"), "why: {detail}");
        assert!(!detail.contains("catalog"), "the catalog is fine: {detail}");
        assert!(
            !detail.contains(&*data.to_string_lossy()),
            "no paths: {detail}"
        );
        assert!(retry.is_some());
    }
    assert_eq!(readyz(&server).0, 204, "ready again once writable");
    {
        let _ro = ReadOnly::bind(&data);
        let (status, detail, _) = readyz(&server);
        assert_eq!(status, 503, "{detail}");
        assert!(detail.contains("the catalog cannot be written"), "{detail}");
        assert!(
            detail.contains("the blob store cannot be written"),
            "{detail}"
        );
    }
    let log = server.log_text();
    assert!(log.contains("NOT READY"), "{log}");
    assert!(log.contains("ready again"), "{log}");
    assert_eq!(readyz(&server).0, 204);
    // and the catalog takes changes again
    let (status, v) = api(
        &server,
        "POST",
        "/v1/images",
        json!({"name": "after-ro"}).to_string().as_bytes(),
    );
    assert_eq!(status, 201, "{v}");
}

#[test]
fn readyz_is_503_on_a_full_disk_and_ready_again_once_space_is_freed() {
    let disk = Tmpfs::mount("48m");
    let server = TestServer::start_in(&disk.path().join("data"));
    assert_eq!(readyz(&server).0, 204);
    disk.fill_to(256 * 1024);
    let (status, detail, _) = readyz(&server);
    assert_eq!(status, 503, "{detail}");
    assert!(detail.contains("the catalog's disk is full"), "{detail}");
    assert!(detail.contains("the blob store is full"), "{detail}");
    // what is published is still served meanwhile
    assert_eq!(server.get("/healthz").0, 204);
    disk.remove_filler();
    assert_eq!(readyz(&server).0, 204);
}

// --------------------------------------------------------------------- systemd

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_and_security() {
    let unit = repo_root().join("contrib/systemd/imgsrv.service");
    let unit_text = fs::read_to_string(&unit).unwrap();
    let exec = "ExecStart=/usr/local/bin/imgsrv serve --data /var/lib/imgsrv\n";
    assert!(unit_text.contains(exec), "{unit_text}");
    for want in [
        "User=imgsrv",
        "StateDirectory=imgsrv",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "LimitNOFILE=65536",
    ] {
        assert!(unit_text.contains(want), "{want} in the unit");
    }
    // the flags it uses are the binary's
    let help = text(&imgsrv(&["serve", "--help"]));
    assert!(help.contains("--data <DIR>"), "{help}");
    // systemd checks that ExecStart exists: point it at the binary built here
    let tmp = temp_dir("systemd");
    let copy = tmp.path().join("imgsrv.service");
    fs::write(
        &copy,
        unit_text.replace(
            exec,
            &format!("ExecStart={IMGSRV} serve --data /var/lib/imgsrv\n"),
        ),
    )
    .unwrap();
    let out = run_any(Command::new("systemd-analyze").arg("verify").arg(&copy));
    let said = text(&out);
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // it warns (and still exits 0) about unknown keys or bad values: none
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify said: {said}"
    );
    // the hardening holds: exposure at most 2.5 of 10 ("OK")
    let out = run_any(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=25", "--no-pager"])
            .arg(&copy),
    );
    let said = text(&out);
    assert!(out.status.success(), "systemd-analyze security: {said}");
    assert!(said.contains("Overall exposure level"), "{said}");
}
