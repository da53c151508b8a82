//! The web catalog (`/`, `/images/{name}`, `/signed-in/...`) as a browser shows it: the
//! real `imgsrv serve`, pages loaded by headless Chromium (`--dump-dom`, `--screenshot`),
//! and curl for what a browser does not show (headers, HEAD, the raw HTML).
//!
//! Credentials: Chromium takes `https://NAME:TOKEN@host/...` in the URL, but sends them only
//! when the server challenges (a 401 with `WWW-Authenticate: Basic`), never unasked, not
//! even to the pages after a redirect. So `/` (which answers anyone) is loaded anonymously,
//! and the signed-in view is `/signed-in/`, which challenges anonymous requests: Chromium
//! then answers with the URL's credentials. A bearer token on `/` is checked with curl.
//!
//! Screenshots (phone 390x844 and desktop 1280x900) are kept in
//! `target/tmp/web-screenshots/` (printed) for CI to keep as artifacts.

mod support;

use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;

const NASTY: &str = "<script>alert(1)</script>&\"'";

/// Runs headless Chromium on `url` with `args` (`--dump-dom`, `--screenshot=...`) and a
/// fresh profile: its stdout.
fn chromium(scratch: &Path, args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir_in(scratch).expect("profile dir");
    let out = run_within(
        Command::new("chromium")
            .args([
                "--headless",
                // as root Chromium refuses to start without it; harmless otherwise
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                // the server's self-signed certificate
                "--ignore-certificate-errors",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(args)
            .arg(url),
        Duration::from_secs(90),
    );
    assert!(
        out.status.success(),
        "chromium {args:?} {url}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The DOM Chromium built from `url`.
#[track_caller]
fn dom(scratch: &Path, url: &str) -> String {
    let d = chromium(scratch, &["--dump-dom"], url);
    assert!(d.contains("</html>"), "no page from {url}:\n{d}");
    d
}

/// Takes a screenshot of `url` at `width`x`height` into `path`; checks it is a PNG of
/// that size.
fn screenshot(scratch: &Path, url: &str, path: &Path, width: u32, height: u32) {
    let _ = fs::remove_file(path);
    chromium(
        scratch,
        &[
            &format!("--screenshot={}", path.display()),
            &format!("--window-size={width},{height}"),
        ],
        url,
    );
    let png = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &png[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is no PNG",
        path.display()
    );
    let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!((dim(16), dim(20)), (width, height), "{}", path.display());
    eprintln!("[web] screenshot {}", path.display());
}

/// Where the screenshots stay after the test (CI artifacts; not committed).
fn screenshot_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    fs::create_dir_all(&d).expect("screenshot dir");
    d
}

/// `imgsrv CMD... --server URL --ca CERT --token-file ADMIN`, asserting success.
fn admin(server: &TestServer, args: &[&str]) -> String {
    text(&run_ok(Command::new(IMGSRV).args(args).args([
        "--server",
        &server.url(),
        "--ca",
        s(&server.cert()),
        "--token-file",
        s(&server.admin_token_file()),
    ])))
}

/// A principal with `reader` on `scope` and a fresh token for it.
fn reader(server: &TestServer, name: &str, scope: &str) -> String {
    let d = s(server.data_dir());
    imgsrv(&["principal", "add", "--data", d, name]);
    imgsrv(&["grant", "add", "--data", d, name, "reader", scope]);
    last_line(&imgsrv(&["token", "issue", "--data", d, name]))
}

/// `sha256 Fingerprint=AB:CD:...` of the server's certificate, as openssl prints it:
/// the part after `=`.
fn openssl_fingerprint(cert: &Path) -> String {
    let out = text(&run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(cert),
    ));
    out.trim()
        .split_once('=')
        .map(|(_, f)| f.to_string())
        .unwrap_or_else(|| panic!("openssl printed {out}"))
}

/// The values of every `src` and `href` attribute in `html`.
fn links(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\"", "src='", "href='"] {
        let quote = &attr[attr.len() - 1..];
        for (i, _) in html.match_indices(attr) {
            let rest = &html[i + attr.len()..];
            let end = rest.find(quote).expect("closed attribute");
            out.push(rest[..end].to_string());
        }
    }
    out
}

#[test]
fn the_catalog_in_a_browser_shows_what_the_catalog_holds_to_whom_may_see_it() {
    let server = TestServer::start();
    let tmp = temp_dir("web");
    let scratch = tmp.path();
    let url = server.url();
    let (public, secret) = minisign_keypair(scratch.join("k"));
    trust_key(server.data_dir(), Some("release"), &public);
    let key_id = minisign_key_id(&public);
    let (public2, secret2) = minisign_keypair(scratch.join("k2"));
    trust_key(server.data_dir(), Some("old-ci"), &public2);

    // demo: two versions (container and VM), the alias on the newer, the older retired
    let v1 = make_test_image(
        scratch.join("v1"),
        &["--serial", "20260301_1200", "--type", "both"],
    );
    let v2 = make_test_image(
        scratch.join("v2"),
        &["--serial", "20260401_1200", "--type", "both"],
    );
    publish_image(
        &server,
        &secret,
        &v1,
        &["--image", "demo", "--alias", "stable"],
    );
    publish_image(
        &server,
        &secret,
        &v2,
        &["--image", "demo", "--alias", "stable"],
    );
    admin(
        &server,
        &[
            "version",
            "retire",
            "demo",
            "20260301_1200",
            "--reason",
            "superseded by 20260401_1200",
        ],
    );
    // a private image, readable by `reader` and not by `outsider`
    let secret_img = make_test_image(
        scratch.join("secret"),
        &[
            "--os",
            "Alpine",
            "--release",
            "3.20",
            "--serial",
            "20260402_0800",
        ],
    );
    publish_image(
        &server,
        &secret,
        &secret_img,
        &["--image", "hush", "--private"],
    );
    let reader_token = reader(&server, "reader", "*");
    let outsider_token = reader(&server, "outsider", "nothing-*");
    // HTML in a description, set through the API
    let body = serde_json::json!({ "name": "nasty", "description": NASTY }).to_string();
    let (status, created) = curl(
        &server,
        &format!("{url}/v1/images"),
        Some(&server.admin_token()),
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
        ],
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&created));
    let nasty = make_test_image(scratch.join("nasty"), &["--serial", "20260403_0900"]);
    publish_image(&server, &secret, &nasty, &["--image", "nasty"]);
    // signed by a key the operator then revokes
    let legacy = make_test_image(scratch.join("legacy"), &["--serial", "20250101_0000"]);
    publish_image(&server, &secret2, &legacy, &["--image", "legacy"]);
    imgsrv(&["key", "revoke", "--data", s(server.data_dir()), "old-ci"]);

    // ---- the front page, anonymous
    let front = dom(scratch, &format!("{url}/"));
    for needle in [
        "demo",
        "20260401_1200",
        "nasty",
        "legacy",
        &format!("verified by release ({key_id})"),
        &format!("value=\"{}\"", fs::metadata(v2.rootfs()).unwrap().len()),
        &format!("value=\"{}\"", fs::metadata(v2.disk()).unwrap().len()),
        &v2.container_fingerprint()[..12],
        &v2.vm_fingerprint()[..12],
        "<span class=\"alias\">stable</span>",
        "signer key revoked: old-ci",
        &format!("incus remote add imgsrv {url}</code>"),
        &format!("incus remote add imgsrv-streams {url} --protocol=simplestreams"),
        "incus launch imgsrv:demo c1",
        &openssl_fingerprint(&server.cert()),
        &openssl_fingerprint(&server.cert())
            .replace(':', "")
            .to_lowercase(),
    ] {
        assert!(
            front.contains(needle),
            "front page lacks {needle:?}:\n{front}"
        );
    }
    // retired versions and private images are not on it
    assert!(
        !front.contains("20260301_1200"),
        "retired version shown:\n{front}"
    );
    assert!(
        !front.contains("hush"),
        "private image shown anonymously:\n{front}"
    );
    // the description is text, not markup: no script element anywhere
    assert!(
        front.contains("&lt;script&gt;alert(1)&lt;/script&gt;&amp;\"'"),
        "description not shown as text:\n{front}"
    );
    assert!(!front.to_lowercase().contains("<script"), "{front}");
    let (_, raw) = curl(&server, &format!("{url}/"), None, &[]);
    let raw = String::from_utf8(raw).unwrap();
    assert!(
        raw.contains("&#60;script&#62;alert(1)&#60;/script&#62;&#38;&#34;&#39;")
            && !raw.contains("<script"),
        "{raw}"
    );

    // ---- the image page: every version, the retired one marked, full fingerprints
    let demo = dom(scratch, &format!("{url}/images/demo"));
    for needle in [
        v1.container_fingerprint(),
        v1.vm_fingerprint(),
        v2.container_fingerprint(),
        v2.vm_fingerprint(),
        format!("{} bytes", fs::metadata(v2.rootfs()).unwrap().len()),
        format!("{} bytes", fs::metadata(v1.disk()).unwrap().len()),
        "<td class=\"alias\">stable</td><td>20260401_1200</td>".to_string(),
        "superseded by 20260401_1200".to_string(),
        "incus launch imgsrv:demo v1 --vm".to_string(),
        format!("imgsrv verify --server {url} --ca imgsrv.crt --trusted-keys publisher.pub demo@20260401_1200"),
    ] {
        assert!(demo.contains(&needle), "image page lacks {needle:?}:\n{demo}");
    }
    let retired_at = demo
        .find("id=\"version-20260301_1200\"")
        .expect("retired version listed");
    let article = &demo[demo[..retired_at].rfind("<article").unwrap()..];
    let article = &article[..article.find("</article>").unwrap()];
    assert!(
        article.contains("class=\"version retired\"")
            && article.contains("<span class=\"badge retired\">retired</span>"),
        "{article}"
    );
    let current = &demo[demo.find("id=\"version-20260401_1200\"").unwrap()..];
    let current = &current[..current.find("</article>").unwrap()];
    assert!(!current.contains("retired"), "{current}");
    let legacy_page = dom(scratch, &format!("{url}/images/legacy"));
    assert!(
        legacy_page.contains("<span class=\"badge revoked\">withheld</span>")
            && legacy_page.contains("No version of this image is served now"),
        "{legacy_page}"
    );

    // ---- private: absent anonymously (also its page), present for a reader
    let hidden = dom(scratch, &format!("{url}/images/hush"));
    assert!(
        hidden.contains("404 Not Found") && !hidden.contains(&secret_img.container_fingerprint()),
        "{hidden}"
    );
    let signed_in = dom(
        scratch,
        &format!(
            "https://reader:{reader_token}@127.0.0.1:{}/signed-in/",
            server.port()
        ),
    );
    assert!(
        signed_in.contains("signed in as <b>reader</b>")
            && signed_in.contains("href=\"/signed-in/images/hush\"")
            && signed_in.contains("<span class=\"badge private\">private</span>")
            && signed_in.contains("demo"),
        "{signed_in}"
    );
    let hush = dom(
        scratch,
        &format!(
            "https://reader:{reader_token}@127.0.0.1:{}/signed-in/images/hush",
            server.port()
        ),
    );
    assert!(
        hush.contains(&secret_img.container_fingerprint()) && hush.contains("Alpine 3.20"),
        "{hush}"
    );
    let outsider = dom(
        scratch,
        &format!(
            "https://outsider:{outsider_token}@127.0.0.1:{}/signed-in/",
            server.port()
        ),
    );
    assert!(
        outsider.contains("signed in as <b>outsider</b>") && !outsider.contains("hush"),
        "{outsider}"
    );
    // a bearer token works on / itself (curl; a browser cannot send one)
    let (status, with_token) = curl(&server, &format!("{url}/"), Some(&reader_token), &[]);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&with_token).contains("/images/hush"));
    let (_, anon) = curl(&server, &format!("{url}/"), None, &[]);
    assert!(!String::from_utf8_lossy(&anon).contains("hush"));
    // a wrong token is refused, not taken for anonymous
    let (status, _) = curl(
        &server,
        &format!(
            "https://reader:wrong@127.0.0.1:{}/signed-in/",
            server.port()
        ),
        None,
        &[],
    );
    assert_eq!(status, 401);
    // asking a browser for credentials is no refusal: not in the audit log; a wrong token is
    let audit = text(&imgsrv(&[
        "audit",
        "--data",
        s(server.data_dir()),
        "--json",
    ]));
    let rows: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let on_signed_in = |r: &&Value| {
        r["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/signed-in"))
    };
    let audited: Vec<&Value> = rows.iter().filter(on_signed_in).collect();
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0]["action"], "auth.failed");
    assert_eq!(audited[0]["outcome"], "denied");
    // a private image's page asked for anonymously is, as on the API
    assert!(
        rows.iter()
            .any(|r| r["path"] == "/images/hush" && r["outcome"] == "denied"),
        "{audit}"
    );

    // ---- screenshots: phone and desktop
    let shots = screenshot_dir();
    screenshot(
        scratch,
        &format!("{url}/"),
        &shots.join("phone-catalog.png"),
        390,
        844,
    );
    screenshot(
        scratch,
        &format!("{url}/images/demo"),
        &shots.join("phone-image.png"),
        390,
        844,
    );
    screenshot(
        scratch,
        &format!("{url}/"),
        &shots.join("desktop-catalog.png"),
        1280,
        900,
    );
    screenshot(
        scratch,
        &format!("{url}/images/demo"),
        &shots.join("desktop-image.png"),
        1280,
        900,
    );
}

#[test]
fn the_front_page_answers_anyone_loads_nothing_from_elsewhere_and_offers_the_certificate() {
    let server = TestServer::start();
    let tmp = temp_dir("web-front");
    let url = server.url();
    let (public, secret) = minisign_keypair(tmp.path().join("k"));
    trust_key(server.data_dir(), None, &public);
    let img = make_test_image(tmp.path().join("img"), &["--type", "both"]);
    publish_image(&server, &secret, &img, &["--alias", "stable"]);

    // what the Incus client does in `incus remote add`: GET / without checking the
    // certificate; HEAD too
    let insecure = run_ok(Command::new("curl").args([
        "-sS",
        "-k",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{content_type} %{size_download}",
        &format!("{url}/"),
    ]));
    let insecure = text(&insecure);
    assert!(insecure.starts_with("200 text/html"), "{insecure}");
    let get_len: usize = insecure.rsplit(' ').next().unwrap().parse().unwrap();
    let head = text(&run_ok(Command::new("curl").args([
        "-sS",
        "-k",
        "-I",
        &format!("{url}/"),
    ])));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains(&format!("content-length: {get_len}")),
        "{head}"
    );
    assert!(
        head.contains("Content-Security-Policy: default-src 'none'; style-src 'self'"),
        "{head}"
    );

    // nothing from another host: every src and href is a path on this server (or data:)
    for path in ["/", "/images/debian-bookworm"] {
        let (status, page) = curl(&server, &format!("{url}{path}"), None, &[]);
        assert_eq!(status, 200, "{path}");
        let page = String::from_utf8(page).unwrap();
        let links = links(&page);
        assert!(links.iter().any(|l| l == "/static/imgsrv.css"), "{links:?}");
        for l in &links {
            let local = (l.starts_with('/') && !l.starts_with("//")) || l.starts_with("data:");
            assert!(local, "{path}: {l:?} is not on this server");
        }
        // and every local link answers (the signed-in view asks for credentials)
        for l in links.iter().filter(|l| l.starts_with('/')) {
            let (status, _) = curl(&server, &format!("{url}{l}"), None, &[]);
            let expected = if l.starts_with("/signed-in/") {
                401
            } else {
                200
            };
            assert_eq!(status, expected, "{path} links {l}");
        }
    }

    // the certificate: what the server presents, and the fingerprint the page shows
    let (status, pem) = curl(&server, &format!("{url}/tls/cert.pem"), None, &[]);
    assert_eq!(status, 200);
    let downloaded = tmp.path().join("imgsrv.crt");
    fs::write(&downloaded, &pem).unwrap();
    let served = text(&run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("openssl s_client -connect \"$1\" </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256")
            .arg("sh")
            .arg(format!("127.0.0.1:{}", server.port())),
    ));
    let fingerprint = openssl_fingerprint(&downloaded);
    assert!(served.contains(&fingerprint), "{served} vs {fingerprint}");
    assert!(!String::from_utf8_lossy(&pem).contains("PRIVATE"));
    let (_, page) = curl(&server, &format!("{url}/"), None, &[]);
    assert!(String::from_utf8_lossy(&page).contains(&format!("sha256 Fingerprint={fingerprint}")));

    // the commands name the host the browser used, when it is a valid name
    let named = |host: &str| {
        let (status, page) = curl(
            &server,
            &format!("{url}/"),
            None,
            &["-H", &format!("Host: {host}")],
        );
        assert_eq!(status, 200);
        String::from_utf8(page).unwrap()
    };
    assert!(named("images.example.org:8443")
        .contains("incus remote add imgsrv https://images.example.org:8443</code>"));
    assert!(named("images.example.org")
        .contains("incus remote add imgsrv https://images.example.org:443</code>"));
    // (the engine refuses a Host that is not an RFC 3986 host with 400; this one is, but
    // it is no DNS name: the commands fall back to a name of the server's own)
    let bogus = named("evil'&x=(1)");
    assert!(
        !bogus.contains("evil") && bogus.contains("incus remote add imgsrv https://"),
        "{bogus}"
    );

    // an unknown image: an HTML 404, not a hint
    let (status, page) = curl(&server, &format!("{url}/images/nope"), None, &[]);
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&page).contains("<h1>404 Not Found</h1>"));
    // a JSON API client still gets JSON
    let images: Value = serde_json::from_slice(&server.get_ok("/v1/images")).unwrap();
    assert_eq!(images["images"][0]["name"], "debian-bookworm");
}
