//! Issue 7, item 2: one download rule. Every way to download bytes (an artifact, an
//! attachment, a blob by digest; TLS and plain HTTP; anonymous and with a reader token;
//! full, Range and HEAD) answers the same for the same version: served while its key is
//! trusted, `410 Gone` once the key is revoked (`404` where the caller may not see the
//! image at all). Driven with the real `curl` against a real `imgsrv serve`.

mod support;

use serde_json::Value;
use support::*;

const VER: &str = "20260101_0000";

/// Every download path of `image`@VER: its artifacts, their attachments, and the blob
/// route for each of their digests, with the sha256 of the bytes each must give.
fn download_paths(server: &TestServer, image: &str) -> Vec<(String, String)> {
    let (status, body) = curl(
        server,
        &format!("{}/v1/images/{image}/versions/{VER}", server.url()),
        Some(&server.admin_token()),
        &[],
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let view: Value = serde_json::from_slice(&body).expect("version JSON");
    let mut paths = Vec::new();
    let base = format!("/v1/images/{image}/versions/{VER}/artifacts");
    for a in view["artifacts"].as_array().expect("artifacts") {
        let art = &a["artifact"];
        let id = art["id"].as_str().expect("artifact id");
        let digest = art["primary_blob_digest"].as_str().expect("digest");
        let hex = digest.trim_start_matches("sha256:").to_string();
        paths.push((format!("{base}/{id}/download"), hex.clone()));
        paths.push((format!("/v1/blobs/{digest}"), hex));
        for t in a["attachments"].as_array().expect("attachments") {
            let att = t["id"].as_str().expect("attachment id");
            let digest = t["blob_digest"].as_str().expect("digest");
            let hex = digest.trim_start_matches("sha256:").to_string();
            paths.push((
                format!("{base}/{id}/attachments/{att}/download"),
                hex.clone(),
            ));
            paths.push((format!("/v1/blobs/{digest}"), hex));
        }
    }
    assert!(
        paths.len() >= 4,
        "an artifact, an attachment and their blobs: {paths:?}"
    );
    paths
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Who asks, and how.
#[derive(Clone, Copy, Debug)]
enum Client {
    Tls,
    TlsReader,
    Plain,
}

/// (status, body) for every client and request kind on `path`.
fn all_ways(
    server: &TestServer,
    path: &str,
    reader: &str,
) -> Vec<(Client, &'static str, u16, Vec<u8>)> {
    let mut out = Vec::new();
    for client in [Client::Tls, Client::TlsReader, Client::Plain] {
        let (url, token) = match client {
            Client::Tls => (format!("{}{path}", server.url()), None),
            Client::TlsReader => (format!("{}{path}", server.url()), Some(reader)),
            Client::Plain => (format!("http://127.0.0.1:{}{path}", server.port()), None),
        };
        for (kind, extra) in [
            ("full", &[][..]),
            ("range", &["-H", "Range: bytes=0-9"][..]),
            ("head", &["-I"][..]),
        ] {
            let (status, body) = curl(server, &url, token, extra);
            out.push((client, kind, status, body));
        }
    }
    out
}

#[test]
fn a_revoked_keys_content_answers_410_on_every_download_route() {
    let server = TestServer::start();
    let tmp = temp_dir("downloads");
    let data = s(server.data_dir()).to_string();
    let (public, secret) = minisign_keypair(tmp.path().join("release"));
    trust_key(server.data_dir(), Some("release"), &public);
    let open = make_test_image(tmp.path().join("open"), &["--serial", VER]);
    publish_image(&server, &secret, &open, &["--image", "open"]);
    let closed = make_test_image(
        tmp.path().join("closed"),
        &["--serial", VER, "--release", "trixie"],
    );
    publish_image(
        &server,
        &secret,
        &closed,
        &["--image", "closed", "--private"],
    );
    imgsrv(&[
        "principal",
        "add",
        "--data",
        &data,
        "--kind",
        "service",
        "rd",
    ]);
    imgsrv(&["grant", "add", "--data", &data, "rd", "reader", "*"]);
    let reader = last_line(&imgsrv(&["token", "issue", "--data", &data, "rd"]));

    let routes: Vec<(&str, String, String)> = ["open", "closed"]
        .into_iter()
        .flat_map(|image| {
            download_paths(&server, image)
                .into_iter()
                .map(move |(p, h)| (image, p, h))
        })
        .collect();

    // Trusted key: served to whoever may see the image, byte for byte.
    for (image, path, hex) in &routes {
        let blob_route = path.starts_with("/v1/blobs/");
        for (client, kind, status, body) in all_ways(&server, path, &reader) {
            let visible = *image == "open" || matches!(client, Client::TlsReader);
            let want = match (client, blob_route, visible, kind) {
                // the blob route is HTTPS-only; plain HTTP never serves a private byte
                (Client::Plain, true, _, _) => 400,
                (_, _, false, _) => 404,
                (_, _, true, "range") => 206,
                (_, _, true, _) => 200,
            };
            assert_eq!(
                status, want,
                "{client:?} {kind} {path} ({image}, key trusted)"
            );
            match (status, kind) {
                (200, "full") => assert_eq!(&sha256(&body), hex, "{client:?} {path}"),
                (206, _) => assert_eq!(body.len(), 10, "{client:?} {path}"),
                _ => {}
            }
        }
    }

    imgsrv(&["key", "revoke", "--data", &data, "release"]);

    // Revoked: no byte of it anywhere, any way.
    for (image, path, _) in &routes {
        let blob_route = path.starts_with("/v1/blobs/");
        for (client, kind, status, body) in all_ways(&server, path, &reader) {
            let visible = *image == "open" || matches!(client, Client::TlsReader);
            let want = match (client, blob_route, visible) {
                (Client::Plain, true, _) => 400,
                (_, _, false) => 404,
                (_, _, true) => 410,
            };
            assert_eq!(
                status,
                want,
                "{client:?} {kind} {path} ({image}, key revoked): {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    // The refusal says why, and the images' records are still there to inspect.
    let (_, body) = curl(
        &server,
        &format!("{}{}", server.url(), routes[0].1),
        None,
        &[],
    );
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("revoked"), "{text}");
    assert_eq!(
        curl(
            &server,
            &format!("{}/v1/images/open/versions/{VER}", server.url()),
            None,
            &[]
        )
        .0,
        200
    );
}
