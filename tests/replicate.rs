//! `imgsrv mirror-imgsrv`: one real imgsrv copied into another (a server and a
//! data directory), keeping the publisher's manifests and signatures.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::*;

fn get_json(server: &TestServer, path: &str) -> serde_json::Value {
    serde_json::from_slice(&server.get_ok(path)).unwrap()
}

fn published_count(data: &Path) -> u64 {
    catalog_sql(
        data,
        "SELECT count(*) FROM image_versions WHERE state = 'published'",
    )
    .trim()
    .parse()
    .unwrap()
}

fn mirror(target: &[&str], upstream: &TestServer, extra: &[&str]) -> Output {
    run_any(
        Command::new(IMGSRV)
            .arg("mirror-imgsrv")
            .args(target)
            .arg("--upstream-ca")
            .arg(upstream.cert())
            .args(extra)
            .arg(upstream.url())
            .env_remove("IMGSRV_TOKEN"),
    )
}

const VERSIONS: [(&str, &str); 3] = [
    ("debian-bookworm", "20260101_0000"),
    ("debian-bookworm", "20260102_0000"),
    ("ubuntu-noble", "20260103_0000"),
];

struct Upstream {
    server: TestServer,
    public: PathBuf,
    tmp: tempfile::TempDir,
}

fn upstream() -> Upstream {
    let server = TestServer::start();
    let tmp = temp_dir("mirror");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    trust_key(server.data_dir(), Some("release"), &public);
    let a1 = make_test_image(tmp.path().join("a1"), &["--serial", VERSIONS[0].1]);
    let a2 = make_test_image(
        tmp.path().join("a2"),
        &["--serial", VERSIONS[1].1, "--type", "both"],
    );
    let b1 = make_test_image(
        tmp.path().join("b1"),
        &[
            "--os",
            "Ubuntu",
            "--release",
            "noble",
            "--serial",
            VERSIONS[2].1,
        ],
    );
    publish_image(&server, &secret, &a1, &["--alias", "stable"]);
    publish_image(&server, &secret, &a2, &["--alias", "edge"]);
    publish_image(&server, &secret, &b1, &[]);
    Upstream {
        server,
        public,
        tmp,
    }
}

#[test]
fn mirroring_keeps_the_original_signatures_and_a_second_run_copies_nothing() {
    let up = upstream();
    let down = TestServer::start();
    // the downstream trusts only the original publisher's key
    trust_key(down.data_dir(), Some("origin"), &up.public);
    let (url, cert, token) = (down.url(), down.cert(), down.admin_token_file());
    let target = [
        "--server",
        &url,
        "--ca",
        s(&cert),
        "--token-file",
        s(&token),
    ];
    let first = mirror(&target, &up.server, &[]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("mirrored 3 version(s)"),
        "{}",
        text(&first)
    );

    let work = up.tmp.path().join("check");
    std::fs::create_dir_all(&work).unwrap();
    for (image, version) in VERSIONS {
        let base = format!("/v1/images/{image}/versions/{version}");
        let (st, manifest) = down.get(&format!("{base}/manifest"));
        assert_eq!(st, 200, "{image}@{version} not published downstream");
        let (_, up_manifest) = up.server.get(&format!("{base}/manifest"));
        assert_eq!(manifest, up_manifest, "manifest bytes differ");
        let (st, sig) = down.get(&format!("{base}/manifest.minisig"));
        assert_eq!(st, 200);
        let (_, up_sig) = up.server.get(&format!("{base}/manifest.minisig"));
        assert_eq!(sig, up_sig, "the signature was not kept as it was");
        // the real minisign, with the ORIGINAL publisher's public key
        let (m, x) = (
            work.join(format!("{image}-{version}.json")),
            work.join(format!("{image}-{version}.json.minisig")),
        );
        std::fs::write(&m, &manifest).unwrap();
        std::fs::write(&x, &sig).unwrap();
        let v = run_any(
            Command::new("minisign")
                .arg("-V")
                .arg("-p")
                .arg(&up.public)
                .arg("-m")
                .arg(&m)
                .arg("-x")
                .arg(&x),
        );
        assert!(v.status.success(), "minisign -V: {}", text(&v));
        // the blobs are served downstream, and are the upstream's
        let view = get_json(&down, &base);
        let up_view = get_json(&up.server, &base);
        let fps = |v: &serde_json::Value| {
            let mut f: Vec<String> = v["publication"]["fingerprints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| format!("{}:{}", f["type"], f["fingerprint"]))
                .collect();
            f.sort();
            f
        };
        assert!(!fps(&view).is_empty());
        assert_eq!(fps(&view), fps(&up_view), "Incus fingerprints differ");
        let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let artifacts = parsed["artifacts"].as_array().unwrap();
        assert!(!artifacts.is_empty(), "no artifact in {image}@{version}");
        for a in artifacts {
            let d = a["digest"].as_str().unwrap();
            let (st, body) = down.get(&format!("/v1/blobs/{d}"));
            assert_eq!(st, 200);
            assert_eq!(body.len() as u64, a["size"].as_u64().unwrap());
        }
    }
    // the downstream trusts exactly one key: the original publisher's
    let keys = get_json(&down, "/v1/keys");
    let keys = keys["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let pub_text = std::fs::read_to_string(&up.public).unwrap();
    assert_eq!(
        keys[0]["public_key"].as_str().unwrap().lines().nth(1),
        pub_text.lines().nth(1)
    );
    let aliases = get_json(&down, "/v1/images/debian-bookworm/aliases");
    let mut pairs: Vec<(String, String)> = aliases["aliases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["alias"].as_str().unwrap().to_string(),
                a["version"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    pairs.sort();
    assert_eq!(
        pairs,
        [
            ("edge".to_string(), VERSIONS[1].1.to_string()),
            ("stable".to_string(), VERSIONS[0].1.to_string())
        ]
    );

    // a second run copies nothing
    let second = mirror(&target, &up.server, &[]);
    assert!(second.status.success(), "{}", text(&second));
    let t = text(&second);
    assert!(t.contains("mirrored 0 version(s)"), "{t}");
    assert!(t.contains("0 blob(s), 0 bytes stored"), "{t}");
    assert!(t.contains("3 already published"), "{t}");
    assert!(t.contains("0 alias(es) set"), "{t}");
    assert!(!t.contains("\nalias "), "{t}");
}

#[test]
fn mirroring_into_a_data_directory_filters_and_refuses_untrusted_signatures() {
    let up = upstream();
    let tmp = temp_dir("mirror-dir");
    let dir = tmp.path().join("data");
    imgsrv(&["init", "--data", s(&dir)]);
    let (other, _) = minisign_keypair(tmp.path().join("other"));
    trust_key(&dir, Some("other"), &other);
    let target = ["--data", s(&dir)];
    let filter = ["--image", "debian-*", "--latest", "1"];

    // enforce (the default) with a key the publisher did not use: refused
    let refused = mirror(&target, &up.server, &filter);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let t = text(&refused);
    assert!(
        t.contains("debian-bookworm@20260102_0000") && t.contains("not a trusted publisher key"),
        "{t}"
    );
    assert!(!t.contains("ubuntu") && !t.contains("20260101_0000"), "{t}");
    assert_eq!(published_count(&dir), 0);

    // trusting the publisher: only the newest debian version comes over
    trust_key(&dir, Some("origin"), &up.public);
    let ok = mirror(&target, &up.server, &filter);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        text(&ok).contains("copied debian-bookworm@20260102_0000"),
        "{}",
        text(&ok)
    );
    assert_eq!(published_count(&dir), 1);
    // its alias came along; the alias of the version not mirrored did not
    let aliases = catalog_sql(
        &dir,
        "SELECT a.alias || '=' || v.version FROM aliases a JOIN image_versions v ON v.id = a.version_id ORDER BY a.alias",
    );
    assert_eq!(aliases.trim(), "edge=20260102_0000");

    // unreachable upstream: could not run (2)
    let port = free_port();
    let down = run_any(
        Command::new(IMGSRV)
            .args(["mirror-imgsrv", "--data", s(&dir)])
            .arg(format!("https://127.0.0.1:{port}")),
    );
    assert_eq!(down.status.code(), Some(2), "{}", text(&down));
}

/// Publishes `img` through the API WITHOUT a signature (only a server in
/// verification mode off or warn accepts that).
fn publish_unsigned(server: &TestServer, img: &TestImage, version: &str) {
    use imgsrv::client::{ApiClient, NewArtifact, NewAttachment};
    let c = ApiClient::new(
        &server.url(),
        Some(&server.cert()),
        Some(server.admin_token()),
    )
    .unwrap();
    let (meta, meta_size) = c
        .upload_file(&img.metadata, "application/x-xz", None)
        .unwrap();
    let (root, root_size) = c
        .upload_file(img.rootfs(), "application/vnd.squashfs", None)
        .unwrap();
    c.create_image("debian-bookworm", None, None).unwrap();
    let metadata = [
        ("os", "Debian"),
        ("release", "bookworm"),
        ("architecture", "x86_64"),
        ("variant", "default"),
        ("serial", version),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    c.create_version("debian-bookworm", version, &metadata)
        .unwrap();
    let art = c
        .add_artifact(
            "debian-bookworm",
            version,
            &NewArtifact {
                variant: "default".into(),
                operating_system: "debian".into(),
                architecture: "x86_64".into(),
                format: "squashfs".into(),
                primary_blob_digest: root,
                primary_blob_size_bytes: root_size,
                primary_media_type: "application/vnd.squashfs".into(),
            },
        )
        .unwrap();
    c.add_attachment(
        "debian-bookworm",
        version,
        &art.id,
        &NewAttachment {
            name: "incus.tar.xz".into(),
            media_type: "application/x-xz".into(),
            blob_digest: meta,
            blob_size_bytes: meta_size,
        },
    )
    .unwrap();
    c.publish("debian-bookworm", version, None).unwrap();
}

#[test]
fn versions_published_unsigned_are_skipped_by_mirror_and_export() {
    let up = TestServer::start_with("[image_verification]\nmode = \"off\"\n");
    let tmp = temp_dir("mirror-unsigned");
    let (public, secret) = minisign_keypair(tmp.path().join("publisher"));
    let signed = make_test_image(tmp.path().join("a"), &["--serial", "20260101_0000"]);
    let unsigned = make_test_image(tmp.path().join("b"), &["--serial", "20260102_0000"]);
    publish_image(&up, &secret, &signed, &[]);
    publish_unsigned(&up, &unsigned, "20260102_0000");
    let (st, _) = up.get("/v1/images/debian-bookworm/versions/20260102_0000/manifest.minisig");
    assert_eq!(st, 404, "the fixture must be unsigned");

    let dir = tmp.path().join("data");
    imgsrv(&["init", "--data", s(&dir)]);
    trust_key(&dir, None, &public);
    let out = mirror(&["--data", s(&dir)], &up, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("WARNING: debian-bookworm@20260102_0000 was published unsigned upstream"),
        "{t}"
    );
    assert!(t.contains("copied debian-bookworm@20260101_0000"), "{t}");
    assert!(t.contains("1 unsigned skipped"), "{t}");
    assert_eq!(published_count(&dir), 1);

    let bundle = tmp.path().join("b.tar");
    let out = run_any(
        Command::new(IMGSRV)
            .args(["export", "--data", s(up.data_dir()), "-o", s(&bundle)])
            .env_remove("IMGSRV_TOKEN"),
    );
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("debian-bookworm@20260102_0000 was published unsigned: not exported"),
        "{t}"
    );
    assert!(t.contains("1 version(s)"), "{t}");
}

#[test]
fn imgsrv_mirror_recognises_an_imgsrv_upstream_and_keeps_its_signatures() {
    let up = upstream();
    let dir = up.tmp.path().join("auto");
    imgsrv(&["init", "--data", s(&dir)]);
    trust_key(&dir, None, &up.public);
    // a mirror key that the target does NOT trust: with an imgsrv upstream it is not used
    let (_, unused_key) = minisign_keypair(up.tmp.path().join("unused"));
    let out = run_any(
        Command::new(IMGSRV)
            .args([
                "mirror",
                "--data",
                s(&dir),
                "--key",
                s(&unused_key),
                "--upstream-ca",
            ])
            .arg(up.server.cert())
            .arg(up.server.url()),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is an imgsrv server"), "{}", text(&out));
    assert_eq!(published_count(&dir), 3);
    // the publisher's signature, byte for byte
    let sig = catalog_sql(
        &dir,
        "SELECT signature FROM publish_records r JOIN image_versions v ON v.id = r.version_id WHERE v.version = '20260101_0000'",
    );
    let (_, upstream_sig) = up
        .server
        .get("/v1/images/debian-bookworm/versions/20260101_0000/manifest.minisig");
    assert_eq!(sig.trim(), String::from_utf8_lossy(&upstream_sig).trim());
}

/// Issue 11, point 4: `mirror-imgsrv` from another imgsrv checks the upstream's
/// transparency log as `imgsrv verify` does, when the client config trusts a log key:
/// each version must be proven in that log (consistently with what was seen of it
/// before), else it is refused in enforce mode and nothing of it is stored.
#[test]
fn mirroring_checks_the_upstreams_log_when_the_client_trusts_one() {
    let up = upstream();
    let tmp = temp_dir("mirror-log");
    let vkey = std::fs::read_to_string(up.server.data_dir().join("log/log.vkey")).unwrap();
    let config = |name: &str, vkey: &str| {
        let path = tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[transparency_log]\nkeys = [\"{}\"]\nstate_dir = \"{}\"\n",
                vkey.trim(),
                tmp.path().join(format!("{name}-state")).display()
            ),
        )
        .unwrap();
        path
    };
    let site = |name: &str| {
        let dir = tmp.path().join(name);
        imgsrv(&["init", "--data", s(&dir)]);
        trust_key(&dir, Some("origin"), &up.public);
        dir
    };
    // another key under the upstream log's name: every version is refused
    let origin = vkey.trim().split('+').next().unwrap().to_string();
    let impostor = imgsrv::tlog::note::Signer::generate(&origin).unwrap().1;
    let wrong = config("wrong", &impostor.verifier().vkey());
    let refused_dir = site("refused");
    let refused = mirror(
        &["--data", s(&refused_dir)],
        &up.server,
        &["--config", s(&wrong)],
    );
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let t = text(&refused);
    assert!(
        t.contains("3 version(s) not mirrored") && t.contains("transparency log"),
        "{t}"
    );
    assert_eq!(published_count(&refused_dir), 0);
    // the upstream's own key: mirrored, and the log's checkpoint remembered
    let right = config("right", &vkey);
    let dir = site("ok");
    let ok = mirror(&["--data", s(&dir)], &up.server, &["--config", s(&right)]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert_eq!(published_count(&dir), 3);
    let kept: Vec<_> = std::fs::read_dir(tmp.path().join("right-state/log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "checkpoint"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
}
