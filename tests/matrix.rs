//! The identity matrix, walked exhaustively: every API route x every role x
//! scope combination, checking that access is granted exactly where the
//! matrix grants it, and that every refusal lands in the audit log.
//!
//! The expectations below are written from the access rules (docs/api.md),
//! not read from the implementation.
//!
//! Every walk runs twice: on the embedded default (SQLite, files), and on the full
//! deployment (issue 10): two instances of the App on one PostgreSQL database
//! (tests/fixtures/pg-harness) and one Garage bucket (tests/fixtures/garage-harness),
//! requests going to them in turn, so that a grant, a token or a refusal's audit row
//! written through one instance is what the other one acts on at its next request.

#[cfg(all(feature = "postgres", feature = "s3"))]
#[path = "support/deployment.rs"]
mod deployment;
#[cfg(all(feature = "postgres", feature = "s3"))]
#[path = "support/garage.rs"]
mod garage;
#[cfg(all(feature = "postgres", feature = "s3"))]
#[path = "support/pg.rs"]
mod pg;
mod support;

use serde_json::{json, Value};
use support::inproc::*;

const PUB: &str = "debian-12"; // public image
const PRIV: &str = "ubuntu-24"; // private image
const V1: &str = "20250101_0000"; // published
const V2: &str = "20250102_0000"; // draft

/// Who is calling. Scopes are chosen so that each principal is inside the
/// matrix for some images and outside it for others.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Anonymous,
    NoGrants,
    Admin,                 // auth-manager *
    WriterAll,             // content-writer *
    WriterDebian,          // content-writer debian-*
    ReaderUbuntu,          // reader ubuntu-*
    ReaderDebian,          // reader debian-* (public image only: gains nothing on ubuntu)
    WriterUbuntuReaderAll, // content-writer ubuntu-2? + reader *
}

const EVERYONE: [Who; 8] = [
    Who::Anonymous,
    Who::NoGrants,
    Who::Admin,
    Who::WriterAll,
    Who::WriterDebian,
    Who::ReaderUbuntu,
    Who::ReaderDebian,
    Who::WriterUbuntuReaderAll,
];

fn grants(w: Who) -> &'static [(&'static str, &'static str)] {
    match w {
        Who::Anonymous | Who::NoGrants => &[],
        Who::Admin => &[("auth-manager", "*")],
        Who::WriterAll => &[("content-writer", "*")],
        Who::WriterDebian => &[("content-writer", "debian-*")],
        Who::ReaderUbuntu => &[("reader", "ubuntu-*")],
        Who::ReaderDebian => &[("reader", "debian-*")],
        Who::WriterUbuntuReaderAll => &[("content-writer", "ubuntu-2?"), ("reader", "*")],
    }
}

fn glob(scope: &str, image: &str) -> bool {
    imgsrv::names::scope_matches(scope, image)
}

fn has(w: Who, roles: &[&str], image: Option<&str>) -> bool {
    grants(w)
        .iter()
        .any(|(r, s)| roles.contains(r) && image.is_none_or(|i| glob(s, i)))
}

/// What a route needs.
#[derive(Clone, Copy, Debug)]
enum Rule {
    Anyone,
    /// Read a published version of an image: public for all, private needs
    /// reader or content-writer on it; refusal is 404.
    Read(&'static str),
    /// Read a draft: content-writer on the image; refusal is 404.
    Draft(&'static str),
    /// content-writer on the image; refusal 401 (anonymous) / 403.
    Write(&'static str),
    /// content-writer on any image (uploads).
    WriteAny,
    /// auth-manager.
    Manage,
    /// content-writer anywhere or auth-manager (operators' status pages).
    Operator,
}

fn allowed(rule: Rule, w: Who) -> bool {
    match rule {
        Rule::Anyone => true,
        Rule::Read(img) => img == PUB || has(w, &["reader", "content-writer"], Some(img)),
        Rule::Draft(img) | Rule::Write(img) => has(w, &["content-writer"], Some(img)),
        Rule::WriteAny => has(w, &["content-writer"], None),
        Rule::Manage => has(w, &["auth-manager"], None),
        Rule::Operator => has(w, &["auth-manager", "content-writer"], None),
    }
}

fn refusal(rule: Rule, w: Who) -> u16 {
    match rule {
        Rule::Read(_) | Rule::Draft(_) => 404,
        _ if w == Who::Anonymous => 401,
        _ => 403,
    }
}

/// Where a world lives.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    /// One App on the embedded default.
    Embedded,
    /// Two Apps on a fresh PostgreSQL database and a fresh Garage bucket.
    #[cfg(all(feature = "postgres", feature = "s3"))]
    Deployment,
}

struct World {
    env: Env,
    /// What the deployment's configuration names (the S3 secret's file).
    _keep: Option<tempfile::TempDir>,
    tokens: Vec<(Who, String)>,
    ids: std::collections::HashMap<String, String>,
}

impl World {
    fn token(&self, w: Who) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(x, _)| *x == w)
            .map(|(_, t)| t.as_str())
    }
    fn id(&self, k: &str) -> &str {
        &self.ids[k]
    }
}

/// Two images (one private), each with a signed published version, a draft
/// and an alias; one principal with a token per `Who`.
fn world(signed: bool, on: Backend) -> World {
    let verification = if signed {
        ""
    } else {
        "[image_verification]\nmode = \"off\"\n"
    };
    let (env, _keep) = match on {
        Backend::Embedded => (env_with(verification), None),
        #[cfg(all(feature = "postgres", feature = "s3"))]
        Backend::Deployment => {
            let keep = tempfile::tempdir().unwrap();
            let url = pg::database(pg::shared());
            let (_store, raw) = garage::store_and_raw("matrix");
            let secret = keep.path().join("s3.secret");
            std::fs::write(&secret, &raw.options().secret_access_key).unwrap();
            let config = format!(
                "{}{verification}",
                deployment::deployment_config(&url, &raw, &secret)
            );
            let env = env_shared(&config, 2);
            assert!(
                !env.dir.path().join(imgsrv::app::CATALOG_FILE).exists()
                    && !env.dir.path().join("sha256").exists(),
                "the deployment's instances keep no catalog or blobs of their own"
            );
            (env, Some(keep))
        }
    };
    let key = signed.then(keypair);
    if let Some(k) = &key {
        trust(env.dir.path(), k, "release");
    }
    let mut ids = std::collections::HashMap::new();
    for (img, n) in [(PUB, 1u8), (PRIV, 2u8)] {
        let meta = [b'M', n];
        let root = [b'R', n];
        env.draft(img, V1, &meta, Some(&root), None);
        let m = env.manifest(img, V1);
        let sig = key.as_ref().map(|k| minisign_sign(k, &m));
        assert_eq!(env.publish(img, V1, sig).status, 200);
        assert_eq!(
            env.call(
                "PUT",
                &format!("/v1/images/{img}/aliases/stable"),
                json!({"version": V1})
            )
            .status,
            200
        );
        env.draft(img, V2, &[b'm', n], Some(&[b'r', n]), None);
        for (ver, tag) in [(V1, "pub"), (V2, "draft")] {
            let view = env
                .call(
                    "GET",
                    &format!("/v1/images/{img}/versions/{ver}"),
                    Value::Null,
                )
                .json();
            ids.insert(
                format!("{img}-{tag}-art"),
                view["artifacts"][0]["artifact"]["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
            ids.insert(
                format!("{img}-{tag}-att"),
                view["artifacts"][0]["attachments"][0]["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        ids.insert(
            format!("{img}-root"),
            imgsrv::digest::Digest::of(&root).to_string(),
        );
    }
    assert_eq!(
        env.call(
            "PUT",
            &format!("/v1/images/{PRIV}/visibility"),
            json!({"visibility": "private"})
        )
        .status,
        200
    );
    let up = env.call("POST", "/v1/uploads", json!({"expected_digest": imgsrv::digest::Digest::of(b"x").to_string(), "expected_size_bytes": 1}));
    ids.insert(
        "upload".into(),
        up.json()["id"].as_str().unwrap().to_string(),
    );
    let mut tokens = Vec::new();
    for (i, w) in EVERYONE.iter().enumerate() {
        if *w == Who::Anonymous {
            continue;
        }
        let name = format!("p{i}");
        let p = env.call("POST", "/v1/auth/principals", json!({"name": name}));
        assert_eq!(p.status, 201, "{}", p.detail());
        for (role, scope) in grants(*w) {
            let r = env.call(
                "PUT",
                // `?` would start a query string: percent-encode it
                &format!(
                    "/v1/auth/principals/{name}/grants/{role}/{}",
                    scope.replace('?', "%3F")
                ),
                Value::Null,
            );
            assert_eq!(r.status, 204, "{}", r.detail());
        }
        let t = env.call(
            "POST",
            &format!("/v1/auth/principals/{name}/api-tokens"),
            json!({"expires_at": "2999-01-01T00:00:00Z"}),
        );
        tokens.push((*w, t.json()["plaintext"].as_str().unwrap().to_string()));
        ids.insert(
            format!("token-{i}"),
            t.json()["id"].as_str().unwrap().to_string(),
        );
    }
    ids.insert("victim".into(), "p1".into());
    World {
        env,
        _keep,
        tokens,
        ids,
    }
}

/// A route to try: method, path, body, rule.
type Case = (&'static str, String, Value, Rule);

fn read_cases(w: &World) -> Vec<Case> {
    let mut c: Vec<Case> = vec![
        ("GET", "/healthz".into(), Value::Null, Rule::Anyone),
        (
            "GET",
            "/streams/v1/index.json".into(),
            Value::Null,
            Rule::Anyone,
        ),
        (
            "GET",
            "/streams/v1/images.json".into(),
            Value::Null,
            Rule::Anyone,
        ),
        ("GET", "/v1/images".into(), Value::Null, Rule::Anyone),
        ("GET", "/v1/keys".into(), Value::Null, Rule::Anyone),
        ("GET", "/v1/audit".into(), Value::Null, Rule::Manage),
        ("GET", "/v1/mirrors".into(), Value::Null, Rule::Operator),
        ("GET", "/v1/auth/roles".into(), Value::Null, Rule::Manage),
        (
            "GET",
            "/v1/auth/principals".into(),
            Value::Null,
            Rule::Manage,
        ),
        ("GET", "/v1/auth/matrix".into(), Value::Null, Rule::Manage),
        (
            "GET",
            "/v1/auth/principals/p1".into(),
            Value::Null,
            Rule::Manage,
        ),
        (
            "GET",
            "/v1/auth/principals/p1/api-tokens".into(),
            Value::Null,
            Rule::Manage,
        ),
        (
            "GET",
            format!("/v1/uploads/{}", w.id("upload")),
            Value::Null,
            Rule::WriteAny,
        ),
    ];
    for img in [PUB, PRIV] {
        let base = format!("/v1/images/{img}");
        let (pa, pt, da) = (
            w.id(&format!("{img}-pub-art")),
            w.id(&format!("{img}-pub-att")),
            w.id(&format!("{img}-draft-art")),
        );
        c.extend([
            ("GET", base.clone(), Value::Null, Rule::Read(img)),
            (
                "GET",
                format!("{base}/versions"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/versions/{V1}"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/versions/{V1}/manifest"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/versions/{V1}/manifest.minisig"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/versions/{V1}/artifacts"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/versions/{V1}/artifacts/{pa}"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/versions/{V1}/artifacts/{pa}/download"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "HEAD",
                format!("{base}/versions/{V1}/artifacts/{pa}/download/x.squashfs"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/versions/{V1}/artifacts/{pa}/attachments/{pt}/download"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/aliases"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/aliases/stable"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/refs/stable"),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("/v1/blobs/{}", w.id(&format!("{img}-root"))),
                Value::Null,
                Rule::Read(img),
            ),
            (
                "GET",
                format!("{base}/versions/{V2}"),
                Value::Null,
                Rule::Draft(img),
            ),
            (
                "GET",
                format!("{base}/versions/{V2}/manifest"),
                Value::Null,
                Rule::Draft(img),
            ),
            (
                "GET",
                format!("{base}/versions/{V2}/artifacts/{da}"),
                Value::Null,
                Rule::Draft(img),
            ),
        ]);
    }
    c
}

fn write_cases(w: &World) -> Vec<Case> {
    let digest = imgsrv::digest::Digest::of(b"x").to_string();
    let up = w.id("upload");
    let mut c: Vec<Case> = vec![
        (
            "POST",
            "/v1/uploads".into(),
            json!({"expected_digest": digest, "expected_size_bytes": 1}),
            Rule::WriteAny,
        ),
        (
            "PUT",
            format!("/v1/uploads/{up}/parts/1"),
            Value::String("x".into()),
            Rule::WriteAny,
        ),
        (
            "POST",
            format!("/v1/uploads/{up}/complete"),
            json!({"parts": []}),
            Rule::WriteAny,
        ),
        (
            "POST",
            format!("/v1/uploads/{up}/abort"),
            Value::Null,
            Rule::WriteAny,
        ),
        (
            "POST",
            "/v1/auth/principals".into(),
            json!({"name": "newcomer"}),
            Rule::Manage,
        ),
        (
            "DELETE",
            "/v1/auth/principals/p1".into(),
            Value::Null,
            Rule::Manage,
        ),
        (
            "PUT",
            "/v1/auth/principals/p1/grants/reader/x-*".into(),
            Value::Null,
            Rule::Manage,
        ),
        (
            "DELETE",
            "/v1/auth/principals/p3/grants/content-writer/*".into(),
            Value::Null,
            Rule::Manage,
        ),
        (
            "PUT",
            "/v1/auth/principals/p1/roles/reader".into(),
            Value::Null,
            Rule::Manage,
        ),
        (
            "POST",
            "/v1/auth/principals/p1/api-tokens".into(),
            json!({"expires_at": "2999-01-01T00:00:00Z"}),
            Rule::Manage,
        ),
        (
            "DELETE",
            format!("/v1/auth/api-tokens/{}", w.id("token-1")),
            Value::Null,
            Rule::Manage,
        ),
    ];
    for img in [PUB, PRIV] {
        let base = format!("/v1/images/{img}");
        let (da, dt) = (
            w.id(&format!("{img}-draft-art")),
            w.id(&format!("{img}-draft-att")),
        );
        let vis = if img == PRIV { "private" } else { "public" };
        c.extend([
            ("POST", "/v1/images".into(), json!({"name": img}), Rule::Write(img)),
            ("PUT", format!("{base}/visibility"), json!({"visibility": vis}), Rule::Write(img)),
            ("POST", format!("{base}/versions"), json!({"version": "20250103_0000"}), Rule::Write(img)),
            (
                "POST",
                format!("{base}/versions/{V2}/artifacts"),
                json!({"operating_system": "debian", "architecture": "x86_64", "format": "qcow2",
                       "primary_blob_digest": digest, "primary_blob_size_bytes": 1, "primary_media_type": "x"}),
                Rule::Write(img),
            ),
            (
                "POST",
                format!("{base}/versions/{V2}/artifacts/{da}/attachments"),
                json!({"name": "sbom", "media_type": "x", "blob_digest": digest, "blob_size_bytes": 1}),
                Rule::Write(img),
            ),
            ("DELETE", format!("{base}/versions/{V2}/artifacts/{da}/attachments/{dt}"), Value::Null, Rule::Write(img)),
            ("DELETE", format!("{base}/versions/{V2}/artifacts/{da}"), Value::Null, Rule::Write(img)),
            ("POST", format!("{base}/versions/{V2}/publish"), json!({}), Rule::Write(img)),
            ("PUT", format!("{base}/aliases/next"), json!({"version": V1}), Rule::Write(img)),
            ("DELETE", format!("{base}/aliases/stable"), Value::Null, Rule::Write(img)),
        ]);
    }
    c
}

fn call(w: &World, who: Who, method: &str, path: &str, body: &Value) -> Resp {
    let bytes = match body {
        Value::Null => Vec::new(),
        Value::String(s) => s.as_bytes().to_vec(),
        v => serde_json::to_vec(v).unwrap(),
    };
    w.env
        .call_full(method, path, w.token(who), &bytes, &[], true)
}

fn denied_count(w: &World) -> usize {
    let r = w
        .env
        .call("GET", "/v1/audit?outcome=denied&limit=100000", Value::Null);
    r.json()["entries"].as_array().unwrap().len()
}

fn check(w: &World, who: Who, (method, path, body, rule): &Case, failures: &mut Vec<String>) {
    let before = denied_count(w);
    let r = call(w, who, method, path, body);
    let after = denied_count(w);
    let want_allowed = allowed(*rule, who);
    let denied = if want_allowed {
        false
    } else {
        r.status == refusal(*rule, who)
    };
    let hidden = matches!(rule, Rule::Read(_) | Rule::Draft(_)) && r.status == 404;
    let granted = !matches!(r.status, 401 | 403) && !hidden;
    if want_allowed && !granted {
        failures.push(format!(
            "{who:?} {method} {path}: expected access, got {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        ));
    }
    if !want_allowed && !denied {
        failures.push(format!(
            "{who:?} {method} {path}: expected {}, got {}",
            refusal(*rule, who),
            r.status
        ));
    }
    if !want_allowed && after != before + 1 {
        failures.push(format!(
            "{who:?} {method} {path}: refusal not audited ({before} -> {after})"
        ));
    }
}

fn read_routes(on: Backend) {
    let w = world(true, on);
    let mut failures = Vec::new();
    let cases = read_cases(&w);
    for who in EVERYONE {
        for case in &cases {
            check(&w, who, case, &mut failures);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} checks failed:\n{}",
        failures.len(),
        cases.len() * EVERYONE.len(),
        failures.join("\n")
    );
}

fn write_routes(on: Backend) {
    let mut failures = Vec::new();
    let mut i = 0;
    loop {
        let w = world(false, on);
        let cases = write_cases(&w);
        let Some(case) = cases.get(i) else { break };
        if on == Backend::Embedded {
            // a fresh world per check: allowed writes change state
            check(&w, EVERYONE[0], case, &mut failures);
            for who in &EVERYONE[1..] {
                let w = world(false, on);
                check(&w, *who, &write_cases(&w)[i], &mut failures);
            }
        } else {
            // on the deployment a world costs a database and a bucket: one world per
            // route, every refused caller first (a refusal changes nothing, so each of
            // them meets the fresh world), then those allowed (a later one may find the
            // change of an earlier one: a 404 or 409 still counts as access granted)
            let (refused, granted): (Vec<Who>, Vec<Who>) =
                EVERYONE.iter().partition(|who| !allowed(case.3, **who));
            for who in refused.into_iter().chain(granted) {
                check(&w, who, case, &mut failures);
            }
        }
        i += 1;
    }
    assert!(i > 30, "only {i} write routes walked");
    assert!(
        failures.is_empty(),
        "{} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn private_images(on: Backend) {
    let w = world(false, on);
    for who in EVERYONE {
        let may = allowed(Rule::Read(PRIV), who);
        let listed = call(&w, who, "GET", "/v1/images", &Value::Null).json()["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == PRIV);
        assert_eq!(listed, may, "{who:?} /v1/images");
        let streams =
            String::from_utf8(call(&w, who, "GET", "/streams/v1/images.json", &Value::Null).body)
                .unwrap();
        assert_eq!(streams.contains(PRIV), may, "{who:?} images.json");
        assert!(streams.contains(PUB), "{who:?} sees the public image");
        let index =
            String::from_utf8(call(&w, who, "GET", "/streams/v1/index.json", &Value::Null).body)
                .unwrap();
        assert_eq!(index.contains(PRIV), may, "{who:?} index.json");
    }
    // plain HTTP (what Incus tries first) never serves private bytes
    let pa = w.id(&format!("{PRIV}-pub-art"));
    let r = w.env.call_full(
        "GET",
        &format!("/v1/images/{PRIV}/versions/{V1}/artifacts/{pa}/download"),
        None,
        &[],
        &[],
        false,
    );
    assert_eq!(r.status, 404);
    let t = w.token(Who::ReaderUbuntu).unwrap();
    let r = w.env.call_full(
        "GET",
        &format!("/v1/images/{PRIV}/versions/{V1}/artifacts/{pa}/download"),
        Some(t),
        &[],
        &[],
        false,
    );
    assert_eq!(r.status, 400, "credentials over plain HTTP are refused");
    let audit = w
        .env
        .call(
            "GET",
            "/v1/audit?action=plain-http-credentials",
            Value::Null,
        )
        .json();
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1, "and logged");
}

#[test]
fn every_read_route_obeys_the_matrix() {
    read_routes(Backend::Embedded)
}

#[test]
fn every_write_route_obeys_the_matrix() {
    write_routes(Backend::Embedded)
}

#[test]
fn private_images_exist_only_for_their_readers() {
    private_images(Backend::Embedded)
}

/// The same walks on two instances sharing PostgreSQL and Garage.
#[cfg(all(feature = "postgres", feature = "s3"))]
mod on_the_deployment {
    use super::*;

    #[test]
    fn every_read_route_obeys_the_matrix() {
        read_routes(Backend::Deployment)
    }

    #[test]
    fn every_write_route_obeys_the_matrix() {
        write_routes(Backend::Deployment)
    }

    #[test]
    fn private_images_exist_only_for_their_readers() {
        private_images(Backend::Deployment)
    }
}
