//! The front stage: one thread, an epoll readiness loop (mio, edge-triggered: every
//! ready socket is read until it would block), owning every connection that is not in
//! a request. See the module documentation of [`super`] for why.
//!
//! A connection here is in one [`Phase`], each with a deadline kept in one ordered set:
//! `New` (waiting for the first byte, `handshake_timeout`), `Handshake` (TLS, the same
//! deadline), `Head` (gathering a request head; `idle` while none of it has arrived:
//! `header_timeout` after a handshake, `keepalive_timeout` between requests; a partial
//! head must be complete within `header_timeout` of its first byte), `Linger` (response
//! sent, write side shut, discarding what the client still sends). A complete head sends
//! the connection to a worker. At a deadline: a partial head gets `408`, anything else
//! is closed. Under pressure the connection nearest its deadline is closed first:
//! legitimate clients send their request right after connecting, so they are served
//! long before a flood's sockets reach the front of that order.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use rustls::ServerConnection;

use super::conn::access_log;
use super::head::{has_complete_head, leading_blank};
use super::pool::Pool;
use super::sock::{RecordSniffer, SniffingReader};
use super::wire::{error_response, response_head};
use super::{HandshakeFailure, Parked, Shared, Slot, LINGER, LINGER_MAX_BYTES, TLS_SEND_LIMIT};

const LISTENER: Token = Token(0);
pub(super) const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// After accept fails for lack of file descriptors with nothing left to close, retry
/// after this long (the listener stays readable; edge-triggered, it would not wake us).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Connections accepted per turn of the loop at most.
const ACCEPT_BATCH: usize = 256;
/// Read size on the front stage (head bytes, discarded linger bytes).
const READ_CHUNK: usize = 16 * 1024;

enum Phase {
    New,
    Handshake(Box<RecordSniffer>),
    Head { idle: bool },
    Linger { discarded: usize },
}

struct Entry {
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Box<ServerConnection>>,
    buf: Vec<u8>,
    phase: Phase,
    deadline: Instant,
    slot: Slot,
}

/// What a connection needs after it made what progress it could.
enum Step {
    Wait,
    /// A complete request head: to a worker.
    Ready,
    /// Answer this status, then linger and close.
    Reject(u16),
    Close,
}

pub(super) struct Front {
    poll: mio::Poll,
    listener: TcpListener,
    shared: Arc<Shared>,
    pool: Pool,
    max_open: usize,
    open: Arc<AtomicUsize>,
    conns: HashMap<usize, Entry>,
    deadlines: BTreeSet<(Instant, usize)>,
    next_token: usize,
    accept_retry: Option<Instant>,
    accept_warned: Option<Instant>,
}

impl Front {
    pub fn new(
        poll: mio::Poll,
        listener: TcpListener,
        shared: Arc<Shared>,
        pool: Pool,
        max_open: usize,
    ) -> Front {
        Front {
            poll,
            listener,
            shared,
            pool,
            max_open,
            open: Arc::new(AtomicUsize::new(0)),
            conns: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_token: FIRST_CONN,
            accept_retry: None,
            accept_warned: None,
        }
    }

    /// Runs until shutdown; then closes every connection it holds.
    pub fn run(mut self) -> io::Result<()> {
        let fd = self.listener.as_raw_fd();
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), LISTENER, Interest::READABLE)?;
        let mut events = Events::with_capacity(1024);
        while !self.shared.is_shutdown() {
            let timeout = self.next_wakeup().map(|t| {
                // Round up: waking a hair early would poll again with a zero timeout.
                t.saturating_duration_since(Instant::now()) + Duration::from_millis(1)
            });
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => self.take_returns(),
                    Token(t) => self.advance(t),
                }
            }
            if self.accept_retry.is_some_and(|t| t <= Instant::now()) {
                self.accept_retry = None;
                self.accept();
            }
            self.expire(Instant::now());
            debug_assert_eq!(self.deadlines.len(), self.conns.len());
        }
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        for (_, e) in self.conns.drain() {
            close_quietly(e);
        }
        Ok(())
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let d = self.deadlines.first().map(|(t, _)| *t);
        match (d, self.accept_retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Accepts what is pending, [`ACCEPT_BATCH`] at most per turn so that a stream of new
    /// connections cannot starve the ones already here (the rest on the next turn).
    fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) => match e.raw_os_error() {
                    _ if e.kind() == io::ErrorKind::WouldBlock => return,
                    Some(libc::EMFILE | libc::ENFILE) => {
                        // Out of descriptors: make room if we can, else retry later
                        // rather than spin on a listener that stays readable.
                        if !self.evict_one() {
                            self.accept_failed(&e);
                            return;
                        }
                    }
                    // the client went away, or a transient network error: next one
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM)
                    | Some(libc::ENETDOWN | libc::ENONET | libc::EHOSTUNREACH)
                    | Some(libc::ENETUNREACH | libc::EHOSTDOWN | libc::EOPNOTSUPP) => {}
                    _ => {
                        // ENOBUFS, ENOMEM, ...: closing a client would not help
                        self.accept_failed(&e);
                        return;
                    }
                },
            }
        }
        // More may be waiting; edge-triggered, the listener will not say so again.
        self.accept_retry = Some(Instant::now());
    }

    fn accept_failed(&mut self, e: &io::Error) {
        let now = Instant::now();
        if self
            .accept_warned
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
        {
            log::warn!("accept failed: {e} (retrying every {ACCEPT_RETRY:?})");
            self.accept_warned = Some(now);
        }
        self.accept_retry = Some(now + ACCEPT_RETRY);
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        if self.open.load(Ordering::SeqCst) >= self.max_open && !self.evict_one() {
            log::debug!("connection limit reached, closing connection from {peer}");
            return;
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let entry = Entry {
            stream,
            peer,
            tls: None,
            buf: Vec::new(),
            phase: Phase::New,
            deadline: Instant::now() + self.shared.cfg.handshake_timeout,
            slot: Slot::new(&self.open),
        };
        self.insert(entry);
    }

    /// Registers `e` and makes what progress it can at once.
    fn insert(&mut self, e: Entry) {
        let token = self.next_token;
        self.next_token += 1;
        let fd = e.stream.as_raw_fd();
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(err) = self
            .poll
            .registry()
            .register(&mut SourceFd(&fd), Token(token), interest)
        {
            log::warn!("{}: cannot watch the connection: {err}", e.peer);
            return;
        }
        self.deadlines.insert((e.deadline, token));
        self.conns.insert(token, e);
        self.advance(token);
    }

    /// Closes the waiting connection nearest its deadline. False if there is none.
    fn evict_one(&mut self) -> bool {
        let Some(&(_, token)) = self.deadlines.first() else {
            return false;
        };
        if let Some(e) = self.remove(token) {
            log::debug!("{}: closed to make room for a new connection", e.peer);
            if matches!(e.phase, Phase::Handshake(_)) {
                self.shared
                    .cfg
                    .tell_handshake_failed(HandshakeFailure::Evicted);
            }
            close_quietly(e);
        }
        true
    }

    fn remove(&mut self, token: usize) -> Option<Entry> {
        let e = self.conns.remove(&token)?;
        self.deadlines.remove(&(e.deadline, token));
        let fd = e.stream.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        Some(e)
    }

    /// Connections the workers are done with.
    fn take_returns(&mut self) {
        let returned = std::mem::take(
            &mut *self
                .shared
                .returns
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let (keepalive, header) = (
            self.shared.cfg.keepalive_timeout,
            self.shared.cfg.header_timeout,
        );
        let now = Instant::now();
        for p in returned {
            let (phase, deadline) = if p.closing {
                (Phase::Linger { discarded: 0 }, now + LINGER)
            } else if p.buf.is_empty() {
                (Phase::Head { idle: true }, now + keepalive)
            } else {
                (Phase::Head { idle: false }, now + header)
            };
            if p.stream.set_nonblocking(true).is_ok() {
                self.insert(Entry {
                    stream: p.stream,
                    peer: p.peer,
                    tls: p.tls,
                    buf: p.buf,
                    phase,
                    deadline,
                    slot: p.slot,
                });
            }
        }
    }

    /// Drives connection `token` as far as its socket allows.
    fn advance(&mut self, token: usize) {
        let cfg = &self.shared.cfg;
        let Some(e) = self.conns.get_mut(&token) else {
            return;
        };
        let before = e.deadline;
        let step = e.step(cfg);
        if e.deadline != before {
            self.deadlines.remove(&(before, token));
            self.deadlines.insert((e.deadline, token));
        }
        match step {
            Step::Wait => {}
            Step::Ready => {
                if let Some(e) = self.remove(token) {
                    self.pool.submit(Parked {
                        stream: e.stream,
                        tls: e.tls,
                        buf: e.buf,
                        peer: e.peer,
                        closing: false,
                        since: Instant::now(),
                        slot: e.slot,
                    });
                }
            }
            Step::Reject(status) => self.reject(token, status),
            Step::Close => {
                self.remove(token);
            }
        }
    }

    /// Answers `status` (best effort: one non-blocking write of a small response), shuts
    /// the write side and lingers.
    fn reject(&mut self, token: usize, status: u16) {
        let Some(mut e) = self.remove(token) else {
            return;
        };
        let resp = error_response(status);
        let len = resp.body.len();
        let mut bytes = response_head(&resp, false, false);
        if let crate::http::message::Body::Bytes(b) = &resp.body {
            bytes.extend_from_slice(b);
        }
        let sent = match &mut e.tls {
            Some(tls) => {
                let ok = tls.writer().write_all(&bytes).is_ok();
                tls.send_close_notify();
                ok && write_tls_nonblocking(tls, &mut e.stream).is_ok() && !tls.wants_write()
            }
            None => matches!(e.stream.write(&bytes), Ok(n) if n == bytes.len()),
        };
        let started = Instant::now();
        let body_bytes = if sent { len } else { 0 };
        self.shared
            .cfg
            .tell_answered("-", super::OTHER_ROUTE, status, body_bytes, started);
        access_log(
            e.peer,
            "-",
            "-",
            status,
            body_bytes,
            started,
            e.tls.is_some(),
        );
        let _ = e.stream.shutdown(Shutdown::Write);
        // what lingers is the bare socket
        e.tls = None;
        e.buf = Vec::new();
        e.phase = Phase::Linger { discarded: 0 };
        e.deadline = Instant::now() + LINGER;
        self.insert(e);
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(t, token)) = self.deadlines.first() {
            if t > now {
                return;
            }
            let partial_head = matches!(
                self.conns.get(&token).map(|e| &e.phase),
                Some(Phase::Head { idle: false })
            );
            if partial_head {
                if let Some(e) = self.conns.get(&token) {
                    log::debug!(
                        "{}: request head not complete within the header timeout",
                        e.peer
                    );
                }
                self.reject(token, 408);
            } else if let Some(e) = self.remove(token) {
                if matches!(e.phase, Phase::Handshake(_)) {
                    self.shared
                        .cfg
                        .tell_handshake_failed(HandshakeFailure::Timeout);
                }
                close_quietly(e);
            } else {
                self.deadlines.remove(&(t, token));
            }
        }
    }
}

/// Closes a connection that is between requests or not yet in one; a TLS session gets
/// its close_notify (best effort, non-blocking).
fn close_quietly(mut e: Entry) {
    if let (Some(tls), Phase::Head { .. }) = (&mut e.tls, &e.phase) {
        tls.send_close_notify();
        let _ = write_tls_nonblocking(tls, &mut e.stream);
    }
}

/// Appends to a head buffer that never holds more than `max` bytes: grown to what it
/// needs (doubling, but never past `max`), so a partial head costs its size, not twice.
fn append(buf: &mut Vec<u8>, data: &[u8], max: usize) {
    let need = buf.len() + data.len();
    if need > buf.capacity() {
        let cap = (buf.capacity() * 2).clamp(need, max.max(need));
        buf.reserve_exact(cap - buf.len());
    }
    buf.extend_from_slice(data);
}

/// Writes what rustls wants to send until the socket would block.
fn write_tls_nonblocking(tls: &mut ServerConnection, stream: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Entry {
    fn step(&mut self, cfg: &super::ServerConfig) -> Step {
        loop {
            match &mut self.phase {
                Phase::New => {
                    let mut first = [0u8; 1];
                    match self.stream.peek(&mut first) {
                        Ok(0) => return Step::Close,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => return Step::Close,
                    }
                    match (&cfg.tls, first[0]) {
                        (Some(tls), 0x16) => match ServerConnection::new(tls.clone()) {
                            Ok(conn) => {
                                self.tls = Some(Box::new(conn));
                                self.phase = Phase::Handshake(Box::default());
                            }
                            Err(e) => {
                                log::error!("TLS session: {e}");
                                return Step::Close;
                            }
                        },
                        _ => {
                            // (idle until a byte that is not a blank line arrives)
                            self.phase = Phase::Head { idle: true };
                            self.deadline = Instant::now() + cfg.header_timeout;
                        }
                    }
                }
                Phase::Handshake(_) => match self.handshake() {
                    Ok(true) => {
                        if let Some(tls) = &mut self.tls {
                            tls.set_buffer_limit(Some(TLS_SEND_LIMIT));
                        }
                        self.phase = Phase::Head { idle: true };
                        self.deadline = Instant::now() + cfg.header_timeout;
                    }
                    Ok(false) => return Step::Wait,
                    Err(e) => {
                        log::debug!("{}: TLS handshake failed: {e}", self.peer);
                        cfg.tell_handshake_failed(HandshakeFailure::Error);
                        let _ = self.stream.shutdown(Shutdown::Both);
                        return Step::Close;
                    }
                },
                Phase::Head { .. } => return self.gather_head(cfg),
                Phase::Linger { .. } => return self.linger(),
            }
        }
    }

    /// Advances the TLS handshake; true once it is complete. Any alert, EOF or TLS error
    /// ends it (a correct client sends no alert during a handshake; rustls ignores a
    /// warning-level close_notify in a TLS 1.2 handshake, see [`RecordSniffer`]).
    fn handshake(&mut self) -> io::Result<bool> {
        let (Some(tls), Phase::Handshake(sniffer)) = (&mut self.tls, &mut self.phase) else {
            return Err(io::Error::other("not in a TLS handshake"));
        };
        let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "EOF during TLS handshake");
        while tls.is_handshaking() {
            let mut reader = SniffingReader {
                inner: &mut self.stream,
                sniffer,
            };
            match tls.read_tls(&mut reader) {
                Ok(0) => return Err(eof()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if sniffer.saw_alert {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "alert received during TLS handshake",
                ));
            }
            match tls.process_new_packets() {
                Ok(state) if state.peer_has_closed() => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "close_notify during TLS handshake",
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    // Best effort: tell the client why (the alert rustls queued).
                    let _ = write_tls_nonblocking(tls, &mut self.stream);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
            write_tls_nonblocking(tls, &mut self.stream)?;
        }
        write_tls_nonblocking(tls, &mut self.stream)?;
        Ok(!tls.is_handshaking())
    }

    /// Reads what has arrived of a request head (at most `max_header_bytes`).
    fn gather_head(&mut self, cfg: &super::ServerConfig) -> Step {
        let max = cfg.max_header_bytes;
        let eof = match self.read_available(max) {
            Ok(eof) => eof,
            Err(e) => {
                log::debug!("{}: reading a request head: {e}", self.peer);
                return Step::Close;
            }
        };
        let blank = leading_blank(&self.buf);
        if blank > 0 {
            self.buf.drain(..blank);
        }
        if let Phase::Head { idle } = &mut self.phase {
            if *idle && !self.buf.is_empty() {
                *idle = false;
                self.deadline = Instant::now() + cfg.header_timeout;
            }
        }
        if has_complete_head(&self.buf) {
            Step::Ready
        } else if self.buf.len() >= max {
            Step::Reject(431)
        } else if eof {
            Step::Close
        } else {
            Step::Wait
        }
    }

    /// Appends what the socket (through TLS, if any) has to `buf`, up to `max` bytes.
    /// True at EOF (or TLS close_notify).
    fn read_available(&mut self, max: usize) -> io::Result<bool> {
        let mut chunk = [0u8; READ_CHUNK];
        let Some(tls) = &mut self.tls else {
            while self.buf.len() < max {
                let want = (max - self.buf.len()).min(READ_CHUNK);
                match self.stream.read(&mut chunk[..want]) {
                    Ok(0) => return Ok(true),
                    Ok(n) => append(&mut self.buf, &chunk[..n], max),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(false);
        };
        loop {
            // Decrypted bytes first, then more records from the socket.
            while self.buf.len() < max {
                let want = (max - self.buf.len()).min(READ_CHUNK);
                match tls.reader().read(&mut chunk[..want]) {
                    Ok(0) => return Ok(true),
                    Ok(n) => append(&mut self.buf, &chunk[..n], max),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(true),
                    Err(e) => return Err(e),
                }
            }
            if self.buf.len() >= max {
                return Ok(false);
            }
            match tls.read_tls(&mut self.stream) {
                Ok(0) => return Ok(true),
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        let _ = write_tls_nonblocking(tls, &mut self.stream);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Session tickets after the handshake, alerts.
        write_tls_nonblocking(tls, &mut self.stream)?;
        Ok(false)
    }

    /// Discards what the client still sends after the final response.
    fn linger(&mut self) -> Step {
        let Phase::Linger { discarded } = &mut self.phase else {
            return Step::Close;
        };
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Step::Close,
                Ok(n) => {
                    *discarded += n;
                    if *discarded > LINGER_MAX_BYTES {
                        return Step::Close;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
    }
}
