//! Issue 10, the full deployment: two `imgsrv serve` instances (the real binary,
//! built with `--features full`) share one PostgreSQL database (a throwaway cluster
//! from tests/fixtures/pg-harness) and one S3 bucket (a real Garage from
//! tests/fixtures/garage-harness). What one instance takes in, the other serves on
//! the next request; an upload begun on one is continued and completed on the
//! other; the bytes live in the bucket under `cas/sha256/..`, and downloads come
//! through imgsrv.
#![cfg(all(feature = "postgres", feature = "s3"))]

#[path = "support/garage.rs"]
mod garage;
#[path = "support/pg.rs"]
mod pg;
mod support;

use serde_json::{json, Value};
use std::fs;
use std::process::Command;
use support::*;

/// The `imgsrv.toml` of an instance of the deployment.
fn deployment_config(url: &str, raw: &garage::Raw, secret_file: &std::path::Path) -> String {
    let o = raw.options();
    format!(
        "metrics_listen = \"\"\n\
         [storage]\ncatalog = \"postgres\"\npostgres_url = \"{url}\"\nblobs = \"s3\"\n\
         [storage.s3]\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\n\
         access_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\npath_style = true\n",
        o.endpoint,
        o.bucket,
        o.region,
        o.access_key_id,
        secret_file.display()
    )
}

/// A JSON API call with `token` (curl: the real client side of the wire).
fn call(server: &TestServer, token: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let auth = format!("Authorization: Bearer {token}");
    let mut args = vec!["-X", method, "-H", auth.as_str(), "--data-binary", "@-"];
    if body.first() == Some(&b'{') {
        args.extend(["-H", "Content-Type: application/json"]);
    }
    curl_stdin(server, path, &args, body)
}

fn curl_stdin(server: &TestServer, path: &str, args: &[&str], body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::Write;
    let mut child = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(server.cert())
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("{}{path}", server.url()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "curl {path}");
    let mut b = out.stdout;
    let nl = b.iter().rposition(|&c| c == b'\n').unwrap();
    let status = String::from_utf8_lossy(&b[nl + 1..])
        .trim()
        .parse()
        .unwrap();
    b.truncate(nl);
    (status, b)
}

fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

/// The fingerprints of `server`'s Simple Streams index, sorted.
fn stream_fingerprints(server: &TestServer) -> Vec<String> {
    let ij: Value = serde_json::from_slice(&server.get_ok("/streams/v1/images.json")).unwrap();
    let mut out = Vec::new();
    for p in ij["products"].as_object().unwrap().values() {
        for v in p["versions"].as_object().unwrap().values() {
            for it in v["items"].as_object().unwrap().values() {
                if let Some(fp) = it["combined_squashfs_sha256"].as_str() {
                    out.push(fp.to_string());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn two_instances_share_one_database_and_one_bucket() {
    let work = temp_dir("deployment");
    let url = pg::database(pg::shared());
    let (_store, raw) = garage::store_and_raw("deployment");
    let secret = work.path().join("s3.secret");
    fs::write(&secret, format!("{}\n", raw.options().secret_access_key)).unwrap();
    let config = deployment_config(&url, &raw, &secret);
    let a = TestServer::start_configured(&config);
    let b = TestServer::start_configured(&config);
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
    for s in [&a, &b] {
        // trusted keys are each instance's files (docs/deployment.md)
        trust_key(s.data_dir(), Some("ci"), &pubkey);
    }
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
