//! Error-to-status mapping (one place), problem+json bodies, JSON helpers,
//! and blob downloads with ranges and conditional requests.

use super::message::{Body, Request, Response};
use crate::cas::CasError;
use crate::catalog::CatalogError;
use crate::digest::Digest;
use crate::uploads::UploadError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Read;

pub const MAX_JSON_BODY: u64 = 1 << 20;

/// An error answer: status plus a short message for the client. 5xx details
/// are logged in full and replaced by a generic message.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub detail: String,
    pub headers: Vec<(String, String)>,
}

impl ApiError {
    pub fn new(status: u16, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
            headers: Vec::new(),
        }
    }
    pub fn bad_request(d: impl Into<String>) -> Self {
        Self::new(400, d)
    }
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(404, d)
    }
    pub fn precondition(d: impl Into<String>) -> Self {
        Self::new(412, d)
    }
    pub fn unauthorized() -> Self {
        let mut e = Self::new(401, "invalid bearer token");
        e.headers
            .push(("WWW-Authenticate".into(), "Bearer realm=\"imgsrv\"".into()));
        e
    }
    pub fn forbidden(action: &str) -> Self {
        Self::new(
            403,
            format!("principal is not authorized for action {action}"),
        )
    }
    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        log::error!("{context}: {e}");
        Self::new(500, "internal error; see the server log")
    }
    /// 507: `what` is full, for `reason`. The full error (with paths) goes to
    /// the log; the client hears what is full and what to do.
    pub fn insufficient_storage(what: &str, reason: &str, e: impl std::fmt::Display) -> Self {
        log::warn!("refused for lack of space (507): {e}");
        Self::new(
            507,
            format!(
                "{what} is full: {reason}. The request was not carried out: retry it once \
                 the server's operator has made free space on its data disk"
            ),
        )
    }
    pub fn with_header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }

    pub fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": "about:blank",
            "title": super::server::reason_phrase(self.status),
            "status": self.status,
            "detail": self.detail,
        });
        let mut r = Response::new(self.status)
            .with_header("Content-Type", "application/problem+json")
            .with_body(Body::Bytes(serde_json::to_vec(&body).unwrap_or_default()));
        r.headers.extend(self.headers);
        r
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NotFound(w) => ApiError::not_found(format!("{w} not found")),
            CatalogError::AlreadyExists(w) => ApiError::new(409, format!("{w} already exists")),
            CatalogError::Precondition(m) => ApiError::precondition(m),
            CatalogError::Conflict(m) => ApiError::new(409, m),
            CatalogError::Invalid(m) => ApiError::bad_request(m),
            CatalogError::Full(ref m) => {
                ApiError::insufficient_storage("the server's data disk", m, &e)
            }
            CatalogError::Unavailable(ref m) => {
                log::warn!("catalog unavailable (503): {m}");
                ApiError::new(
                    503,
                    "the catalog database is unavailable; retry in a few seconds",
                )
                .with_header("Retry-After", "5")
            }
            e @ CatalogError::Backend(_) => ApiError::internal("catalog", e),
        }
    }
}

impl From<CasError> for ApiError {
    fn from(e: CasError) -> Self {
        match e {
            CasError::Mismatch { .. } | CasError::Truncated { .. } | CasError::MissingPart(_) => {
                ApiError::precondition(e.to_string())
            }
            CasError::Invalid(m) => ApiError::bad_request(m),
            CasError::Full { ref reason, .. } => {
                ApiError::insufficient_storage("the server's blob store", reason, &e)
            }
            CasError::Unavailable {
                ref path,
                ref reason,
            } => {
                log::warn!("blob store unavailable (503): {path}: {reason}");
                ApiError::new(
                    503,
                    "the blob store cannot be reached; retry in a few seconds",
                )
                .with_header("Retry-After", "5")
            }
            e @ (CasError::NotFound(_) | CasError::Io { .. }) => {
                ApiError::internal("blob store", e)
            }
        }
    }
}

impl From<crate::download::ServeError> for ApiError {
    fn from(e: crate::download::ServeError) -> Self {
        match e {
            crate::download::ServeError::Unavailable(m) => {
                log::warn!("download refused (503): {m}");
                ApiError::new(503, m)
            }
            crate::download::ServeError::Store(e) => e.into(),
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::Invalid(m) => ApiError::bad_request(m),
            UploadError::Refused(m) => ApiError::precondition(m),
            UploadError::TooLarge(m) => ApiError::new(413, m),
            e @ UploadError::Truncated { .. } => {
                ApiError::bad_request(e.to_string()).with_header("Connection", "close")
            }
            UploadError::Catalog(e) => e.into(),
            UploadError::Store(e) => e.into(),
        }
    }
}

/// Dispatches a route on the request method:
/// `methods!(req, "/v1/images/{name}", m; "GET" => a, "PUT" => b)`.
/// The second argument names the route's pattern on the request ([`Request::route`]:
/// the bounded label of its metrics), written as docs/api.md writes the path.
/// `HEAD` runs the `GET` handler (the engine sends no body); a method the route does
/// not take is `405 Method Not Allowed` with `Allow` (RFC 9110 section 15.5.6). (The
/// engine answers `501` to methods it does not know at all.)
macro_rules! methods {
    ($req:expr, $route:expr, $m:expr; $($meth:literal => $handler:expr),+ $(,)?) => {{
        $req.route = $route;
        let m: &str = $m;
        match if m == "HEAD" { "GET" } else { m } {
            $($meth => $handler,)+
            _ => Err($crate::http::response::method_not_allowed(m, &[$($meth),+])),
        }
    }};
}
pub(crate) use methods;

/// `405` for `method` on a route that takes `allowed` (plus `HEAD` with `GET`).
pub fn method_not_allowed(method: &str, allowed: &[&str]) -> ApiError {
    let mut list: Vec<&str> = allowed.to_vec();
    if list.contains(&"GET") {
        list.push("HEAD");
    }
    let allow = list.join(", ");
    ApiError::new(
        405,
        format!("{method} is not allowed on this path; it takes {allow}"),
    )
    .with_header("Allow", allow)
}

pub fn json<T: Serialize>(status: u16, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(b) => Response::new(status)
            .with_header("Content-Type", "application/json")
            .with_body(Body::Bytes(b)),
        Err(e) => ApiError::internal("serializing response", e).into_response(),
    }
}

/// Reads a JSON body (≤ 1 MiB), refusing unknown fields (the target types say
/// `deny_unknown_fields`) and trailing data.
pub fn read_json<T: DeserializeOwned>(req: &mut Request<'_>) -> Result<T, ApiError> {
    let too_large = || ApiError::new(413, format!("JSON body larger than {MAX_JSON_BODY} bytes"));
    if req.content_length.is_some_and(|n| n > MAX_JSON_BODY) {
        return Err(too_large());
    }
    let mut buf = Vec::new();
    (&mut req.body)
        .take(MAX_JSON_BODY + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ApiError::bad_request(format!("reading request body: {e}")))?;
    if buf.len() as u64 > MAX_JSON_BODY {
        return Err(too_large());
    }
    serde_json::from_slice(&buf)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON request body: {e}")))
}

/// Byte range requested by a client.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    Full,
    Part { start: u64, end: u64 },
    Unsatisfiable,
}

/// Parses one `Range: bytes=…` against a blob of `size` bytes.
pub fn parse_range(header: Option<&str>, size: u64) -> RangeSpec {
    let Some(h) = header else {
        return RangeSpec::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeSpec::Unsatisfiable;
    };
    if spec.contains(',') || size == 0 {
        return RangeSpec::Unsatisfiable;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Unsatisfiable;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", n) => match num(n) {
            Some(0) | None => RangeSpec::Unsatisfiable,
            Some(n) => RangeSpec::Part {
                start: size.saturating_sub(n),
                end: size - 1,
            },
        },
        (s, "") => match num(s) {
            Some(s) if s < size => RangeSpec::Part {
                start: s,
                end: size - 1,
            },
            _ => RangeSpec::Unsatisfiable,
        },
        (s, e) => match (num(s), num(e)) {
            (Some(s), Some(e)) if s <= e && s < size => RangeSpec::Part {
                start: s,
                end: e.min(size - 1),
            },
            _ => RangeSpec::Unsatisfiable,
        },
    }
}

fn etag_matches(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

/// Streams a stored blob with ETag, conditional and single-range support.
pub fn serve_blob(
    app: &crate::app::App,
    req: &Request<'_>,
    digest: &Digest,
    size: u64,
    media_type: &str,
    public: bool,
) -> Result<Response, ApiError> {
    let etag = format!("\"{digest}\"");
    let cache = if public {
        "public, max-age=31536000, immutable"
    } else {
        "private, max-age=0"
    };
    let base = |status: u16| {
        Response::new(status)
            .with_header("ETag", etag.clone())
            .with_header("Accept-Ranges", "bytes")
            .with_header("Cache-Control", cache)
    };
    if let Some(inm) = req.header("if-none-match") {
        if etag_matches(inm, &etag) {
            return Ok(base(304));
        }
    }
    let mut range = parse_range(req.header("range"), size);
    if let Some(ir) = req.header("if-range") {
        if ir.trim() != etag {
            range = RangeSpec::Full;
        }
    }
    let (status, start, len, content_range) = match range {
        RangeSpec::Unsatisfiable => {
            return Err(
                ApiError::new(416, format!("range not satisfiable for {size} bytes"))
                    .with_header("Content-Range", format!("bytes */{size}")),
            )
        }
        RangeSpec::Full => (200, 0, size, None),
        RangeSpec::Part { start, end } => (
            206,
            start,
            end - start + 1,
            Some(format!("bytes {start}-{end}/{size}")),
        ),
    };
    let reader: Box<dyn Read + Send> = if req.method == "HEAD" {
        app.stored_for_download(digest, size)?;
        Box::new(std::io::empty())
    } else {
        app.open_download(digest, size, start, len)?
    };
    let mut r = base(status).with_header("Content-Type", media_type);
    if let Some(cr) = content_range {
        r = r.with_header("Content-Range", cr);
    }
    Ok(r.with_body(Body::Reader { reader, len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_catalog_answers_503_with_retry_after() {
        let e = ApiError::from(CatalogError::Unavailable(
            "cannot connect: Connection refused (os error 111)".into(),
        ));
        assert_eq!(e.status, 503);
        assert!(!e.detail.contains("os error"), "{}", e.detail);
        assert!(e.headers.iter().any(|(k, _)| k == "Retry-After"));
    }

    #[test]
    fn ranges() {
        use RangeSpec::*;
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(
            parse_range(Some("bytes=0-3"), 10),
            Part { start: 0, end: 3 }
        );
        assert_eq!(parse_range(Some("bytes=5-"), 10), Part { start: 5, end: 9 });
        assert_eq!(parse_range(Some("bytes=-3"), 10), Part { start: 7, end: 9 });
        assert_eq!(
            parse_range(Some("bytes=-30"), 10),
            Part { start: 0, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=8-100"), 10),
            Part { start: 8, end: 9 }
        );
        for bad in [
            "bytes=10-",
            "bytes=3-2",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=-0",
            "bytes=a-b",
            "bytes=-",
            "bytes=+1-2",
        ] {
            assert_eq!(parse_range(Some(bad), 10), Unsatisfiable, "{bad}");
        }
        assert_eq!(parse_range(Some("bytes=0-0"), 0), Unsatisfiable);
    }

    #[test]
    fn etags() {
        let e = "\"sha256:ab\"";
        assert!(etag_matches("\"sha256:ab\"", e));
        assert!(etag_matches("W/\"sha256:ab\", \"x\"", e));
        assert!(etag_matches("*", e));
        assert!(!etag_matches("\"sha256:ac\"", e));
    }
}
