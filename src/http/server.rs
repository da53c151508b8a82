//! HTTP/1.1 + TLS connection engine.
//!
//! One accept thread hands every connection to its own thread (bounded by
//! [`ServerConfig::max_connections`]); the accept thread never reads from or writes to a
//! client, so one silent client cannot stall the others. Each connection peeks its first
//! byte: `0x16` (a TLS handshake record) with TLS configured is terminated with rustls,
//! anything else is served as plain HTTP with [`Request::secure`] false (the routes decide
//! what plain HTTP may do, see docs/api.md "Plain HTTP"). Requests are parsed with
//! httparse and handed to the [`Handler`]; responses are framed with `Content-Length`.
//!
//! Why not tiny_http: its 0.12 `ssl-rustls` feature pulls rustls 0.20.9
//! (RUSTSEC-2024-0336: a client sending close_notify during the handshake makes a blocking
//! server spin forever), its `ssl-openssl` feature does the TLS handshake on the accept
//! thread (one silent client stalls everyone), and it cannot take a custom stream. So we
//! terminate TLS with rustls 0.23 ourselves, driving the handshake by hand under a hard
//! deadline, and parse HTTP/1.1 with httparse.
//!
//! Every blocking socket operation is bounded: the TLS handshake by `handshake_timeout`
//! (overall), the request head by `header_timeout` (overall, against slowloris), body
//! reads and response writes by `io_timeout` (per operation), the idle wait between
//! keep-alive requests by `keepalive_timeout`. No loop retries without having made
//! progress on the socket, so a misbehaving peer cannot make a thread spin.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustls::ServerConnection;

use super::message::{Body, Request, Response};

/// Engine settings. `Default` listens on `127.0.0.1:0` without TLS.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `None`: plain HTTP only.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Deadline for the whole TLS handshake (and for the first byte of a connection).
    pub handshake_timeout: Duration,
    /// Deadline for receiving a complete request head (slowloris).
    pub header_timeout: Duration,
    /// Per read/write timeout while reading request bodies and writing responses.
    pub io_timeout: Duration,
    /// Idle wait for the next request on a kept-alive connection.
    pub keepalive_timeout: Duration,
    /// Beyond this many open connections, new connections are closed at once.
    pub max_connections: usize,
    /// A request head larger than this gets `431`.
    pub max_header_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(15),
            max_connections: 1024,
            max_header_bytes: 32 * 1024,
        }
    }
}

/// The route dispatcher called once per request.
pub type Handler = Arc<dyn Fn(&mut Request<'_>) -> Response + Send + Sync>;

/// Size of the per-connection buffer used to stream `Body::Reader` responses and to
/// drain unread request bodies.
const STREAM_BUF: usize = 256 * 1024;
/// Unread request body the engine drains to keep a connection alive.
const DRAIN_MAX: u64 = 1024 * 1024;
/// Maximum number of request header fields.
const MAX_HEADERS: usize = 128;
/// Maximum length of a chunk-size line in a chunked request body.
const MAX_CHUNK_LINE: usize = 4096;
/// After sending a final response on a connection we close, read (and discard) what
/// the client still sends for this long, so the close does not turn into a reset that
/// destroys the response before the client read it.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 1024 * 1024;
/// How long `run` waits for in-flight requests after a shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// rustls send-buffer limit: larger than one `STREAM_BUF` write so a chunk is
/// encrypted in one go (rustls fragments it into 16 KiB records).
const TLS_SEND_LIMIT: usize = STREAM_BUF + 64 * 1024;

struct ShutdownInner {
    flag: AtomicBool,
    /// Becomes (and stays) readable once `tx` was written: every `poll` including it
    /// wakes up, so idle connections and the accept loop notice a shutdown at once.
    rx: UnixStream,
    tx: UnixStream,
}

/// Stops a running [`Server`]: the accept loop ends, idle keep-alive connections
/// close, requests in flight finish (with `Connection: close`) and `run` returns.
#[derive(Clone)]
pub struct ShutdownHandle {
    inner: Arc<ShutdownInner>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        if !self.inner.flag.swap(true, Ordering::SeqCst) {
            let _ = (&self.inner.tx).write(&[1]);
        }
    }

    pub fn is_shutdown(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }
}

pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    cfg: ServerConfig,
    shutdown: Arc<ShutdownInner>,
}

/// State shared by the accept loop and the connection threads.
struct Shared {
    cfg: ServerConfig,
    shutdown: Arc<ShutdownInner>,
    active: Mutex<usize>,
    idle: Condvar,
}

impl Shared {
    fn try_acquire(&self) -> bool {
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if *n >= self.cfg.max_connections {
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self) {
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    fn is_shutdown(&self) -> bool {
        self.shutdown.flag.load(Ordering::SeqCst)
    }
}

/// Releases a connection slot when the connection thread ends (even by panic).
struct SlotGuard(Arc<Shared>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Server {
    pub fn bind(cfg: ServerConfig) -> io::Result<Server> {
        let listener = TcpListener::bind(cfg.listen)?;
        // Non-blocking so a connection that vanished between poll and accept cannot
        // block the accept loop; accepted sockets are set back to blocking.
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        let shutdown = Arc::new(ShutdownInner {
            flag: AtomicBool::new(false),
            rx,
            tx,
        });
        Ok(Server {
            listener,
            local_addr,
            cfg,
            shutdown,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            inner: self.shutdown.clone(),
        }
    }

    /// Serves until [`ShutdownHandle::shutdown`] is called. After the accept loop ends,
    /// waits a few seconds at most for requests in flight.
    pub fn run(self, handler: Handler) -> io::Result<()> {
        let shared = Arc::new(Shared {
            cfg: self.cfg,
            shutdown: self.shutdown,
            active: Mutex::new(0),
            idle: Condvar::new(),
        });
        let lfd = self.listener.as_raw_fd();
        let sfd = shared.shutdown.rx.as_raw_fd();
        while !shared.is_shutdown() {
            let mut fds = [pollfd(lfd), pollfd(sfd)];
            poll(&mut fds, None)?;
            if shared.is_shutdown() || fds[1].revents != 0 {
                break;
            }
            if fds[0].revents == 0 {
                continue;
            }
            let (stream, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) => {
                    match e.kind() {
                        io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset => {}
                        _ => {
                            // EMFILE/ENFILE/ENOBUFS: back off instead of spinning on a
                            // listener that stays readable.
                            log::warn!("accept failed: {e}");
                            thread::sleep(Duration::from_millis(50));
                        }
                    }
                    continue;
                }
            };
            if !shared.try_acquire() {
                log::debug!("connection limit reached, closing connection from {peer}");
                drop(stream);
                continue;
            }
            let conn_shared = shared.clone();
            let conn_handler = handler.clone();
            let spawned = thread::Builder::new()
                .name("imgsrv-conn".into())
                .spawn(move || {
                    let guard = SlotGuard(conn_shared);
                    handle_connection(stream, peer, &guard.0, &conn_handler);
                });
            if let Err(e) = spawned {
                log::error!("cannot start connection thread: {e}");
                shared.release();
            }
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut n = shared.active.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "shutdown: {} connection(s) still busy, not waiting longer",
                    *n
                );
                break;
            }
            n = shared
                .idle
                .wait_timeout(n, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// poll(2) helpers

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// poll(2) with EINTR handling; `None` waits forever. Returns the number of ready fds.
fn poll(fds: &mut [libc::pollfd], deadline: Option<Instant>) -> io::Result<usize> {
    loop {
        let timeout_ms: libc::c_int = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so we never wake just before the deadline and poll again.
                let ms = left.as_micros().div_ceil(1000);
                ms.min(i32::MAX as u128) as libc::c_int
            }
        };
        for f in fds.iter_mut() {
            f.revents = 0;
        }
        // SAFETY: fds is a valid, exclusively borrowed slice of pollfd structures.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

enum Wait {
    Ready,
    Timeout,
    Shutdown,
}

/// Waits until `fd` is readable (or hung up), the deadline passes, or shutdown starts.
fn wait_readable(fd: RawFd, shared: &Shared, deadline: Instant) -> Wait {
    let mut fds = [pollfd(fd), pollfd(shared.shutdown.rx.as_raw_fd())];
    match poll(&mut fds, Some(deadline)) {
        Err(e) => {
            log::debug!("poll failed: {e}");
            Wait::Timeout
        }
        Ok(_) if fds[1].revents != 0 || shared.is_shutdown() => Wait::Shutdown,
        Ok(_) if fds[0].revents != 0 => Wait::Ready,
        Ok(_) => Wait::Timeout,
    }
}

// ---------------------------------------------------------------------------------------
// Socket with deadlines

#[derive(Clone, Copy, PartialEq)]
enum Limit {
    /// Each read or write may block this long.
    PerOp(Duration),
    /// All reads and writes must finish before this instant.
    Deadline(Instant),
}

/// A TCP stream whose reads and writes are bounded by a [`Limit`]. Timeouts surface as
/// `ErrorKind::TimedOut`.
struct Sock {
    stream: TcpStream,
    limit: Limit,
    read_to: Option<Duration>,
    write_to: Option<Duration>,
}

impl Sock {
    fn new(stream: TcpStream, limit: Limit) -> Sock {
        Sock {
            stream,
            limit,
            read_to: None,
            write_to: None,
        }
    }

    fn set_limit(&mut self, limit: Limit) {
        self.limit = limit;
    }

    fn op_timeout(&self) -> io::Result<Duration> {
        match self.limit {
            Limit::PerOp(d) => Ok(d.max(Duration::from_millis(1))),
            Limit::Deadline(t) => {
                let left = t.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
                } else {
                    Ok(left.max(Duration::from_millis(1)))
                }
            }
        }
    }

    /// One write under the current limit, retried on EINTR.
    fn write_with(
        &mut self,
        mut op: impl FnMut(&mut TcpStream) -> io::Result<usize>,
    ) -> io::Result<usize> {
        loop {
            let d = self.op_timeout()?;
            if self.write_to != Some(d) {
                self.stream.set_write_timeout(Some(d))?;
                self.write_to = Some(d);
            }
            match op(&mut self.stream) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map_err(timeout_kind),
            }
        }
    }
}

fn timeout_kind(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "socket timeout")
    } else {
        e
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let d = self.op_timeout()?;
            if self.read_to != Some(d) {
                self.stream.set_read_timeout(Some(d))?;
                self.read_to = Some(d);
            }
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map_err(timeout_kind),
            }
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_with(|s| s.write(buf))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.write_with(|s| s.write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// TLS

/// Watches the raw bytes of the handshake for TLS record headers and notes any alert
/// record. rustls ignores a warning-level close_notify during a TLS 1.2 handshake (and
/// rustls 0.20 spun on one, RUSTSEC-2024-0336); a correct client never sends an alert
/// while the handshake is still running, so we close the connection on any alert.
#[derive(Default)]
struct RecordSniffer {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
    saw_alert: bool,
}

impl RecordSniffer {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            self.header[self.header_len] = data[0];
            self.header_len += 1;
            data = &data[1..];
            if self.header_len == self.header.len() {
                self.header_len = 0;
                if self.header[0] == 0x15 {
                    self.saw_alert = true;
                }
                self.body_left = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
            }
        }
    }
}

struct SniffingReader<'a> {
    sock: &'a mut Sock,
    sniffer: &'a mut RecordSniffer,
}

impl Read for SniffingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.sniffer.feed(&buf[..n]);
        Ok(n)
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Writes out everything rustls wants to send.
fn flush_tls(conn: &mut ServerConnection, sock: &mut Sock) -> io::Result<()> {
    while conn.wants_write() {
        if conn.write_tls(sock)? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// Runs the server side of the TLS handshake. Every socket operation is bounded by
/// `deadline`; each loop iteration reads at least one byte or fails, so the loop cannot
/// spin. EOF, an alert, any TLS error or the deadline end the handshake with an error.
fn tls_handshake(
    sock: &mut Sock,
    cfg: Arc<rustls::ServerConfig>,
    deadline: Instant,
) -> io::Result<ServerConnection> {
    sock.set_limit(Limit::Deadline(deadline));
    let mut conn = ServerConnection::new(cfg).map_err(tls_err)?;
    let mut sniffer = RecordSniffer::default();
    loop {
        flush_tls(&mut conn, sock)?;
        if !conn.is_handshaking() {
            return Ok(conn);
        }
        if !conn.wants_read() {
            return Err(io::Error::other("TLS handshake stalled"));
        }
        let n = conn.read_tls(&mut SniffingReader {
            sock,
            sniffer: &mut sniffer,
        })?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF during TLS handshake",
            ));
        }
        if sniffer.saw_alert {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "alert received during TLS handshake",
            ));
        }
        match conn.process_new_packets() {
            Ok(state) if state.peer_has_closed() => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "close_notify during TLS handshake",
                ));
            }
            Ok(_) => {}
            Err(e) => {
                // Best effort: tell the client why (the alert rustls queued).
                let _ = flush_tls(&mut conn, sock);
                return Err(tls_err(e));
            }
        }
    }
}

/// An established TLS session over a [`Sock`].
struct TlsIo {
    conn: ServerConnection,
    sock: Sock,
}

impl TlsIo {
    /// True when decrypted bytes (or a close) are waiting without reading the socket.
    fn has_pending_input(&mut self) -> bool {
        match self.conn.process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            Err(_) => true,
        }
    }
}

impl Read for TlsIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                // TCP EOF without close_notify: HTTP framing detects truncation itself.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            flush_tls(&mut self.conn, &mut self.sock)?;
            // Reads at least one byte or reports EOF (seen by the reader above) or fails.
            self.conn.read_tls(&mut self.sock)?;
            if let Err(e) = self.conn.process_new_packets() {
                let _ = flush_tls(&mut self.conn, &mut self.sock);
                return Err(tls_err(e));
            }
        }
    }
}

impl Write for TlsIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        flush_tls(&mut self.conn, &mut self.sock)?;
        let n = self.conn.writer().write(buf)?;
        flush_tls(&mut self.conn, &mut self.sock)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.writer().flush()?;
        flush_tls(&mut self.conn, &mut self.sock)
    }
}

// ---------------------------------------------------------------------------------------
// Connection I/O

enum Io {
    Plain(Sock),
    Tls(Box<TlsIo>),
}

impl Io {
    fn sock(&mut self) -> &mut Sock {
        match self {
            Io::Plain(s) => s,
            Io::Tls(t) => &mut t.sock,
        }
    }

    fn is_secure(&self) -> bool {
        matches!(self, Io::Tls(_))
    }
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.read(buf),
            Io::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.write(buf),
            Io::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Io::Plain(s) => s.flush(),
            Io::Tls(t) => t.flush(),
        }
    }
}

/// Connection I/O with a read buffer (request heads, pipelined requests, body bytes
/// that arrived with the head).
struct BufIo {
    io: Io,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl BufIo {
    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes into the buffer (compacting it first if needed); 0 at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "read buffer full",
                ));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.io.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Reads into `out` from the buffer first, then from the connection.
    fn read_into(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.start == self.end {
            if out.len() >= self.buf.len() {
                return self.io.read(out);
            }
            if self.fill()? == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.consume(n);
        Ok(n)
    }

    fn has_pending_input(&mut self) -> bool {
        if self.start < self.end {
            return true;
        }
        match &mut self.io {
            Io::Plain(_) => false,
            Io::Tls(t) => t.has_pending_input(),
        }
    }

    /// Calls `f` with the next line (without CR LF) and consumes it.
    fn with_line<T>(
        &mut self,
        max: usize,
        f: impl FnOnce(&[u8]) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut scanned = 0;
        loop {
            let data = self.buffered();
            if let Some(i) = data[scanned..].iter().position(|&b| b == b'\n') {
                let i = scanned + i;
                let mut line = &data[..i];
                if let [rest @ .., b'\r'] = line {
                    line = rest;
                }
                let r = f(line);
                self.consume(i + 1);
                return r;
            }
            scanned = data.len();
            if scanned >= max {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated request body",
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Request bodies

enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
}

enum BodyState {
    Length(u64),
    Chunked(ChunkState),
    Done,
    /// A read failed (timeout, truncation, bad framing): the connection must close.
    Broken,
}

/// The request body reader handed to handlers as `Request::body`.
struct BodyReader<'a> {
    bio: &'a mut BufIo,
    state: &'a mut BodyState,
    max_trailers: usize,
}

fn bad_chunk(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let size = line.split(|&b| b == b';').next().unwrap_or(line);
    let size = size.trim_ascii();
    if size.is_empty() || size.len() > 16 || !size.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad_chunk("invalid chunk size"));
    }
    let s = std::str::from_utf8(size).map_err(|_| bad_chunk("invalid chunk size"))?;
    u64::from_str_radix(s, 16).map_err(|_| bad_chunk("invalid chunk size"))
}

impl BodyReader<'_> {
    fn read_inner(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.state {
                BodyState::Done => return Ok(0),
                BodyState::Broken => {
                    return Err(io::Error::other(
                        "request body unreadable after an earlier error",
                    ))
                }
                BodyState::Length(left) => {
                    let want = (out.len() as u64).min(*left) as usize;
                    let n = self.bio.read_into(&mut out[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "request body shorter than Content-Length",
                        ));
                    }
                    *left -= n as u64;
                    if *left == 0 {
                        *self.state = BodyState::Done;
                    }
                    return Ok(n);
                }
                BodyState::Chunked(ChunkState::Size) => {
                    let size = self.bio.with_line(MAX_CHUNK_LINE, parse_chunk_size)?;
                    *self.state = BodyState::Chunked(if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    });
                }
                BodyState::Chunked(ChunkState::Data(left)) => {
                    let want = (out.len() as u64).min(*left) as usize;
                    let n = self.bio.read_into(&mut out[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "truncated chunk",
                        ));
                    }
                    *left -= n as u64;
                    if *left == 0 {
                        *self.state = BodyState::Chunked(ChunkState::DataEnd);
                    }
                    return Ok(n);
                }
                BodyState::Chunked(ChunkState::DataEnd) => {
                    self.bio.with_line(MAX_CHUNK_LINE, |l| {
                        if l.is_empty() {
                            Ok(())
                        } else {
                            Err(bad_chunk("missing CRLF after chunk data"))
                        }
                    })?;
                    *self.state = BodyState::Chunked(ChunkState::Size);
                }
                BodyState::Chunked(ChunkState::Trailers(seen)) => {
                    let max = self.max_trailers.saturating_sub(*seen).max(1);
                    let len = self.bio.with_line(max, |l| Ok(l.len()))?;
                    *seen += len + 2;
                    if len == 0 {
                        *self.state = BodyState::Done;
                    } else if *seen > self.max_trailers {
                        return Err(bad_chunk("chunked trailers too large"));
                    }
                }
            }
        }
    }
}

impl Read for BodyReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let r = self.read_inner(out);
        if let Err(e) = &r {
            if e.kind() != io::ErrorKind::Interrupted {
                *self.state = BodyState::Broken;
            }
        }
        r
    }
}

// ---------------------------------------------------------------------------------------
// Request heads

/// A parsed request head.
struct Head {
    method: String,
    target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    minor: u8,
    headers: Vec<(String, String)>,
}

/// Why no request could be read.
enum HeadError {
    /// Nothing (or only blank lines) arrived before EOF, timeout or shutdown: close quietly.
    Quiet,
    /// Part of a head arrived, then the deadline passed.
    Timeout,
    /// Part of a head arrived, then EOF or an I/O error.
    Broken,
    /// Answer with this status and close.
    Status(u16),
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

fn read_head(bio: &mut BufIo, max: usize) -> Result<Head, HeadError> {
    let mut scanned: usize = 0;
    let mut got_any = false;
    loop {
        // Blank lines before a request line are ignored (RFC 9112 section 2.2).
        let blank = bio
            .buffered()
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
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
fn split_target(target: &str) -> (String, Option<String>) {
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
fn header_tokens(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Determines the body framing. Errors are statuses to answer before closing.
fn body_framing(headers: &[(String, String)]) -> Result<(BodyState, Option<u64>), u16> {
    let mut length: Option<u64> = None;
    for (k, v) in headers {
        if k != "content-length" {
            continue;
        }
        if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(400);
        }
        let n: u64 = v.parse().map_err(|_| 400u16)?;
        if length.is_some_and(|l| l != n) {
            return Err(400);
        }
        length = Some(n);
    }
    let codings = header_tokens(headers, "transfer-encoding");
    let has_te = headers.iter().any(|(k, _)| k == "transfer-encoding");
    if has_te {
        // Both framings at once is the classic request smuggling vector.
        if length.is_some() {
            return Err(400);
        }
        match codings.split_last() {
            Some((last, rest)) if last == "chunked" => {
                if rest.iter().any(|c| c == "chunked") {
                    return Err(400);
                }
                if !rest.is_empty() {
                    return Err(501);
                }
                return Ok((BodyState::Chunked(ChunkState::Size), None));
            }
            _ => return Err(400),
        }
    }
    match length {
        Some(0) => Ok((BodyState::Done, Some(0))),
        Some(n) => Ok((BodyState::Length(n), Some(n))),
        None => Ok((BodyState::Done, None)),
    }
}

// ---------------------------------------------------------------------------------------
// Responses

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
fn response_head(resp: &Response, head_only: bool, keep_alive: bool) -> Vec<u8> {
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
enum WriteError {
    /// The socket failed.
    Io(io::Error),
    /// The body reader failed or ended before its declared length.
    Body(io::Error),
}

/// Writes `resp`. The engine sets `Content-Length` to the body length (a handler's own
/// value is ignored, except on HEAD and 304 responses where it is kept), `Date` and
/// `Connection`; 1xx and 204 responses carry no length. HEAD, 1xx, 204 and 304 responses
/// carry no body. Returns the number of body bytes sent.
fn write_response(
    io: &mut Io,
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
    io: &mut Io,
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
fn error_response(status: u16) -> Response {
    let body = format!("{} {}\n", status, reason_phrase(status));
    Response::new(status)
        .with_header("Content-Type", "text/plain; charset=utf-8")
        .with_body(Body::Bytes(body.into_bytes()))
}

// ---------------------------------------------------------------------------------------
// Connection handling

struct Conn {
    bio: BufIo,
    /// The one streaming buffer of this connection (allocated on first use).
    scratch: Vec<u8>,
    peer: SocketAddr,
}

impl Conn {
    /// Closes the connection. After a final response (`linger`), half-closes and
    /// discards what the client still sends for a moment, so an unread request body
    /// does not make the kernel reset the connection before the client read the
    /// response. `abort`: no TLS close_notify (the response was incomplete).
    fn close(mut self, linger: bool, abort: bool) {
        if let Io::Tls(t) = &mut self.bio.io {
            if !abort {
                t.conn.send_close_notify();
                t.sock.set_limit(Limit::PerOp(Duration::from_secs(1)));
                let _ = flush_tls(&mut t.conn, &mut t.sock);
            }
        }
        let sock = self.bio.io.sock();
        let _ = sock.stream.shutdown(Shutdown::Write);
        if linger && !abort {
            sock.set_limit(Limit::Deadline(Instant::now() + LINGER));
            let mut buf = [0u8; 8192];
            let mut total = 0;
            while total < LINGER_MAX_BYTES {
                match sock.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        }
    }
}

fn access_log(
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

fn handle_connection(stream: TcpStream, peer: SocketAddr, shared: &Shared, handler: &Handler) {
    let cfg = &shared.cfg;
    let hs_deadline = Instant::now() + cfg.handshake_timeout;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    match wait_readable(stream.as_raw_fd(), shared, hs_deadline) {
        Wait::Ready => {}
        Wait::Timeout => {
            log::debug!("{peer}: nothing received within the handshake timeout");
            return;
        }
        Wait::Shutdown => return,
    }
    let mut first = [0u8; 1];
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    match stream.peek(&mut first) {
        Ok(1) => {}
        _ => return,
    }
    let mut sock = Sock::new(stream, Limit::PerOp(cfg.io_timeout));
    let io = match (&cfg.tls, first[0]) {
        (Some(tls), 0x16) => match tls_handshake(&mut sock, tls.clone(), hs_deadline) {
            Ok(mut conn) => {
                conn.set_buffer_limit(Some(TLS_SEND_LIMIT));
                Io::Tls(Box::new(TlsIo { conn, sock }))
            }
            Err(e) => {
                log::debug!("{peer}: TLS handshake failed: {e}");
                let _ = sock.stream.shutdown(Shutdown::Both);
                return;
            }
        },
        _ => Io::Plain(sock),
    };
    let bio = BufIo {
        io,
        buf: vec![0u8; cfg.max_header_bytes.max(16 * 1024)].into_boxed_slice(),
        start: 0,
        end: 0,
    };
    serve(
        Conn {
            bio,
            scratch: Vec::new(),
            peer,
        },
        shared,
        handler,
    );
}

/// Serves requests on one connection until it closes.
fn serve(mut c: Conn, shared: &Shared, handler: &Handler) {
    let cfg = &shared.cfg;
    let secure = c.bio.io.is_secure();
    let peer = c.peer;
    let mut first = true;
    loop {
        if !first && !c.bio.has_pending_input() {
            if shared.is_shutdown() {
                return c.close(false, false);
            }
            let deadline = Instant::now() + cfg.keepalive_timeout;
            let fd = c.bio.io.sock().stream.as_raw_fd();
            match wait_readable(fd, shared, deadline) {
                Wait::Ready => {}
                Wait::Timeout | Wait::Shutdown => return c.close(false, false),
            }
        }
        first = false;
        let started = Instant::now();
        c.bio
            .io
            .sock()
            .set_limit(Limit::Deadline(started + cfg.header_timeout));
        let head = match read_head(&mut c.bio, cfg.max_header_bytes) {
            Ok(h) => h,
            Err(HeadError::Quiet) => return c.close(false, false),
            Err(HeadError::Broken) => return c.close(false, true),
            Err(HeadError::Timeout) => {
                log::debug!("{peer}: request head not complete within the header timeout");
                return reject(c, 408, started, secure);
            }
            Err(HeadError::Status(s)) => return reject(c, s, started, secure),
        };
        c.bio.io.sock().set_limit(Limit::PerOp(cfg.io_timeout));

        let (mut body_state, content_length) = match body_framing(&head.headers) {
            Ok(x) => x,
            Err(s) => return reject(c, s, started, secure),
        };
        let conn_tokens = header_tokens(&head.headers, "connection");
        let mut keep_alive = if head.minor >= 1 {
            !conn_tokens.iter().any(|t| t == "close")
        } else {
            conn_tokens.iter().any(|t| t == "keep-alive")
        };
        if let Some(expect) = head
            .headers
            .iter()
            .find(|(k, _)| k == "expect")
            .map(|(_, v)| v)
        {
            if !expect.eq_ignore_ascii_case("100-continue") {
                return reject(c, 417, started, secure);
            }
            let wants_body = !matches!(body_state, BodyState::Done);
            if head.minor >= 1 && wants_body && c.bio.buffered().is_empty() {
                if let Err(e) = c.bio.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n") {
                    log::debug!("{peer}: writing 100 Continue: {e}");
                    return c.close(false, true);
                }
            }
        }

        let head_only = head.method == "HEAD";
        let (path, query) = split_target(&head.target);
        let method = head.method;
        let response = {
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
            };
            match panic::catch_unwind(AssertUnwindSafe(|| handler(&mut req))) {
                Ok(r) => r,
                Err(_) => {
                    log::error!("{peer}: handler panicked on {method} {path}");
                    keep_alive = false;
                    error_response(500)
                }
            }
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
        let written = write_response(
            &mut c.bio.io,
            &mut c.scratch,
            response,
            head_only,
            keep_alive,
        );
        let bytes = match &written {
            Ok(n) => *n,
            Err(_) => 0,
        };
        access_log(peer, &method, &path, status, bytes, started, secure);
        match written {
            Ok(_) => {}
            Err(WriteError::Io(e)) => {
                log::debug!("{peer}: writing response: {e}");
                return c.close(false, true);
            }
            Err(WriteError::Body(e)) => {
                log::warn!(
                    "{peer}: {method} {path}: response body failed: {e}; closing connection"
                );
                return c.close(false, true);
            }
        }
        if !keep_alive {
            return c.close(true, false);
        }
        if !matches!(body_state, BodyState::Done)
            && !drain(&mut c, &mut body_state, cfg.max_header_bytes)
        {
            return c.close(false, false);
        }
    }
}

/// Reads and discards up to [`DRAIN_MAX`] bytes of unread request body. True when the
/// body ended within that budget, so the connection can serve the next request.
fn drain(c: &mut Conn, state: &mut BodyState, max_trailers: usize) -> bool {
    if c.scratch.len() < STREAM_BUF {
        c.scratch.resize(STREAM_BUF, 0);
    }
    let mut body = BodyReader {
        bio: &mut c.bio,
        state,
        max_trailers,
    };
    let mut total = 0u64;
    loop {
        let want = (DRAIN_MAX + 1 - total).min(c.scratch.len() as u64) as usize;
        match body.read(&mut c.scratch[..want]) {
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

/// Answers an engine-detected error with `status` and closes the connection.
fn reject(mut c: Conn, status: u16, started: Instant, secure: bool) {
    let resp = error_response(status);
    let len = resp.body.len();
    c.bio
        .io
        .sock()
        .set_limit(Limit::PerOp(Duration::from_secs(5)));
    let ok = write_response(&mut c.bio.io, &mut c.scratch, resp, false, false).is_ok();
    access_log(
        c.peer,
        "-",
        "-",
        status,
        if ok { len } else { 0 },
        started,
        secure,
    );
    c.close(ok, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

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

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a").ok(), Some(26));
        assert_eq!(parse_chunk_size(b"FF ; name=value").ok(), Some(255));
        assert!(parse_chunk_size(b"").is_err());
        assert!(parse_chunk_size(b"-1").is_err());
        assert!(parse_chunk_size(b"0x10").is_err());
        assert!(parse_chunk_size(b"11111111111111111").is_err());
    }

    #[test]
    fn framing() {
        assert!(matches!(body_framing(&[]), Ok((BodyState::Done, None))));
        assert!(matches!(
            body_framing(&hdrs(&[("content-length", "12")])),
            Ok((BodyState::Length(12), Some(12)))
        ));
        assert!(matches!(
            body_framing(&hdrs(&[("content-length", "3"), ("content-length", "3")])),
            Ok((BodyState::Length(3), Some(3)))
        ));
        assert!(matches!(
            body_framing(&hdrs(&[("transfer-encoding", "Chunked")])),
            Ok((BodyState::Chunked(ChunkState::Size), None))
        ));
        for bad in [
            &[("content-length", "+3")][..],
            &[("content-length", "3, 3")],
            &[("content-length", "")],
            &[("content-length", "3"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "chunked, chunked")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "identity"),
            ],
        ] {
            assert_eq!(body_framing(&hdrs(bad)).err(), Some(400), "{bad:?}");
        }
        assert_eq!(
            body_framing(&hdrs(&[("transfer-encoding", "gzip, chunked")])).err(),
            Some(501)
        );
    }

    #[test]
    fn sniffer_finds_alert_records_across_reads() {
        let mut s = RecordSniffer::default();
        // A handshake record of 3 bytes, then an alert split across feeds.
        s.feed(&[0x16, 0x03, 0x01, 0x00, 0x03, 1, 2]);
        s.feed(&[3, 0x15, 0x03]);
        assert!(!s.saw_alert);
        s.feed(&[0x03, 0x00, 0x02, 0x01, 0x00]);
        assert!(s.saw_alert);
        let mut s = RecordSniffer::default();
        // Alert bytes inside a record body are not mistaken for a header.
        s.feed(&[
            0x16, 0x03, 0x01, 0x00, 0x02, 0x15, 0x15, 0x14, 0x03, 0x03, 0x00, 0x01, 0x01,
        ]);
        assert!(!s.saw_alert);
    }

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
