//! A worker serving one connection: reads the request head the front stage buffered,
//! runs the handler, writes the response, and serves pipelined requests that already
//! arrived. Then the connection goes back to the front stage (kept alive, or lingering
//! before its close).

use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use super::body::{body_framing, BodyReader, BodyState};
use super::head::{check_request, has_complete_head, header_tokens, read_head, split_target};
use super::head::{Head, HeadError};
use super::sock::{flush_tls, BufIo, Io, Limit, Sock, TlsIo};
use super::wire::{error_response, write_response, WriteError};
use super::{Handler, Parked, Shared, Slot, DRAIN_MAX, STREAM_BUF};
use crate::http::message::Request;

struct Conn {
    bio: BufIo,
    peer: SocketAddr,
    slot: Slot,
}

/// Serves the connection `p` (a complete request head is buffered) on a worker thread.
pub(super) fn serve(p: Parked, shared: &Shared, handler: &Handler, scratch: &mut Vec<u8>) {
    let Parked {
        stream,
        tls,
        buf,
        peer,
        closing: _,
        since,
        slot,
    } = p;
    if let Err(e) = stream.set_nonblocking(false) {
        log::debug!("{peer}: {e}");
        return;
    }
    let sock = Sock::new(
        stream,
        Limit::PerOp(shared.cfg.io_timeout),
        shared.cfg.min_rate,
    );
    let io = match tls {
        Some(mut conn) => {
            // a streamed response is written a stream buffer (256 KiB) at a time:
            // encrypted whole and sent in one writev, not in 64 KiB rounds
            conn.set_buffer_limit(Some(2 * super::STREAM_BUF));
            Io::Tls(Box::new(TlsIo { conn, sock }))
        }
        None => Io::Plain(sock),
    };
    let cap = shared.cfg.max_header_bytes.max(16 * 1024);
    let mut c = Conn {
        bio: BufIo::new(io, buf, cap),
        peer,
        slot,
    };
    if since.elapsed() > shared.cfg.header_timeout {
        // Every worker was busy for that long: say so rather than answer late.
        log::warn!(
            "{peer}: request waited {:?} for a worker; answering 503 (limits.max_workers is {})",
            since.elapsed(),
            shared.cfg.max_workers
        );
        let busy = error_response(503).with_header("Retry-After", "5");
        c.answer_and_close(shared, busy, Instant::now(), scratch);
        return;
    }
    loop {
        // `None`: the connection was closed (or handed back to linger).
        let Some(next) = one_request(c, shared, handler, scratch) else {
            return;
        };
        c = next;
        if let Err(e) = c.bio.take_tls_plaintext() {
            log::debug!("{peer}: {e}");
            c.close(shared, false, true);
            return;
        }
        if has_complete_head(c.bio.buffered()) {
            continue;
        }
        if shared.is_shutdown() {
            c.close(shared, false, false);
            return;
        }
        return shared.hand_back(c.park(false));
    }
}

/// Reads, handles and answers one request. `Some`: kept alive for the next one.
fn one_request(
    mut c: Conn,
    shared: &Shared,
    handler: &Handler,
    scratch: &mut Vec<u8>,
) -> Option<Conn> {
    let cfg = &shared.cfg;
    let secure = c.bio.io.is_secure();
    let peer = c.peer;
    let started = Instant::now();
    c.bio
        .io
        .sock()
        .set_limit(Limit::Deadline(started + cfg.header_timeout));
    let head = match read_head(&mut c.bio, cfg.max_header_bytes) {
        Ok(h) => h,
        Err(HeadError::Quiet) => return c.close(shared, false, false),
        Err(HeadError::Broken) => return c.close(shared, false, true),
        Err(HeadError::Timeout) => {
            log::debug!("{peer}: request head not complete within the header timeout");
            return c.reject(shared, 408, started, scratch);
        }
        Err(HeadError::Status(s)) => return c.reject(shared, s, started, scratch),
    };
    if let Err(s) = check_request(&head) {
        return c.reject(shared, s, started, scratch);
    }
    c.bio.io.sock().set_limit(Limit::PerOp(cfg.io_timeout));
    let (mut body_state, content_length) = match body_framing(&head.headers, head.minor) {
        Ok(x) => x,
        Err(s) => return c.reject(shared, s, started, scratch),
    };
    let mut keep_alive = wants_keep_alive(&head);
    if let Some(expect) = head.headers.iter().find(|(k, _)| k == "expect") {
        if !expect.1.eq_ignore_ascii_case("100-continue") {
            return c.reject(shared, 417, started, scratch);
        }
        let wants_body = !matches!(body_state, BodyState::Done);
        if head.minor >= 1 && wants_body && c.bio.buffered().is_empty() {
            if let Err(e) = c.bio.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n") {
                log::debug!("{peer}: writing 100 Continue: {e}");
                return c.close(shared, false, true);
            }
        }
    }

    let head_only = head.method == "HEAD";
    let (path, query) = split_target(&head.target);
    let method = head.method;
    if let Some(o) = &cfg.observer {
        o.request_started();
    }
    let (response, route) = {
        let body = BodyReader {
            bio: &mut c.bio,
            state: &mut body_state,
            max_trailers: cfg.max_header_bytes,
        };
        let mut req = Request {
            method: method.clone(),
            path: path.clone(),
            query,
            headers: head.headers,
            secure,
            peer,
            content_length,
            body: Box::new(body),
            route: super::OTHER_ROUTE,
        };
        let response = match panic::catch_unwind(AssertUnwindSafe(|| handler(&mut req))) {
            Ok(r) => r,
            Err(_) => {
                log::error!("{peer}: handler panicked on {method} {path}");
                keep_alive = false;
                error_response(500)
            }
        };
        (response, req.route)
    };

    // Decide whether the connection can be reused.
    match body_state {
        BodyState::Done => {}
        BodyState::Broken => keep_alive = false,
        BodyState::Length(left) if left > DRAIN_MAX => keep_alive = false,
        _ => {}
    }
    let close_tokens = response
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"));
    if close_tokens || shared.is_shutdown() {
        keep_alive = false;
    }

    let status = response.status;
    let written = write_response(&mut c.bio.io, scratch, response, head_only, keep_alive);
    let bytes = *written.as_ref().unwrap_or(&0);
    if let Some(o) = &cfg.observer {
        o.request_ended();
    }
    cfg.tell_answered(&method, route, status, bytes, started);
    access_log(peer, &method, &path, status, bytes, started, secure);
    match written {
        Ok(_) => {}
        Err(WriteError::Io(e)) => {
            log::debug!("{peer}: writing response: {e}");
            return c.close(shared, false, true);
        }
        Err(WriteError::Body(e)) => {
            log::warn!("{peer}: {method} {path}: response body failed: {e}; closing connection");
            return c.close(shared, false, true);
        }
    }
    if !keep_alive {
        return c.close(shared, true, false);
    }
    // An unread body is drained within header_timeout, or the connection closes (a
    // trickled body must not hold the worker).
    c.bio
        .io
        .sock()
        .set_limit(Limit::Deadline(Instant::now() + cfg.header_timeout));
    if !matches!(body_state, BodyState::Done)
        && !drain(&mut c, &mut body_state, cfg.max_header_bytes, scratch)
    {
        return c.close(shared, false, false);
    }
    Some(c)
}

/// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 only with
/// `Connection: keep-alive`.
fn wants_keep_alive(head: &Head) -> bool {
    let tokens = header_tokens(&head.headers, "connection");
    if head.minor >= 1 {
        !tokens.iter().any(|t| t == "close")
    } else {
        tokens.iter().any(|t| t == "keep-alive")
    }
}

impl Conn {
    /// Hands the connection back to the front stage: to wait for its next request, or
    /// (`closing`) to linger before the close.
    fn park(self, closing: bool) -> Parked {
        let (io, buf) = self.bio.into_parts();
        let (stream, tls) = match io {
            Io::Plain(s) => (s.stream, None),
            Io::Tls(t) => (t.sock.stream, Some(t.conn)),
        };
        // A closing connection lingers as a bare socket (its close_notify was sent).
        let (tls, buf) = if closing {
            (None, Vec::new())
        } else {
            (tls, buf)
        };
        Parked {
            stream,
            tls,
            buf,
            peer: self.peer,
            closing,
            since: Instant::now(),
            slot: self.slot,
        }
    }

    /// Ends the connection. After a final response (`linger`), half-closes and lets the
    /// front stage discard what the client still sends for a moment, so an unread
    /// request body does not make the kernel reset the connection before the client read
    /// the response. `abort`: no TLS close_notify (the response was incomplete).
    fn close(mut self, shared: &Shared, linger: bool, abort: bool) -> Option<Conn> {
        if let Io::Tls(t) = &mut self.bio.io {
            if !abort {
                t.conn.send_close_notify();
                t.sock.set_limit(Limit::PerOp(Duration::from_secs(1)));
                let _ = flush_tls(&mut t.conn, &mut t.sock);
            }
        }
        let _ = self.bio.io.sock().stream.shutdown(Shutdown::Write);
        if linger && !abort {
            shared.hand_back(self.park(true));
        }
        None
    }

    /// Answers an engine-detected error with `status` and closes the connection.
    fn reject(
        self,
        shared: &Shared,
        status: u16,
        started: Instant,
        scratch: &mut Vec<u8>,
    ) -> Option<Conn> {
        self.answer_and_close(shared, error_response(status), started, scratch)
    }

    /// Sends an engine-made response `resp` and closes the connection.
    fn answer_and_close(
        mut self,
        shared: &Shared,
        resp: crate::http::message::Response,
        started: Instant,
        scratch: &mut Vec<u8>,
    ) -> Option<Conn> {
        let (status, len) = (resp.status, resp.body.len());
        self.bio
            .io
            .sock()
            .set_limit(Limit::PerOp(Duration::from_secs(5)));
        let ok = write_response(&mut self.bio.io, scratch, resp, false, false).is_ok();
        let secure = self.bio.io.is_secure();
        let sent = if ok { len } else { 0 };
        shared
            .cfg
            .tell_answered("-", super::OTHER_ROUTE, status, sent, started);
        access_log(self.peer, "-", "-", status, sent, started, secure);
        self.close(shared, ok, false)
    }
}

/// Reads and discards up to [`DRAIN_MAX`] bytes of unread request body. True when the
/// body ended within that budget, so the connection can serve the next request.
fn drain(c: &mut Conn, state: &mut BodyState, max_trailers: usize, scratch: &mut Vec<u8>) -> bool {
    use std::io::Read;
    if scratch.len() < STREAM_BUF {
        scratch.resize(STREAM_BUF, 0);
    }
    let mut body = BodyReader {
        bio: &mut c.bio,
        state,
        max_trailers,
    };
    let mut total = 0u64;
    loop {
        let want = (DRAIN_MAX + 1 - total).min(scratch.len() as u64) as usize;
        match body.read(&mut scratch[..want]) {
            Ok(0) => return true,
            Ok(n) => {
                total += n as u64;
                if total > DRAIN_MAX {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

pub(super) fn access_log(
    peer: SocketAddr,
    method: &str,
    path: &str,
    status: u16,
    bytes: u64,
    started: Instant,
    secure: bool,
) {
    log::info!(
        target: "imgsrv::access",
        "{peer} {method} {path} {status} {bytes} {}ms secure={secure}",
        started.elapsed().as_millis()
    );
}
