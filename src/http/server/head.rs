//! Request heads: finding the end of a head in the read buffer, parsing it (httparse)
//! and the checks RFC 9112 asks of a server before any handler runs.

use std::io;

use super::sock::BufIo;
use super::MAX_HEADERS;

/// A parsed request head.
pub(super) struct Head {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<(String, String)>,
}

/// Why no request could be read.
pub(super) enum HeadError {
    /// Nothing (or only blank lines) arrived before EOF, timeout or shutdown: close quietly.
    Quiet,
    /// Part of a head arrived, then the deadline passed.
    Timeout,
    /// Part of a head arrived, then EOF or an I/O error.
    Broken,
    /// Answer with this status and close.
    Status(u16),
}

/// Methods this engine knows (RFC 9110 section 9, and PATCH from RFC 5789). Any other
/// gets `501 Not Implemented` before a handler runs; a known one that a route does not
/// take is the handler's `405` with `Allow`.
const KNOWN_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Number of blank line bytes (CR, LF) at the start of `data`: ignored before a request
/// line (RFC 9112 section 2.2).
pub(super) fn leading_blank(data: &[u8]) -> usize {
    data.iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

/// True when `data` holds a complete request head (after any blank lines).
pub(super) fn has_complete_head(data: &[u8]) -> bool {
    let data = &data[leading_blank(data)..];
    find_head_end(data, 0).is_some()
}

/// Finds the end of a request head (index after the blank line), scanning from `from`.
fn find_head_end(data: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(p) = data[i..].iter().position(|&b| b == b'\n') {
        let nl = i + p;
        match &data[nl + 1..] {
            [b'\n', ..] => return Some(nl + 2),
            [b'\r', b'\n', ..] => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// Reads one request head from `bio` (usually already buffered by the front stage).
pub(super) fn read_head(bio: &mut BufIo, max: usize) -> Result<Head, HeadError> {
    let mut scanned: usize = 0;
    let mut got_any = false;
    loop {
        let blank = leading_blank(bio.buffered());
        if blank > 0 {
            bio.consume(blank);
            scanned = 0;
        }
        let data = bio.buffered();
        if !data.is_empty() {
            got_any = true;
        }
        if let Some(end) = find_head_end(data, scanned.saturating_sub(2)) {
            if end > max {
                return Err(HeadError::Status(431));
            }
            let head = parse_head(&data[..end]);
            bio.consume(end);
            return head;
        }
        scanned = data.len();
        if scanned >= max {
            return Err(HeadError::Status(431));
        }
        match bio.fill() {
            Ok(0) => {
                return Err(if got_any {
                    HeadError::Broken
                } else {
                    HeadError::Quiet
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(if got_any {
                    HeadError::Timeout
                } else {
                    HeadError::Quiet
                });
            }
            Err(e) => {
                log::debug!("reading request head: {e}");
                return Err(if got_any {
                    HeadError::Broken
                } else {
                    HeadError::Quiet
                });
            }
        }
    }
}

fn parse_head(data: &[u8]) -> Result<Head, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(data) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Status(400)),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::Status(431)),
        Err(httparse::Error::Version) => {
            // A well-formed request line naming another HTTP version gets 505.
            let line = data
                .split(|&b| b == b'\n')
                .next()
                .unwrap_or(data)
                .trim_ascii();
            let version = line.rsplit(|&b| b == b' ').next().unwrap_or(line);
            let is_http_version = version.len() == 8
                && version.starts_with(b"HTTP/")
                && version[5].is_ascii_digit()
                && version[6] == b'.'
                && version[7].is_ascii_digit();
            return Err(HeadError::Status(if is_http_version { 505 } else { 400 }));
        }
        Err(_) => return Err(HeadError::Status(400)),
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Status(400));
    };
    let headers = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_string(),
            )
        })
        .collect();
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        minor,
        headers,
    })
}

/// Splits a request target into raw path and query. Absolute-form targets
/// (`http://host/p?q`) are reduced to their path.
pub(super) fn split_target(target: &str) -> (String, Option<String>) {
    let mut t = target;
    for scheme in ["http://", "https://"] {
        if t.len() > scheme.len() && t[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &t[scheme.len()..];
            t = rest.find(['/', '?']).map_or("/", |i| &rest[i..]);
            break;
        }
    }
    let (path, query) = match t.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (t, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    (path.to_string(), query)
}

/// Comma-separated tokens of all `name` headers, lower-cased.
pub(super) fn header_tokens(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// What RFC 9112 requires of a request before it is routed: a known method (else 501),
/// exactly one `Host` on HTTP/1.1 and at most one on HTTP/1.0, with a valid value
/// (else 400, section 3.2). Framing is checked separately ([`super::body::body_framing`]).
pub(super) fn check_request(head: &Head) -> Result<(), u16> {
    if !KNOWN_METHODS.contains(&head.method.as_str()) {
        return Err(501);
    }
    let hosts: Vec<&str> = head
        .headers
        .iter()
        .filter(|(k, _)| k == "host")
        .map(|(_, v)| v.as_str())
        .collect();
    match hosts.as_slice() {
        [] if head.minor == 0 => Ok(()),
        [host] if valid_host(host) => Ok(()),
        _ => Err(400),
    }
}

/// `uri-host [ ":" port ]` (RFC 3986): a reg-name, IPv4 or bracketed IP literal, or
/// empty (a target without authority). Nothing that could smuggle a path, user info
/// or white space.
fn valid_host(v: &str) -> bool {
    let reg_name = |h: &str| {
        h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b))
    };
    let port = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = v.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let literal = !ip.is_empty()
            && ip
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b".:v".contains(&b));
        return literal && (after.is_empty() || after.strip_prefix(':').is_some_and(port));
    }
    match v.split_once(':') {
        Some((h, p)) => reg_name(h) && port(p),
        None => reg_name(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_detection() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nrest", 0), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nrest", 0), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r", 0), None);
    }

    #[test]
    fn targets() {
        assert_eq!(
            split_target("/a/b?x=1&y"),
            ("/a/b".into(), Some("x=1&y".into()))
        );
        assert_eq!(split_target("/a%20b"), ("/a%20b".into(), None));
        assert_eq!(
            split_target("http://h:1/p?q"),
            ("/p".into(), Some("q".into()))
        );
        assert_eq!(split_target("HTTPS://h"), ("/".into(), None));
        assert_eq!(split_target("*"), ("*".into(), None));
    }

    fn head(method: &str, minor: u8, hosts: &[&str]) -> Head {
        Head {
            method: method.into(),
            target: "/".into(),
            minor,
            headers: hosts
                .iter()
                .map(|h| ("host".into(), h.to_string()))
                .collect(),
        }
    }

    #[test]
    fn rfc9112_host_and_method_rules() {
        for ok in [
            "localhost",
            "127.0.0.1:8443",
            "[::1]:8443",
            "[::1]",
            "a.example",
            "",
        ] {
            assert_eq!(check_request(&head("GET", 1, &[ok])), Ok(()), "{ok:?}");
        }
        // HTTP/1.1 needs exactly one Host; HTTP/1.0 at most one.
        assert_eq!(check_request(&head("GET", 1, &[])), Err(400));
        assert_eq!(check_request(&head("GET", 1, &["a", "a"])), Err(400));
        assert_eq!(check_request(&head("GET", 0, &[])), Ok(()));
        assert_eq!(check_request(&head("GET", 0, &["a", "b"])), Err(400));
        for bad in [
            "a b",
            "a/b",
            "user@host",
            "h:80x",
            "::1",
            "[::1",
            "h?x",
            "h\u{7f}",
        ] {
            assert_eq!(check_request(&head("GET", 1, &[bad])), Err(400), "{bad:?}");
        }
        for m in [
            "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "POST", "HEAD",
        ] {
            assert_eq!(check_request(&head(m, 1, &["h"])), Ok(()), "{m}");
        }
        for m in ["BREW", "get", "PROPFIND", "FOO"] {
            assert_eq!(check_request(&head(m, 1, &["h"])), Err(501), "{m}");
        }
    }
}
