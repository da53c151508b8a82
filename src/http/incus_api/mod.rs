//! The Incus REST API of a public image server (`/1.0/...`), beside the native API
//! on the same listener, so that `incus remote add NAME https://host:8443` works: the
//! client asks to trust the server's certificate once, pins it and hands it to its
//! daemon. docs/incus-api.md has the routes, the alias names and what is left out.
//!
//! What it shows is the anonymous Simple Streams projection ([`App::streams`]):
//! published versions of public images, without the retired ones and those a revoked
//! key signed, each fingerprint once, aliases on the newest build ([`model`]). Exports
//! go through the download rule ([`crate::download`], via
//! [`super::routes::download_allowed`]) and the blob store's checked reads.
//!
//! Every answer, errors included, is in the Incus envelope:
//! `{"type":"sync","status":"Success","status_code":200,...,"metadata":...}` or
//! `{"type":"error","error_code":404,"error":"...",...}`. Query parameters the clients
//! send (`project`, `target`, `filter`, `all-projects`, `secret`) are accepted and
//! ignored but `recursion`.

mod export;
pub mod model;

use super::message::{Body, Request, Response};
use super::response::{methods, ApiError};
use super::routes::{query_pairs, Ctx};
use crate::app::App;
use crate::catalog::BlobRef;
use model::{Found, Image, Model, Names};
use serde_json::{json, Map, Value};
use std::sync::Arc;

type Res = Result<Response, ApiError>;

/// What a path segment escapes (as Go's `url.PathEscape`): all but the unreserved.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Incus's zero time, for the dates an image server has no value for.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Whether `path` (raw, as sent) is one of this API's: `/1.0` and below.
pub fn claims(path: &str) -> bool {
    path == "/1.0" || path.starts_with("/1.0/")
}

/// Answers a request [`claims`] took, always in the Incus envelope.
pub fn dispatch(app: &App, req: &mut Request<'_>, ctx: &mut Ctx) -> Res {
    Ok(match route(app, req, ctx) {
        Ok(r) => r,
        Err(e) => error(e),
    })
}

fn route(app: &App, req: &mut Request<'_>, ctx: &mut Ctx) -> Res {
    let m = req.method.clone();
    let m = m.as_str();
    let rest = req.path["/1.0".len()..].trim_end_matches('/').to_string();
    if rest.is_empty() {
        return methods!(req, "/1.0", m; "GET" => Ok(sync(server_info())));
    }
    // alias names hold `/`: the client sends them escaped (`debian%2Fbookworm`), so
    // the name is the rest of the raw path, decoded
    if let Some(raw) = rest.strip_prefix("/images/aliases/") {
        let name = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| ApiError::bad_request("alias name is not UTF-8"))?
            .into_owned();
        return methods!(req, "/1.0/images/aliases/{name}", m; "GET" => alias(app, req, &name));
    }
    let segs: Vec<&str> = rest[1..].split('/').collect();
    match segs.as_slice() {
        ["images"] => methods!(req, "/1.0/images", m; "GET" => images(app, req)),
        ["images", "aliases"] => {
            methods!(req, "/1.0/images/aliases", m; "GET" => aliases(app, req))
        }
        ["images", fp] => {
            methods!(req, "/1.0/images/{fingerprint}", m; "GET" => image(app, req, fp))
        }
        ["images", fp, "export"] => {
            methods!(req, "/1.0/images/{fingerprint}/export", m; "GET" => export(app, req, ctx, fp))
        }
        _ => {
            req.route = "/1.0/*";
            Err(ApiError::not_found(format!(
                "{} is not served: this is a public image server (images and aliases only)",
                req.path
            )))
        }
    }
}

/// `{"type":"sync",...,"metadata":v}`
fn sync(v: Value) -> Response {
    envelope(
        200,
        &json!({
            "type": "sync",
            "status": "Success",
            "status_code": 200,
            "operation": "",
            "error_code": 0,
            "error": "",
            "metadata": v,
        }),
    )
}

/// `{"type":"error","error_code":S,"error":"...",...}` with the status of `e` (and its
/// headers: `Allow`, `Retry-After`).
fn error(e: ApiError) -> Response {
    let mut r = envelope(
        e.status,
        &json!({
            "type": "error",
            "status": "",
            "status_code": 0,
            "operation": "",
            "error_code": e.status,
            "error": e.detail,
            "metadata": null,
        }),
    );
    r.headers.extend(e.headers);
    r
}

fn envelope(status: u16, v: &Value) -> Response {
    Response::new(status)
        .with_header("Content-Type", "application/json")
        .with_body(Body::Bytes(
            serde_json::to_vec(v).expect("JSON value serializes"),
        ))
}

/// `GET /1.0`: an untrusted client's view of a public server. No API extension is
/// listed: a client checks them on the server it changes (its own daemon), not on an
/// image source, and `api_filtering` would make `incus image list` send filters this
/// server does not apply.
fn server_info() -> Value {
    json!({
        "api_extensions": [],
        "api_status": "stable",
        "api_version": "1.0",
        "auth": "untrusted",
        "public": true,
        "auth_methods": ["tls"],
        "config": {},
        "environment": {
            "server": "imgsrv",
            "server_name": "imgsrv",
            "server_version": env!("CARGO_PKG_VERSION"),
            "server_clustered": false,
        },
    })
}

/// The model of the anonymous projection, and the alias table for this client.
fn current(app: &App, req: &Request<'_>) -> Result<(Arc<Model>, Arc<Names>), ApiError> {
    let streams = app.streams(&[]).map_err(|e| {
        ApiError::internal("building the simplestreams projection", format!("{e:#}"))
    })?;
    let m = model::cached(&streams);
    let names = m.names(model::client_arch(req.header("user-agent")));
    Ok((m, names))
}

fn recursive(req: &Request<'_>) -> bool {
    query_pairs(req)
        .iter()
        .any(|(k, v)| k == "recursion" && v != "0")
}

fn images(app: &App, req: &Request<'_>) -> Res {
    let (m, names) = current(app, req)?;
    let list: Vec<Value> = if recursive(req) {
        (0..m.images.len())
            .map(|i| image_json(&m.images[i], &names.of_image[i]))
            .collect()
    } else {
        m.images
            .iter()
            .map(|i| json!(format!("/1.0/images/{}", i.fingerprint)))
            .collect()
    };
    Ok(sync(Value::Array(list)))
}

fn image(app: &App, req: &Request<'_>, fp: &str) -> Res {
    let (m, names) = current(app, req)?;
    let i = find(&m, fp)?;
    Ok(sync(image_json(&m.images[i], &names.of_image[i])))
}

fn aliases(app: &App, req: &Request<'_>) -> Res {
    let (m, names) = current(app, req)?;
    let rec = recursive(req);
    let list: Vec<Value> = names
        .by_name
        .iter()
        .map(|(name, i)| {
            if rec {
                alias_json(name, &m.images[*i])
            } else {
                let escaped = percent_encoding::utf8_percent_encode(name, SEGMENT);
                json!(format!("/1.0/images/aliases/{escaped}"))
            }
        })
        .collect();
    Ok(sync(Value::Array(list)))
}

fn alias(app: &App, req: &Request<'_>, name: &str) -> Res {
    let (m, names) = current(app, req)?;
    match names.by_name.get(name) {
        Some(i) => Ok(sync(alias_json(name, &m.images[*i]))),
        None => Err(ApiError::not_found("Image alias not found")),
    }
}

/// The image `fp` (a prefix) names in the listing: 404 if none, 400 if several.
fn find(m: &Model, fp: &str) -> Result<usize, ApiError> {
    match m.find(&fp.to_ascii_lowercase()) {
        Found::One(i) => Ok(i),
        Found::None => Err(ApiError::not_found("Image not found")),
        Found::Several => Err(ApiError::bad_request("More than one image matches")),
    }
}

/// `GET /1.0/images/{fp}/export`. The fingerprint is looked up in the listing, else
/// among every published version (a version just retired, or withheld, or private),
/// and the download rule decides: `404` for what the caller may not see, `410` for what
/// is withheld, the bytes otherwise.
fn export(app: &App, req: &Request<'_>, ctx: &mut Ctx, fp: &str) -> Res {
    let fp = fp.to_ascii_lowercase();
    let (m, _) = current(app, req)?;
    let entries = match m.find(&fp) {
        Found::One(i) => vec![m.images[i].entry.clone()],
        Found::Several => return Err(ApiError::bad_request("More than one image matches")),
        Found::None => {
            if fp.is_empty() || fp.len() > 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApiError::not_found("Image not found"));
            }
            app.catalog.projection_by_fingerprint(&fp)?
        }
    };
    let Some(first) = entries.first() else {
        return Err(ApiError::not_found("Image not found"));
    };
    if entries
        .iter()
        .any(|e| e.combined_sha256 != first.combined_sha256)
    {
        return Err(ApiError::bad_request("More than one image matches"));
    }
    // every version holding these bytes: served if any one of them may be
    let citing: Vec<BlobRef> = entries
        .iter()
        .map(|e| BlobRef {
            image: e.image.clone(),
            version_id: e.version.id.clone(),
            published: true,
        })
        .collect();
    let full = first.combined_sha256.hex();
    let public =
        super::routes::download_allowed(app, ctx, &citing, false, &format!("image {full}"))
            .map_err(|e| match e.status {
                404 => ApiError::not_found("Image not found"),
                _ => e,
            })?;
    export::respond(app, req, first, &full, public)
}

fn image_json(img: &Image, names: &[String]) -> Value {
    let e = &img.entry;
    let mut props: Map<String, Value> = e
        .version
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("simplestreams."))
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let os = crate::simplestreams::os_of(e).to_string();
    let release = crate::simplestreams::release_of(e).to_string();
    let arch = &e.artifact.architecture;
    let variant = &e.artifact.variant;
    let description = format!("{os} {release} {arch} ({variant}) ({})", img.serial);
    for (k, v) in [
        ("os", os.as_str()),
        ("release", release.as_str()),
        ("variant", variant),
        ("architecture", arch),
        ("serial", &img.serial),
        ("type", &e.ftype),
        ("description", &description),
    ] {
        props
            .entry(k.to_string())
            .or_insert_with(|| json!(v.to_string()));
    }
    let aliases: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "description": ""}))
        .collect();
    let (_, filename) = export::file_names(&img.fingerprint, &e.ftype);
    json!({
        "aliases": aliases,
        "architecture": img.architecture,
        "auto_update": false,
        "cached": false,
        "created_at": e.published_at,
        "expires_at": ZERO_TIME,
        "filename": filename,
        "fingerprint": img.fingerprint,
        "last_used_at": ZERO_TIME,
        "profiles": ["default"],
        "project": "default",
        "properties": props,
        "public": true,
        "size": img.size(),
        "type": img.kind,
        "uploaded_at": e.published_at,
    })
}

fn alias_json(name: &str, img: &Image) -> Value {
    json!({
        "name": name,
        "description": format!(
            "{} {} ({}, {})",
            img.entry.image.name, img.entry.version.version, img.architecture, img.kind
        ),
        "target": img.fingerprint,
        "type": img.kind,
    })
}
