//! Issue 8, item 2: garbage collection as an operator runs it (`imgsrv gc --data DIR`,
//! beside a running `imgsrv serve`): what a refused mirror, an abandoned upload and a
//! crash left behind is reclaimed, exactly the bytes the dry run announced; `kill -9` in
//! the middle of a run never leaves a catalog row without its blob; and a soak of
//! publishes, mirror runs, bundle imports and retention against GC in a loop with no
//! grace loses nothing.

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const IMAGE: &str = "debian-bookworm";

fn gc(data: &Path, extra: &[&str]) -> Value {
    let out = run_ok(
        Command::new(IMGSRV)
            .args(["gc", "--data", s(data), "--json"])
            .args(extra),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("gc --json: {e}: {}", text(&out)))
}

/// Size of every file under the store's own directories.
fn store_bytes(data: &Path) -> u64 {
    ["sha256", "tmp", "uploads"]
        .iter()
        .flat_map(|d| walkdir::WalkDir::new(data.join(d)))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn blob_path(data: &Path, hex: &str) -> PathBuf {
    data.join("sha256")
        .join(&hex[..2])
        .join(&hex[2..4])
        .join(hex)
}

/// (digest hex, size) of every cas_blobs row.
fn rows(data: &Path) -> BTreeMap<String, u64> {
    catalog_sql(data, "SELECT substr(digest, 8), size_bytes FROM cas_blobs")
        .lines()
        .map(|l| {
            let (d, n) = l.split_once('|').unwrap();
            (d.to_string(), n.parse().unwrap())
        })
        .collect()
}

/// Every row has its file with its size: what a crash must never break.
fn assert_rows_have_blobs(data: &Path, when: &str) {
    for (hex, size) in rows(data) {
        let p = blob_path(data, &hex);
        let got = fs::metadata(&p).map(|m| m.len()).ok();
        assert_eq!(got, Some(size), "{when}: row {hex} without its blob file");
    }
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The sha256 of every artifact and attachment of each published version the server
/// lists (downloaded through the API), by `image@version` and file name.
fn served(server: &TestServer) -> BTreeMap<String, BTreeMap<String, String>> {
    let token = server.admin_token();
    let get = |path: &str| -> Value {
        let (status, body) = curl(
            server,
            &format!("{}{path}", server.url()),
            Some(&token),
            &[],
        );
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    };
    let mut out = BTreeMap::new();
    for img in get("/v1/images")["images"].as_array().unwrap() {
        let name = img["name"].as_str().unwrap();
        for v in get(&format!("/v1/images/{name}/versions"))["versions"]
            .as_array()
            .unwrap()
        {
            if v["state"] != "published" {
                continue;
            }
            let ver = v["version"].as_str().unwrap();
            let base = format!("/v1/images/{name}/versions/{ver}");
            let mut files = BTreeMap::new();
            for a in get(&base)["artifacts"].as_array().unwrap() {
                let id = a["artifact"]["id"].as_str().unwrap();
                let (st, body) = curl(
                    server,
                    &format!("{}{base}/artifacts/{id}/download", server.url()),
                    Some(&token),
                    &[],
                );
                assert_eq!(st, 200, "{name}@{ver} artifact {id}");
                files.insert(
                    a["artifact"]["format"].as_str().unwrap().to_string(),
                    sha256(&body),
                );
                for t in a["attachments"].as_array().unwrap() {
                    let (st, body) = curl(
                        server,
                        &format!(
                            "{}{base}/artifacts/{id}/attachments/{}/download",
                            server.url(),
                            t["id"].as_str().unwrap()
                        ),
                        Some(&token),
                        &[],
                    );
                    assert_eq!(st, 200, "{name}@{ver} attachment");
                    files.insert(t["name"].as_str().unwrap().to_string(), sha256(&body));
                }
            }
            out.insert(format!("{name}@{ver}"), files);
        }
    }
    out
}

/// The sha256 of a test image's files as `served` names them.
fn expected(img: &TestImage) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("squashfs".to_string(), sha256_file(img.rootfs()));
    m.insert("incus.tar.xz".to_string(), sha256_file(&img.metadata));
    m
}

#[test]
fn gc_reclaims_a_refused_mirror_an_abandoned_upload_and_crash_leftovers_exactly_as_planned() {
    let tmp = temp_dir("gc-reclaim");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    // upstream: two versions; the newer one's rootfs is damaged on disk, so a mirror
    // refuses that version after it stored the rest of it
    let up = TestServer::start();
    trust_key(up.data_dir(), Some("release"), &public);
    let a = make_test_image(tmp.path().join("a"), &["--serial", "20260101_0000"]);
    let b = make_test_image(
        tmp.path().join("b"),
        &["--serial", "20260102_0000", "--pad-mib", "1"],
    );
    publish_image(&up, &secret, &a, &[]);
    publish_image(&up, &secret, &b, &[]);
    // the mirror stores a version's blobs in digest order: damage the last one, so the
    // first is stored before the version is refused
    let (b_meta, b_root) = (sha256_file(&b.metadata), sha256_file(b.rootfs()));
    let (stored, last) = if b_meta < b_root {
        (b_meta, b_root)
    } else {
        (b_root, b_meta)
    };
    let damaged = blob_path(up.data_dir(), &last);
    let mut bytes = fs::read(&damaged).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&damaged, &bytes).unwrap();

    let down = TestServer::start();
    trust_key(down.data_dir(), Some("release"), &public);
    let data = down.data_dir().to_path_buf();
    let (_, mirror_key) = minisign_keypair(tmp.path().join("mirror"));
    let out = run_any(
        Command::new(IMGSRV)
            .args([
                "mirror",
                "--data",
                s(&data),
                "--key",
                s(&mirror_key),
                "--upstream-ca",
            ])
            .arg(up.cert())
            .arg(up.url()),
    );
    assert!(
        text(&out).contains("20260102_0000"),
        "the damaged version is named: {}",
        text(&out)
    );
    assert!(
        rows(&data).contains_key(&stored),
        "the refused version left a blob"
    );
    assert!(!rows(&data).contains_key(&last));

    // an abandoned upload (half its parts, then nothing for longer than its expiry)
    let token = down.admin_token();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (st, body) = curl(
        &down,
        &format!("{}/v1/uploads", down.url()),
        Some(&token),
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &format!(
                r#"{{"expected_digest":"sha256:{}","expected_size_bytes":{}}}"#,
                sha256(&payload),
                payload.len()
            ),
        ],
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
    let id = serde_json::from_slice::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let part = tmp.path().join("part");
    fs::write(&part, &payload[..100_000]).unwrap();
    let (st, _) = curl(
        &down,
        &format!("{}/v1/uploads/{id}/parts/1", down.url()),
        Some(&token),
        &[
            "-X",
            "PUT",
            "--data-binary",
            &format!("@{}", part.display()),
        ],
    );
    assert_eq!(st, 200);
    // a live upload is kept whatever the grace
    let plan = gc(&data, &["--grace", "0", "--dry-run"]);
    assert_eq!(plan["uploads"], 0, "{plan}");
    // ...until it expires (its expiry moved into the past: a day went by)
    catalog_sql(
        &data,
        &format!("UPDATE upload_sessions SET expires_at = '2000-01-01T00:00:00.000000000Z' WHERE id = '{id}'"),
    );
    // what a crash leaves in tmp/
    fs::write(data.join("tmp").join("ingest-crashed"), vec![7u8; 123_456]).unwrap();

    let before_files = store_bytes(&data);
    let served_before = served(&down);
    let plan = gc(&data, &["--grace", "0", "--dry-run"]);
    assert_eq!(plan["uploads"], 1, "{plan}");
    assert_eq!(plan["leftovers"]["temp"], 1, "{plan}");
    assert_eq!(plan["leftovers"]["staged"], 1, "{plan}");
    assert!(plan["blobs"].as_u64().unwrap() >= 1, "{plan}");
    let announced = plan["blob_bytes"].as_u64().unwrap() + plan["leftover_bytes"].as_u64().unwrap();
    assert_eq!(
        store_bytes(&data),
        before_files,
        "a dry run changes nothing"
    );

    let run = gc(&data, &["--grace", "0"]);
    let report = &run["report"];
    assert_eq!(report["failures"].as_array().unwrap().len(), 0, "{run}");
    assert_eq!(report["bytes_freed"].as_u64().unwrap(), announced, "{run}");
    assert_eq!(
        before_files - store_bytes(&data),
        announced,
        "freed on disk"
    );
    assert!(!rows(&data).contains_key(&stored));
    assert!(!blob_path(&data, &stored).exists());
    assert!(!data.join("tmp").join("ingest-crashed").exists());
    assert!(!data.join("uploads").join(&id).exists());
    assert_eq!(
        catalog_sql(
            &data,
            &format!("SELECT count(*) FROM upload_sessions WHERE id = '{id}'")
        )
        .trim(),
        "0"
    );
    // what is published is untouched, and served the same
    assert_rows_have_blobs(&data, "after gc");
    assert_eq!(served(&down), served_before);
    assert_eq!(served_before.len(), 1, "{served_before:?}");
    assert_eq!(served_before["debian-bookworm@20260101_0000"], expected(&a));
    // the server's /metrics tell when the command-line run last succeeded
    let metrics = down.scrape();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("imgsrv_background_job_last_success_timestamp_seconds{job=\"gc\"}"))
        .unwrap_or_else(|| panic!("no gc success timestamp:\n{metrics}"));
    let at: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - at).abs() < 120.0, "{line}");
    // a second run finds nothing
    let again = gc(&data, &["--grace", "0", "--dry-run"]);
    assert_eq!(again["blobs"], 0, "{again}");
    assert_eq!(again["blob_bytes"], 0, "{again}");
}

/// Writes `n` blobs nobody cites straight into the store and the catalog, as ingests that
/// completed long ago would have left them.
fn unreferenced_blobs(data: &Path, n: usize) {
    let mut sql = String::from("BEGIN;\n");
    for i in 0..n {
        let body = format!("garbage blob {i}\n").repeat(1 + i % 7);
        let hex = sha256(body.as_bytes());
        let p = blob_path(data, &hex);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &body).unwrap();
        sql.push_str(&format!(
            "INSERT INTO cas_blobs VALUES ('sha256:{hex}', {}, 'sha256/{}/{}/{hex}', NULL, \
             '2020-01-01T00:00:00.000000000Z', '2020-01-01T00:00:00.000000000Z');\n",
            body.len(),
            &hex[..2],
            &hex[2..4]
        ));
    }
    sql.push_str("COMMIT;\n");
    let mut child = Command::new("sqlite3")
        .arg(data.join("catalog.db"))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn kill_9_in_the_middle_of_gc_leaves_no_row_without_its_blob() {
    let server = TestServer::start();
    let tmp = temp_dir("gc-kill");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    trust_key(server.data_dir(), Some("release"), &public);
    let img = make_test_image(tmp.path().join("img"), &[]);
    publish_image(&server, &secret, &img, &[]);
    let data = server.data_dir().to_path_buf();
    unreferenced_blobs(&data, 4000);
    let total = rows(&data).len();
    let mut kills = 0;
    for delay_ms in [150u64, 300, 450, 600, 900] {
        let mut child = Command::new(IMGSRV)
            .args(["gc", "--data", s(&data), "--grace", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            kills += 1;
        }
        let _ = child.wait();
        assert_rows_have_blobs(&data, &format!("after kill -9 at {delay_ms} ms"));
    }
    let left = rows(&data).len();
    // written past the test harness's capture, so that CI logs show it
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "gc kill -9: {kills} kills; {total} rows before, {left} after"
    );
    assert!(
        kills >= 1,
        "gc was never caught in the middle: make more garbage"
    );
    assert!(
        left < total,
        "the runs that were killed had deleted something"
    );
    // a complete run finishes the job: only the published version's blobs stay
    gc(&data, &["--grace", "0"]);
    assert_rows_have_blobs(&data, "after a complete run");
    let published: BTreeSet<String> =
        [sha256_file(&img.metadata), sha256_file(img.rootfs())].into();
    assert_eq!(
        rows(&data).keys().cloned().collect::<BTreeSet<_>>(),
        published
    );
    let files: BTreeSet<String> = walkdir::WalkDir::new(data.join("sha256"))
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files, published,
        "stray files of the killed runs were collected"
    );
    assert_eq!(
        served(&server)["debian-bookworm@20260101_0000"],
        expected(&img)
    );
}

#[test]
fn soak_publishes_mirrors_imports_and_retention_against_gc_with_no_grace_lose_nothing() {
    let tmp = temp_dir("gc-soak");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    let (_, mirror_key) = minisign_keypair(tmp.path().join("mirror"));
    let up = TestServer::start();
    trust_key(up.data_dir(), Some("release"), &public);
    // the target keeps the newest 3 versions of the published image; the mirrored one
    // (another image) keeps everything
    let server = TestServer::start_with(
        "[gc]\ninterval = \"off\"\n\
         [[retention]]\nimages = \"debian-*\"\nkeep_latest = 3\n",
    );
    trust_key(server.data_dir(), Some("release"), &public);
    let data = server.data_dir().to_path_buf();

    // images: the serial changes the metadata; every third one also changes the rootfs,
    // so retired versions share blobs with live ones
    let image = |dir: &str, serial: String, os: &str, i: usize| {
        let pad = if i.is_multiple_of(3) { "1" } else { "0" };
        make_test_image(
            tmp.path().join(dir),
            &["--serial", &serial, "--os", os, "--pad-mib", pad],
        )
    };
    const ROUNDS: usize = 8;
    let published: Vec<(String, TestImage)> = (0..ROUNDS)
        .map(|i| {
            let serial = format!("202601{:02}_0000", i + 1);
            (
                format!("{IMAGE}@{serial}"),
                image(&format!("p{i}"), serial, "Debian", i),
            )
        })
        .collect();
    let mirrored: Vec<(String, TestImage)> = (0..ROUNDS)
        .map(|i| {
            let serial = format!("202602{:02}_0000", i + 1);
            (
                format!("alpine-bookworm@{serial}"),
                image(&format!("m{i}"), serial, "Alpine", i),
            )
        })
        .collect();
    // bundle imports: versions published into a data directory of their own, exported
    // and imported into the target, one per round beside the mirror runs
    let imported: Vec<(String, TestImage)> = (0..ROUNDS)
        .map(|i| {
            let serial = format!("202603{:02}_0000", i + 1);
            (
                format!("ubuntu-bookworm@{serial}"),
                image(&format!("b{i}"), serial, "Ubuntu", i),
            )
        })
        .collect();
    let source = tmp.path().join("bundle-source");
    run_ok(Command::new(IMGSRV).args(["init", "--data", s(&source)]));
    trust_key(&source, Some("release"), &public);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc_loop = {
        let (stop, data) = (stop.clone(), data.clone());
        std::thread::spawn(move || {
            let (mut runs, mut removed, mut retired, mut collected) = (0, 0, 0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = gc(&data, &["--grace", "0"]);
                let r = &r["report"];
                assert_eq!(r["failures"].as_array().unwrap().len(), 0, "{r}");
                runs += 1;
                removed += r["blobs_removed"].as_u64().unwrap();
                retired += r["retired"].as_u64().unwrap();
                collected += r["collected_versions"].as_u64().unwrap();
            }
            (runs, removed, retired, collected)
        })
    };
    let started = Instant::now();
    let publisher = {
        let server_url = server.url();
        let (cert, token) = (server.cert(), server.admin_token_file());
        let secret = secret.clone();
        let imgs: Vec<TestImage> = published.iter().map(|p| p.1.clone()).collect();
        std::thread::spawn(move || {
            for img in imgs {
                let roots = [img.rootfs().to_path_buf()];
                run_ok(
                    Command::new(IMGSRV)
                        .args(["publish", "--server", &server_url, "--ca"])
                        .arg(&cert)
                        .arg("--token-file")
                        .arg(&token)
                        .arg("--key")
                        .arg(&secret)
                        .arg(&img.metadata)
                        .args(&roots),
                );
            }
        })
    };
    // the mirror loop: a new upstream version, then a mirror run into the target; and
    // a bundle of a new version imported into it
    for (i, ((_, img), (_, bundled))) in mirrored.iter().zip(&imported).enumerate() {
        let roots = [bundled.rootfs()];
        run_ok(
            Command::new(IMGSRV)
                .args(["publish", "--data", s(&source), "--key", s(&secret)])
                .arg(&bundled.metadata)
                .args(roots),
        );
        let bundle = tmp.path().join(format!("bundle{i}.tar"));
        run_ok(Command::new(IMGSRV).args(["export", "--data", s(&source), "-o", s(&bundle)]));
        run_ok(Command::new(IMGSRV).args(["import", "--data", s(&data), s(&bundle)]));
        publish_image(&up, &secret, img, &[]);
        run_ok(
            Command::new(IMGSRV)
                .args([
                    "mirror",
                    "--data",
                    s(&data),
                    "--key",
                    s(&mirror_key),
                    "--upstream-ca",
                ])
                .arg(up.cert())
                .arg(up.url()),
        );
    }
    publisher.join().expect("every publish succeeded");
    // a few more GC runs after the last publish, then stop
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (runs, removed, retired, collected) = gc_loop.join().expect("every gc run succeeded");
    // and one last run, so that the retention policy has seen every publish
    let last = gc(&data, &["--grace", "0"]);
    let retired = retired + last["report"]["retired"].as_u64().unwrap();
    let collected = collected + last["report"]["collected_versions"].as_u64().unwrap();
    let removed = removed + last["report"]["blobs_removed"].as_u64().unwrap();

    // every version that is still published exports byte-identical; the retired ones
    // are exactly those the policy retires (all but the newest 3 of debian-bookworm)
    assert_rows_have_blobs(&data, "after the soak");
    let now = served(&server);
    let mut want: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (name, img) in published
        .iter()
        .skip(ROUNDS - 3)
        .chain(mirrored.iter())
        .chain(imported.iter())
    {
        want.insert(name.clone(), expected(img));
    }
    assert_eq!(now, want);
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "gc soak: {} publishes + {} mirror runs + {} bundle imports in {:.0?}; {runs} gc runs beside them \
         (grace 0): {retired} retired by the policy, {collected} collected, {removed} blobs \
         removed, 0 lost",
        published.len(),
        mirrored.len(),
        imported.len(),
        started.elapsed()
    );
    assert_eq!(retired, (ROUNDS - 3) as u64);
    assert_eq!(collected, retired);
    assert!(runs >= 3, "gc ran beside the publishes: {runs}");
    assert!(removed >= 1, "retired versions' own blobs were removed");
}

#[test]
fn serve_collects_on_its_interval_and_retention_spares_aliases_and_young_versions() {
    let tmp = temp_dir("gc-serve");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    let mut server = TestServer::start_with(
        "[gc]\ninterval = \"1m\"\ngrace = \"0\"\n\
         [[retention]]\nimages = \"debian-*\"\nkeep_latest = 1\n\
         [[retention]]\nimages = \"*\"\nkeep_latest = 1\nmin_age = \"30d\"\n",
    );
    trust_key(server.data_dir(), Some("release"), &public);
    let data = server.data_dir().to_path_buf();
    let serials = ["20260101_0000", "20260102_0000", "20260103_0000"];
    for (i, serial) in serials.iter().enumerate() {
        let img = make_test_image(tmp.path().join(format!("d{i}")), &["--serial", serial]);
        // the oldest carries an alias: the policy never retires it
        let alias: &[&str] = if i == 0 { &["--alias", "pinned"] } else { &[] };
        publish_image(&server, &secret, &img, alias);
        let img = make_test_image(
            tmp.path().join(format!("u{i}")),
            &["--serial", serial, "--os", "Ubuntu"],
        );
        publish_image(&server, &secret, &img, &[]);
    }
    fs::write(data.join("tmp").join("ingest-crashed"), b"left by a crash").unwrap();
    // the first periodic run comes 10 s after the start: restart, so that it sees all
    server.kill();
    server.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    while data.join("tmp").join("ingest-crashed").exists() {
        assert!(
            Instant::now() < deadline,
            "no periodic gc: {}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log_text().contains("gc: retired") {
        assert!(Instant::now() < deadline, "{}", server.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let versions = |image: &str| -> Vec<String> {
        let (_, body) = curl(
            &server,
            &format!("{}/v1/images/{image}/versions", server.url()),
            None,
            &[],
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_str().unwrap().to_string())
            .collect()
    };
    // debian: the newest, and the aliased oldest; the middle one was retired by "gc"
    assert_eq!(versions("debian-bookworm"), vec![serials[2], serials[0]]);
    // ubuntu: all younger than min_age, all kept
    assert_eq!(versions("ubuntu-bookworm").len(), 3);
    let who = catalog_sql(
        &data,
        "SELECT r.principal_name || ' ' || r.reason FROM retirements r",
    );
    assert!(who.starts_with("gc retention policy"), "{who}");
    assert_eq!(who.lines().count(), 1, "{who}");
}
