//! A connection flood and a latency probe, shared by the flood test (`tests/flood.rs`)
//! and the benchmark client (`examples/flood.rs`, run by `contrib/bench/flood.sh`
//! against imgsrv and nginx).
//!
//! The flood holds `idle_tcp` TCP connections that never send a byte and `idle_tls`
//! connections that finish a TLS handshake and then send nothing; whatever the server
//! closes is opened again at once. Meanwhile `requests` normal requests (a fresh TLS
//! connection each, `GET path`, `Connection: close`) are sent one after another over
//! `duration`, each timed from connect to the end of its response.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

#[derive(Clone)]
pub struct FloodConfig {
    pub target: SocketAddr,
    /// TLS server name (and `Host`).
    pub server_name: String,
    pub tls: Arc<ClientConfig>,
    pub idle_tcp: usize,
    pub idle_tls: usize,
    pub requests: usize,
    /// The requests are spread over this long (after the flood is established).
    pub duration: Duration,
    pub path: String,
    /// A request not answered within this long counts as not answered.
    pub request_timeout: Duration,
    /// The server's processes (nginx: its workers), for their RSS and thread count
    /// (summed).
    pub server_pids: Vec<u32>,
}

#[derive(Debug, Default)]
pub struct FloodReport {
    /// Flood connections open (TCP connected, or TLS established) when the first
    /// request was sent, and the fewest open at any request.
    pub held_at_start: usize,
    pub held_min: usize,
    /// Flood connections opened in all (first opens and re-opens).
    pub opened: u64,
    /// Flood connections the server closed (and the flood re-opened).
    pub closed_by_server: u64,
    pub requests: usize,
    /// Latencies of the answered requests (status 2xx-4xx), in order.
    pub latencies: Vec<Duration>,
    pub failures: Vec<String>,
    /// Largest VmRSS seen at a request, and VmHWM at the end (KiB).
    pub server_rss_max_kib: Option<u64>,
    pub server_hwm_kib: Option<u64>,
    pub server_threads_max: Option<u64>,
}

impl FloodReport {
    pub fn answered(&self) -> usize {
        self.latencies.len()
    }

    /// The `q` quantile (0..=1) of the answered requests' latencies.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut v = self.latencies.clone();
        v.sort();
        if v.is_empty() {
            return None;
        }
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        Some(v[i])
    }

    /// One line: answered, p50, p90, max, what the flood held, the server's memory.
    pub fn summary(&self) -> String {
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
        };
        let kib = |k: Option<u64>| k.map_or("-".to_string(), |k| format!("{}", k / 1024));
        format!(
            "answered {}/{}  p50 {} ms  p90 {} ms  max {} ms  flood held {} (min {}), opened {}, closed by server {}  server RSS max {} MiB, HWM {} MiB, threads max {}",
            self.answered(),
            self.requests,
            ms(self.quantile(0.5)),
            ms(self.quantile(0.9)),
            ms(self.latencies.iter().max().copied()),
            self.held_at_start,
            self.held_min,
            self.opened,
            self.closed_by_server,
            kib(self.server_rss_max_kib),
            kib(self.server_hwm_kib),
            self.server_threads_max
                .map_or("-".to_string(), |t| t.to_string()),
        )
    }
}

/// `VmRSS`, `VmHWM` (KiB) and `Threads` of process `pid`.
pub fn proc_status(pid: u32) -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?, field("Threads:")?))
}

/// [`proc_status`] summed over `pids` (`None` if there are none or one is gone).
fn proc_status_sum(pids: &[u32]) -> Option<(u64, u64, u64)> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold((0, 0, 0), |acc, &pid| {
        let (r, h, t) = proc_status(pid)?;
        Some((acc.0 + r, acc.1 + h, acc.2 + t))
    })
}

struct Counters {
    held: AtomicUsize,
    opened: AtomicU64,
    closed_by_server: AtomicU64,
    stop: AtomicBool,
}

/// Runs the flood and the probe; returns when both are done.
pub fn run(cfg: &FloodConfig) -> FloodReport {
    let counters = Arc::new(Counters {
        held: AtomicUsize::new(0),
        opened: AtomicU64::new(0),
        closed_by_server: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let flood = {
        let (cfg, counters) = (cfg.clone(), counters.clone());
        thread::spawn(move || Flood::new(&cfg, counters).run())
    };
    // Established: everything open at once (or as much as the server lets be open).
    let total = cfg.idle_tcp + cfg.idle_tls;
    let settle = Instant::now() + Duration::from_secs(30);
    while counters.held.load(Ordering::SeqCst) < total && Instant::now() < settle {
        thread::sleep(Duration::from_millis(50));
    }
    let mut report = FloodReport {
        requests: cfg.requests,
        held_at_start: counters.held.load(Ordering::SeqCst),
        held_min: usize::MAX,
        ..FloodReport::default()
    };
    let interval = cfg.duration / cfg.requests.max(1) as u32;
    for i in 0..cfg.requests {
        let at = Instant::now();
        report.held_min = report.held_min.min(counters.held.load(Ordering::SeqCst));
        if let Some((rss, _, threads)) = proc_status_sum(&cfg.server_pids) {
            report.server_rss_max_kib = Some(report.server_rss_max_kib.unwrap_or(0).max(rss));
            report.server_threads_max = Some(report.server_threads_max.unwrap_or(0).max(threads));
        }
        match probe(cfg) {
            Ok(d) => report.latencies.push(d),
            Err(e) => report.failures.push(format!("request {i}: {e}")),
        }
        if let Some(left) = (at + interval).checked_duration_since(Instant::now()) {
            thread::sleep(left);
        }
    }
    if report.held_min == usize::MAX {
        report.held_min = report.held_at_start;
    }
    report.server_hwm_kib = proc_status_sum(&cfg.server_pids).map(|(_, h, _)| h);
    counters.stop.store(true, Ordering::SeqCst);
    if flood.join().is_err() {
        report.failures.push("the flood thread panicked".into());
    }
    report.opened = counters.opened.load(Ordering::SeqCst);
    report.closed_by_server = counters.closed_by_server.load(Ordering::SeqCst);
    report
}

/// One normal request on a new TLS connection: the time to its complete response.
fn probe(cfg: &FloodConfig) -> Result<Duration, String> {
    let t = Instant::now();
    let deadline = t + cfg.request_timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within {:?}", cfg.request_timeout))
    };
    let sock =
        TcpStream::connect_timeout(&cfg.target, left()?).map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(cfg.server_name.clone()).map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(cfg.tls.clone(), name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        cfg.path, cfg.server_name
    );
    tls.sock
        .set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    tls.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut resp = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        tls.sock
            .set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            // the server closed without close_notify after a complete response
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !resp.is_empty() => break,
            Err(e) => return Err(format!("read: {e} after {} bytes", resp.len())),
        }
    }
    let status = resp
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("no HTTP status in {} bytes", resp.len()))?;
    if !(200..500).contains(&status) {
        return Err(format!("status {status}"));
    }
    Ok(t.elapsed())
}

/// One flood connection.
struct Idle {
    stream: mio::net::TcpStream,
    tls: Option<ClientConnection>,
    held: bool,
}

struct Flood {
    cfg: FloodConfig,
    counters: Arc<Counters>,
    poll: Poll,
    slots: Vec<Option<Idle>>,
    reopen: Vec<usize>,
}

impl Flood {
    fn new(cfg: &FloodConfig, counters: Arc<Counters>) -> Flood {
        let total = cfg.idle_tcp + cfg.idle_tls;
        Flood {
            cfg: cfg.clone(),
            counters,
            poll: Poll::new().expect("poll"),
            slots: (0..total).map(|_| None).collect(),
            reopen: (0..total).collect(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(4096);
        while !self.counters.stop.load(Ordering::SeqCst) {
            for i in std::mem::take(&mut self.reopen) {
                self.open(i);
            }
            let _ = self.poll.poll(&mut events, Some(Duration::from_millis(10)));
            for ev in events.iter() {
                self.advance(ev.token().0);
            }
        }
    }

    fn open(&mut self, i: usize) {
        let tls = i >= self.cfg.idle_tcp;
        let Ok(mut stream) = mio::net::TcpStream::connect(self.cfg.target) else {
            self.reopen.push(i);
            return;
        };
        if self
            .poll
            .registry()
            .register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.reopen.push(i);
            return;
        }
        let tls = tls.then(|| {
            let name = ServerName::try_from(self.cfg.server_name.clone()).expect("name");
            ClientConnection::new(self.cfg.tls.clone(), name).expect("client connection")
        });
        self.counters.opened.fetch_add(1, Ordering::SeqCst);
        self.slots[i] = Some(Idle {
            stream,
            tls,
            held: false,
        });
    }

    fn advance(&mut self, i: usize) {
        let Some(c) = self.slots[i].as_mut() else {
            return;
        };
        let state = match &mut c.tls {
            None => plain_step(&mut c.stream),
            Some(tls) => tls_step(tls, &mut c.stream),
        };
        match state {
            State::Pending => {}
            State::Established => {
                if !c.held {
                    c.held = true;
                    self.counters.held.fetch_add(1, Ordering::SeqCst);
                }
            }
            State::Closed => {
                if c.held {
                    self.counters.held.fetch_sub(1, Ordering::SeqCst);
                }
                self.counters
                    .closed_by_server
                    .fetch_add(1, Ordering::SeqCst);
                if let Some(mut c) = self.slots[i].take() {
                    let _ = self.poll.registry().deregister(&mut c.stream);
                }
                self.reopen.push(i);
            }
        }
    }
}

enum State {
    /// Connecting or handshaking.
    Pending,
    Established,
    Closed,
}

/// Connected yet? `None`: failed.
fn connected(stream: &mio::net::TcpStream) -> Option<bool> {
    if let Ok(Some(_)) | Err(_) = stream.take_error() {
        return None;
    }
    match stream.peer_addr() {
        Ok(_) => Some(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Some(false),
        Err(_) => None,
    }
}

fn plain_step(stream: &mut mio::net::TcpStream) -> State {
    match connected(stream) {
        None => return State::Closed,
        Some(false) => return State::Pending,
        Some(true) => {}
    }
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return State::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return State::Established,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return State::Closed,
        }
    }
}

fn tls_step(tls: &mut ClientConnection, stream: &mut mio::net::TcpStream) -> State {
    match connected(stream) {
        None => return State::Closed,
        Some(false) => return State::Pending,
        Some(true) => {}
    }
    loop {
        while tls.wants_write() {
            match tls.write_tls(stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return State::Closed,
            }
            if !tls.wants_write() {
                break;
            }
        }
        match tls.read_tls(stream) {
            Ok(0) => return State::Closed,
            Ok(_) => {
                if tls.process_new_packets().is_err() {
                    return State::Closed;
                }
                let mut sink = [0u8; 4096];
                while matches!(tls.reader().read(&mut sink), Ok(n) if n > 0) {}
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return State::Closed,
        }
    }
    // (rustls may have more to send after what it just read: one more round)
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(_) => {}
            Err(_) => break,
        }
    }
    if tls.is_handshaking() {
        State::Pending
    } else {
        State::Established
    }
}
