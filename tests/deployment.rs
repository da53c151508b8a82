//! Issue 10, the full deployment: two `imgsrv serve` instances (the real binary,
//! built with `--features full`) share one PostgreSQL database (a throwaway cluster
//! from tests/fixtures/pg-harness) and one S3 bucket (a real Garage from
//! tests/fixtures/garage-harness). What one instance takes in, the other serves on
//! the next request; an upload begun on one is continued and completed on the
//! other; the bytes live in the bucket under `cas/sha256/..`, and downloads come
//! through imgsrv. The trusted keys and their revocations, and the failed-login
//! throttle, are the same for both (they are in the database).
#![cfg(all(feature = "postgres", feature = "s3"))]

#[path = "support/deployment.rs"]
mod deployment;
#[path = "support/garage.rs"]
mod garage;
#[path = "support/pg.rs"]
mod pg;
mod support;

use deployment::*;
use serde_json::{json, Value};
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

#[test]
fn two_instances_share_one_database_and_one_bucket() {
    let Deployment {
        a, b, raw, work, ..
    } = deployment("deployment");
    // one catalog: the bootstrap token `imgsrv init` wrote for the first works on both
    let token = a.admin_token();
    assert!(
        !b.admin_token_file().exists(),
        "the second init made another admin"
    );
    for s in [&a, &b] {
        let (st, _) = call(s, &token, "GET", "/v1/images", b"");
        assert_eq!(st, 200);
        assert_eq!(s.get("/readyz").0, 204, "{}", s.log_text());
    }

    // a publish through A is in B's projection on the next request
    let img = make_test_image(work.path().join("img"), &[]);
    let (pubkey, sk) = minisign_keypair(work.path());
    // the trusted keys are in the database: added through A, trusted by both
    trust_key(a.data_dir(), Some("ci"), &pubkey);
    assert!(stream_fingerprints(&b).is_empty());
    publish_image(&a, &sk, &img, &["--image", "shared", "--version", "1"]);
    assert_eq!(stream_fingerprints(&b), [img.container_fingerprint()]);
    assert_eq!(stream_fingerprints(&a), stream_fingerprints(&b));

    // the bytes are in the bucket under the store's keys, and come through B
    let rootfs = fs::read(img.rootfs()).unwrap();
    let hex = sha256_file(img.rootfs());
    let key = format!("cas/sha256/{}/{}/{hex}", &hex[..2], &hex[2..4]);
    assert_eq!(
        raw.keys(&key),
        std::slice::from_ref(&key),
        "not in the bucket"
    );
    let (st, got) = b.get(&format!("/v1/blobs/sha256:{hex}"));
    assert_eq!(st, 200);
    assert!(got == rootfs, "B served other bytes");
    let (st, _) = curl_stdin(
        &b,
        &format!("/v1/blobs/sha256:{hex}"),
        &["-r", "0-9", "-o", "/dev/null", "-D", "-"],
        b"",
    );
    assert_eq!(st, 206);

    // an upload begun on A is continued on B and completed on A
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let digest = imgsrv::digest::Digest::of(&bytes);
    let begin = json!({"expected_digest": digest.to_string(), "expected_size_bytes": bytes.len()});
    let (st, sess) = call(
        &a,
        &token,
        "POST",
        "/v1/uploads",
        begin.to_string().as_bytes(),
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&sess));
    let id = json_of(&sess)["id"].as_str().unwrap().to_string();
    let (st, p) = call(
        &b,
        &token,
        "PUT",
        &format!("/v1/uploads/{id}/parts/1"),
        &bytes,
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&p));
    let etag = json_of(&p)["etag"].as_str().unwrap().to_string();
    let done = json!({"parts": [{"number": 1, "etag": etag, "size_bytes": bytes.len()}]});
    let (st, c) = call(
        &a,
        &token,
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        done.to_string().as_bytes(),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&c));
    assert_eq!(json_of(&c)["state"], "ready");
    // (served only once a published version cites it: the one download rule)
    let h = digest.hex();
    let key = format!("cas/sha256/{}/{}/{h}", &h[..2], &h[2..4]);
    assert!(raw.get(&key) == bytes, "the bucket holds other bytes");
    assert!(raw.keys("uploads/").is_empty(), "staged parts left");

    // garbage collection on one instance, grace 0, keeps what is published and
    // what the finished upload's session still claims; the published bytes stay
    run_ok(Command::new(IMGSRV).args(["gc", "--data", s(a.data_dir()), "--grace", "0"]));
    assert!(
        raw.get(&key) == bytes,
        "gc took a blob a live upload session claims"
    );
    let (st, got) = b.get(&format!("/v1/blobs/sha256:{hex}"));
    assert_eq!(st, 200);
    assert!(got == rootfs);
    assert_eq!(stream_fingerprints(&b), [img.container_fingerprint()]);
}

/// The key id of `name` in `server`'s `GET /v1/keys`, and its state.
fn listed_key(server: &TestServer, name: &str) -> Option<(String, String)> {
    let keys: Value = serde_json::from_slice(&server.get_ok("/v1/keys")).unwrap();
    keys["keys"].as_array().unwrap().iter().find_map(|k| {
        (k["name"] == name).then(|| {
            (
                k["key_id"].as_str().unwrap().to_string(),
                k["state"].as_str().unwrap().to_string(),
            )
        })
    })
}

/// A key revoked through one instance's data directory is revoked for the other at
/// its very next request: the next publish signed with it is refused there (mode
/// enforce), its web pages and `GET /v1/keys` say it is revoked, and what it signed
/// leaves the other's Simple Streams index.
#[test]
fn a_key_revoked_on_one_instance_is_refused_by_the_other_at_the_next_publish() {
    let Deployment {
        a, b, work, url, ..
    } = deployment("deployment-keys");
    // the admin token works on both (one database); `imgsrv publish` reads it from a file
    fs::copy(a.admin_token_file(), b.admin_token_file()).unwrap();
    let (pubkey, sk) = minisign_keypair(work.path().join("ci"));
    trust_key(a.data_dir(), Some("ci"), &pubkey);
    let key_id = minisign_key_id(&pubkey);
    assert_eq!(
        listed_key(&b, "ci"),
        Some((key_id.clone(), "active".into()))
    );
    let one = make_test_image(work.path().join("one"), &["--serial", "20260101_0000"]);
    let out = publish_image(&b, &sk, &one, &["--image", "shared", "--version", "1"]);
    assert!(out.contains("verified"), "{out}");
    assert_eq!(stream_fingerprints(&b), [one.container_fingerprint()]);
    let page = String::from_utf8_lossy(&b.get_ok("/")).into_owned();
    assert!(
        page.contains(&format!("verified by ci ({key_id})")),
        "{page}"
    );

    let revoked = text(&imgsrv(&["key", "revoke", "--data", s(a.data_dir()), "ci"]));
    assert!(revoked.contains("is revoked"), "{revoked}");

    // the very next publish through B, signed with it: refused, the version not published
    let two = make_test_image(work.path().join("two"), &["--serial", "20260102_0000"]);
    let mut publish = Command::new(IMGSRV);
    publish
        .args(["publish", "--server", &b.url(), "--ca", s(&b.cert())])
        .arg("--token-file")
        .arg(b.admin_token_file())
        .arg("--key")
        .arg(&sk)
        .args(["--image", "shared", "--version", "2"])
        .arg(&two.metadata)
        .arg(two.rootfs());
    let out = run_any(&mut publish);
    assert!(
        !out.status.success(),
        "B published with a revoked key: {}",
        text(&out)
    );
    assert!(text(&out).contains("revoked"), "{}", text(&out));
    assert_eq!(
        psql(
            &url,
            "SELECT v.state FROM image_versions v JOIN images i ON i.id = v.image_id \
             WHERE i.name = 'shared' ORDER BY v.version"
        ),
        "published\ndraft"
    );
    // B's views say so, and what the key signed leaves B's index
    assert_eq!(
        listed_key(&b, "ci"),
        Some((key_id.clone(), "revoked".into()))
    );
    for path in ["/", "/images/shared"] {
        let page = String::from_utf8_lossy(&b.get_ok(path)).into_owned();
        assert!(
            page.contains(&format!("signer key revoked: ci ({key_id})")),
            "{path}: {page}"
        );
    }
    assert!(
        stream_fingerprints(&b).is_empty(),
        "B still offers what a revoked key signed"
    );
    let hex = sha256_file(one.rootfs());
    assert_eq!(b.get(&format!("/v1/blobs/sha256:{hex}")).0, 410);
    // and B's own CLI sees the revocation (one trust store)
    let list = text(&imgsrv(&["key", "list", "--data", s(b.data_dir())]));
    assert!(list.contains("ci") && list.contains("revoked"), "{list}");
    // not even psql brings the key back
    let (ok, _) = {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", &url, "-c"])
            .arg("DELETE FROM key_states")
            .output()
            .unwrap();
        (out.status.success(), ())
    };
    assert!(!ok, "psql deleted a revocation");
    assert_eq!(listed_key(&b, "ci"), Some((key_id, "revoked".into())));
}

/// Failed logins are counted per client address in the database: after failures
/// against A, the next bad token on B waits as long as the next one on A would.
#[test]
fn failed_logins_on_one_instance_slow_the_next_attempt_on_the_other() {
    let Deployment { a, b, url, .. } = deployment("deployment-throttle");
    let bad = format!("imgsrv_{}_{}", "0".repeat(16), "0".repeat(64));
    let timed = |server: &TestServer| {
        let t = Instant::now();
        let (st, _) = call(server, &bad, "GET", "/v1/images", b"");
        assert_eq!(st, 401);
        t.elapsed()
    };
    // 100 + 200 + 400 + 800 ms on A
    let on_a: Vec<Duration> = (0..4).map(|_| timed(&a)).collect();
    assert!(
        on_a[3] >= Duration::from_millis(700),
        "{on_a:?}: A does not slow down"
    );
    assert_eq!(
        psql(&url, "SELECT client || ' ' || failures FROM auth_failures"),
        "127.0.0.1 4"
    );
    // the fifth failure, the first on B: 1.6 s (B alone would answer in 0.1 s)
    let on_b = timed(&b);
    assert!(
        on_b >= Duration::from_millis(1500),
        "{on_b:?}: B did not count the failures made on A ({on_a:?})"
    );
    assert!(on_b < Duration::from_secs(30), "{on_b:?}");
    assert_eq!(
        psql(
            &url,
            "SELECT failures FROM auth_failures WHERE client = '127.0.0.1'"
        ),
        "5"
    );
    // a good token still works at once on both
    let token = a.admin_token();
    for server in [&a, &b] {
        let t = Instant::now();
        assert_eq!(call(server, &token, "GET", "/v1/images", b"").0, 200);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
