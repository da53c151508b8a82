//! Writing responses: status line and headers (the engine's framing rules), bodies
//! (bytes, or streamed from a reader through one buffer), the reason phrases.

use std::io::{self, Read, Write};

use super::STREAM_BUF;
use crate::http::message::{Body, Response};

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        _ => match status / 100 {
            1 => "Informational",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            _ => "Server Error",
        },
    }
}

/// Current time as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn http_date() -> String {
    chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Serializes the status line and headers. See [`write_response`] for the rules.
pub(super) fn response_head(resp: &Response, head_only: bool, keep_alive: bool) -> Vec<u8> {
    let status = resp.status;
    let mut h = Vec::with_capacity(256);
    h.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", status, reason_phrase(status)).as_bytes());
    let mut handler_length: Option<&str> = None;
    for (k, v) in &resp.headers {
        if !is_token(k) || v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            log::warn!("dropping invalid response header {k:?}");
            continue;
        }
        match k.to_ascii_lowercase().as_str() {
            "content-length" => {
                handler_length.get_or_insert(v.as_str());
                continue;
            }
            "connection" | "date" | "transfer-encoding" | "keep-alive" => continue,
            _ => {}
        }
        h.extend_from_slice(k.as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(v.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    let length = if (100..200).contains(&status) || status == 204 {
        None
    } else if head_only || status == 304 {
        // A HEAD (or 304) response may describe a body it does not carry.
        match (handler_length, status) {
            (Some(v), _) => Some(v.to_string()),
            (None, 304) => None,
            (None, _) => Some(resp.body.len().to_string()),
        }
    } else {
        Some(resp.body.len().to_string())
    };
    if let Some(len) = length {
        h.extend_from_slice(format!("Content-Length: {len}\r\n").as_bytes());
    }
    h.extend_from_slice(format!("Date: {}\r\n", http_date()).as_bytes());
    h.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    h
}

/// Why writing a response failed.
pub(super) enum WriteError {
    /// The socket failed.
    Io(io::Error),
    /// The body reader failed or ended before its declared length.
    Body(io::Error),
}

/// Writes `resp`. The engine sets `Content-Length` to the body length (a handler's own
/// value is ignored, except on HEAD and 304 responses where it is kept), `Date` and
/// `Connection`; 1xx and 204 responses carry no length. HEAD, 1xx, 204 and 304 responses
/// carry no body. Returns the number of body bytes sent.
pub(super) fn write_response(
    io: &mut impl Write,
    scratch: &mut Vec<u8>,
    resp: Response,
    head_only: bool,
    keep_alive: bool,
) -> Result<u64, WriteError> {
    let mut resp = resp;
    if !(200..=999).contains(&resp.status) {
        log::error!(
            "handler returned invalid status {}; sending 500",
            resp.status
        );
        resp = error_response(500);
    }
    let status = resp.status;
    let head = response_head(&resp, head_only, keep_alive);
    let send_body = !head_only && !(100..200).contains(&status) && status != 204 && status != 304;
    let body = if send_body { resp.body } else { Body::Empty };
    let small = |b: &[u8]| head.len() + b.len() <= STREAM_BUF;
    match body {
        Body::Empty => {
            io.write_all(&head).map_err(WriteError::Io)?;
            Ok(0)
        }
        Body::Bytes(b) => write_bytes(io, scratch, &head, &b, small(&b)),
        Body::Shared(b) => write_bytes(io, scratch, &head, &b, small(&b)),
        Body::Reader { mut reader, len } => {
            if scratch.len() < STREAM_BUF {
                scratch.resize(STREAM_BUF, 0);
            }
            let mut filled = 0;
            if head.len() <= scratch.len() / 2 {
                scratch[..head.len()].copy_from_slice(&head);
                filled = head.len();
            } else {
                io.write_all(&head).map_err(WriteError::Io)?;
            }
            let mut left = len;
            while left > 0 {
                let room = ((scratch.len() - filled) as u64).min(left) as usize;
                let n = match reader.read(&mut scratch[filled..filled + room]) {
                    Ok(0) => {
                        // Send what we have; the caller closes without completing the body.
                        let _ = io.write_all(&scratch[..filled]);
                        return Err(WriteError::Body(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("body reader ended {left} bytes early"),
                        )));
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = io.write_all(&scratch[..filled]);
                        return Err(WriteError::Body(e));
                    }
                };
                filled += n;
                left -= n as u64;
                if filled == scratch.len() || left == 0 {
                    io.write_all(&scratch[..filled]).map_err(WriteError::Io)?;
                    filled = 0;
                }
            }
            if filled > 0 {
                io.write_all(&scratch[..filled]).map_err(WriteError::Io)?;
            }
            io.flush().map_err(WriteError::Io)?;
            Ok(len)
        }
    }
}

fn write_bytes(
    io: &mut impl Write,
    scratch: &mut Vec<u8>,
    head: &[u8],
    body: &[u8],
    coalesce: bool,
) -> Result<u64, WriteError> {
    if coalesce && !body.is_empty() {
        // One write (one TLS record or TCP segment train) for head and body.
        scratch.clear();
        scratch.extend_from_slice(head);
        scratch.extend_from_slice(body);
        let r = io.write_all(scratch);
        scratch.clear();
        r.map_err(WriteError::Io)?;
    } else {
        io.write_all(head).map_err(WriteError::Io)?;
        io.write_all(body).map_err(WriteError::Io)?;
    }
    Ok(body.len() as u64)
}

/// A minimal engine-generated response (errors before a handler ran).
pub(super) fn error_response(status: u16) -> Response {
    let body = format!("{} {}\n", status, reason_phrase(status));
    Response::new(status)
        .with_header("Content-Type", "text/plain; charset=utf-8")
        .with_body(Body::Bytes(body.into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads() {
        let r = Response::new(200)
            .with_header("Content-Length", "999")
            .with_header("X-Bad", "a\r\nInjected: 1")
            .with_header("Connection", "close")
            .with_body(Body::Bytes(b"abc".to_vec()));
        let h = String::from_utf8(response_head(&r, false, true)).expect("utf8");
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(h.contains("Content-Length: 3\r\n"));
        assert!(!h.contains("999") && !h.contains("Injected"));
        assert!(h.ends_with("Connection: keep-alive\r\n\r\n"));
        // HEAD keeps the handler's length.
        let h = String::from_utf8(response_head(&r, true, false)).expect("utf8");
        assert!(h.contains("Content-Length: 999\r\n") && !h.contains("Content-Length: 3"));
        let h = String::from_utf8(response_head(&Response::new(204), false, false)).expect("utf8");
        assert!(h.starts_with("HTTP/1.1 204 No Content\r\n") && !h.contains("Content-Length"));
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        let d = http_date();
        assert_eq!(d.len(), 29, "{d}");
        assert!(d.ends_with(" GMT"));
    }
}
