//! Issue 8, item 1: removing without breaking immutability, as a user does it: drafts are
//! deleted, published versions retired (`imgsrv version retire`), an alias blocks a
//! retirement until it is moved, a retired version leaves the index and the listings at
//! once but its bytes still download during the grace (an Incus client whose cached index
//! still names it can export it), and after `imgsrv gc` they answer 410 while the
//! manifest and signature stay readable and verify with `minisign -V`. The real `incus`
//! client, `curl`, `minisign` and `sqlite3` against a real `imgsrv serve`.

mod support;

use serde_json::Value;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use support::*;

const IMAGE: &str = "debian-bookworm";
const OLD: &str = "20260101_0000";
const NEW: &str = "20260102_0000";

/// `imgsrv SUB ARGS... --server URL --ca CERT --token-file ADMIN`, whatever its status.
fn client(server: &TestServer, args: &[&str]) -> Output {
    run_any(
        Command::new(IMGSRV)
            .args(args)
            .arg("--server")
            .arg(server.url())
            .arg("--ca")
            .arg(server.cert())
            .arg("--token-file")
            .arg(server.admin_token_file()),
    )
}

fn api(server: &TestServer, path: &str) -> (u16, Value) {
    let (status, body) = curl(
        server,
        &format!("{}{path}", server.url()),
        Some(&server.admin_token()),
        &[],
    );
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn version_ids(server: &TestServer) -> Vec<String> {
    let (status, v) = api(server, &format!("/v1/images/{IMAGE}/versions"));
    assert_eq!(status, 200, "{v}");
    v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap().to_string())
        .collect()
}

/// (artifact download path, blob digest) of every artifact and attachment of a version.
fn downloads(server: &TestServer, ver: &str) -> Vec<(String, String)> {
    let (status, view) = api(server, &format!("/v1/images/{IMAGE}/versions/{ver}"));
    assert_eq!(status, 200, "{view}");
    let base = format!("/v1/images/{IMAGE}/versions/{ver}/artifacts");
    let mut out = Vec::new();
    for a in view["artifacts"].as_array().unwrap() {
        let id = a["artifact"]["id"].as_str().unwrap();
        out.push((
            format!("{base}/{id}/download"),
            a["artifact"]["primary_blob_digest"]
                .as_str()
                .unwrap()
                .to_string(),
        ));
        for t in a["attachments"].as_array().unwrap() {
            out.push((
                format!(
                    "{base}/{id}/attachments/{}/download",
                    t["id"].as_str().unwrap()
                ),
                t["blob_digest"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

fn blob_file(data: &Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data.join("sha256")
        .join(&hex[..2])
        .join(&hex[2..4])
        .join(hex)
}

#[test]
fn a_retired_version_leaves_the_index_downloads_during_the_grace_and_is_gone_after_gc() {
    let server = TestServer::start();
    let tmp = temp_dir("retire");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    trust_key(server.data_dir(), Some("release"), &public);
    let old = make_test_image(tmp.path().join("old"), &["--serial", OLD]);
    let new = make_test_image(tmp.path().join("new"), &["--serial", NEW]);
    publish_image(&server, &secret, &old, &[]);
    publish_image(&server, &secret, &new, &["--alias", "stable"]);
    let (old_fp, new_fp) = (old.container_fingerprint(), new.container_fingerprint());

    // a client that lists the images now keeps the index in its cache (5 minutes)
    let cached = Incus::new(server.cert());
    cached.remote_add("imgsrv", &server.url());
    let listed = cached.fingerprints("imgsrv:");
    assert!(
        listed.contains(&old_fp) && listed.contains(&new_fp),
        "{listed:?}"
    );

    // an alias on the version blocks its retirement, with a message that says what to do
    let out = client(
        &server,
        &["version", "retire", IMAGE, NEW, "--reason", "broken sshd"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("409") && text(&out).contains("alias stable"),
        "{}",
        text(&out)
    );
    assert_eq!(version_ids(&server).len(), 2, "nothing changed");
    run_ok(
        Command::new(IMGSRV)
            .args(["alias", "set", IMAGE, "stable", OLD])
            .args([
                "--server",
                &server.url(),
                "--ca",
                s(&server.cert()),
                "--token-file",
                s(&server.admin_token_file()),
            ]),
    );
    let out = client(
        &server,
        &["version", "retire", IMAGE, NEW, "--reason", "broken sshd"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let retired_downloads = downloads(&server, NEW);

    // from the next request on: out of the index and the listings...
    assert_eq!(version_ids(&server), vec![OLD.to_string()]);
    let images_json = String::from_utf8(server.get_ok("/streams/v1/images.json")).unwrap();
    assert!(!images_json.contains(NEW), "{images_json}");
    assert!(images_json.contains(OLD));
    let fresh = Incus::new(server.cert());
    fresh.remote_add("imgsrv", &server.url());
    assert_eq!(fresh.fingerprints("imgsrv:"), vec![old_fp.clone()]);
    // ...and the newest remaining version answers the image's default alias
    assert_eq!(
        fresh.info_fingerprint(&["imgsrv:debian/bookworm"]),
        old_fp,
        "the default alias moved to the newest remaining version"
    );
    // the version is still readable by name, with its retirement
    let (status, view) = api(&server, &format!("/v1/images/{IMAGE}/versions/{NEW}"));
    assert_eq!(status, 200);
    assert_eq!(view["retirement"]["reason"], "broken sshd", "{view}");
    assert!(view["retirement"]["collected_at"].is_null());
    // an alias cannot point at it any more; a second retirement is refused
    let out = client(&server, &["alias", "set", IMAGE, "again", NEW]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("retired"), "{}", text(&out));
    let out = client(&server, &["version", "retire", IMAGE, NEW, "--reason", "x"]);
    assert!(text(&out).contains("already retired"), "{}", text(&out));

    // during the grace the cached client still exports it, bytes identical
    let export = tmp.path().join("export-grace");
    fs::create_dir_all(&export).unwrap();
    cached.run(&["image", "export", &format!("imgsrv:{new_fp}"), s(&export)]);
    assert_eq!(
        single_file(&export, ".squashfs"),
        fs::read(new.rootfs()).unwrap(),
        "the exported root is the published one"
    );
    // the default gc grace (24h) keeps it
    let out = run_ok(Command::new(IMGSRV).args(["gc", "--data", s(server.data_dir())]));
    assert!(text(&out).contains("collect 0 retired"), "{}", text(&out));
    for (path, _) in &retired_downloads {
        assert_eq!(server.get(path).0, 200, "{path} during the grace");
    }

    // gc with no grace, beside the running server: the retired version is collected
    let dry = run_ok(Command::new(IMGSRV).args([
        "gc",
        "--data",
        s(server.data_dir()),
        "--grace",
        "0",
        "--dry-run",
    ]));
    assert!(text(&dry).contains("collect 1 retired"), "{}", text(&dry));
    let out =
        run_ok(Command::new(IMGSRV).args(["gc", "--data", s(server.data_dir()), "--grace", "0"]));
    assert!(text(&out).contains("collected 1 retired"), "{}", text(&out));
    let kept = downloads(&server, OLD);
    for (path, digest) in &retired_downloads {
        let (status, body) = server.get(path);
        assert_eq!(status, 410, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(String::from_utf8_lossy(&body).contains("retired"));
        // its bytes are gone from the store unless the remaining version shares them
        let shared = kept.iter().any(|(_, d)| d == digest);
        assert_eq!(
            blob_file(server.data_dir(), digest).exists(),
            shared,
            "{digest} (shared with {OLD}: {shared})"
        );
    }
    let export = tmp.path().join("export-after");
    fs::create_dir_all(&export).unwrap();
    let out = cached.try_run(&["image", "export", &format!("imgsrv:{new_fp}"), s(&export)]);
    assert!(!out.status.success(), "export after gc: {}", text(&out));
    // what remains still serves
    for (path, _) in &kept {
        assert_eq!(server.get(path).0, 200, "{path}");
    }

    // the manifest, its signature and the publish record stay readable, and verify
    let manifest = tmp.path().join("manifest.json");
    fs::write(
        &manifest,
        server.get_ok(&format!("/v1/images/{IMAGE}/versions/{NEW}/manifest")),
    )
    .unwrap();
    let sig = tmp.path().join("manifest.json.minisig");
    fs::write(
        &sig,
        server.get_ok(&format!(
            "/v1/images/{IMAGE}/versions/{NEW}/manifest.minisig"
        )),
    )
    .unwrap();
    run_ok(
        Command::new("minisign")
            .args(["-V", "-p"])
            .arg(&public)
            .arg("-m")
            .arg(&manifest)
            .arg("-x")
            .arg(&sig),
    );
    let (_, view) = api(&server, &format!("/v1/images/{IMAGE}/versions/{NEW}"));
    assert!(view["retirement"]["collected_at"].is_string(), "{view}");
    assert!(view["publication"]["manifest_digest"].is_string(), "{view}");

    // the retirement and the collection are audited, and the rows cannot be undone
    let audit = catalog_sql(
        server.data_dir(),
        "SELECT action || ' ' || target || ' ' || detail FROM audit_log \
         WHERE action IN ('version.retire', 'version.collect') ORDER BY id",
    );
    assert!(
        audit.contains(&format!("version.retire {IMAGE}@{NEW}")),
        "{audit}"
    );
    assert!(audit.contains("broken sshd"), "{audit}");
    assert!(
        audit.contains(&format!("version.collect {IMAGE}@{NEW}")),
        "{audit}"
    );
    for sql in [
        "DELETE FROM retirements",
        "UPDATE retirements SET reason = 'nothing happened'",
        "DELETE FROM collections",
        "INSERT OR REPLACE INTO retirements SELECT version_id, 'x', NULL, NULL, retired_at FROM retirements",
    ] {
        let out = run_any(
            Command::new("sqlite3")
                .arg(server.data_dir().join("catalog.db"))
                .arg(sql),
        );
        assert!(!out.status.success(), "{sql} was allowed");
    }
    let (_, view) = api(&server, &format!("/v1/images/{IMAGE}/versions/{NEW}"));
    assert_eq!(view["retirement"]["reason"], "broken sshd");
}

#[test]
fn drafts_are_deleted_published_versions_are_not() {
    let server = TestServer::start();
    let tmp = temp_dir("drafts");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    trust_key(server.data_dir(), Some("release"), &public);
    let img = make_test_image(tmp.path().join("img"), &["--serial", OLD]);
    publish_image(&server, &secret, &img, &[]);
    let token = server.admin_token();
    let (status, body) = curl(
        &server,
        &format!("{}/v1/images/{IMAGE}/versions", server.url()),
        Some(&token),
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"version":"draft1"}"#,
        ],
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        api(&server, &format!("/v1/images/{IMAGE}/versions/draft1")).0,
        200
    );

    // a published version: refused, saying what to do instead
    let out = client(&server, &["version", "delete", IMAGE, OLD]);
    assert!(!out.status.success());
    assert!(text(&out).contains("retire"), "{}", text(&out));
    assert_eq!(
        api(&server, &format!("/v1/images/{IMAGE}/versions/{OLD}")).0,
        200
    );
    // anonymous: 401, nothing deleted
    let (status, _) = curl(
        &server,
        &format!("{}/v1/images/{IMAGE}/versions/draft1", server.url()),
        None,
        &["-X", "DELETE"],
    );
    assert_eq!(status, 401);

    let out = client(&server, &["version", "delete", IMAGE, "draft1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        api(&server, &format!("/v1/images/{IMAGE}/versions/draft1")).0,
        404
    );
    let out = client(&server, &["version", "delete", IMAGE, "draft1"]);
    assert!(text(&out).contains("not found"), "{}", text(&out));
    // a draft cannot be retired, nor retired without a reason
    let out = client(&server, &["version", "retire", IMAGE, OLD, "--reason", " "]);
    assert!(text(&out).contains("reason"), "{}", text(&out));
    let audit = catalog_sql(
        server.data_dir(),
        "SELECT action || ' ' || outcome FROM audit_log WHERE action = 'version.delete' ORDER BY id",
    );
    assert!(audit.contains("version.delete ok"), "{audit}");
    assert!(audit.contains("version.delete denied"), "{audit}");
}
