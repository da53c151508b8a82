//! Acceptance: a real `imgsrv serve`, images published with `imgsrv publish`,
//! read by the stock `incus` client, `sstream-query`, and launched by a real
//! Incus daemon.

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use support::*;

const OLD: &str = "20260101_0000";
const NEW: &str = "20260102_0000";
const IMAGE: &str = "debian-bookworm";

/// A server with two published versions of `debian-bookworm` (container and VM
/// each); the alias `stable` stays on the older one.
struct Fixture {
    server: TestServer,
    old: TestImage,
    new: TestImage,
    _tmp: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let server = TestServer::start();
    let tmp = temp_dir("incus-e2e");
    let (public, secret) = minisign_keypair(tmp.path().join("keys"));
    trust_key(server.data_dir(), Some("release"), &public);
    let old = make_test_image(tmp.path().join("old"), &["--serial", OLD, "--type", "both"]);
    let new = make_test_image(tmp.path().join("new"), &["--serial", NEW, "--type", "both"]);
    let out = publish_image(&server, &secret, &old, &["--alias", "stable"]);
    assert!(
        out.contains(&old.container_fingerprint()) && out.contains(&old.vm_fingerprint()),
        "{out}"
    );
    let out = publish_image(&server, &secret, &new, &[]);
    assert!(
        out.contains(&new.container_fingerprint()) && out.contains(&new.vm_fingerprint()),
        "{out}"
    );
    Fixture {
        server,
        old,
        new,
        _tmp: tmp,
    }
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

#[test]
fn incus_client_lists_inspects_and_exports_containers_and_vms() {
    let f = fixture();
    let incus = Incus::new(f.server.cert());
    incus.remote_add("r", &f.server.url());

    let list = incus.json(&["image", "list", "r:"]);
    let fps: BTreeSet<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["fingerprint"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = [
        f.old.container_fingerprint(),
        f.old.vm_fingerprint(),
        f.new.container_fingerprint(),
        f.new.vm_fingerprint(),
    ]
    .into_iter()
    .collect();
    assert_eq!(fps, want, "incus image list fingerprints");
    for i in list.as_array().unwrap() {
        assert_eq!(i["architecture"], "x86_64");
        let fp = i["fingerprint"].as_str().unwrap();
        let t = if fp == f.old.vm_fingerprint() || fp == f.new.vm_fingerprint() {
            "virtual-machine"
        } else {
            "container"
        };
        assert_eq!(i["type"], t, "{fp}");
    }

    // default alias -> newest; movable alias pinned to the older version; --vm; distro alias
    assert_eq!(
        incus.info_fingerprint(&[&format!("r:{IMAGE}")]),
        f.new.container_fingerprint()
    );
    assert_eq!(
        incus.info_fingerprint(&[&format!("r:{IMAGE}/stable")]),
        f.old.container_fingerprint()
    );
    assert_eq!(
        incus.info_fingerprint(&[&format!("r:{IMAGE}"), "--vm"]),
        f.new.vm_fingerprint()
    );
    assert_eq!(
        incus.info_fingerprint(&[&format!("r:{IMAGE}/stable"), "--vm"]),
        f.old.vm_fingerprint()
    );
    assert_eq!(
        incus.info_fingerprint(&[&format!("r:{IMAGE}/{OLD}")]),
        f.old.container_fingerprint()
    );
    assert_eq!(
        incus.info_fingerprint(&["r:debian/bookworm"]),
        f.new.container_fingerprint()
    );
    assert_eq!(
        incus.info_fingerprint(&["r:debian/bookworm/default", "--vm"]),
        f.new.vm_fingerprint()
    );

    // exports are byte-identical to what was published
    let tmp = temp_dir("export");
    let ct = tmp.path().join("ct");
    std::fs::create_dir_all(&ct).unwrap();
    incus.run(&[
        "image",
        "export",
        &format!("r:{IMAGE}/stable"),
        ct.to_str().unwrap(),
    ]);
    assert_eq!(single_file(&ct, ".incus.tar.xz"), read(&f.old.metadata));
    assert_eq!(single_file(&ct, ".squashfs"), read(f.old.rootfs()));
    let vm = tmp.path().join("vm");
    std::fs::create_dir_all(&vm).unwrap();
    incus.run(&[
        "image",
        "export",
        &format!("r:{IMAGE}"),
        vm.to_str().unwrap(),
        "--vm",
    ]);
    assert_eq!(single_file(&vm, ".incus.tar.xz"), read(&f.new.metadata));
    assert_eq!(single_file(&vm, ".qcow2"), read(f.new.disk()));
    let mut both = read(&f.new.metadata);
    both.extend(read(f.new.disk()));
    assert_eq!(
        imgsrv::digest::Digest::of(&both).hex(),
        f.new.vm_fingerprint()
    );

    // the client tried every artifact over plain HTTP first, and was answered there
    let log = f.server.log_text();
    assert!(
        log.lines().any(|l| l.contains("imgsrv::access")
            && l.contains("/download/")
            && l.contains(" 200 ")
            && l.contains("secure=false")),
        "no plain-HTTP download in the log:\n{log}"
    );
}

/// Issue acceptance: UPDATE and DELETE from the `sqlite3` shell on the rows
/// of a published version and on the blob rows it references all fail, and
/// afterwards the Incus client still sees the same fingerprints and exports
/// the same bytes.
#[test]
fn sqlite_shell_tampering_changes_nothing_the_incus_client_sees() {
    let f = fixture();
    let before = Incus::new(f.server.cert());
    before.remote_add("r", &f.server.url());
    let mut want = before.fingerprints("r:");
    want.sort();
    assert_eq!(want.len(), 4);

    let db = f.server.data_dir().join("catalog.db");
    let root = format!("sha256:{}", sha256_file(f.old.rootfs()));
    for sql in [
        "UPDATE image_versions SET state = 'draft'".to_string(),
        "DELETE FROM image_versions".to_string(),
        "UPDATE release_artifacts SET primary_blob_size_bytes = 1".to_string(),
        "DELETE FROM release_artifacts".to_string(),
        "UPDATE artifact_attachments SET blob_size_bytes = 1".to_string(),
        "DELETE FROM artifact_attachments".to_string(),
        "UPDATE incus_projection SET combined_sha256 = substr(combined_sha256, 2) || '0'"
            .to_string(),
        "DELETE FROM incus_projection".to_string(),
        "UPDATE publish_records SET signature = 'x'".to_string(),
        format!("DELETE FROM cas_blobs WHERE digest = '{root}'"),
        format!("UPDATE cas_blobs SET size_bytes = 1 WHERE digest = '{root}'"),
    ] {
        let out = run_any(Command::new("sqlite3").arg(&db).arg(&sql));
        assert!(!out.status.success(), "sqlite3 accepted: {sql}");
    }

    // a fresh client (the CLI caches the index for 5 minutes)
    let after = Incus::new(f.server.cert());
    after.remote_add("r", &f.server.url());
    let mut got = after.fingerprints("r:");
    got.sort();
    assert_eq!(got, want);
    let tmp = temp_dir("export-after-sqlite");
    after.run(&[
        "image",
        "export",
        &format!("r:{IMAGE}/stable"),
        tmp.path().to_str().unwrap(),
    ]);
    assert_eq!(
        single_file(tmp.path(), ".incus.tar.xz"),
        read(&f.old.metadata)
    );
    assert_eq!(single_file(tmp.path(), ".squashfs"), read(f.old.rootfs()));
}

#[test]
fn sstream_query_reads_the_same_streams() {
    let f = fixture();
    let out = run_ok(
        Command::new("sstream-query")
            .arg("--json")
            .arg(format!("{}/streams/v1/index.json", f.server.url()))
            .env("REQUESTS_CA_BUNDLE", f.server.cert())
            .env("SSL_CERT_FILE", f.server.cert()),
    );
    let items: Value = serde_json::from_slice(&out.stdout).expect("sstream-query prints JSON");
    let items = items.as_array().unwrap();
    let sha = |ftype: &str| -> BTreeSet<String> {
        items
            .iter()
            .filter(|i| i["ftype"] == ftype)
            .map(|i| i["sha256"].as_str().unwrap().to_string())
            .collect()
    };
    let want_roots: BTreeSet<String> = [sha256_file(f.old.rootfs()), sha256_file(f.new.rootfs())]
        .into_iter()
        .collect();
    assert_eq!(sha("squashfs"), want_roots);
    let want_disks: BTreeSet<String> = [sha256_file(f.old.disk()), sha256_file(f.new.disk())]
        .into_iter()
        .collect();
    assert_eq!(sha("disk-kvm.img"), want_disks);
    assert_eq!(sha("incus.tar.xz").len(), 2);
    assert_eq!(sha("lxd.tar.xz"), sha("incus.tar.xz"));
    for i in items {
        let url = i["item_url"].as_str().unwrap();
        assert!(url.starts_with(&f.server.url()), "{url}");
    }
}

#[test]
fn incus_daemon_launches_published_containers() {
    let f = fixture();
    let _daemon = IncusDaemon::up(f.server.cert());
    let incus = Incus::new(f.server.cert());
    incus.remote_add("r", &f.server.url());
    incus.run(&["launch", &format!("r:{IMAGE}"), "c1"]);
    incus.run(&["launch", &format!("r:{IMAGE}/stable"), "c2"]);
    let list = incus.json(&["list"]);
    for name in ["c1", "c2"] {
        let c = list
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {list}"));
        assert_eq!(c["status"], "Running", "{name}: {c}");
    }
    // the containers run the published root filesystems
    assert_eq!(
        incus
            .stdout(&["exec", "c1", "--", "cat", "/etc/imgsrv-test-marker"])
            .trim(),
        NEW
    );
    assert_eq!(
        incus
            .stdout(&["exec", "c2", "--", "cat", "/etc/imgsrv-test-marker"])
            .trim(),
        OLD
    );
    let local: BTreeSet<String> = incus.fingerprints("local:").into_iter().collect();
    assert!(
        local.contains(&f.new.container_fingerprint())
            && local.contains(&f.old.container_fingerprint()),
        "{local:?}"
    );
}

#[test]
fn private_images_need_a_readers_credentials_in_the_incus_remote() {
    let server = TestServer::start();
    let tmp = temp_dir("incus-private");
    let d = server.data_dir().to_str().unwrap().to_string();
    let (public, secret) = minisign_keypair(tmp.path().join("keys"));
    trust_key(&d, None, &public);
    let img = make_test_image(tmp.path().join("img"), &["--serial", OLD]);
    publish_image(&server, &secret, &img, &["--private"]);

    // anonymous: nothing there
    let anon = Incus::new(server.cert());
    anon.remote_add("r", &server.url());
    assert_eq!(
        anon.json(&["image", "list", "r:"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert!(!anon
        .try_run(&["image", "info", &format!("r:{IMAGE}")])
        .status
        .success());

    // a reader's dedicated token in the remote URL
    imgsrv(&["principal", "add", "--data", &d, "--kind", "service", "lab"]);
    imgsrv(&["grant", "add", "--data", &d, "lab", "reader", "debian-*"]);
    let issued = imgsrv(&["token", "issue", "--data", &d, "lab"]);
    let token = last_line(&issued);
    let reader = Incus::new(server.cert());
    reader.remote_add(
        "p",
        &server
            .url()
            .replace("https://", &format!("https://lab:{token}@")),
    );
    let list = reader.json(&["image", "list", "p:"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["fingerprint"], img.container_fingerprint());
    assert_eq!(
        reader.info_fingerprint(&[&format!("p:{IMAGE}")]),
        img.container_fingerprint()
    );
    let out = tmp.path().join("export");
    std::fs::create_dir_all(&out).unwrap();
    reader.run(&[
        "image",
        "export",
        &format!("p:{IMAGE}"),
        out.to_str().unwrap(),
    ]);
    assert_eq!(single_file(&out, ".squashfs"), read(img.rootfs()));
    assert_eq!(single_file(&out, ".incus.tar.xz"), read(&img.metadata));

    // the client's plain-HTTP attempt carried the credentials: refused and logged
    let log = server.log_text();
    assert!(
        log.contains("refused plain-HTTP request carrying credentials"),
        "{log}"
    );
    assert!(!log.lines().any(|l| l.contains("imgsrv::access")
        && l.contains("secure=false")
        && l.contains(" 200 ")));

    // made public, anyone sees it
    run_ok(
        Command::new(IMGSRV)
            .args(["image", "set-visibility", "--server", &server.url(), "--ca"])
            .arg(server.cert())
            .arg("--token-file")
            .arg(server.admin_token_file())
            .args([IMAGE, "public"]),
    );
    let anon2 = Incus::new(server.cert());
    anon2.remote_add("r", &server.url());
    assert_eq!(
        anon2.info_fingerprint(&[&format!("r:{IMAGE}")]),
        img.container_fingerprint()
    );
}
