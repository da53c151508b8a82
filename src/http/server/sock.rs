//! Blocking connection I/O for the request workers: a socket whose every operation is
//! bounded by a [`Limit`], TLS over it, and the read buffer requests are parsed from.
//! Also the TLS record sniffer the front stage uses during handshakes.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rustls::ServerConnection;

// ---------------------------------------------------------------------------------------
// Socket with deadlines

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Limit {
    /// Each read or write may block this long.
    PerOp(Duration),
    /// All reads and writes must finish before this instant.
    Deadline(Instant),
}

/// Under [`Limit::PerOp`] a peer must also keep a pace: for every `window` spent waiting
/// on it, at least `min_bytes` must move (Apache's `mod_reqtimeout` MinRate idea; the
/// server sets 1 KiB/s over 30 s, [`super::ServerConfig::min_rate`]). A client trickling
/// a body or reading a download a byte a minute would otherwise hold a worker as long as
/// it likes with a per-operation timeout alone. Only time blocked in the socket counts,
/// so a handler that computes for a minute before answering is not cut off.
#[derive(Clone, Copy, Debug)]
pub struct MinRate {
    pub bytes_per_sec: u64,
    pub window: Duration,
}

#[derive(Default)]
struct Pace {
    waited: Duration,
    bytes: u64,
}

/// A TCP stream whose reads and writes are bounded by a [`Limit`] (and a minimum pace).
/// Timeouts surface as `ErrorKind::TimedOut`.
pub(super) struct Sock {
    pub stream: TcpStream,
    limit: Limit,
    read_to: Option<Duration>,
    write_to: Option<Duration>,
    min_rate: MinRate,
    pace: Pace,
}

impl Sock {
    pub fn new(stream: TcpStream, limit: Limit, min_rate: MinRate) -> Sock {
        Sock {
            stream,
            limit,
            read_to: None,
            write_to: None,
            min_rate,
            pace: Pace::default(),
        }
    }

    pub fn set_limit(&mut self, limit: Limit) {
        self.limit = limit;
        self.pace = Pace::default();
    }

    /// Counts an operation that waited `waited` and moved `n` bytes against the pace.
    fn paced(&mut self, waited: Duration, n: usize) -> io::Result<usize> {
        if !matches!(self.limit, Limit::PerOp(_)) {
            return Ok(n);
        }
        self.pace.waited += waited;
        self.pace.bytes += n as u64;
        let MinRate {
            bytes_per_sec,
            window,
        } = self.min_rate;
        if self.pace.waited >= window {
            let slow = (self.pace.bytes as f64) < bytes_per_sec as f64 * window.as_secs_f64();
            self.pace = Pace::default();
            if slow {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("peer slower than {bytes_per_sec} bytes/s"),
                ));
            }
        }
        Ok(n)
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

    /// One read or write (`write`) under the current limit and pace, retried on EINTR.
    fn op(
        &mut self,
        write: bool,
        mut op: impl FnMut(&mut TcpStream) -> io::Result<usize>,
    ) -> io::Result<usize> {
        loop {
            let d = Some(self.op_timeout()?);
            let set = if write {
                &mut self.write_to
            } else {
                &mut self.read_to
            };
            if *set != d {
                if write {
                    self.stream.set_write_timeout(d)?;
                } else {
                    self.stream.set_read_timeout(d)?;
                }
                *set = d;
            }
            let t = Instant::now();
            match op(&mut self.stream) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(n) => return self.paced(t.elapsed(), n),
                Err(e) => return Err(timeout_kind(e)),
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
        self.op(false, |s| s.read(buf))
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.op(true, |s| s.write(buf))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.op(true, |s| s.write_vectored(bufs))
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
pub(super) struct RecordSniffer {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
    pub saw_alert: bool,
}

impl RecordSniffer {
    pub fn feed(&mut self, mut data: &[u8]) {
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

/// Feeds what is read through it to a [`RecordSniffer`].
pub(super) struct SniffingReader<'a, R: Read> {
    pub inner: &'a mut R,
    pub sniffer: &'a mut RecordSniffer,
}

impl<R: Read> Read for SniffingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sniffer.feed(&buf[..n]);
        Ok(n)
    }
}

pub(super) fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Writes out everything rustls wants to send.
pub(super) fn flush_tls(conn: &mut ServerConnection, sock: &mut impl Write) -> io::Result<()> {
    while conn.wants_write() {
        if conn.write_tls(sock)? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// An established TLS session over a [`Sock`].
pub(super) struct TlsIo {
    pub conn: Box<ServerConnection>,
    pub sock: Sock,
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

pub(super) enum Io {
    Plain(Sock),
    Tls(Box<TlsIo>),
}

impl Io {
    pub fn sock(&mut self) -> &mut Sock {
        match self {
            Io::Plain(s) => s,
            Io::Tls(t) => &mut t.sock,
        }
    }

    pub fn is_secure(&self) -> bool {
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
pub(super) struct BufIo {
    pub io: Io,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl BufIo {
    /// `pending`: bytes already read from the connection (the front stage's request
    /// head); the buffer holds at least `cap` bytes.
    pub fn new(io: Io, mut pending: Vec<u8>, cap: usize) -> BufIo {
        let end = pending.len();
        pending.resize(cap.max(end), 0);
        BufIo {
            io,
            buf: pending,
            start: 0,
            end,
        }
    }

    /// The connection and the bytes read but not consumed, in a buffer no larger than
    /// they are (a parked connection keeps no request-sized buffer).
    pub fn into_parts(self) -> (Io, Vec<u8>) {
        let rest = self.buf[self.start..self.end].to_vec();
        (self.io, rest)
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Moves plaintext that TLS already decrypted (or can decrypt from records it has
    /// already received) into the buffer, without reading the socket: after a response,
    /// this is how a pipelined request that arrived with the previous one is found.
    pub fn take_tls_plaintext(&mut self) -> io::Result<()> {
        let Io::Tls(t) = &mut self.io else {
            return Ok(());
        };
        t.conn.process_new_packets().map_err(tls_err)?;
        loop {
            if self.end == self.buf.len() {
                if self.start == 0 {
                    return Ok(());
                }
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match t.conn.reader().read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(()),
                Ok(n) => self.end += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads more bytes into the buffer (compacting it first if needed); 0 at EOF.
    pub fn fill(&mut self) -> io::Result<usize> {
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
    pub fn read_into(&mut self, out: &mut [u8]) -> io::Result<usize> {
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

    /// Calls `f` with the next line (without CR LF) and consumes it.
    pub fn with_line<T>(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
