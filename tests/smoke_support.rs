//! Smoke tests of the shared test helpers (tests/support) and fixtures (tests/fixtures).
mod support;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn make_test_image_is_reproducible_and_serial_dependent() {
    let tmp = temp_dir("smoke-image");
    let args = [
        "--serial",
        "20260102_0304",
        "--type",
        "both",
        "--pad-mib",
        "1",
    ];
    let a = make_test_image(tmp.path().join("a"), &args);
    let b = make_test_image(tmp.path().join("b"), &args);
    let c = make_test_image(
        tmp.path().join("c"),
        &[
            "--serial",
            "20260102_0305",
            "--type",
            "both",
            "--pad-mib",
            "1",
        ],
    );
    for img in [&a, &b, &c] {
        assert!(img.metadata.is_file());
        assert!(img.rootfs().is_file());
        assert!(img.disk().is_file());
    }
    assert_eq!(sha256_file(&a.metadata), sha256_file(&b.metadata));
    assert_eq!(a.container_fingerprint(), b.container_fingerprint());
    assert_eq!(a.vm_fingerprint(), b.vm_fingerprint());
    assert_ne!(sha256_file(a.rootfs()), sha256_file(c.rootfs()));
    assert_ne!(sha256_file(a.disk()), sha256_file(c.disk()));
    assert_ne!(a.container_fingerprint(), a.vm_fingerprint());

    let meta = run_ok(
        Command::new("tar")
            .arg("-xJOf")
            .arg(&a.metadata)
            .arg("metadata.yaml"),
    );
    let meta = String::from_utf8(meta.stdout).unwrap();
    assert!(meta.contains("serial: \"20260102_0304\""), "{meta}");
    assert!(meta.contains("architecture: \"x86_64\""), "{meta}");

    let ct = make_test_image(tmp.path().join("ct"), &["--serial", "x"]);
    assert!(ct.rootfs.is_some() && ct.disk.is_none());

    // Fingerprint = sha256(metadata ‖ rootfs), checked against sha256sum of the concatenation.
    let cat = tmp.path().join("cat");
    let mut bytes = fs::read(&a.metadata).unwrap();
    bytes.extend(fs::read(a.rootfs()).unwrap());
    fs::write(&cat, bytes).unwrap();
    assert_eq!(sha256_file(&cat), a.container_fingerprint());
    let out = run_ok(Command::new("sha256sum").arg(&cat));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha256_file(&cat)));
}

#[test]
fn incus_simplestreams_accepts_test_image() {
    let tmp = temp_dir("smoke-ss");
    let img = make_test_image(tmp.path().join("img"), &["--type", "both"]);
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    for data in [img.rootfs(), img.disk()] {
        run_ok(
            Command::new("incus-simplestreams")
                .current_dir(&tree)
                .arg("add")
                .arg(&img.metadata)
                .arg(data),
        );
    }
    run_ok(
        Command::new("incus-simplestreams")
            .current_dir(&tree)
            .arg("verify"),
    );
    let images: serde_json::Value =
        serde_json::from_slice(&fs::read(tree.join("streams/v1/images.json")).unwrap()).unwrap();
    let items =
        &images["products"]["Debian:bookworm:default:x86_64"]["versions"]["202601010000"]["items"];
    assert_eq!(
        items["incus.tar.xz"]["combined_squashfs_sha256"],
        img.container_fingerprint()
    );
    assert_eq!(
        items["incus.tar.xz"]["combined_disk-kvm-img_sha256"],
        img.vm_fingerprint()
    );
}

#[test]
fn minisign_helpers_sign_and_verify() {
    let tmp = temp_dir("smoke-minisign");
    let (public, secret) = minisign_keypair(tmp.path().join("keys"));
    let file = tmp.path().join("manifest.json");
    fs::write(&file, b"{\"schema\":\"imgsrv.manifest.v1\"}").unwrap();
    let sig = minisign_sign(&secret, &file);
    assert!(fs::read_to_string(&sig)
        .unwrap()
        .starts_with("untrusted comment:"));
    run_ok(
        Command::new("minisign")
            .arg("-V")
            .arg("-p")
            .arg(&public)
            .arg("-m")
            .arg(&file)
            .arg("-x")
            .arg(&sig),
    );
}

/// The harness's daemon trusts a self-signed cert, imports and launches the test image.
#[test]
fn incus_daemon_launches_test_image() {
    let tmp = temp_dir("smoke-incusd");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = tmp.path().join("cert.pem");
    fs::write(&cert, ck.cert.pem()).unwrap();
    let img = make_test_image(tmp.path().join("img"), &["--serial", "20260203_0405"]);

    let _daemon = IncusDaemon::up(&cert);
    let incus = Incus::new(&cert);
    let meta = img.metadata.to_str().unwrap();
    let rootfs = img.rootfs().to_str().unwrap();
    incus.run(&["image", "import", meta, rootfs, "--alias", "t"]);
    let images = incus.json(&["image", "list"]);
    assert_eq!(images[0]["fingerprint"], img.container_fingerprint());

    incus.run(&["launch", "t", "c1"]);
    let list = incus.json(&["list"]);
    assert_eq!(list[0]["name"], "c1");
    assert_eq!(list[0]["status"], "Running", "{list:#}");
    assert_eq!(
        incus.stdout(&["exec", "c1", "--", "cat", "/etc/imgsrv-test-marker"]),
        "20260203_0405\n"
    );
    assert_eq!(
        incus.stdout(&["exec", "c1", "--", "cat", "/etc/hostname"]),
        "c1\n"
    );
}

#[test]
fn test_server_starts_and_answers_healthz() {
    let server = TestServer::start();
    assert!(server.url().starts_with("https://127.0.0.1:"));
    assert!(server.cert().is_file());
    assert!(!server.admin_token().is_empty());
    let resp = server
        .agent()
        .get(format!("{}/healthz", server.url()))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    let _incus = Incus::new(server.cert());
}

#[test]
fn run_within_returns_what_an_exiting_command_printed() {
    let out = run_within(
        Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out), "out\nerr\n");
}

#[test]
fn run_within_stops_a_command_that_hangs() {
    let t = Instant::now();
    let hung = std::panic::catch_unwind(|| {
        run_within(Command::new("sleep").arg("30"), Duration::from_millis(300))
    });
    let msg = hung.expect_err("sleep 30 did not time out");
    let msg = msg
        .downcast_ref::<String>()
        .expect("a formatted panic message");
    assert!(msg.contains("sleep 30 did not exit within 300ms"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}
