//! HTTP/1.1 + TLS connection engine.
//!
//! Two stages:
//!
//! * The **front stage** ([`front`]), one thread on an epoll readiness loop (mio), owns
//!   every connection that is not in the middle of a request: it accepts, tells TLS from
//!   plain HTTP by the first byte (`0x16` is a TLS handshake record), runs TLS handshakes
//!   (rustls, non-blocking), gathers request heads, holds kept-alive connections between
//!   requests and lingers over closing ones. A connection there costs its socket and a
//!   few hundred bytes (a TLS session a few KiB more), never a thread, so thousands of
//!   idle or half-open connections cost little. Each phase has a deadline (handshake,
//!   header, keep-alive timeouts); under pressure (at `max_connections`, or out of file
//!   descriptors) the connection closest to its deadline is closed to admit a new one.
//! * The **request workers** ([`pool`]), threads started on demand up to `max_workers`,
//!   get a connection once a complete request head is in its buffer, and run the
//!   [`Handler`] with blocking I/O bounded by deadlines ([`sock`]): handlers stay plain
//!   synchronous functions that read bodies and stream files. After the response, a
//!   pipelined request already received is served at once; otherwise the connection goes
//!   back to the front stage.
//!
//! Why: with a thread per connection (the first design), about 1,100 sockets that never
//! finish a handshake or a head held every slot for the whole handshake timeout and took
//! the server off the air (issue 7). A readiness front stage is what nginx does; doing it
//! only up to the request head keeps the handlers synchronous (the design card asks for
//! one small synchronous binary) and the engine small. Maintained server crates were
//! weighed: hyper and axum need an async runtime (tokio) around every handler;
//! tiny_http (0.12) pulls rustls 0.20.9 (RUSTSEC-2024-0336), does its OpenSSL handshake on
//! the accept thread and keeps a thread per connection; rouille sits on tiny_http.
//!
//! The engine parses HTTP/1.1 with httparse and enforces RFC 9112 before a handler runs
//! ([`head::check_request`], [`body::body_framing`]): one `Host` (400), no chunked body on
//! HTTP/1.0 (400), no smuggling framings (400), unknown methods 501. Responses are
//! framed with `Content-Length` ([`wire`]). Every blocking socket operation of a worker
//! is bounded (`io_timeout` per operation, `header_timeout` for a head that did not come
//! whole); no loop retries without progress, so a misbehaving peer cannot make a thread
//! spin.

mod body;
mod conn;
mod front;
mod head;
mod pool;
mod sock;
mod wire;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ServerConnection;

use super::message::{Request, Response};

pub use sock::MinRate;
pub use wire::{http_date, reason_phrase};

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
    /// Open connections at most (also bounded by the file descriptor limit). A new
    /// connection beyond it closes the waiting connection closest to its deadline, or,
    /// when every connection is in a request, is closed at once.
    pub max_connections: usize,
    /// Requests processed at once (worker threads, started on demand); further
    /// complete requests wait for a worker without holding one.
    pub max_workers: usize,
    /// A request head larger than this gets `431`.
    pub max_header_bytes: usize,
    /// While reading a body or writing a response, the peer must move at least this
    /// many bytes per second of waiting (measured over the window), else the
    /// connection closes: a trickle cannot hold a worker.
    pub min_rate: MinRate,
    /// Told about every request answered and every failed TLS handshake (metrics);
    /// `None`: nobody is.
    pub observer: Option<Arc<dyn Observer>>,
}

/// What the engine reports as it works, for metrics. Called on the engine's threads: keep
/// it cheap (counters, no I/O).
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// A handler starts on a request (a worker runs it).
    fn request_started(&self);
    /// That request's response was written (or writing it failed).
    fn request_ended(&self);
    /// A response went out: a handler's (after [`Observer::request_ended`]) or one the
    /// engine made itself before any handler ran (400, 408, 431, 501, a queue's 503...:
    /// route [`OTHER_ROUTE`]).
    fn answered(&self, a: &Answered<'_>);
    /// A TLS handshake did not complete.
    fn handshake_failed(&self, why: HandshakeFailure);
}

/// One answered request, as [`Observer::answered`] hears it.
#[derive(Debug)]
pub struct Answered<'a> {
    /// As sent (`-` when the engine answered before reading a method).
    pub method: &'a str,
    /// The route pattern the handler named ([`Request::route`]).
    pub route: &'static str,
    pub status: u16,
    /// Body bytes of a response written whole (0 when writing it failed).
    pub body_bytes: u64,
    /// From the request head's arrival at a worker to the end of the response.
    pub elapsed: Duration,
}

/// Why a TLS handshake did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// A protocol error, an alert from the client (e.g. it refused our certificate), or
    /// the client closing mid-handshake.
    Error,
    /// Not complete within `handshake_timeout`.
    Timeout,
    /// Closed to make room for a new connection (at `max_connections`).
    Evicted,
}

/// The route of requests no route matched, or that were answered before routing.
pub const OTHER_ROUTE: &str = "other";

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(15),
            max_connections: 16 * 1024,
            max_workers: 256,
            max_header_bytes: 32 * 1024,
            min_rate: MinRate {
                bytes_per_sec: 1024,
                window: Duration::from_secs(30),
            },
            observer: None,
        }
    }
}

impl ServerConfig {
    /// Tells the observer (if any) about a response that went out.
    fn tell_answered(
        &self,
        method: &str,
        route: &'static str,
        status: u16,
        body_bytes: u64,
        started: Instant,
    ) {
        if let Some(o) = &self.observer {
            o.answered(&Answered {
                method,
                route,
                status,
                body_bytes,
                elapsed: started.elapsed(),
            });
        }
    }

    fn tell_handshake_failed(&self, why: HandshakeFailure) {
        if let Some(o) = &self.observer {
            o.handshake_failed(why);
        }
    }
}

/// The route dispatcher called once per request.
pub type Handler = Arc<dyn Fn(&mut Request<'_>) -> Response + Send + Sync>;

/// Size of the per-worker buffer used to stream `Body::Reader` responses and to drain
/// unread request bodies.
const STREAM_BUF: usize = 256 * 1024;
/// Unread request body a worker drains to keep a connection alive.
const DRAIN_MAX: u64 = 1024 * 1024;
/// Maximum number of request header fields.
const MAX_HEADERS: usize = 128;
/// Maximum length of a chunk-size line in a chunked request body.
const MAX_CHUNK_LINE: usize = 4096;
/// After sending a final response on a connection we close, read (and discard) what
/// the client still sends for this long, so the close does not turn into a reset that
/// destroys the response before the client read it. Done by the front stage.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 1024 * 1024;
/// How long `run` waits for requests in flight after a shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// rustls send-buffer limit: larger than one `STREAM_BUF` write so a chunk is
/// encrypted in one go (rustls fragments it into 16 KiB records).
const TLS_SEND_LIMIT: usize = STREAM_BUF + 64 * 1024;
/// Pending connections the kernel queues for accept (nginx's default is 511).
const LISTEN_BACKLOG: libc::c_int = 4096;
/// File descriptors kept free for everything but client connections (catalog, blobs,
/// TLS files, outgoing mirror connections).
const FD_RESERVE: usize = 256;

/// Counts a connection as open until dropped (with its socket).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn new(open: &Arc<AtomicUsize>) -> Slot {
        open.fetch_add(1, Ordering::SeqCst);
        Slot(open.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection between two stages: handed by the front stage to a worker with a
/// complete request head in `buf`, or back by the worker to wait for the next request
/// (`buf`: what of it already arrived) or, `closing`, to linger before the close (then
/// `buf` is empty and `tls` gone: what lingers is the bare socket).
struct Parked {
    stream: TcpStream,
    tls: Option<Box<ServerConnection>>,
    buf: Vec<u8>,
    peer: SocketAddr,
    closing: bool,
    /// When it was handed over (a worker answers 503 to a request that waited in the
    /// queue longer than `header_timeout`).
    since: Instant,
    slot: Slot,
}

struct ShutdownInner {
    flag: AtomicBool,
    waker: mio::Waker,
}

/// Stops a running [`Server`]: the front stage stops accepting and closes the
/// connections it holds, requests in flight finish (with `Connection: close`) and `run`
/// returns.
#[derive(Clone)]
pub struct ShutdownHandle {
    inner: Arc<ShutdownInner>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        if !self.inner.flag.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.inner.waker.wake() {
                log::error!("waking the connection engine for shutdown: {e}");
            }
        }
    }

    pub fn is_shutdown(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }
}

/// State shared by the front stage and the workers.
struct Shared {
    cfg: ServerConfig,
    shutdown: Arc<ShutdownInner>,
    /// Connections handed back by workers, taken by the front stage when woken.
    returns: Mutex<Vec<Parked>>,
}

impl Shared {
    fn is_shutdown(&self) -> bool {
        self.shutdown.flag.load(Ordering::SeqCst)
    }

    /// Gives a connection back to the front stage (closed instead during shutdown).
    fn hand_back(&self, p: Parked) {
        if self.is_shutdown() {
            return;
        }
        self.returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p);
        if let Err(e) = self.shutdown.waker.wake() {
            log::error!("waking the front stage: {e}");
        }
    }
}

pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    cfg: ServerConfig,
    poll: mio::Poll,
    shutdown: Arc<ShutdownInner>,
    max_open: usize,
}

impl Server {
    pub fn bind(cfg: ServerConfig) -> io::Result<Server> {
        let listener = TcpListener::bind(cfg.listen)?;
        // std listens with a backlog of 128: a burst of connections (a flood re-opening
        // what timed out, many clients at once) would overflow it, and the kernel drops
        // SYNs that the clients resend only after a second. Listening again on a
        // listening socket sets a new backlog (Linux caps it at net.core.somaxconn).
        // SAFETY: listen(2) on the descriptor the listener owns.
        if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            log::warn!("setting the listen backlog: {}", io::Error::last_os_error());
        }
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), front::WAKER)?;
        let fds = raise_fd_limit();
        let max_open = cfg
            .max_connections
            .min(fds.saturating_sub(FD_RESERVE))
            .max(1);
        if max_open < cfg.max_connections {
            log::warn!(
                "the file descriptor limit ({fds}) allows {max_open} connections, not the \
                 configured {}; raise it (ulimit -n, LimitNOFILE=) to hold more",
                cfg.max_connections
            );
        }
        Ok(Server {
            listener,
            local_addr,
            cfg,
            poll,
            shutdown: Arc::new(ShutdownInner {
                flag: AtomicBool::new(false),
                waker,
            }),
            max_open,
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

    /// Serves until [`ShutdownHandle::shutdown`] is called, then waits a few seconds at
    /// most for requests in flight.
    pub fn run(self, handler: Handler) -> io::Result<()> {
        let shared = Arc::new(Shared {
            cfg: self.cfg,
            shutdown: self.shutdown,
            returns: Mutex::new(Vec::new()),
        });
        let work_shared = shared.clone();
        let pool = pool::Pool::new(
            shared.cfg.max_workers,
            Arc::new(move |p: Parked, scratch: &mut Vec<u8>| {
                conn::serve(p, &work_shared, &handler, scratch)
            }),
        );
        let front = front::Front::new(
            self.poll,
            self.listener,
            shared.clone(),
            pool.clone(),
            self.max_open,
        );
        let result = front.run();
        // (also when the front stage failed: workers then close instead of handing back)
        shared.shutdown.flag.store(true, Ordering::SeqCst);
        let left = pool.close(Instant::now() + SHUTDOWN_GRACE);
        if left > 0 {
            log::warn!("shutdown: {left} request(s) still busy, not waiting longer");
        }
        shared
            .returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        result
    }
}

/// Raises this process's soft file descriptor limit to the hard one (as Go and nginx's
/// `worker_rlimit_nofile` do; Debian's default soft limit of 1024 would cap the
/// connections long before memory does). Returns the soft limit now in force. (Also
/// what the flood client of the tests and benchmark calls for its own sockets.)
pub fn raise_fd_limit() -> usize {
    // SAFETY: getrlimit/setrlimit write/read the struct we own.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
        usize::try_from(rl.rlim_cur).unwrap_or(usize::MAX)
    }
}
