//! The full deployment for the tests (issue 10): two `imgsrv serve` instances (the real
//! binary, built with `--features full`) on one fresh PostgreSQL database (the cluster of
//! tests/support/pg.rs) and one fresh Garage bucket (tests/support/garage.rs), and the
//! small clients the deployment tests share: [`call`] (curl with a bearer token),
//! [`psql`], [`stream_fingerprints`].
//!
//! A test file using it declares the modules it needs beside it:
//! `#[path = "support/garage.rs"] mod garage;`, `#[path = "support/pg.rs"] mod pg;`,
//! `#[path = "support/deployment.rs"] mod deployment;` and `mod support;`.

#![allow(dead_code)]

use crate::support::*;
use crate::{garage, pg};
use serde_json::Value;
use std::fs;
use std::path::Path;
use std::process::Command;

/// The `imgsrv.toml` of an instance of the deployment.
pub fn deployment_config(url: &str, raw: &garage::Raw, secret_file: &Path) -> String {
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

/// Two instances on one fresh database and one bucket.
pub struct Deployment {
    pub a: TestServer,
    pub b: TestServer,
    pub raw: garage::Raw,
    /// The database's URL.
    pub url: String,
    pub work: tempfile::TempDir,
}

/// A new deployment: a fresh database in the shared cluster, a fresh bucket named
/// after `test`, and `imgsrv init` + `imgsrv serve` twice on the same configuration
/// (the first init makes the admin; the second finds the catalog set up).
pub fn deployment(test: &str) -> Deployment {
    let work = temp_dir(test);
    let url = pg::database(pg::shared());
    let (_store, raw) = garage::store_and_raw(test);
    let secret = work.path().join("s3.secret");
    fs::write(&secret, format!("{}\n", raw.options().secret_access_key)).unwrap();
    let config = deployment_config(&url, &raw, &secret);
    let a = TestServer::start_configured(&config);
    let b = TestServer::start_configured(&config);
    Deployment {
        a,
        b,
        raw,
        url,
        work,
    }
}

/// `psql -At URL -c SQL`: its stdout, trimmed.
pub fn psql(url: &str, sql: &str) -> String {
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

/// A JSON API call with `token` (curl: the real client side of the wire).
pub fn call(
    server: &TestServer,
    token: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let auth = format!("Authorization: Bearer {token}");
    let mut args = vec!["-X", method, "-H", auth.as_str(), "--data-binary", "@-"];
    if body.first() == Some(&b'{') {
        args.extend(["-H", "Content-Type: application/json"]);
    }
    curl_stdin(server, path, &args, body)
}

/// curl `ARGS... SERVER_URL/PATH` with `body` on its stdin (trusting the server's
/// certificate): the status and the body.
pub fn curl_stdin(server: &TestServer, path: &str, args: &[&str], body: &[u8]) -> (u16, Vec<u8>) {
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

/// A body as JSON, panicking with the text if it is not.
pub fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

/// The fingerprints of `server`'s anonymous Simple Streams index, sorted.
pub fn stream_fingerprints(server: &TestServer) -> Vec<String> {
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
