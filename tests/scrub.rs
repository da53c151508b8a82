//! `imgsrv scrub` as an operator runs it, with the real binary, a running
//! server, the real `minisign` and `sqlite3`: damage found and named with the
//! versions it affects, damaged blobs quarantined and refused to downloads,
//! repairs by a re-upload and by a bundle import, tampered publications,
//! samples, dry runs, and the periodic scrub inside `serve`.

mod support;

use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use support::*;

const IMAGE: &str = "debian-bookworm";
const V1: &str = "20260101_0000";
const V2: &str = "20260102_0000";

/// A server whose data directory trusts a publisher key.
struct Site {
    server: TestServer,
    public: PathBuf,
    secret: PathBuf,
    tmp: tempfile::TempDir,
}

fn site_with(config: Option<&str>) -> Site {
    let server = match config {
        Some(c) => TestServer::start_with(c),
        None => TestServer::start(),
    };
    let tmp = temp_dir("scrub");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    trust_key(server.data_dir(), Some("publisher"), &public);
    Site {
        server,
        public,
        secret,
        tmp,
    }
}

impl Site {
    /// A container image with serial `serial`, published signed.
    fn publish(&self, serial: &str) -> TestImage {
        let img = make_test_image(self.tmp.path().join(serial), &["--serial", serial]);
        publish_image(&self.server, &self.secret, &img, &[]);
        img
    }
    fn data(&self) -> &Path {
        self.server.data_dir()
    }
}

fn scrub(data: &Path, args: &[&str]) -> Output {
    run_within(
        Command::new(IMGSRV)
            .args(["scrub", "--data", s(data)])
            .args(args),
        Duration::from_secs(120),
    )
}

#[track_caller]
fn expect(o: &Output, code: i32) -> String {
    let t = text(o);
    assert_eq!(o.status.code(), Some(code), "exit status, output:\n{t}");
    t
}

/// Where the store keeps the blob whose sha256 is `hex`.
fn blob_file(data: &Path, hex: &str) -> PathBuf {
    data.join("sha256")
        .join(&hex[..2])
        .join(&hex[2..4])
        .join(hex)
}

/// Blob files are read-only (0444): an operator (or a disk) changes them anyway.
fn damage(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(path).unwrap();
    f(&mut bytes);
    fs::write(path, bytes).unwrap();
}

/// The `PROBLEM` line about `subject` and the lines that follow it up to the
/// next problem or note.
#[track_caller]
fn problem<'a>(out: &'a str, kind: &str, subject: &str) -> &'a str {
    let head = format!("PROBLEM {kind} {subject}");
    let start = out
        .find(&head)
        .unwrap_or_else(|| panic!("no {head:?} in:\n{out}"));
    let rest = &out[start..];
    let end = rest[1..]
        .find("\nPROBLEM")
        .into_iter()
        .chain(rest[1..].find("\nnote:"))
        .chain(rest[1..].find("\nscrub:"))
        .min()
        .map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

/// The server-relative path of the images.json item whose sha256 is `hex`.
fn item_path(server: &TestServer, hex: &str) -> String {
    let v: Value = serde_json::from_slice(&server.get_ok("/streams/v1/images.json")).unwrap();
    for p in v["products"].as_object().unwrap().values() {
        for ver in p["versions"].as_object().unwrap().values() {
            for item in ver["items"].as_object().unwrap().values() {
                if item["sha256"] == hex {
                    return format!("/{}", item["path"].as_str().unwrap());
                }
            }
        }
    }
    panic!("no item with sha256 {hex} in images.json");
}

/// `detail` of a problem+json body.
fn detail(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not problem+json: {}", String::from_utf8_lossy(body)));
    v["detail"].as_str().unwrap().to_string()
}

/// An API call with the admin token: (status, body).
fn api(server: &TestServer, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let len = body.len();
    let req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", server.url()))
        .header("Content-Length", len)
        .header("Authorization", format!("Bearer {}", server.admin_token()))
        .body(ureq::SendBody::from_owned_reader(std::io::Cursor::new(
            body,
        )))
        .unwrap();
    let mut resp = server
        .agent()
        .run(req)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_vec().unwrap();
    (status, body)
}

/// Uploads `data` through the upload API; returns the begin's status (201:
/// the bytes are sent and stored; 200: the server has them already).
fn upload(server: &TestServer, data: &[u8]) -> u16 {
    let begin = json!({
        "expected_digest": format!("sha256:{}", sha256_hex(data)),
        "expected_size_bytes": data.len(),
    });
    let (status, body) = api(server, "POST", "/v1/uploads", begin.to_string().into());
    assert!(
        status == 200 || status == 201,
        "{status} {}",
        String::from_utf8_lossy(&body)
    );
    if status == 200 {
        return status;
    }
    let id = serde_json::from_slice::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, part) = api(
        server,
        "PUT",
        &format!("/v1/uploads/{id}/parts/1"),
        data.to_vec(),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&part));
    let etag = serde_json::from_slice::<Value>(&part).unwrap()["etag"].clone();
    let done = json!({"parts": [{"number": 1, "etag": etag, "size_bytes": data.len()}]});
    let (s, body) = api(
        server,
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        done.to_string().into(),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    status
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

fn quarantined(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(data.join("quarantine"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn damaged_blobs_are_named_quarantined_refused_and_repaired_by_an_upload_and_an_import() {
    let site = site_with(None);
    let a = site.publish(V1);
    let b = site.publish(V2);
    let (a_root, a_meta) = (sha256_file(a.rootfs()), sha256_file(&a.metadata));
    let b_root = sha256_file(b.rootfs());
    let bundle = site.tmp.path().join("before.tar");
    let out = run_any(
        Command::new(IMGSRV)
            .args(["export", "--data", s(site.data()), "--key", s(&site.secret)])
            .arg("-o")
            .arg(&bundle),
    );
    expect(&out, 0);

    let t = expect(&scrub(site.data(), &[]), 0);
    assert!(t.contains("reading 4 blob(s)"), "{t}");
    assert!(t.contains("2 published version(s)"), "{t}");
    assert!(t.contains("signatures: 2 verified, 0 failed"), "{t}");
    assert!(t.contains("scrub: no problem found"), "{t}");

    // a flipped byte, a truncated blob, a deleted one
    damage(&blob_file(site.data(), &a_root), |b| b[100] ^= 0x01);
    damage(&blob_file(site.data(), &a_meta), |b| {
        b.truncate(b.len() / 2)
    });
    fs::remove_file(blob_file(site.data(), &b_root)).unwrap();

    let t = expect(&scrub(site.data(), &[]), 1);
    let p = problem(&t, "damaged", &format!("sha256:{a_root}"));
    assert!(p.contains(&format!("affects {IMAGE}@{V1}")), "{p}");
    assert!(p.contains("moved to quarantine"), "{p}");
    let p = problem(&t, "damaged", &format!("sha256:{a_meta}"));
    assert!(p.contains(&format!("affects {IMAGE}@{V1}")), "{p}");
    let p = problem(&t, "missing", &format!("sha256:{b_root}"));
    assert!(p.contains(&format!("affects {IMAGE}@{V2}")), "{p}");
    assert!(!p.contains(V1), "{p}");
    assert!(t.contains("scrub: 3 problem(s)"), "{t}");
    assert!(t.contains("2 damaged and quarantined; 1 missing"), "{t}");
    let mut want = vec![
        a_meta.clone(),
        format!("{a_meta}.reason"),
        a_root.clone(),
        format!("{a_root}.reason"),
    ];
    want.sort();
    assert_eq!(quarantined(site.data()), want);
    for h in [&a_root, &a_meta] {
        assert!(!blob_file(site.data(), h).exists(), "{h} left in the tree");
    }
    let note = fs::read_to_string(
        site.data()
            .join("quarantine")
            .join(format!("{a_root}.reason")),
    )
    .unwrap();
    assert!(note.contains("hash to sha256:"), "{note}");
    let audit = catalog_sql(
        site.data(),
        "SELECT target FROM audit_log WHERE action = 'blob.quarantine' ORDER BY 1",
    );
    assert!(
        audit.contains(&a_root) && audit.contains(&a_meta),
        "{audit}"
    );

    // downloads answer a clear 503, never the flipped bytes
    for (h, says) in [
        (&a_root, "failed a scrub"),
        (&a_meta, "failed a scrub"),
        (&b_root, "missing"),
    ] {
        let (status, body) = site.server.get(&item_path(&site.server, h));
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        let d = detail(&body);
        assert!(d.contains(says), "{d}");
        assert!(d.contains("re-upload, re-mirror or re-import"), "{d}");
        let (status, _) = site.server.get(&format!("/v1/blobs/sha256:{h}"));
        assert_eq!(status, 503);
        let head = site
            .server
            .agent()
            .head(format!("{}/v1/blobs/sha256:{h}", site.server.url()))
            .call()
            .unwrap();
        assert_eq!(head.status().as_u16(), 503, "HEAD says what GET says");
    }

    // a second scrub (JSON) reports them as still quarantined and missing
    let o = scrub(site.data(), &["--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let kinds: Vec<(String, String)> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_string(),
                p["subject"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    for (kind, h) in [
        ("quarantined", &a_root),
        ("quarantined", &a_meta),
        ("missing", &b_root),
    ] {
        assert!(
            kinds.contains(&(kind.to_string(), format!("sha256:{h}"))),
            "{kind} {h}: {kinds:?}"
        );
    }
    assert_eq!(report["plan"]["quarantined_before"], 2);

    // repair 1: the deleted rootfs uploaded again (the server takes the bytes)
    assert_eq!(upload(&site.server, &fs::read(b.rootfs()).unwrap()), 201);
    let served = site.server.get_ok(&item_path(&site.server, &b_root));
    assert_eq!(sha256_hex(&served), b_root);

    // repair 2: a bundle that carries the right bytes
    let o = run_any(
        Command::new(IMGSRV)
            .args(["import", "--data", s(site.data())])
            .arg(&bundle),
    );
    let t = expect(&o, 0);
    assert!(t.contains(&format!("restored blob sha256:{a_root}")), "{t}");
    assert!(t.contains(&format!("restored blob sha256:{a_meta}")), "{t}");
    assert!(t.contains("restored 2 missing blob(s)"), "{t}");

    let t = expect(&scrub(site.data(), &[]), 0);
    assert!(t.contains("scrub: no problem found"), "{t}");
    assert!(t.contains("2 repaired since quarantined"), "{t}");
    assert!(
        t.contains(&format!("note: sha256:{a_root}: quarantined")),
        "{t}"
    );
    for (h, file) in [(&a_root, a.rootfs()), (&a_meta, a.metadata.as_path())] {
        let served = site.server.get_ok(&item_path(&site.server, h));
        assert_eq!(served, fs::read(file).unwrap(), "{h} served right again");
    }
    // the damaged copies stay for the operator
    assert_eq!(quarantined(site.data()).len(), 4);
}

#[test]
fn a_tampered_publication_is_reported_and_an_unsigned_one_only_noted() {
    let mut site = site_with(None);
    site.publish(V1);
    // V2 is published under warn mode with a key the site does not trust
    site.server.kill();
    let cfg = site.data().join("imgsrv.toml");
    fs::write(&cfg, "[image_verification]\nmode = \"warn\"\n").unwrap();
    site.server.spawn();
    let img = make_test_image(site.tmp.path().join(V2), &["--serial", V2]);
    let (_, stranger) = minisign_keypair(site.tmp.path().join("stranger"));
    publish_image(&site.server, &stranger, &img, &[]);

    let t = expect(&scrub(site.data(), &[]), 0);
    assert!(
        t.contains(&format!("note: {IMAGE}@{V2}: published unverified")),
        "{t}"
    );
    assert!(t.contains("1 verified, 0 failed, 1 unsigned"), "{t}");

    // the privileged-operator attack: the published manifest edited in the catalog
    site.server.kill();
    let sql = "DROP TRIGGER publish_records_no_update; \
        UPDATE publish_records SET manifest = CAST(replace(CAST(manifest AS TEXT), \
        '\"release\":\"bookworm\"', '\"release\":\"bullseye\"') AS BLOB) \
        WHERE verification = 'verified'; SELECT changes();";
    assert_eq!(catalog_sql(site.data(), sql).trim(), "1");
    let t = expect(&scrub(site.data(), &[]), 1);
    let label = format!("{IMAGE}@{V1}");
    let p = problem(&t, "manifest", &label);
    assert!(p.contains("not to the sha256:"), "{p}");
    assert!(
        p.contains("differs from the one the version's catalog rows give"),
        "{p}"
    );
    assert!(p.contains(&format!("affects {label}")), "{p}");
    let p = problem(&t, "signature", &label);
    assert!(p.contains("does not verify"), "{p}");
    assert!(
        !t.contains(&format!("PROBLEM signature {IMAGE}@{V2}")),
        "{t}"
    );
    assert!(t.contains("scrub: 2 problem(s)"), "{t}");
    // no blob was touched
    assert!(quarantined(site.data()).is_empty());
}

#[test]
fn a_sample_reads_about_that_share_and_a_dry_run_reads_and_changes_nothing() {
    let server = TestServer::start();
    let blobs: Vec<Vec<u8>> = (0..40)
        .map(|i| format!("blob number {i} ").repeat(100 + i).into_bytes())
        .collect();
    for b in &blobs {
        assert_eq!(upload(&server, b), 201);
    }
    let data = server.data_dir();

    let t = expect(&scrub(data, &["--sample", "10"]), 0);
    assert!(t.contains("40 blob(s) stored"), "{t}");
    assert!(t.contains("reading 4 blob(s)"), "{t}");
    assert!(t.contains("a 10% sample"), "{t}");
    assert!(t.contains("scrub: read 4 blob(s)"), "{t}");

    // a truncated blob is read whatever the sample (its size gives it away);
    // a dry run says so, and reads and changes nothing
    let victim = sha256_hex(&blobs[7]);
    let path = blob_file(data, &victim);
    damage(&path, |b| b.truncate(10));
    let before = fs::read(&path).unwrap();
    let t = expect(&scrub(data, &["--sample", "10", "--dry-run"]), 0);
    assert!(
        t.contains("reading 4 blob(s)") || t.contains("reading 5 blob(s)"),
        "{t}"
    );
    assert!(
        t.contains("scrub: dry run, nothing was read or changed"),
        "{t}"
    );
    assert!(!t.contains("PROBLEM"), "{t}");
    assert_eq!(fs::read(&path).unwrap(), before);
    assert!(quarantined(data).is_empty());

    let t = expect(&scrub(data, &["--sample", "10"]), 1);
    let p = problem(&t, "damaged", &format!("sha256:{victim}"));
    assert!(!p.contains("affects"), "no version cites it: {p}");
    assert!(!path.exists());
    assert_eq!(quarantined(data).len(), 2);

    // bad input: a clear error, exit 2, nothing done
    for bad in [
        &["--sample", "0"][..],
        &["--sample", "150"],
        &["--rate", "slow"],
    ] {
        let o = scrub(data, bad);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", text(&o));
        assert!(text(&o).contains("invalid value"), "{}", text(&o));
    }
}

#[test]
fn serve_scrubs_on_its_own_schedule_and_logs_the_outcome() {
    let mut site = site_with(Some("[scrub]\ninterval = \"1h\"\nrate = \"20MB/s\"\n"));
    let status_file = site.data().join("scrub-status.json");
    wait_for(|| fs::read_to_string(&status_file).is_ok_and(|s| s.contains("last_finished")));
    let first: Value = serde_json::from_slice(&fs::read(&status_file).unwrap()).unwrap();
    assert_eq!(first["last_outcome"], "ok", "{first}");
    let a = site.publish(V1);
    let root = sha256_file(a.rootfs());
    damage(&blob_file(site.data(), &root), |b| b[0] ^= 0x80);
    // not due for an hour, also not after a restart
    site.server.kill();
    site.server.spawn();
    std::thread::sleep(Duration::from_secs(2));
    assert!(blob_file(site.data(), &root).exists());
    let again: Value = serde_json::from_slice(&fs::read(&status_file).unwrap()).unwrap();
    assert_eq!(again["last_started"], first["last_started"]);

    // a server that never scrubbed this directory does so at start
    site.server.kill();
    fs::remove_file(&status_file).unwrap();
    site.server.spawn();
    wait_for(|| fs::read_to_string(&status_file).is_ok_and(|s| s.contains("last_finished")));
    let st: Value = serde_json::from_slice(&fs::read(&status_file).unwrap()).unwrap();
    assert_eq!(st["last_outcome"], "problems", "{st}");
    assert_eq!(st["last_summary"]["counts"]["damaged"], 1, "{st}");
    assert!(!blob_file(site.data(), &root).exists());
    assert!(site.data().join("quarantine").join(&root).exists());
    let log = site.server.log_text();
    assert!(
        log.contains(&format!("PROBLEM damaged sha256:{root}")),
        "{log}"
    );
    assert!(log.contains(&format!("affects {IMAGE}@{V1}")), "{log}");
    assert!(log.contains("at most 20.0 MB/s"), "{log}");
    let (status, body) = site.server.get(&item_path(&site.server, &root));
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    // the command line finds it still quarantined, until the bytes come back
    let t = expect(&scrub(site.data(), &[]), 1);
    problem(&t, "quarantined", &format!("sha256:{root}"));
}

/// (The Simple Streams mirror's repair is in tests/mirror.rs, beside its upstream tree.)
#[test]
fn a_mirror_imgsrv_run_fetches_again_what_a_scrub_quarantined() {
    let up = site_with(None);
    let a = up.publish(V1);
    let root = sha256_file(a.rootfs());
    let tmp = temp_dir("scrub-mirror");
    let data = tmp.path().join("data");
    imgsrv(&["init", "--data", s(&data)]);
    trust_key(&data, Some("publisher"), &up.public);
    let mirror = || {
        run_any(
            Command::new(IMGSRV)
                .args(["mirror-imgsrv", "--data", s(&data)])
                .arg("--upstream-ca")
                .arg(up.server.cert())
                .arg(up.server.url())
                .env_remove("IMGSRV_TOKEN"),
        )
    };
    expect(&mirror(), 0);
    let t = expect(&mirror(), 0);
    assert!(!t.contains("restored"), "nothing to repair yet: {t}");
    damage(&blob_file(&data, &root), |b| b[10] ^= 0x01);
    problem(
        &expect(&scrub(&data, &[]), 1),
        "damaged",
        &format!("sha256:{root}"),
    );
    assert!(!blob_file(&data, &root).exists());
    let t = expect(&mirror(), 0);
    assert!(
        t.contains(&format!(
            "{IMAGE}@{V1} is already published on the target: skipped; restored 1 missing blob(s)"
        )),
        "{t}"
    );
    let t = expect(&scrub(&data, &[]), 0);
    assert!(t.contains("1 repaired since quarantined"), "{t}");
    assert_eq!(sha256_file(blob_file(&data, &root)), root);
}

#[track_caller]
fn wait_for(mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(100));
    }
}
