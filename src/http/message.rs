//! Request and response values exchanged between the connection engine
//! ([`super::server`]) and the route handlers ([`super::routes`]).
//!
//! Handlers are plain functions `(&App, &mut Request) -> Response`, so they can
//! be tested without sockets (build a [`Request`] with [`Request::for_test`]).

use std::io::{self, Read};
use std::net::SocketAddr;

/// One parsed HTTP/1.1 request. The body is a reader limited to the declared
/// `Content-Length` (or decoding `Transfer-Encoding: chunked`); a handler that
/// does not read it fully leaves the engine to drain or close the connection.
/// The body borrows the connection, so it lives only as long as the handler call.
pub struct Request<'a> {
    pub method: String,
    /// Raw path as sent (percent-encoded, no query string).
    pub path: String,
    /// Raw query string without the `?`, if any.
    pub query: Option<String>,
    /// Header names lower-cased, values as sent (trimmed).
    pub headers: Vec<(String, String)>,
    /// True when the request arrived over TLS.
    pub secure: bool,
    pub peer: SocketAddr,
    /// `Content-Length` when declared; `None` for chunked or no body.
    pub content_length: Option<u64>,
    pub body: Box<dyn Read + 'a>,
    /// The pattern of the route that took the request (`/v1/images/{name}`), set by the
    /// dispatcher for metrics labels; [`super::server::OTHER_ROUTE`] until then.
    pub route: &'static str,
}

impl<'a> Request<'a> {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A request for in-process handler tests.
    pub fn for_test(
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Self {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path_and_query.to_string(), None),
        };
        Request {
            method: method.to_string(),
            path,
            query,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect(),
            secure: true,
            peer: "127.0.0.1:1".parse().expect("static addr"),
            content_length: Some(body.len() as u64),
            body: Box::new(io::Cursor::new(body)),
            route: super::server::OTHER_ROUTE,
        }
    }
}

/// What a handler answers. The engine adds `Content-Length` (or chunked
/// framing), `Date` and `Connection` headers, and omits the body on HEAD.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

pub enum Body {
    Empty,
    Bytes(Vec<u8>),
    /// Shared immutable bytes (cached JSON documents).
    Shared(std::sync::Arc<[u8]>),
    /// Exactly `len` bytes read from `reader` (files, ranges). If the reader
    /// ends early the engine closes the connection instead of sending a
    /// short body under a full `Content-Length`.
    Reader {
        reader: Box<dyn Read + Send + 'static>,
        len: u64,
    },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::Shared(b) => b.len() as u64,
            Body::Reader { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Response {
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Empty,
        }
    }
    pub fn with_header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    pub fn with_body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Reads the whole body (tests).
    pub fn body_bytes(self) -> Vec<u8> {
        match self.body {
            Body::Empty => Vec::new(),
            Body::Bytes(b) => b,
            Body::Shared(b) => b.to_vec(),
            Body::Reader { mut reader, .. } => {
                let mut v = Vec::new();
                let _ = reader.read_to_end(&mut v);
                v
            }
        }
    }
}
