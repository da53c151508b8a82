//! The web catalog: server-rendered HTML pages for people.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the images the caller may read, with their newest version, and how to add this server to Incus |
//! | `GET /images/{name}` | one image: every published version (retired ones marked), artifacts, fingerprints, signatures |
//! | `GET /tls/cert.pem` | the certificate this server presents (PEM) |
//! | `GET /static/imgsrv.css` | the pages' style sheet |
//! | `GET /signed-in/`, `/signed-in/images/{name}` | the same pages, asking an anonymous browser for HTTP basic credentials (`NAME:TOKEN`) |
//!
//! The pages use the API's authentication (a bearer token, or HTTP basic
//! `NAME:TOKEN`) and its visibility rule: anonymous callers see public images;
//! private ones appear for a caller with `content.read` on them. They need no
//! JavaScript and load nothing from elsewhere (air-gapped sites): one style
//! sheet served here, and a `Content-Security-Policy` that allows nothing else.
//!
//! Templates: [askama](https://askama.rs), which compiles `templates/*.html`
//! into the binary at build time (a template error is a build error, nothing is
//! read at run time: still one small binary) and HTML-escapes every value by
//! default. `minijinja`, the run-time alternative, would parse templates at
//! start and check them only then; nothing here needs templates changed
//! without a rebuild.

mod view;

use super::message::{Body, Request, Response};
use super::response::{methods, ApiError};
use super::routes::Ctx;
use crate::app::App;
use askama::Template;
use view::{Detail, Summary};

type Res = Result<Response, ApiError>;

/// The name the commands give this server's remote.
const REMOTE: &str = "imgsrv";

const CSS: &str = include_str!("../../templates/imgsrv.css");

/// Nothing but this server's own style sheet; no script, no frame, no form.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The web routes (`segs` is one of the paths above); errors become HTML pages.
pub fn routes(app: &App, req: &mut Request<'_>, ctx: &mut Ctx, m: &str, segs: &[&str]) -> Res {
    Ok(page(app, req, ctx, m, segs).unwrap_or_else(error_page))
}

fn page(app: &App, req: &mut Request<'_>, ctx: &mut Ctx, m: &str, segs: &[&str]) -> Res {
    match segs {
        [] => methods!(req, "/", m; "GET" => catalog_page(app, req, ctx, "")),
        ["images", name] => {
            methods!(req, "/images/{name}", m; "GET" => image_page(app, req, ctx, "", name))
        }
        [SIGNED_IN] => methods!(req, "/signed-in/", m; "GET" => {
            signed_in(ctx)?;
            catalog_page(app, req, ctx, BASE_SIGNED_IN)
        }),
        [SIGNED_IN, "images", name] => methods!(req, "/signed-in/images/{name}", m; "GET" => {
            signed_in(ctx)?;
            image_page(app, req, ctx, BASE_SIGNED_IN, name)
        }),
        ["tls", "cert.pem"] => methods!(req, "/tls/cert.pem", m; "GET" => certificate(app)),
        ["static", "imgsrv.css"] => methods!(req, "/static/imgsrv.css", m; "GET" => Ok(
            Response::new(200)
                .with_header("Content-Type", "text/css; charset=utf-8")
                .with_header("Cache-Control", "public, max-age=3600")
                .with_body(Body::Bytes(CSS.as_bytes().to_vec()))
        )),
        _ => Err(ApiError::not_found(format!(
            "no route for {m} {}",
            req.path
        ))),
    }
}

/// The first segment of the pages that ask for credentials.
pub const SIGNED_IN: &str = "signed-in";
const BASE_SIGNED_IN: &str = "/signed-in";

/// The pages under `/signed-in/` answer an anonymous request with a basic
/// challenge: a browser asks for a name and a password (the principal's name
/// and an API token) once, then answers each later challenge of the realm with
/// them by itself. (A browser does not reliably send them unasked: Chromium
/// does not, so the pages that need them ask every time.)
fn signed_in(ctx: &mut Ctx) -> Result<(), ApiError> {
    if ctx.caller.is_some() {
        return Ok(());
    }
    // how a browser is asked, not a refusal: not in the audit log
    ctx.challenge();
    Err(ApiError::new(
        401,
        "sign in with your principal's name as the user name and an API token as the password",
    )
    .with_header(
        "WWW-Authenticate",
        "Basic realm=\"imgsrv\", charset=\"UTF-8\"",
    ))
}

/// What the pages say about the server and the caller.
struct Site {
    /// `host:port` clients reach this server at.
    authority: String,
    /// The certificate's SHA-256 fingerprint, as openssl prints it and as Incus does.
    cert_colons: Option<String>,
    cert_hex: Option<String>,
    /// The caller's principal, when signed in.
    who: Option<String>,
    remote: &'static str,
    /// What the pages' links start with: `/signed-in` on the pages that ask
    /// for credentials, else nothing.
    base: &'static str,
}

impl Site {
    fn new(app: &App, req: &Request<'_>, ctx: &Ctx, base: &'static str) -> Site {
        Site {
            authority: authority(req, &app.config),
            cert_colons: app.served_cert.as_ref().map(|c| c.fingerprint_colons()),
            cert_hex: app.served_cert.as_ref().map(|c| c.fingerprint_hex()),
            who: ctx.caller.as_ref().map(|c| c.principal_name.clone()),
            remote: REMOTE,
            base,
        }
    }
}

#[derive(Template)]
#[template(path = "catalog.html")]
struct CatalogPage {
    site: Site,
    images: Vec<Summary>,
}

#[derive(Template)]
#[template(path = "image.html")]
struct ImagePage {
    site: Site,
    d: Detail,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    status: u16,
    title: &'static str,
    detail: String,
}

fn catalog_page(app: &App, req: &Request<'_>, ctx: &mut Ctx, base: &'static str) -> Res {
    let images = view::catalog(app, &|img| ctx.can_read(img))?;
    let page = CatalogPage {
        site: Site::new(app, req, ctx, base),
        images,
    };
    html(200, page.render())
}

fn image_page(app: &App, req: &Request<'_>, ctx: &mut Ctx, base: &'static str, name: &str) -> Res {
    let not_found = || ApiError::not_found(format!("image {name} not found"));
    let img = ctx.readable_image(app, name)?;
    let d = view::detail(app, &img)?.ok_or_else(not_found)?;
    let page = ImagePage {
        site: Site::new(app, req, ctx, base),
        d,
    };
    html(200, page.render())
}

fn certificate(app: &App) -> Res {
    let cert = app.served_cert.as_ref().ok_or_else(|| {
        ApiError::not_found("this server could not read its certificate file at start")
    })?;
    Ok(Response::new(200)
        .with_header("Content-Type", "application/x-pem-file")
        .with_header("Content-Disposition", "attachment; filename=\"imgsrv.crt\"")
        .with_header("Cache-Control", "no-cache")
        .with_body(Body::Bytes(cert.pem.clone().into_bytes())))
}

fn error_page(e: ApiError) -> Response {
    let page = ErrorPage {
        status: e.status,
        title: super::server::reason_phrase(e.status),
        detail: e.detail.clone(),
    };
    let mut r = html(e.status, page.render()).unwrap_or_else(|e| e.into_response());
    r.headers.extend(e.headers);
    r
}

fn html(status: u16, rendered: askama::Result<String>) -> Res {
    let body = rendered.map_err(|e| ApiError::internal("rendering a web page", e))?;
    Ok(Response::new(status)
        .with_header("Content-Type", "text/html; charset=utf-8")
        .with_header("Content-Security-Policy", CSP)
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header("Referrer-Policy", "no-referrer")
        // what a page shows depends on who asks
        .with_header("Cache-Control", "private, no-cache")
        .with_header("Vary", "Authorization")
        .with_body(Body::Bytes(body.into_bytes())))
}

/// `host:port` for the commands: the request's `Host` when it is a valid host
/// name or IP address (with the port a browser leaves out for 443), else the
/// first of the config's `[tls] names` (or `localhost`) with the listening port.
fn authority(req: &Request<'_>, config: &crate::config::Config) -> String {
    if let Some(a) = req.header("host").and_then(valid_authority) {
        return a;
    }
    let host = config
        .tls_names
        .iter()
        .find_map(|n| valid_authority(n))
        .and_then(|a| a.rsplit_once(':').map(|(h, _)| h.to_string()))
        .unwrap_or_else(|| "localhost".to_string());
    let port = match config.listen.port() {
        0 => 8443,
        p => p,
    };
    format!("{host}:{port}")
}

/// `Host` header value -> `host:port` (lower case), if it is a DNS name, an
/// IPv4 address or a bracketed IPv6 address, with an optional port.
fn valid_authority(h: &str) -> Option<String> {
    let h = h.trim().to_ascii_lowercase();
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0);
    let (host, p) = match h.strip_prefix('[') {
        Some(rest) => {
            let (ip, after) = rest.split_once(']')?;
            ip.parse::<std::net::Ipv6Addr>().ok()?;
            let p = match after {
                "" => 443,
                a => port(a.strip_prefix(':')?)?,
            };
            (format!("[{ip}]"), p)
        }
        None => {
            let (host, p) = match h.rsplit_once(':') {
                Some((host, p)) => (host, port(p)?),
                None => (h.as_str(), 443),
            };
            if host.parse::<std::net::Ipv4Addr>().is_err() && !dns_name(host) {
                return None;
            }
            (host.to_string(), p)
        }
    };
    Some(format!("{host}:{p}"))
}

fn dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_are_validated() {
        assert_eq!(
            valid_authority("Images.Example.org:8443").as_deref(),
            Some("images.example.org:8443")
        );
        assert_eq!(
            valid_authority("images.example.org").as_deref(),
            Some("images.example.org:443")
        );
        assert_eq!(
            valid_authority("127.0.0.1:1234").as_deref(),
            Some("127.0.0.1:1234")
        );
        assert_eq!(valid_authority("[::1]:8443").as_deref(), Some("[::1]:8443"));
        assert_eq!(valid_authority("[::1]").as_deref(), Some("[::1]:443"));
        for bad in [
            "",
            "a b",
            "<script>",
            "host:0",
            "host:99999",
            "host:",
            "-a.org",
            "a..org",
            "[::1",
            "[zz]:1",
            "a.org:1:2",
            "user@host",
            "\"x\"",
        ] {
            assert_eq!(valid_authority(bad), None, "{bad:?}");
        }
    }
}
