//! Acceptance (issue 7, side-table tampering): whatever the `sqlite3` shell
//! manages to do to the rows of `DATA/catalog.db` that its triggers leave
//! writable (every column of every row set to garbage, every row deleted,
//! `PRAGMA user_version` forgotten or absurd), a running server keeps serving
//! the published versions, and a restarted one starts and serves them: the
//! same Simple Streams entries and the same bytes.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use support::*;

const IMAGE: &str = "debian-bookworm";
const OLD: &str = "20260101_0000";
const NEW: &str = "20260102_0000";
const DRAFT: &str = "20260103_0000";
const NEWEST: &str = "20260104_0000";

/// What the table-by-table tamper writes into every column of every row, one
/// round per value (each the last one a column keeps where it is allowed).
const GARBAGE: &[&str] = &[
    "NULL",
    "-1",
    "9223372036854775807",
    "1.5",
    "'garbage'",
    "X'00ff'",
];

/// What a server serves of its published versions, anonymously.
struct Served {
    index: Value,
    images: Value,
    /// Download path (from images.json) -> sha256 of its bytes.
    downloads: BTreeMap<String, String>,
    /// `manifest` and `manifest.minisig` of each published version.
    manifests: BTreeMap<String, Vec<u8>>,
}

fn json(server: &TestServer, path: &str) -> Value {
    let body = server.get_ok(path);
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e})"))
}

impl Served {
    fn read(server: &TestServer) -> Served {
        let index = json(server, "/streams/v1/index.json");
        let images = json(server, "/streams/v1/images.json");
        let mut downloads = BTreeMap::new();
        for (key, product) in images["products"].as_object().expect("products") {
            for (serial, version) in product["versions"].as_object().expect("versions") {
                for (name, item) in version["items"].as_object().expect("items") {
                    let path = item["path"].as_str().expect("item path");
                    let body = server.get_ok(&format!("/{path}"));
                    let sha = imgsrv::digest::Digest::of(&body).hex();
                    assert_eq!(
                        Some(sha.as_str()),
                        item["sha256"].as_str(),
                        "{key} {serial} {name}: the bytes served are not the ones listed"
                    );
                    downloads.insert(path.to_string(), sha);
                }
            }
        }
        let mut manifests = BTreeMap::new();
        for v in [OLD, NEW] {
            for doc in ["manifest", "manifest.minisig"] {
                let path = format!("/v1/images/{IMAGE}/versions/{v}/{doc}");
                manifests.insert(path.clone(), server.get_ok(&path));
            }
        }
        Served {
            index,
            images,
            downloads,
            manifests,
        }
    }

    /// The same documents and bytes, except the aliases the operator's rows
    /// no longer give (`gone`: deleted alias rows).
    fn assert_served_by(&self, server: &TestServer, when: &str, gone: &[&str]) {
        let now = Served::read(server);
        let mut want = self.images.clone();
        for product in want["products"].as_object_mut().unwrap().values_mut() {
            let kept: Vec<&str> = product["aliases"]
                .as_str()
                .unwrap()
                .split(',')
                .filter(|a| !gone.contains(a))
                .collect();
            product["aliases"] = Value::String(kept.join(","));
        }
        assert_eq!(now.index, self.index, "{when}: index.json changed");
        assert_eq!(now.images, want, "{when}: images.json changed");
        assert_eq!(now.downloads, self.downloads, "{when}: downloads changed");
        assert_eq!(now.manifests, self.manifests, "{when}: manifests changed");
        let log = server.log_text();
        assert!(!log.contains("panicked"), "{when}: the server panicked");
    }
}

fn sqlite(db: &Path, sql: &str) -> String {
    let out = run_ok(Command::new("sqlite3").arg(db).arg(sql));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `script` in one `sqlite3` session that goes on after each refused
/// statement (the triggers', the constraints'): what the shell let through
/// stays. Returns how many statements were refused.
fn sqlite_script(db: &Path, script: &str) -> usize {
    let dir = temp_dir("tamper-script");
    let file = dir.path().join("tamper.sql");
    std::fs::write(&file, script).unwrap();
    let out = run_any(
        Command::new("sqlite3")
            .arg(db)
            .arg(format!(".read {}", file.display())),
    );
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(" error near line"))
        .count()
}

fn tables(db: &Path) -> Vec<String> {
    sqlite(
        db,
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

fn rowids(db: &Path, table: &str) -> Vec<String> {
    sqlite(db, &format!("SELECT rowid FROM \"{table}\""))
        .lines()
        .map(str::to_string)
        .collect()
}

/// `UPDATE t SET c = value WHERE rowid = r` for every column of every row of
/// every table, one statement each (one refused row does not protect another).
fn set_everything_to(db: &Path, value: &str) -> usize {
    let mut script = String::from("PRAGMA synchronous = OFF;\n");
    for t in tables(db) {
        let columns = sqlite(db, &format!("SELECT name FROM pragma_table_info('{t}')"));
        for r in rowids(db, &t) {
            for c in columns.lines() {
                script.push_str(&format!(
                    "UPDATE \"{t}\" SET \"{c}\" = {value} WHERE rowid = {r};\n"
                ));
            }
        }
    }
    sqlite_script(db, &script)
}

/// `DELETE FROM t WHERE rowid = r` for every row of every table.
fn delete_everything(db: &Path) -> usize {
    let mut script = String::from("PRAGMA synchronous = OFF;\n");
    for t in tables(db) {
        for r in rowids(db, &t) {
            script.push_str(&format!("DELETE FROM \"{t}\" WHERE rowid = {r};\n"));
        }
    }
    sqlite_script(db, &script)
}

fn count(db: &Path, table: &str) -> u64 {
    sqlite(db, &format!("SELECT count(*) FROM \"{table}\""))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn sqlite_shell_tamper_on_every_table_leaves_published_versions_served() {
    let mut server = TestServer::start();
    let data = server.data_dir().to_path_buf();
    let d = s(&data).to_string();
    let db = data.join("catalog.db");
    let tmp = temp_dir("tamper");
    let (public, secret) = minisign_keypair(tmp.path().join("keys"));
    trust_key(&data, Some("release"), &public);
    let old = make_test_image(tmp.path().join("old"), &["--serial", OLD]);
    let new = make_test_image(tmp.path().join("new"), &["--serial", NEW, "--type", "both"]);
    publish_image(&server, &secret, &old, &["--alias", "stable"]);
    publish_image(&server, &secret, &new, &[]);
    // a draft with its blobs, metadata and upload sessions: signed by a key
    // the server does not trust, so it stays a draft
    let (_, stranger) = minisign_keypair(tmp.path().join("stranger"));
    let draft = make_test_image(tmp.path().join("draft"), &["--serial", DRAFT]);
    let roots = [draft.rootfs()];
    let mut cmd = Command::new(IMGSRV);
    cmd.arg("publish")
        .args(["--server", &server.url(), "--ca"])
        .arg(server.cert())
        .arg("--token-file")
        .arg(server.admin_token_file())
        .arg("--key")
        .arg(&stranger)
        .arg(&draft.metadata)
        .args(roots);
    assert!(
        !run_any(&mut cmd).status.success(),
        "untrusted key accepted"
    );
    // principals, grants, tokens (and their audit rows)
    imgsrv(&["principal", "add", "--data", &d, "lab"]);
    imgsrv(&["grant", "add", "--data", &d, "lab", "reader", "debian-*"]);
    imgsrv(&["token", "issue", "--data", &d, "lab"]);

    let before = Served::read(&server);
    assert_eq!(before.downloads.len(), 5, "3 roots, 2 metadata tarballs");
    let stable = format!("{IMAGE}/stable");
    assert!(
        before.images.to_string().contains(&stable),
        "{}",
        before.images
    );
    let all = tables(&db);
    for t in [
        "catalog_state",
        "cas_blobs",
        "upload_sessions",
        "upload_parts",
        "images",
        "image_versions",
        "version_metadata",
        "aliases",
        "roles",
        "role_actions",
        "principals",
        "grants",
        "api_tokens",
        "audit_log",
        "sqlite_sequence",
    ] {
        assert!(all.contains(&t.to_string()), "no table {t}: {all:?}");
        assert!(count(&db, t) > 0, "nothing to tamper with in {t}");
    }

    // every column of every row, to each garbage value in turn, under the
    // running server
    for value in GARBAGE {
        let refused = set_everything_to(&db, value);
        assert!(refused > 0, "the triggers refused nothing");
        before.assert_served_by(&server, &format!("running, after SET = {value}"), &[]);
    }
    // the tamper did reach the side tables
    let roles = sqlite(&db, "SELECT DISTINCT quote(display_name) FROM roles");
    assert_eq!(roles.trim(), "X'00FF'", "roles not tampered");
    server.kill();
    server.spawn();
    before.assert_served_by(&server, "restarted after the updates", &[]);

    // every row deleted where the shell lets it
    delete_everything(&db);
    for t in [
        "roles",
        "role_actions",
        "aliases",
        "principals",
        "grants",
        "api_tokens",
        "upload_sessions",
        "trusted_keys",
    ] {
        assert_eq!(count(&db, t), 0, "{t} rows not deleted");
    }
    before.assert_served_by(&server, "running, after the deletes", &[&stable]);
    server.kill();
    server.spawn();
    before.assert_served_by(&server, "restarted after the deletes", &[&stable]);

    // the schema version forgotten, negative, from the future
    for v in ["0", "-1", "1000"] {
        server.kill();
        sqlite(&db, &format!("PRAGMA user_version = {v}"));
        server.spawn();
        before.assert_served_by(
            &server,
            &format!("restarted after user_version = {v}"),
            &[&stable],
        );
    }

    // and the server still works: roles are back (the bootstrap admin made
    // again, with a new token), a new version is published and listed (the
    // projection is not stuck on a stale generation)
    let matrix = text(&imgsrv(&["auth", "matrix", "--data", &d]));
    assert!(
        matrix.contains("AUTH-MANAGER")
            && matrix
                .lines()
                .any(|l| l.starts_with("admin ") && l.contains('*')),
        "{matrix}"
    );
    // (the trusted keys live in the catalog: the shell deleted the active one, as
    // `imgsrv key remove` would, and the key that signs from now on is added anew)
    let (public2, secret2) = minisign_keypair(tmp.path().join("keys2"));
    trust_key(&data, Some("release2"), &public2);
    let newest = make_test_image(tmp.path().join("newest"), &["--serial", NEWEST]);
    publish_image(&server, &secret2, &newest, &["--alias", "stable"]);
    let images = json(&server, "/streams/v1/images.json").to_string();
    assert!(
        images.contains(NEWEST) && images.contains(&stable),
        "{images}"
    );
    imgsrv(&["principal", "add", "--data", &d, "lab2"]);
    imgsrv(&["grant", "add", "--data", &d, "lab2", "reader", "*"]);
}

#[test]
fn replace_from_the_shell_cannot_rewrite_append_only_rows() {
    let server = TestServer::start();
    let data = server.data_dir().to_path_buf();
    let db = data.join("catalog.db");
    let tmp = temp_dir("tamper-replace");
    let (public, secret) = minisign_keypair(tmp.path().join("keys"));
    trust_key(&data, Some("release"), &public);
    let old = make_test_image(tmp.path().join("old"), &["--serial", OLD]);
    let new = make_test_image(tmp.path().join("new"), &["--serial", NEW]);
    publish_image(&server, &secret, &old, &[]);
    publish_image(&server, &secret, &new, &[]);
    let out = run_any(
        Command::new(IMGSRV)
            .args(["version", "retire", IMAGE, OLD, "--reason", "superseded"])
            .args(["--server", &server.url(), "--ca"])
            .arg(server.cert())
            .arg("--token-file")
            .arg(server.admin_token_file()),
    );
    assert!(out.status.success(), "{}", text(&out));
    let audit = sqlite(&db, "SELECT group_concat(id || action, ',') FROM audit_log");
    let retired = sqlite(&db, "SELECT reason FROM retirements");
    for sql in [
        "INSERT OR REPLACE INTO audit_log (id, at, action, target, outcome, detail) \
         SELECT id, at, 'nothing', '', 'ok', '{}' FROM audit_log",
        "REPLACE INTO audit_log (id, at, action, target, outcome, detail) \
         SELECT min(id), '2000-01-01', 'nothing', '', 'ok', '{}' FROM audit_log",
        "UPDATE OR REPLACE audit_log SET id = id + 1",
        "INSERT OR REPLACE INTO retirements SELECT version_id, 'nothing', NULL, NULL, retired_at \
         FROM retirements",
        "REPLACE INTO publish_records SELECT * FROM publish_records",
    ] {
        let out = run_any(Command::new("sqlite3").arg(&db).arg(sql));
        assert!(!out.status.success(), "allowed: {sql}");
    }
    assert_eq!(
        sqlite(&db, "SELECT group_concat(id || action, ',') FROM audit_log"),
        audit
    );
    assert_eq!(sqlite(&db, "SELECT reason FROM retirements"), retired);
    // appending still works (the server's own rows)
    let _ = server.get("/v1/audit");
    assert!(count(&db, "audit_log") as usize >= audit.split(',').count());
}

/// Which version the alias `stable` of `demo` is on in the anonymous projection.
fn stable_on(e: &support::inproc::Env) -> String {
    let images = e.images_json();
    let on: Vec<&String> = images["products"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, p)| {
            p["aliases"]
                .as_str()
                .unwrap()
                .split(',')
                .any(|a| a == "demo/stable")
        })
        .map(|(k, _)| k)
        .collect();
    assert_eq!(on.len(), 1, "{images}");
    on[0].split(':').nth(1).unwrap().to_string()
}

/// The projection generation counter, tampered with from the shell: the
/// guards refuse to set it back (a cache that saw the old value would serve
/// a stale projection), and a counter that is broken anyway (a catalog from
/// before the guards, or someone who dropped them) means "rebuild", never a
/// failed request or a stale document.
#[test]
fn a_tampered_generation_counter_never_serves_a_stale_projection() {
    use serde_json::json;
    use support::inproc::*;
    let e = env_with("[image_verification]\nmode = \"off\"\n");
    let db = e.dir.path().join("catalog.db");
    let generation = || sqlite(&db, "SELECT quote(generation) FROM catalog_state");
    e.draft("demo", "20250101_0000", META, Some(ROOT), None);
    assert_eq!(e.publish("demo", "20250101_0000", None).status, 200);
    e.draft("demo", "20250102_0000", b"META2", Some(b"ROOT2"), None);
    assert_eq!(e.publish("demo", "20250102_0000", None).status, 200);
    let put = |v: &str| {
        let r = e.call(
            "PUT",
            "/v1/images/demo/aliases/stable",
            json!({ "version": v }),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    };
    put("20250101_0000");
    assert_eq!(stable_on(&e), "20250101_0000");
    let seen = generation();

    // guarded: the counter cannot be set back to what the cache saw
    put("20250102_0000");
    for sql in [
        format!("UPDATE catalog_state SET generation = {seen}"),
        "UPDATE catalog_state SET generation = -1".into(),
        "UPDATE catalog_state SET generation = 'x'".into(),
        "DELETE FROM catalog_state".into(),
        format!("INSERT OR REPLACE INTO catalog_state VALUES (1, {seen})"),
    ] {
        let out = run_any(Command::new("sqlite3").arg(&db).arg(&sql));
        assert!(!out.status.success(), "sqlite3 accepted: {sql}");
    }
    assert_eq!(stable_on(&e), "20250102_0000", "stale projection");

    // the guards dropped: set back below what the cache saw, unreadable,
    // deleted; each time the alias moves first, and the projection follows
    sqlite(
        &db,
        "DROP TRIGGER catalog_state_forward_only; DROP TRIGGER catalog_state_no_delete; \
         DROP TRIGGER catalog_state_no_replace",
    );
    let mut on = "20250101_0000";
    for sql in [
        "UPDATE catalog_state SET generation = 1",
        "UPDATE catalog_state SET generation = -5",
        "UPDATE catalog_state SET generation = 'garbage'",
        "UPDATE catalog_state SET generation = X'00'",
        "UPDATE catalog_state SET generation = 2.5",
        "DELETE FROM catalog_state",
    ] {
        put(on);
        sqlite(&db, sql);
        assert_eq!(stable_on(&e), on, "stale projection after {sql}");
        // repaired: a number above anything the cache saw, cached on again
        let g = generation();
        assert!(
            g.trim().parse::<i64>().is_ok_and(|g| g > 1 << 40),
            "{sql}: {g}"
        );
        let a = e.anon("GET", "/streams/v1/images.json");
        let b = e.anon("GET", "/streams/v1/images.json");
        assert_eq!((a.status, a.header("etag")), (200, b.header("etag")));
        on = if on == "20250101_0000" {
            "20250102_0000"
        } else {
            "20250101_0000"
        };
    }
}
