//! Issue 9, item 5: `imgsrv publish --data DIR` for a publisher on the server's own
//! machine, beside a running `imgsrv serve`: signed and verified like a publish through
//! the API (an untrusted key is refused under enforce), audited, the files copied (never
//! linked: rebuilding one in place later does not touch what is served), the same
//! fingerprints the Incus client computes.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use support::*;

fn publish_data(
    data: &std::path::Path,
    key: &std::path::Path,
    files: &[&std::path::Path],
    extra: &[&str],
) -> std::process::Output {
    run_any(
        Command::new(IMGSRV)
            .args(["publish", "--data"])
            .arg(data)
            .arg("--key")
            .arg(key)
            .args(extra)
            .args(files),
    )
}

#[test]
fn publish_into_a_data_directory_beside_its_server() {
    let server = TestServer::start();
    let data = server.data_dir().to_path_buf();
    let tmp = temp_dir("publish-data");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    let img = make_test_image(tmp.path().join("img"), &["--type", "both"]);
    let files = [img.disk(), &img.metadata, img.rootfs()];

    // an untrusted key: refused (enforce), nothing published
    let out = publish_data(&data, &secret, &files, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("not a trusted publisher key"),
        "{}",
        text(&out)
    );
    assert_eq!(
        server
            .get("/v1/images/debian-bookworm/versions/20260101_0000")
            .0,
        404
    );

    trust_key(&data, Some("release"), &public);
    let out = publish_data(&data, &secret, &files, &["--alias", "stable"]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    for fp in [img.container_fingerprint(), img.vm_fingerprint()] {
        assert!(printed.contains(&fp), "{fp} in {printed}");
    }
    assert!(printed.contains("verified"), "{printed}");
    // the running server serves it at once, with the alias, bytes identical
    let images = String::from_utf8(server.get_ok("/streams/v1/images.json")).unwrap();
    assert!(images.contains(&img.container_fingerprint()), "{images}");
    assert!(
        images.contains("debian-bookworm/stable") || images.contains("stable"),
        "{images}"
    );
    let (status, sig) =
        server.get("/v1/images/debian-bookworm/versions/20260101_0000/manifest.minisig");
    assert_eq!(status, 200, "signed");
    assert!(!sig.is_empty());
    // copied, not linked: the publisher's file keeps one link and its mode
    for f in files {
        assert_eq!(
            fs::metadata(f).unwrap().nlink(),
            1,
            "{} was linked into the store",
            f.display()
        );
    }
    let root_hex = sha256_file(img.rootfs());
    let stored = data
        .join("sha256")
        .join(&root_hex[..2])
        .join(&root_hex[2..4])
        .join(&root_hex);
    assert_eq!(sha256_file(&stored), root_hex);
    fs::write(img.rootfs(), b"rebuilt in place").unwrap();
    assert_eq!(
        sha256_file(&stored),
        root_hex,
        "the store's copy did not change"
    );
    // audited as the local user
    let audit = catalog_sql(
        &data,
        "SELECT principal_name || ' ' || action || ' ' || outcome FROM audit_log WHERE action = 'publish'",
    );
    assert!(
        audit.contains("local:") && audit.contains("publish ok"),
        "{audit}"
    );
    // --server and --data typed together are refused
    let out = run_any(
        Command::new(IMGSRV)
            .args(["publish", "--server", &server.url(), "--data"])
            .arg(&data)
            .arg("--key")
            .arg(&secret)
            .arg(&img.metadata)
            .arg(img.disk()),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("give one of them"), "{}", text(&out));
}
