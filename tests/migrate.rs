//! Issue 10, point 5: outgrowing the box. `imgsrv migrate --from DATA_DIR --to CONFIG`
//! (the real binary, built with `--features full`) copies an embedded appliance
//! (catalog, blobs, signatures, audit log, tokens, grants, trusted keys with their
//! retirements and revocations) into a real PostgreSQL (tests/fixtures/pg-harness) and
//! a real Garage bucket (tests/fixtures/garage-harness), checks every blob and
//! signature on the far side, and is resumable; `imgsrv serve` on the migrated
//! deployment serves the same Simple Streams index, byte-identical artifacts, and the
//! same tokens and key states. Bad inputs are refused with what to do, and change
//! nothing.
#![cfg(all(feature = "postgres", feature = "s3"))]

#[path = "support/garage.rs"]
mod garage;
#[path = "support/pg.rs"]
mod pg;
mod support;

use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// The `imgsrv.toml` of a deployment on database `url` and `raw`'s bucket, reached at
/// `endpoint` (the Garage's, or a proxy's in front of it).
fn deployment_config(url: &str, raw: &garage::Raw, endpoint: &str, secret: &Path) -> String {
    let o = raw.options();
    format!(
        "metrics_listen = \"\"\n\
         [storage]\ncatalog = \"postgres\"\npostgres_url = \"{url}\"\nblobs = \"s3\"\n\
         [storage.s3]\nendpoint = \"{endpoint}\"\nbucket = \"{}\"\nregion = \"{}\"\n\
         access_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\npath_style = true\n",
        o.bucket,
        o.region,
        o.access_key_id,
        secret.display()
    )
}

/// A fresh database and bucket, and a deployment directory whose `imgsrv.toml` names
/// them (not yet used by anything).
struct Target {
    url: String,
    raw: garage::Raw,
    /// The deployment instance's data directory.
    dir: PathBuf,
    secret: PathBuf,
    _work: tempfile::TempDir,
}

impl Target {
    fn new(test: &str) -> Target {
        let work = temp_dir(test);
        let url = pg::database(pg::shared());
        let (_store, raw) = garage::store_and_raw(test);
        let secret = work.path().join("s3.secret");
        fs::write(&secret, format!("{}\n", raw.options().secret_access_key)).unwrap();
        let dir = work.path().join("deploy");
        fs::create_dir(&dir).unwrap();
        let t = Target {
            url,
            raw,
            dir,
            secret,
            _work: work,
        };
        t.write_config(&t.raw.options().endpoint);
        t
    }

    fn config(&self) -> PathBuf {
        self.dir.join("imgsrv.toml")
    }

    fn config_text(&self, endpoint: &str) -> String {
        deployment_config(&self.url, &self.raw, endpoint, &self.secret)
    }

    fn write_config(&self, endpoint: &str) {
        fs::write(self.config(), self.config_text(endpoint)).unwrap();
    }

    fn psql(&self, sql: &str) -> String {
        psql(&self.url, sql)
    }

    /// The blob objects in the bucket, sorted.
    fn blob_keys(&self) -> Vec<String> {
        let mut k = self.raw.keys("cas/sha256/");
        k.sort();
        k
    }

    /// `imgsrv serve` on the migrated deployment (after `imgsrv init`, which finds
    /// the migrated admin and makes no other).
    fn serve(&self) -> TestServer {
        TestServer::start_configured_in(&self.dir, &self.config_text(&self.raw.options().endpoint))
    }
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

/// `imgsrv migrate --from FROM --to TO [EXTRA]`, whatever its outcome.
fn migrate(from: &Path, to: &Path, extra: &[&str]) -> Output {
    run_any(
        Command::new(IMGSRV)
            .args(["migrate", "--from", s(from), "--to", s(to)])
            .args(extra),
    )
}

#[track_caller]
fn migrate_ok(from: &Path, to: &Path, extra: &[&str]) -> String {
    let o = migrate(from, to, extra);
    assert!(o.status.success(), "migrate failed: {}", text(&o));
    text(&o)
}

#[track_caller]
fn migrate_refused(from: &Path, to: &Path, extra: &[&str], says: &[&str]) -> String {
    let o = migrate(from, to, extra);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "migrate was not refused: {t}");
    for s in says {
        assert!(t.contains(s), "{s:?} not in: {t}");
    }
    t
}

/// The same query on the appliance's SQLite catalog and the deployment's database,
/// one row per line, columns separated by `|` (both shells' default).
fn sqlite_rows(data: &Path, sql: &str) -> String {
    catalog_sql(data, sql).trim().to_string()
}

/// What must be the same on both sides, row for row (ids, times, manifests,
/// signatures, token hashes, key states).
const SAME_ROWS: &[&str] = &[
    "SELECT digest, size_bytes, created_at FROM cas_blobs ORDER BY digest",
    "SELECT id, name, visibility, created_at FROM images ORDER BY id",
    "SELECT id, version, state, coalesce(published_at, ''), created_at FROM image_versions \
     ORDER BY id",
    "SELECT version_id, manifest_digest, coalesce(signature, ''), coalesce(signer_key_id, ''), \
     verification, published_at FROM publish_records ORDER BY version_id",
    "SELECT artifact_id, combined_sha256 FROM incus_projection ORDER BY artifact_id",
    "SELECT version_id, reason, retired_at FROM retirements ORDER BY version_id",
    "SELECT id, alias, version_id FROM aliases ORDER BY id",
    "SELECT id, name, kind FROM principals ORDER BY id",
    "SELECT principal_id, role_id, scope FROM grants ORDER BY principal_id, role_id, scope",
    "SELECT name, key_id, scopes, added_at FROM trusted_keys ORDER BY name",
    "SELECT key_id, state, name, at FROM key_states ORDER BY key_id, state",
];

/// Asserts the deployment holds the appliance's rows (and its audit log, followed by
/// the migration's own row).
#[track_caller]
fn assert_same_rows(appliance: &Path, t: &Target) {
    for q in SAME_ROWS {
        assert_eq!(sqlite_rows(appliance, q), t.psql(q), "{q}");
    }
    // (the token hashes are bytes: hex on both sides)
    let tokens = "FROM api_tokens ORDER BY id";
    assert_eq!(
        sqlite_rows(
            appliance,
            &format!("SELECT id, lower(hex(secret_hash)), expires_at, revoked_at {tokens}")
        ),
        t.psql(&format!(
            "SELECT id, encode(secret_hash, 'hex'), expires_at, revoked_at {tokens}"
        )),
        "the same tokens"
    );
    let audit = "SELECT id, at, action, target, outcome FROM audit_log ORDER BY id";
    let src = sqlite_rows(appliance, audit);
    let dst = t.psql(audit);
    let n = src.lines().count();
    assert!(n > 0);
    let dst_lines: Vec<&str> = dst.lines().collect();
    assert_eq!(
        dst_lines[..n].join("\n"),
        src,
        "the audit log is there, same ids and times"
    );
    assert!(
        dst_lines[n].contains("|migrate|"),
        "the migration's row follows: {}",
        dst_lines[n]
    );
}

/// The fingerprints of `server`'s Simple Streams index, sorted.
fn stream_fingerprints(index: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in index["products"].as_object().unwrap().values() {
        for v in p["versions"].as_object().unwrap().values() {
            for it in v["items"].as_object().unwrap().values() {
                for k in ["combined_squashfs_sha256", "combined_disk-kvm-img_sha256"] {
                    if let Some(fp) = it[k].as_str() {
                        out.push(fp.to_string());
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Every download path of the index (the items' `path`), sorted.
fn stream_paths(index: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in index["products"].as_object().unwrap().values() {
        for v in p["versions"].as_object().unwrap().values() {
            for it in v["items"].as_object().unwrap().values() {
                out.push(format!("/{}", it["path"].as_str().unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn index_of(server: &TestServer) -> Value {
    serde_json::from_slice(&server.get_ok("/streams/v1/images.json")).unwrap()
}

/// `GET /v1/keys`: name -> state.
fn key_states(server: &TestServer) -> Vec<(String, String)> {
    let keys: Value = serde_json::from_slice(&server.get_ok("/v1/keys")).unwrap();
    keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().to_string(),
                k["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `imgsrv publish --data DIR` of a test image, signed with `secret`.
fn publish_local(data: &Path, secret: &Path, img: &TestImage, extra: &[&str]) -> String {
    let roots: Vec<&Path> = img
        .rootfs
        .iter()
        .chain(img.disk.iter())
        .map(|p| p.as_path())
        .collect();
    let out = run_ok(
        Command::new(IMGSRV)
            .args(["publish", "--data", s(data), "--key"])
            .arg(secret)
            .args(extra)
            .arg(&img.metadata)
            .args(&roots),
    );
    text(&out)
}

/// A stopped appliance in `root/appliance` with two images (three published versions,
/// a VM among them), signed by a trusted key: (data dir, [(image, version)]).
fn small_appliance(root: &Path) -> (PathBuf, Vec<TestImage>) {
    let data = root.join("appliance");
    imgsrv(&["init", "--data", s(&data)]);
    let (public, secret) = minisign_keypair(root.join("release"));
    trust_key(&data, Some("release"), &public);
    let mut imgs = Vec::new();
    for (i, (image, version, kind)) in [
        ("debian", "1", "container"),
        ("debian", "2", "container"),
        ("alpine", "1", "both"),
    ]
    .into_iter()
    .enumerate()
    {
        let img = make_test_image(
            root.join(format!("img{i}")),
            &[
                "--serial",
                &format!("2026010{}_0000", i + 1),
                "--type",
                kind,
            ],
        );
        publish_local(
            &data,
            &secret,
            &img,
            &["--image", image, "--version", version, "--alias", "latest"],
        );
        imgs.push(img);
    }
    (data, imgs)
}

/// The blob file of `digest` (bare hex) in an appliance.
fn blob_file(data: &Path, hex: &str) -> PathBuf {
    data.join("sha256")
        .join(&hex[..2])
        .join(&hex[2..4])
        .join(hex)
}

// --------------------------------------------------------------------------- the tests

/// The whole journey: an appliance with signed versions (a container and a VM
/// image), a draft, a retired version, aliases, a principal with a grant and a
/// token, a retired and a revoked key; a dry run that changes nothing; the
/// migration; `imgsrv serve` on the migrated deployment serving the same index, the
/// same bytes, the same tokens and key states; a second run with nothing to do.
#[test]
fn an_appliance_moves_onto_postgres_and_s3_and_serves_the_same_fingerprints() {
    let work = temp_dir("migrate-journey");
    let mut app = TestServer::start();
    let data = app.data_dir().to_path_buf();
    let d = s(&data).to_string();
    let keys = |name: &str| minisign_keypair(work.path().join(name));
    let (release_pub, release_sk) = keys("release");
    let (old_pub, old_sk) = keys("old");
    let (stolen_pub, stolen_sk) = keys("stolen");
    run_ok(
        Command::new(IMGSRV)
            .args(["key", "add", "--data", &d, "--name", "release"])
            .args(["--scope", "debian*", "--scope", "ubuntu*"])
            .arg(&release_pub),
    );
    trust_key(&data, Some("old"), &old_pub);
    trust_key(&data, Some("stolen"), &stolen_pub);

    let img = |n: &str, serial: &str, kind: &str| {
        make_test_image(work.path().join(n), &["--serial", serial, "--type", kind])
    };
    let deb1 = img("deb1", "20260101_0000", "both");
    let deb2 = img("deb2", "20260102_0000", "container");
    let ubu1 = img("ubu1", "20260103_0000", "container");
    let alp1 = img("alp1", "20260104_0000", "container");
    publish_image(
        &app,
        &release_sk,
        &deb1,
        &["--image", "debian", "--version", "1", "--alias", "stable"],
    );
    publish_image(
        &app,
        &release_sk,
        &deb2,
        &["--image", "debian", "--version", "2"],
    );
    publish_image(
        &app,
        &old_sk,
        &ubu1,
        &["--image", "ubuntu", "--version", "1", "--alias", "lts"],
    );
    publish_image(
        &app,
        &stolen_sk,
        &alp1,
        &["--image", "alpine", "--version", "1"],
    );
    // debian@2 retired; a draft debian@3
    let server_args = |s: &TestServer| {
        vec![
            "--server".to_string(),
            s.url(),
            "--ca".to_string(),
            s.cert().display().to_string(),
            "--token-file".to_string(),
            s.admin_token_file().display().to_string(),
        ]
    };
    run_ok(
        Command::new(IMGSRV)
            .args([
                "version",
                "retire",
                "debian",
                "2",
                "--reason",
                "broken sshd",
            ])
            .args(server_args(&app)),
    );
    let admin = app.admin_token();
    let (st, body) = curl(
        &app,
        &format!("{}/v1/images/debian/versions", app.url()),
        Some(&admin),
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"version":"3"}"#,
        ],
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
    // a principal with a grant and a token
    imgsrv(&["principal", "add", "--data", &d, "--kind", "service", "ci"]);
    imgsrv(&[
        "grant",
        "add",
        "--data",
        &d,
        "ci",
        "content-writer",
        "debian*",
    ]);
    let ci_token = last_line(&imgsrv(&[
        "token",
        "issue",
        "--data",
        &d,
        "--expires",
        "30d",
        "ci",
    ]));
    // the old key retired (what it signed still verifies), the stolen one revoked
    imgsrv(&["key", "retire", "--data", &d, "old"]);
    imgsrv(&["key", "revoke", "--data", &d, "stolen"]);
    // and a key trusted once, retired, then removed: its retirement record stays
    let (gone_pub, _) = keys("gone");
    trust_key(&data, Some("gone"), &gone_pub);
    imgsrv(&["key", "retire", "--data", &d, "gone"]);
    imgsrv(&["key", "remove", "--data", &d, "gone"]);

    // what the appliance serves
    let index = index_of(&app);
    let fingerprints = stream_fingerprints(&index);
    assert_eq!(
        fingerprints,
        {
            let mut f = vec![
                deb1.container_fingerprint(),
                deb1.vm_fingerprint(),
                ubu1.container_fingerprint(),
            ];
            f.sort();
            f
        },
        "debian@1 (both) and ubuntu@1; not the retired one, not what the revoked key signed"
    );
    let paths = stream_paths(&index);
    let artifacts: Vec<Vec<u8>> = paths.iter().map(|p| app.get_ok(p)).collect();
    let alp_hex = sha256_file(alp1.rootfs());
    assert_eq!(app.get(&format!("/v1/blobs/sha256:{alp_hex}")).0, 410);
    let keys_before = key_states(&app);
    assert_eq!(
        keys_before,
        [
            ("old".to_string(), "retired".to_string()),
            ("release".into(), "active".into()),
            ("stolen".into(), "revoked".into())
        ]
    );
    // a running appliance is not copied
    let t = Target::new("migrate-journey");
    migrate_refused(&data, &t.config(), &[], &["stop `imgsrv serve`"]);
    // what consumers of the appliance's transparency log have seen last
    let appliance_checkpoint = app.get_ok("/log/checkpoint");
    let appliance_vkey = app.get_ok("/log/vkey");
    app.kill();
    // a setting the deployment's imgsrv.toml lacks is named, not written
    let mut appliance_config = fs::read_to_string(data.join("imgsrv.toml")).unwrap();
    appliance_config.push_str("\n[[retention]]\nimages = \"alpine*\"\nkeep_latest = 3\n");
    fs::write(data.join("imgsrv.toml"), &appliance_config).unwrap();
    let deployment_config = fs::read_to_string(t.config()).unwrap();
    let cert = fs::read(data.join("tls/cert.pem")).unwrap();
    use sha2::Digest as _;
    let cert_sha256 = hex::encode(sha2::Sha256::digest(pem::parse(&cert).unwrap().contents()));

    // the dry run: the plan, and nothing in the database or the bucket
    let plan = migrate_ok(&data, &t.config(), &["--dry-run"]);
    for says in [
        "source: 3 images, 5 versions (3 published, 1 retired, 1 drafts), 2 aliases",
        "2 principals with",
        "3 trusted keys (1 active, 1 retired, 1 revoked; 1 records of keys no longer listed)",
        "target: empty",
        "plan: copy ",
        &format!("tls: copy the appliance's certificate (sha256 {cert_sha256}) and key"),
        "sets `retention`, the deployment's",
        "dry run: nothing was written to the target",
    ] {
        assert!(plan.contains(says), "{says:?} not in: {plan}");
    }
    assert!(
        !plan.contains("`tls`"),
        "an empty [tls] is no setting: {plan}"
    );
    assert!(!t.dir.join("tls").exists(), "the dry run copied nothing");
    for table in [
        "images",
        "principals",
        "cas_blobs",
        "audit_log",
        "trusted_keys",
        "job_runs",
    ] {
        assert_eq!(
            t.psql(&format!("SELECT count(*) FROM {table}")),
            "0",
            "{table}"
        );
    }
    assert!(t.blob_keys().is_empty());

    // the migration
    let out = migrate_ok(&data, &t.config(), &[]);
    eprintln!("{plan}\n{out}");
    assert!(out.contains("migrate complete"), "{out}");
    assert!(
        out.contains("every one read back from the target and hashed"),
        "{out}"
    );
    assert!(
        out.contains("signatures verified with the migrated keys"),
        "{out}"
    );
    assert_same_rows(&data, &t);
    // the certificate clients accepted goes along (the key readable by its owner only);
    // the configuration is the operator's
    assert!(
        out.contains("tls: copied the appliance's certificate"),
        "{out}"
    );
    assert_eq!(fs::read(t.dir.join("tls/cert.pem")).unwrap(), cert);
    assert_eq!(
        fs::read(t.dir.join("tls/key.pem")).unwrap(),
        fs::read(data.join("tls/key.pem")).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(t.dir.join("tls/key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(out.contains("note: settings: the appliance's"), "{out}");
    assert!(out.contains("log: copied the appliance's log key"), "{out}");
    let entries = sqlite_rows(&data, "SELECT count(*) FROM log_entries");
    assert!(
        out.contains(&format!(
            "transparency log: {entries} entries ({entries} copied now)"
        )),
        "{out}"
    );
    assert_eq!(fs::read_to_string(t.config()).unwrap(), deployment_config);
    let digests = sqlite_rows(&data, "SELECT digest FROM cas_blobs ORDER BY digest");
    let want_keys: Vec<String> = digests
        .lines()
        .map(|d| {
            let hex = d.trim_start_matches("sha256:");
            format!("cas/sha256/{}/{}/{hex}", &hex[..2], &hex[2..4])
        })
        .collect();
    assert_eq!(t.blob_keys(), want_keys, "every blob in the bucket, once");
    // run again: nothing to do, nothing changed
    let etags: Vec<_> = want_keys.iter().map(|k| t.raw.etag(k)).collect();
    let again = migrate_ok(&data, &t.config(), &[]);
    assert!(again.contains("nothing to do"), "{again}");
    assert_eq!(
        want_keys.iter().map(|k| t.raw.etag(k)).collect::<Vec<_>>(),
        etags
    );
    assert_same_rows(&data, &t);

    // the deployment serves the same
    let dep = t.serve();
    assert!(
        !dep.admin_token_file().exists(),
        "init made no second admin"
    );
    // the deployment goes on with the appliance's log: same key, same checkpoint
    assert_eq!(dep.get_ok("/log/vkey"), appliance_vkey);
    assert_eq!(
        String::from_utf8(dep.get_ok("/log/checkpoint")).unwrap(),
        String::from_utf8(appliance_checkpoint).unwrap()
    );
    let dep_index = index_of(&dep);
    assert_eq!(stream_fingerprints(&dep_index), fingerprints);
    assert_eq!(dep_index, index, "the same Simple Streams index");
    for (p, bytes) in paths.iter().zip(&artifacts) {
        assert!(dep.get_ok(p) == *bytes, "{p}: other bytes");
    }
    assert_eq!(
        key_states(&dep),
        keys_before,
        "the same keys, the revoked one revoked"
    );
    assert_eq!(dep.get(&format!("/v1/blobs/sha256:{alp_hex}")).0, 410);
    // the tokens still authenticate: ci sees the draft (a writer of debian*), anonymous does not
    let versions = |token: Option<&str>| {
        let (st, body) = curl(
            &dep,
            &format!("{}/v1/images/debian/versions", dep.url()),
            token,
            &[],
        );
        assert_eq!(st, 200);
        String::from_utf8_lossy(&body).into_owned()
    };
    assert!(
        versions(Some(&ci_token)).contains(r#""3""#),
        "ci sees the draft"
    );
    assert!(!versions(None).contains(r#""version":"3""#));
    let (st, _) = curl(
        &dep,
        &format!("{}/v1/images/debian/versions", dep.url()),
        Some("imgsrv_nope_x"),
        &[],
    );
    assert_eq!(st, 401);
    // the revoked key is never trusted again, the retired one stays retired
    // (the revoked key stays listed, so its key id is taken; the removed one was retired)
    for (public, says) in [(&stolen_pub, "stolen"), (&gone_pub, "never")] {
        let back = run_any(
            Command::new(IMGSRV)
                .args(["key", "add", "--data", s(&t.dir), "--name", "again"])
                .arg(public),
        );
        assert!(
            !back.status.success() && text(&back).contains(says),
            "{}",
            text(&back)
        );
    }
    fs::copy(app.admin_token_file(), dep.admin_token_file()).unwrap();
    let publish = |sk: &Path, version: &str| {
        run_any(
            Command::new(IMGSRV)
                .args(["publish", "--server", &dep.url(), "--ca", s(&dep.cert())])
                .arg("--token-file")
                .arg(dep.admin_token_file())
                .arg("--key")
                .arg(sk)
                .args(["--image", "debian", "--version", version])
                .arg(&deb2.metadata)
                .arg(deb2.rootfs()),
        )
    };
    let refused = publish(&old_sk, "4");
    assert!(
        !refused.status.success() && text(&refused).contains("retired"),
        "published with a retired key: {}",
        text(&refused)
    );
    // the appliance's admin token publishes on the deployment, with the active key
    let out = publish(&release_sk, "5");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stream_fingerprints(&index_of(&dep)).contains(&deb2.container_fingerprint()),
        "published on the deployment"
    );
}

/// A TCP proxy on 127.0.0.1 in front of `upstream` (`http://HOST:PORT`) that sends
/// what the client writes on at about `rate` bytes a second: a slow link to the
/// bucket, so that a copy can be interrupted in the middle. Stops accepting when
/// dropped; each connection ends with its client.
struct SlowProxy {
    endpoint: String,
    stop: Arc<AtomicBool>,
}

impl SlowProxy {
    fn start(upstream: &str, rate: usize) -> SlowProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(_) => return,
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe(client, server, Some(rate)));
                std::thread::spawn(move || pipe(s2, c2, None));
            }
        });
        SlowProxy { endpoint, stop }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` until either side closes, at most `rate` bytes a second.
fn pipe(mut from: TcpStream, mut to: TcpStream, rate: Option<usize>) {
    let chunk = rate.map_or(64 * 1024, |r| (r / 20).max(1));
    let mut buf = vec![0u8; chunk];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if rate.is_some() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// A migration killed (SIGKILL) in the middle of its blob copy leaves a target that
/// nothing serves; run again, it goes on where it stopped (the objects already in
/// the bucket are read back and kept, not sent again), and ends with the same rows
/// and the same bucket as the appliance; one more run has nothing to do.
#[test]
fn an_interrupted_migration_resumes_and_ends_identical() {
    let work = temp_dir("migrate-resume");
    let (data, imgs) = small_appliance(work.path());
    let t = Target::new("migrate-resume");
    let blobs = sqlite_rows(&data, "SELECT count(*) FROM cas_blobs");
    let blobs: usize = blobs.parse().unwrap();
    assert!(blobs >= 7, "{blobs}");

    // a slow link to the bucket, and a kill -9 once a few objects are in
    let proxy = SlowProxy::start(&t.raw.options().endpoint, 256 * 1024);
    t.write_config(&proxy.endpoint);
    let mut child = Command::new(IMGSRV)
        .args(["migrate", "--from", s(&data), "--to", s(&t.config())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while Instant::now() < deadline {
        seen = t.blob_keys().len();
        if seen >= 2 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "migrate ended before it was interrupted"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop(proxy);
    let before = t.blob_keys();
    assert!(
        seen >= 2 && before.len() < blobs,
        "interrupted in the middle of the copy: {} of {blobs} objects",
        before.len()
    );
    let etags: Vec<_> = before.iter().map(|k| t.raw.etag(k)).collect();

    // the half-filled deployment is not served, initialised, collected, scrubbed or
    // administered
    t.write_config(&t.raw.options().endpoint);
    for args in [
        vec!["serve", "--data", s(&t.dir), "--listen", "127.0.0.1:0"],
        vec!["init", "--data", s(&t.dir)],
        vec!["gc", "--data", s(&t.dir), "--dry-run"],
        vec!["scrub", "--data", s(&t.dir), "--dry-run"],
        vec!["key", "list", "--data", s(&t.dir)],
    ] {
        let o = run_any(Command::new(IMGSRV).args(&args));
        assert!(!o.status.success(), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("has not completed: run that command again"),
            "{args:?}: {}",
            text(&o)
        );
    }
    assert_eq!(t.psql("SELECT count(*) FROM principals"), "0");

    // the dry run of the resume says what is there
    let plan = migrate_ok(&data, &t.config(), &["--dry-run"]);
    assert!(
        plan.contains("target: holds (from an earlier run)"),
        "{plan}"
    );
    // resumed: what is in the bucket is kept as it is
    let out = migrate_ok(&data, &t.config(), &[]);
    assert!(out.contains("migrate complete"), "{out}");
    assert_eq!(
        before.iter().map(|k| t.raw.etag(k)).collect::<Vec<_>>(),
        etags,
        "objects already in the bucket are not written again"
    );
    assert_same_rows(&data, &t);
    assert_eq!(t.blob_keys().len(), blobs, "every blob once: {out}");
    assert_eq!(
        t.psql("SELECT count(*) FROM audit_log WHERE action = 'migrate'"),
        "1"
    );
    let again = migrate_ok(&data, &t.config(), &[]);
    assert!(again.contains("nothing to do"), "{again}");

    // and it serves what the appliance had
    let dep = t.serve();
    let mut want: Vec<String> = imgs
        .iter()
        .flat_map(|i| {
            let mut f = vec![i.container_fingerprint()];
            if i.disk.is_some() {
                f.push(i.vm_fingerprint());
            }
            f
        })
        .collect();
    want.sort();
    assert_eq!(stream_fingerprints(&index_of(&dep)), want);
}

/// One bad item does not stop the run: a blob damaged in the appliance's store is
/// counted and listed with the version that cites it, and everything else is copied
/// and checked; the command exits 1 and the deployment stays refused. Once the
/// blob's bytes are put back, the same command finishes the migration.
#[test]
fn a_damaged_blob_is_counted_the_rest_copied_and_the_next_run_finishes() {
    let work = temp_dir("migrate-damaged");
    let (data, imgs) = small_appliance(work.path());
    let t = Target::new("migrate-damaged");
    let hex = sha256_file(imgs[1].rootfs());
    let file = blob_file(&data, &hex);
    let good = fs::read(&file).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 0xff;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&file, &bad).unwrap();

    let out = migrate_refused(
        &data,
        &t.config(),
        &[],
        &[
            &format!("FAILED blob sha256:{hex}"),
            "damaged in the appliance's store",
            "FAILED version debian@2: not copied: its blob",
            "migrate failed: ",
            "run the same `imgsrv migrate` again",
        ],
    );
    // the rest is there: the other versions with their fingerprints, every other blob
    assert_eq!(
        t.psql(
            "SELECT i.name || '@' || v.version FROM image_versions v JOIN images i ON \
             i.id = v.image_id ORDER BY 1"
        ),
        "alpine@1\ndebian@1",
        "{out}"
    );
    let key = format!("cas/sha256/{}/{}/{hex}", &hex[..2], &hex[2..4]);
    assert!(!t.blob_keys().contains(&key), "nothing of the damaged blob");
    assert_eq!(t.blob_keys().len(), 6);
    let o = run_any(Command::new(IMGSRV).args(["serve", "--data", s(&t.dir)]));
    assert!(
        !o.status.success() && text(&o).contains("has not completed"),
        "{}",
        text(&o)
    );

    // repaired, the same command finishes
    fs::write(&file, &good).unwrap();
    let out = migrate_ok(&data, &t.config(), &[]);
    assert!(out.contains("migrate complete"), "{out}");
    assert_same_rows(&data, &t);
    assert_eq!(t.raw.get(&key), good);
}

/// Bad inputs are refused with what to do next, and change nothing: a `--to` that
/// names the embedded stores or is missing, a `--from` that is not a data directory,
/// a target database that `imgsrv init` set up already, one holding another
/// appliance's completed migration, and an appliance changed after its migration.
#[test]
fn bad_inputs_are_refused_and_change_nothing() {
    let work = temp_dir("migrate-refused");
    let root = work.path();
    let a = root.join("a");
    imgsrv(&["init", "--data", s(&a)]);
    let (public, _) = minisign_keypair(root.join("k"));
    trust_key(&a, Some("release"), &public);
    let t = Target::new("migrate-refused");

    // --to names the embedded stores: nothing is created beside it
    let embedded = root.join("embedded");
    fs::create_dir(&embedded).unwrap();
    fs::write(embedded.join("imgsrv.toml"), "metrics_listen = \"\"\n").unwrap();
    migrate_refused(
        &a,
        &embedded.join("imgsrv.toml"),
        &[],
        &[
            "names the embedded stores",
            "catalog = \"postgres\"",
            "docs/deployment.md",
        ],
    );
    assert_eq!(fs::read_dir(&embedded).unwrap().count(), 1);
    // a --to that is not there
    migrate_refused(
        &a,
        &root.join("nowhere/imgsrv.toml"),
        &[],
        &["reading the deployment's imgsrv.toml"],
    );
    assert!(!root.join("nowhere").exists());
    // a --from that is not a data directory (or not there): nothing is created
    let empty = root.join("empty");
    fs::create_dir(&empty).unwrap();
    for from in [&empty, &root.join("missing")] {
        migrate_refused(
            from,
            &t.config(),
            &[],
            &[
                "not an imgsrv appliance's data directory",
                "--data of its `imgsrv serve`",
            ],
        );
    }
    assert_eq!(fs::read_dir(&empty).unwrap().count(), 0);
    assert!(!root.join("missing").exists());
    // --from and --to's directory overlap
    let inside = a.join("deploy");
    fs::create_dir(&inside).unwrap();
    fs::copy(t.config(), inside.join("imgsrv.toml")).unwrap();
    migrate_refused(&a, &inside.join("imgsrv.toml"), &[], &["overlap"]);
    fs::remove_dir_all(&inside).unwrap();
    // key files in --to's directory (an old appliance's keys/ copied along)
    fs::create_dir(t.dir.join("keys")).unwrap();
    fs::copy(&public, t.dir.join("keys/release.pub")).unwrap();
    migrate_refused(
        &a,
        &t.config(),
        &[],
        &[
            "keys exists",
            "migrated from the appliance's catalog",
            "Move it out",
        ],
    );
    fs::remove_dir_all(t.dir.join("keys")).unwrap();
    // none of these touched the database or the bucket
    assert_eq!(
        t.psql("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"),
        "0"
    );
    assert!(t.blob_keys().is_empty());

    // a deployment `imgsrv init` set up already: refused, with how to start afresh
    let inited = Target::new("migrate-refused-init");
    imgsrv(&["init", "--data", s(&inited.dir)]);
    let counts = "SELECT (SELECT count(*) FROM principals) || ' ' || \
                  (SELECT count(*) FROM api_tokens) || ' ' || (SELECT count(*) FROM job_runs) \
                  || ' ' || (SELECT count(*) FROM audit_log)";
    let before = inited.psql(counts);
    migrate_refused(
        &a,
        &inited.config(),
        &[],
        &[
            "is not empty, and no `imgsrv migrate` wrote into it",
            "createdb",
            "before `imgsrv init`",
        ],
    );
    migrate_refused(&a, &inited.config(), &["--dry-run"], &["is not empty"]);
    assert_eq!(inited.psql(counts), before, "nothing changed");

    // a completed migration of another appliance: refused; of this one, changed
    // since: refused too (the deployment may be serving)
    migrate_ok(&a, &t.config(), &[]);
    let b = root.join("b");
    imgsrv(&["init", "--data", s(&b)]);
    let rows = "SELECT count(*) FROM principals";
    let before = t.psql(rows);
    migrate_refused(
        &b,
        &t.config(),
        &[],
        &[
            "holds a completed migration of",
            "another appliance, or it has changed since",
            "principal admin (another id)",
            "empty database",
        ],
    );
    let (other, _) = minisign_keypair(root.join("k2"));
    trust_key(&a, Some("later"), &other);
    migrate_refused(
        &a,
        &t.config(),
        &[],
        &["or it has changed since", "trusted key later"],
    );
    assert_eq!(t.psql(rows), before);
    assert_eq!(t.psql("SELECT count(*) FROM trusted_keys"), "1");
}
