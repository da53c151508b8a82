//! Routes: `(app, request) -> response`. Every handler returns
//! `Result<Response, ApiError>`; the mapping from domain errors to statuses
//! lives in [`super::response`]. The contract is docs/api.md.

use super::message::{Body, Request, Response};
use super::response::{json, methods, read_json, serve_blob, ApiError};
use crate::app::App;
use crate::auth::{self, Caller, ACTION_AUTH_MANAGE, ACTION_CONTENT_READ, ACTION_CONTENT_WRITE};
use crate::catalog::{
    self, Artifact, AuditEntry, CatalogError, Image, NewArtifact, NewAttachment, PublishRecord,
    VersionState, VersionView,
};
use crate::digest::Digest;
use crate::uploads::{ListedPart, NewUpload, WholeUpload};
use serde::Deserialize;
use serde_json::json as j;
use std::collections::BTreeMap;
use std::time::Instant;

mod content;
mod tlog;
mod uploads;

use content::*;
use tlog::*;
pub(crate) use uploads::download_allowed;
use uploads::*;

type Res = Result<Response, ApiError>;

/// Per-request state: who is calling, and what goes into the audit log.
pub struct Ctx {
    pub caller: Option<Caller>,
    /// Short name of the operation (`publish`, `alias.put`, ...).
    action: Option<String>,
    /// What it acted on (`image@version`, a digest, a principal...).
    target: String,
    detail: serde_json::Map<String, serde_json::Value>,
    /// Access was refused (401/403, or a 404 hiding something private).
    denied: bool,
    /// An anonymous read answered with a basic challenge (the web catalog's
    /// signed-in pages): how a browser is asked for credentials, not a refusal.
    challenged: bool,
}

impl Ctx {
    fn anonymous() -> Ctx {
        Ctx {
            caller: None,
            action: None,
            target: String::new(),
            detail: Default::default(),
            denied: false,
            challenged: false,
        }
    }

    /// Marks the answer as a basic challenge to an anonymous read (not audited).
    pub(crate) fn challenge(&mut self) {
        self.challenged = true;
    }

    pub(crate) fn op_name(&mut self, action: &str, target: impl Into<String>) {
        self.op(action, target)
    }

    pub(crate) fn require_manage(&mut self) -> Result<(), ApiError> {
        self.manage().map(|_| ())
    }

    pub(crate) fn note(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.detail.insert(key.to_string(), value.into());
    }

    fn op(&mut self, action: &str, target: impl Into<String>) {
        self.action = Some(action.to_string());
        self.target = target.into();
    }

    fn deny(&mut self, e: ApiError) -> ApiError {
        self.denied = true;
        e
    }

    fn caller_or_401(&mut self) -> Result<&Caller, ApiError> {
        if self.caller.is_none() {
            return Err(self.deny(ApiError::unauthorized()));
        }
        Ok(self.caller.as_ref().expect("checked above"))
    }

    /// content.write on image `name`: 401 anonymous, 403 otherwise.
    fn write(&mut self, name: &str) -> Result<&Caller, ApiError> {
        let ok = self.caller_or_401()?.can_on(ACTION_CONTENT_WRITE, name);
        if !ok {
            return Err(self.deny(ApiError::forbidden(&format!(
                "{ACTION_CONTENT_WRITE} on {name}"
            ))));
        }
        Ok(self.caller.as_ref().expect("checked above"))
    }

    /// content.write on some image (uploads belong to no image yet).
    fn write_anywhere(&mut self) -> Result<&Caller, ApiError> {
        let ok = self.caller_or_401()?.can_somewhere(ACTION_CONTENT_WRITE);
        if !ok {
            return Err(self.deny(ApiError::forbidden(ACTION_CONTENT_WRITE)));
        }
        Ok(self.caller.as_ref().expect("checked above"))
    }

    fn manage(&mut self) -> Result<&Caller, ApiError> {
        let ok = self.caller_or_401()?.can_somewhere(ACTION_AUTH_MANAGE);
        if !ok {
            return Err(self.deny(ApiError::forbidden(ACTION_AUTH_MANAGE)));
        }
        Ok(self.caller.as_ref().expect("checked above"))
    }

    fn can_write(&self, name: &str) -> bool {
        self.caller
            .as_ref()
            .is_some_and(|c| c.can_on(ACTION_CONTENT_WRITE, name))
    }

    /// Public images are readable by anyone; private ones need content.read.
    pub(crate) fn can_read(&self, img: &Image) -> bool {
        !img.is_private()
            || self
                .caller
                .as_ref()
                .is_some_and(|c| c.can_on(ACTION_CONTENT_READ, &img.name))
    }

    /// The image, if the caller may see it; 404 otherwise (a private image
    /// is not revealed, and that refusal is audited).
    pub(crate) fn readable_image(&mut self, app: &App, name: &str) -> Result<Image, ApiError> {
        let img = app.catalog.get_image(name)?;
        if !self.can_read(&img) {
            return Err(self.deny(ApiError::not_found(format!("image {name} not found"))));
        }
        Ok(img)
    }
}

/// Entry point for the connection engine.
pub fn handle(app: &App, req: &mut Request<'_>) -> Response {
    let t = Instant::now();
    let mut ctx = Ctx::anonymous();
    let resp = match authenticate(app, req, &mut ctx).and_then(|()| dispatch(app, req, &mut ctx)) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    audit(app, req, &ctx, resp.status);
    log::debug!(
        "{} {} -> {} in {:?}",
        req.method,
        req.path,
        resp.status,
        t.elapsed()
    );
    resp
}

/// Appends the audit row for a write or a refusal. Reads that succeed are
/// not audited (the access log has them).
fn audit(app: &App, req: &Request<'_>, ctx: &Ctx, status: u16) {
    let write = !matches!(req.method.as_str(), "GET" | "HEAD");
    if ctx.challenged && ctx.caller.is_none() && !write {
        return;
    }
    let denied = ctx.denied || status == 401 || status == 403;
    if !write && !denied {
        return;
    }
    let outcome = if denied {
        "denied"
    } else if status < 400 {
        "ok"
    } else {
        "failed"
    };
    let entry = AuditEntry {
        principal_id: ctx.caller.as_ref().map(|c| c.principal_id.clone()),
        principal_name: ctx.caller.as_ref().map(|c| c.principal_name.clone()),
        action: ctx.action.clone().unwrap_or_else(|| {
            if denied {
                "denied".into()
            } else {
                "request".into()
            }
        }),
        target: ctx.target.clone(),
        outcome: outcome.into(),
        status: Some(status),
        method: Some(req.method.clone()),
        path: Some(req.path.chars().take(1024).collect()),
        remote: Some(req.peer.ip().to_string()),
        detail: serde_json::Value::Object(ctx.detail.clone()).to_string(),
    };
    if let Err(e) = app.catalog.append_audit(&entry) {
        log::error!(
            "AUDIT: could not record {} {} ({status}): {e}",
            req.method,
            req.path
        );
    }
}

/// Reads `Authorization` (Bearer token, or Basic `NAME:TOKEN` as the Incus
/// client sends for `https://NAME:TOKEN@host` remotes). Bad credentials are
/// 401 after a delay that grows with repeated failures from the address.
fn authenticate(app: &App, req: &Request<'_>, ctx: &mut Ctx) -> Result<(), ApiError> {
    let Some(h) = req.header("authorization") else {
        return Ok(());
    };
    let result = match h.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => {
            auth::authenticate(app.catalog.as_ref(), t.trim())
        }
        Some((scheme, b)) if scheme.eq_ignore_ascii_case("basic") => {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
                .and_then(|v| String::from_utf8(v).ok());
            match decoded.as_deref().and_then(|s| s.split_once(':')) {
                Some((name, token)) => auth::authenticate_basic(app.catalog.as_ref(), name, token),
                None => Err(auth::AuthError::InvalidToken),
            }
        }
        _ => Err(auth::AuthError::InvalidToken),
    };
    match result {
        Ok(c) => {
            ctx.caller = Some(c);
            Ok(())
        }
        Err(auth::AuthError::InvalidToken) => {
            let delay = app
                .auth_failures
                .failed(app.catalog.as_ref(), req.peer.ip());
            log::warn!(
                "authentication failed from {} for {} {} (answering in {delay:?})",
                req.peer,
                req.method,
                req.path
            );
            ctx.op("auth.failed", "");
            std::thread::sleep(delay);
            Err(ctx.deny(ApiError::unauthorized()))
        }
        Err(auth::AuthError::Catalog(e)) => Err(e.into()),
    }
}

/// Percent-decodes and splits the path; refuses encoded slashes, dot
/// segments and invalid UTF-8.
fn segments(path: &str) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for raw in path.split('/').skip(1) {
        if raw.is_empty() {
            continue;
        }
        let s = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| ApiError::bad_request("path is not UTF-8"))?;
        if s.contains('/') || s == "." || s == ".." || s.contains('\0') {
            return Err(ApiError::bad_request("invalid path segment"));
        }
        out.push(s.into_owned());
    }
    Ok(out)
}

/// Download routes accept a trailing file name (`…/download/NAME`), which
/// the Simple Streams paths carry so Incus names exported files sensibly.
fn strip_download_name(segs: &mut Vec<String>) {
    let is_download = |n: usize| {
        segs.len() == n
            && segs[0] == "v1"
            && segs[1] == "images"
            && segs[3] == "versions"
            && segs[5] == "artifacts"
            && segs[n - 2] == "download"
    };
    if is_download(9) || (is_download(11) && segs[7] == "attachments") {
        segs.pop();
    }
}

/// The Incus client tries every artifact over plain HTTP on this port first.
/// Published downloads are safe to answer in clear (the client checks their
/// sha256 from the JSON it read over HTTPS); nothing else is.
fn plain_http_allowed(method: &str, segs: &[&str], has_auth: bool) -> bool {
    if has_auth || !matches!(method, "GET" | "HEAD") {
        return false;
    }
    matches!(
        segs,
        ["healthz"]
            | ["v1", "images", _, "versions", _, "artifacts", _, "download"]
            | [
                "v1",
                "images",
                _,
                "versions",
                _,
                "artifacts",
                _,
                "attachments",
                _,
                "download"
            ]
    )
}

fn dispatch(app: &App, req: &mut Request<'_>, ctx: &mut Ctx) -> Res {
    // the Incus REST API (`/1.0/...`) matches on the raw path (`%2F` in alias names)
    let incus = crate::http::incus_api::claims(&req.path);
    let mut owned = if incus {
        Vec::new()
    } else {
        segments(&req.path)?
    };
    strip_download_name(&mut owned);
    let segs: Vec<&str> = owned.iter().map(String::as_str).collect();
    let method = req.method.clone();
    let m = method.as_str();
    let has_auth = req.header("authorization").is_some();
    if !req.secure && !plain_http_allowed(m, &segs, has_auth) {
        if has_auth {
            // the credentials already crossed the network in clear
            log::warn!(
                "refused plain-HTTP request carrying credentials from {} for {}; \
                 that client should use https:// and rotate the token",
                req.peer,
                req.path
            );
            ctx.op("plain-http-credentials", "");
            ctx.denied = true;
        }
        return Err(
            ApiError::bad_request("this server speaks HTTPS on this port; use https://")
                .with_header("Connection", "close"),
        );
    }
    let get = matches!(m, "GET" | "HEAD");
    if !get && ctx.caller.is_some() {
        // no change starts without room for it and its audit row
        if let Err(e) = app.room_for_change() {
            let e = ApiError::from(e);
            ctx.note("refused", e.detail.clone());
            return Err(e);
        }
    }
    if incus {
        return crate::http::incus_api::dispatch(app, req, ctx);
    }
    match segs.as_slice() {
        ["v1", "images", name, rest @ ..] => image_routes(app, req, ctx, m, name, rest),
        ["v1", "auth", rest @ ..] => crate::http::admin::auth_routes(app, req, ctx, m, rest),
        _ => top_routes(app, req, ctx, m, &segs),
    }
}

fn no_route(m: &str, req: &Request<'_>) -> ApiError {
    ApiError::not_found(format!("no route for {m} {}", req.path))
}

/// Everything but `/v1/images/{name}/...` and `/v1/auth/...`.
fn top_routes(app: &App, req: &mut Request<'_>, ctx: &mut Ctx, m: &str, segs: &[&str]) -> Res {
    match segs {
        [] | ["images", _] | ["signed-in", ..] | ["tls", "cert.pem"] | ["static", _] => {
            crate::http::web::routes(app, req, ctx, m, segs)
        }
        ["healthz"] => methods!(req, "/healthz", m; "GET" => Ok(Response::new(204))),
        ["readyz"] => methods!(req, "/readyz", m; "GET" => {
            let reasons = app.unready_reasons();
            if reasons.is_empty() {
                return Ok(Response::new(204));
            }
            Err(ApiError::new(503, format!("not ready: {}", reasons.join("; ")))
                .with_header("Retry-After", "10"))
        }),
        ["streams", "v1", doc @ ("index.json" | "images.json")] => {
            methods!(req, if *doc == "index.json" { "/streams/v1/index.json" } else { "/streams/v1/images.json" }, m; "GET" => streams(app, req, ctx, doc))
        }
        ["v1", "uploads"] => methods!(req, "/v1/uploads", m; "POST" => begin_upload(app, req, ctx)),
        ["v1", "uploads", id] => methods!(req, "/v1/uploads/{upload}", m; "GET" => {
            ctx.write_anywhere()?;
            Ok(json(200, &app.catalog.get_upload(id)?))
        }),
        ["v1", "uploads", id, "parts", n] => {
            methods!(req, "/v1/uploads/{upload}/parts/{part}", m; "PUT" => put_part(app, req, ctx, id, n))
        }
        ["v1", "uploads", id, "complete"] => {
            methods!(req, "/v1/uploads/{upload}/complete", m; "POST" => complete_upload(app, req, ctx, id))
        }
        ["v1", "uploads", id, "abort"] => {
            methods!(req, "/v1/uploads/{upload}/abort", m; "POST" => abort_upload(app, ctx, id))
        }
        ["v1", "blobs"] => methods!(req, "/v1/blobs", m; "POST" => upload_whole(app, req, ctx)),
        ["v1", "blobs", digest] => {
            methods!(req, "/v1/blobs/{digest}", m; "GET" => get_blob(app, req, ctx, digest))
        }
        ["v1", "images"] => methods!(req, "/v1/images", m;
            "GET" => list_images(app, ctx),
            "POST" => create_image(app, req, ctx),
        ),
        ["v1", "keys"] => methods!(req, "/v1/keys", m; "GET" => trusted_keys(app)),
        ["log", rest @ ..] => log_routes(app, req, m, rest),
        ["witness", "add-checkpoint"] => methods!(req, "/witness/add-checkpoint", m;
            "POST" => witness_add_checkpoint(app, req)),
        ["v1", "mirrors"] => methods!(req, "/v1/mirrors", m; "GET" => mirrors(app, ctx)),
        ["v1", "audit"] => methods!(req, "/v1/audit", m; "GET" => audit_log(app, req, ctx)),
        _ => Err(no_route(m, req)),
    }
}

fn list_images(app: &App, ctx: &mut Ctx) -> Res {
    let published: std::collections::HashSet<String> = app
        .catalog
        .list_images(false)?
        .into_iter()
        .map(|i| i.name)
        .collect();
    let images: Vec<Image> = app
        .catalog
        .list_images(true)?
        .into_iter()
        .filter(|i| ctx.can_read(i) && (published.contains(&i.name) || ctx.can_write(&i.name)))
        .collect();
    Ok(json(200, &j!({ "images": images })))
}

/// Operators' information (upstreams, errors): writers and auth-managers.
fn mirrors(app: &App, ctx: &mut Ctx) -> Res {
    let ok = ctx.caller_or_401()?.can_somewhere(ACTION_CONTENT_WRITE)
        || ctx
            .caller
            .as_ref()
            .is_some_and(|c| c.can_somewhere(ACTION_AUTH_MANAGE));
    if !ok {
        return Err(ctx.deny(ApiError::forbidden(ACTION_CONTENT_WRITE)));
    }
    let jobs = crate::schedule::read_status(&app.config.data_dir)
        .map_err(|e| ApiError::internal("mirror status", e))?;
    Ok(json(200, &j!({ "mirrors": jobs })))
}

/// `/v1/images/{name}/...`
fn image_routes(
    app: &App,
    req: &mut Request<'_>,
    ctx: &mut Ctx,
    m: &str,
    name: &str,
    rest: &[&str],
) -> Res {
    match rest {
        [] => methods!(req, "/v1/images/{name}", m; "GET" => {
            let img = ctx.readable_image(app, name)?;
            if !ctx.can_write(name) && app.catalog.list_versions(name, false)?.is_empty() {
                return Err(ApiError::not_found(format!("image {name} not found")));
            }
            Ok(json(200, &img))
        }),
        ["visibility"] => {
            methods!(req, "/v1/images/{name}/visibility", m; "PUT" => set_visibility(app, req, ctx, name))
        }
        ["versions"] => methods!(req, "/v1/images/{name}/versions", m;
            "GET" => {
                ctx.readable_image(app, name)?;
                let w = ctx.can_write(name);
                let vs = app.catalog.list_versions(name, w)?;
                if !w && vs.is_empty() {
                    return Err(ApiError::not_found(format!("image {name} not found")));
                }
                Ok(json(200, &j!({ "versions": vs })))
            },
            "POST" => create_version(app, req, ctx, name),
        ),
        ["versions", ver, rest @ ..] => version_routes(app, req, ctx, m, name, ver, rest),
        ["aliases"] => methods!(req, "/v1/images/{name}/aliases", m; "GET" => {
            ctx.readable_image(app, name)?;
            Ok(json(200, &j!({ "aliases": app.catalog.list_aliases(name)? })))
        }),
        ["aliases", alias] => methods!(req, "/v1/images/{name}/aliases/{alias}", m;
            "GET" => {
                ctx.readable_image(app, name)?;
                Ok(json(200, &app.catalog.get_alias(name, alias)?))
            },
            "PUT" => put_alias(app, req, ctx, name, alias),
            "DELETE" => {
                ctx.op("alias.delete", format!("{name}:{alias}"));
                ctx.write(name)?;
                app.catalog.delete_alias(name, alias)?;
                Ok(Response::new(204))
            },
        ),
        ["refs", r] => methods!(req, "/v1/images/{name}/refs/{ref}", m; "GET" => {
            ctx.readable_image(app, name)?;
            let ver = match app.catalog.get_version(name, r) {
                Ok(v) if v.state == VersionState::Published => v.version,
                Ok(_) | Err(CatalogError::NotFound(_)) => app.catalog.get_alias(name, r)?.version,
                Err(e) => return Err(e.into()),
            };
            let view = app.catalog.version_view(name, &ver)?;
            view_response(app, view)
        }),
        _ => Err(no_route(m, req)),
    }
}

/// `/v1/images/{name}/versions/{ver}/...`
fn version_routes(
    app: &App,
    req: &mut Request<'_>,
    ctx: &mut Ctx,
    m: &str,
    name: &str,
    ver: &str,
    rest: &[&str],
) -> Res {
    match rest {
        [] => methods!(req, "/v1/images/{name}/versions/{version}", m;
            "GET" => {
                let view = readable_view(app, ctx, name, ver)?;
                view_response(app, view)
            },
            "DELETE" => {
                ctx.op("version.delete", format!("{name}@{ver}"));
                ctx.write(name)?;
                app.delete_draft(name, ver)?;
                Ok(Response::new(204))
            },
        ),
        ["retire"] => {
            methods!(req, "/v1/images/{name}/versions/{version}/retire", m; "POST" => retire(app, req, ctx, name, ver))
        }
        ["manifest"] => {
            methods!(req, "/v1/images/{name}/versions/{version}/manifest", m; "GET" => manifest(app, ctx, name, ver))
        }
        ["manifest.minisig"] => {
            methods!(req, "/v1/images/{name}/versions/{version}/manifest.minisig", m; "GET" => signature(app, ctx, name, ver))
        }
        ["manifest.tlog-proof"] => {
            methods!(req, "/v1/images/{name}/versions/{version}/manifest.tlog-proof", m; "GET" => tlog_proof(app, ctx, name, ver))
        }
        ["publish"] => {
            methods!(req, "/v1/images/{name}/versions/{version}/publish", m; "POST" => publish(app, req, ctx, name, ver))
        }
        ["artifacts"] => methods!(req, "/v1/images/{name}/versions/{version}/artifacts", m;
            "GET" => {
                let view = readable_view(app, ctx, name, ver)?;
                let arts: Vec<&Artifact> = view.artifacts.iter().map(|a| &a.artifact).collect();
                Ok(json(200, &j!({ "artifacts": arts })))
            },
            "POST" => add_artifact(app, req, ctx, name, ver),
        ),
        ["artifacts", id] => {
            methods!(req, "/v1/images/{name}/versions/{version}/artifacts/{artifact}", m;
                "GET" => {
                    let view = readable_view(app, ctx, name, ver)?;
                    let a = view
                        .artifacts
                        .iter()
                        .find(|a| a.artifact.id == *id)
                        .ok_or_else(|| ApiError::not_found(format!("artifact {id} not found")))?;
                    Ok(json(200, &a.artifact))
                },
                "DELETE" => {
                    ctx.op("artifact.delete", format!("{name}@{ver}/{id}"));
                    ctx.write(name)?;
                    let v = app.catalog.get_version(name, ver)?;
                    app.catalog.delete_artifact(&v.id, id)?;
                    Ok(Response::new(204))
                },
            )
        }
        ["artifacts", id, "download"] => {
            methods!(req, "/v1/images/{name}/versions/{version}/artifacts/{artifact}/download", m; "GET" => download(app, req, ctx, name, ver, id, None))
        }
        ["artifacts", id, "attachments"] => {
            methods!(req, "/v1/images/{name}/versions/{version}/artifacts/{artifact}/attachments", m; "POST" => add_attachment(app, req, ctx, name, ver, id))
        }
        ["artifacts", id, "attachments", att] => {
            methods!(req, "/v1/images/{name}/versions/{version}/artifacts/{artifact}/attachments/{attachment}", m; "DELETE" => {
                ctx.op("attachment.delete", format!("{name}@{ver}/{id}/{att}"));
                ctx.write(name)?;
                let v = app.catalog.get_version(name, ver)?;
                app.catalog.delete_attachment(&v.id, id, att)?;
                Ok(Response::new(204))
            })
        }
        ["artifacts", id, "attachments", att, "download"] => {
            methods!(req, "/v1/images/{name}/versions/{version}/artifacts/{artifact}/attachments/{attachment}/download", m; "GET" => download(app, req, ctx, name, ver, id, Some(att)))
        }
        _ => Err(no_route(m, req)),
    }
}

/// `GET .../manifest.minisig`: the signature the version was published with.
fn signature(app: &App, ctx: &mut Ctx, name: &str, ver: &str) -> Res {
    let view = readable_view(app, ctx, name, ver)?;
    if view.version.state != VersionState::Published {
        return Err(ApiError::not_found(format!(
            "{name}@{ver} is not published"
        )));
    }
    let rec = app.catalog.publish_record(&view.version.id)?;
    let sig = rec
        .signature
        .ok_or_else(|| ApiError::not_found(format!("{name}@{ver} was published unsigned")))?;
    Ok(Response::new(200)
        .with_header("Content-Type", "text/plain; charset=utf-8")
        .with_body(Body::Bytes(sig.into_bytes())))
}

// ------------------------------------------------------------ validation

fn check(kind: &str, ok: fn(&str) -> bool, s: &str) -> Result<(), ApiError> {
    if ok(s) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("invalid {kind} {s:?}")))
    }
}

/// Architecture names the Incus client knows; a product with any other is
/// silently dropped by the client, so it is refused here instead.
pub const INCUS_ARCHES: &[&str] = &[
    "i686",
    "x86_64",
    "armv6l",
    "armv7l",
    "armv8l",
    "aarch64",
    "ppc",
    "ppc64",
    "ppc64le",
    "s390x",
    "mips",
    "mips64",
    "riscv32",
    "riscv64",
    "loongarch64",
    "amd64",
    "i386",
    "i586",
    "386",
    "x86",
    "arm64",
    "armhf",
    "armhfp",
    "armv7",
    "armel",
    "arm",
    "ppc64el",
    "powerpc",
    "powerpc64",
    "mipsel",
    "mips64el",
    "loong64",
];

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse()
        .map_err(|e: crate::digest::DigestParseError| ApiError::bad_request(e.to_string()))
}

// ------------------------------------------------------------ streams

fn streams(app: &App, req: &Request<'_>, ctx: &Ctx, doc: &str) -> Res {
    // the projection holds exactly what this caller may read
    let readable_private: Vec<String> = app
        .catalog
        .list_images(true)?
        .into_iter()
        .filter(|i| i.is_private() && ctx.can_read(i))
        .map(|i| i.name)
        .collect();
    let s = app.streams(&readable_private).map_err(|e| {
        ApiError::internal("building the simplestreams projection", format!("{e:#}"))
    })?;
    let d = if doc == "index.json" {
        &s.index
    } else {
        &s.images
    };
    let base = Response::new(200)
        .with_header("ETag", d.etag.clone())
        .with_header("Cache-Control", "no-cache")
        .with_header("Vary", "Accept-Encoding");
    if req
        .header("if-none-match")
        .is_some_and(|h| h.split(',').any(|t| t.trim() == d.etag))
    {
        let mut r = base;
        r.status = 304;
        return Ok(r);
    }
    let gzip = req.header("accept-encoding").is_some_and(|h| {
        h.split(',').any(|e| {
            e.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("gzip")
        })
    });
    let r = base.with_header("Content-Type", "application/json");
    Ok(if gzip {
        r.with_header("Content-Encoding", "gzip")
            .with_body(Body::Shared(d.gzip.clone()))
    } else {
        r.with_body(Body::Shared(d.bytes.clone()))
    })
}

// ------------------------------------------------------------ aliases

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutAlias {
    version: String,
}

fn put_alias(app: &App, req: &mut Request<'_>, ctx: &mut Ctx, name: &str, alias: &str) -> Res {
    ctx.op("alias.put", format!("{name}:{alias}"));
    ctx.write(name)?;
    check("alias", crate::names::alias, alias)?;
    let b: PutAlias = read_json(req)?;
    ctx.note("version", b.version.clone());
    let a = app.catalog.put_alias(name, alias, &b.version)?;
    log::info!("alias {name}:{alias} -> {}", a.version);
    Ok(json(200, &a))
}

// ------------------------------------------------------------ audit

/// `GET /v1/audit` (auth-manager): filters `principal`, `action` (exact, or a
/// prefix ending in `.`), `outcome`, `target` (substring), `since`, `until`
/// (RFC 3339), `after_id`, `limit` (default 1000); `format=jsonl` answers JSON
/// lines instead of `{"entries": [...]}`.
fn audit_log(app: &App, req: &Request<'_>, ctx: &mut Ctx) -> Res {
    ctx.manage()?;
    let mut q = catalog::AuditQuery {
        limit: Some(1000),
        ..Default::default()
    };
    let mut jsonl = false;
    for (k, v) in query_pairs(req) {
        match k.as_str() {
            "principal" => q.principal = Some(v),
            "action" => q.action = Some(v),
            "outcome" => q.outcome = Some(v),
            "target" => q.target = Some(v),
            "since" => q.since = Some(v),
            "until" => q.until = Some(v),
            "after_id" => {
                q.after_id = Some(
                    v.parse()
                        .map_err(|_| ApiError::bad_request("after_id must be a number"))?,
                )
            }
            "limit" => {
                q.limit = Some(
                    v.parse()
                        .ok()
                        .filter(|l| (1..=100_000).contains(l))
                        .ok_or_else(|| ApiError::bad_request("limit must be 1..100000"))?,
                )
            }
            "format" if v == "jsonl" => jsonl = true,
            "format" if v == "json" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown audit filter {other:?}"
                )))
            }
        }
    }
    let rows = app.catalog.query_audit(&q)?;
    if jsonl {
        let mut out = Vec::new();
        for r in &rows {
            serde_json::to_writer(&mut out, r).map_err(|e| ApiError::internal("serializing", e))?;
            out.push(b'\n');
        }
        return Ok(Response::new(200)
            .with_header("Content-Type", "application/x-ndjson")
            .with_body(Body::Bytes(out)));
    }
    Ok(json(200, &j!({ "entries": rows })))
}

/// Decoded `key=value` pairs of the query string.
pub(crate) fn query_pairs(req: &Request<'_>) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    req.query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_decoded_and_dot_segments_refused() {
        assert_eq!(
            segments("/v1/images/a/versions/2024_13%3A00").unwrap(),
            ["v1", "images", "a", "versions", "2024_13:00"]
        );
        assert!(segments("/v1/images/%2e%2e/x").is_err());
        assert!(segments("/v1/images/a%2Fb").is_err());
        assert!(segments("/v1/images/%ff").is_err());
    }

    #[test]
    fn plain_http_only_for_downloads_without_credentials() {
        let dl = [
            "v1",
            "images",
            "a",
            "versions",
            "1",
            "artifacts",
            "x",
            "download",
        ];
        assert!(plain_http_allowed("GET", &dl, false));
        assert!(plain_http_allowed("HEAD", &dl, false));
        assert!(!plain_http_allowed("GET", &dl, true));
        assert!(!plain_http_allowed("POST", &dl, false));
        assert!(!plain_http_allowed(
            "GET",
            &["streams", "v1", "images.json"],
            false
        ));
        assert!(!plain_http_allowed(
            "GET",
            &["v1", "blobs", "sha256:00"],
            false
        ));
    }
}
