//! Request bodies: framing (`Content-Length` or chunked, RFC 9112 section 6) and the
//! reader handed to handlers, which decodes chunked bodies and never reads past the body.

use std::io::{self, Read};

use super::head::header_tokens;
use super::sock::BufIo;
use super::MAX_CHUNK_LINE;

pub(super) enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
}

pub(super) enum BodyState {
    Length(u64),
    Chunked(ChunkState),
    Done,
    /// A read failed (timeout, truncation, bad framing): the connection must close.
    Broken,
}

/// The request body reader handed to handlers as `Request::body`.
pub(super) struct BodyReader<'a> {
    pub bio: &'a mut BufIo,
    pub state: &'a mut BodyState,
    pub max_trailers: usize,
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

/// Reads what it can (at most `*left` bytes) of a counted run of body bytes (a
/// `Content-Length` body or one chunk) and counts it down; EOF before its end is `short`.
fn read_run(
    bio: &mut BufIo,
    out: &mut [u8],
    left: &mut u64,
    short: &'static str,
) -> io::Result<usize> {
    let want = (out.len() as u64).min(*left) as usize;
    let n = bio.read_into(&mut out[..want])?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, short));
    }
    *left -= n as u64;
    Ok(n)
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
                    let n = read_run(
                        self.bio,
                        out,
                        left,
                        "request body shorter than Content-Length",
                    )?;
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
                    let n = read_run(self.bio, out, left, "truncated chunk")?;
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

/// Determines the body framing of a request in HTTP/1.`minor`. Errors are statuses to
/// answer before closing.
pub(super) fn body_framing(
    headers: &[(String, String)],
    minor: u8,
) -> Result<(BodyState, Option<u64>), u16> {
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
        // Both framings at once is the classic request smuggling vector; so is a
        // Transfer-Encoding on HTTP/1.0, which has no such field (RFC 9112 section 6.1:
        // an HTTP/1.0 intermediary may forward it unparsed, framing the body differently).
        if length.is_some() || minor == 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
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
        assert!(matches!(body_framing(&[], 1), Ok((BodyState::Done, None))));
        assert!(matches!(
            body_framing(&hdrs(&[("content-length", "12")]), 1),
            Ok((BodyState::Length(12), Some(12)))
        ));
        assert!(matches!(
            body_framing(
                &hdrs(&[("content-length", "3"), ("content-length", "3")]),
                1
            ),
            Ok((BodyState::Length(3), Some(3)))
        ));
        assert!(matches!(
            body_framing(&hdrs(&[("transfer-encoding", "Chunked")]), 1),
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
            assert_eq!(body_framing(&hdrs(bad), 1).err(), Some(400), "{bad:?}");
        }
        assert_eq!(
            body_framing(&hdrs(&[("transfer-encoding", "gzip, chunked")]), 1).err(),
            Some(501)
        );
        // HTTP/1.0 has no Transfer-Encoding: a chunked body there is refused, a
        // Content-Length one is fine.
        let chunked = hdrs(&[("transfer-encoding", "chunked")]);
        assert_eq!(body_framing(&chunked, 0).err(), Some(400));
        assert!(matches!(
            body_framing(&hdrs(&[("content-length", "2")]), 0),
            Ok((BodyState::Length(2), Some(2)))
        ));
    }
}
