//! What hyper's parser accepts but a strict server refuses, and cannot be seen once the request
//! is parsed: bare LF line endings, more than one empty line before the request line, raw
//! non-ASCII bytes in the request line, and Content-Length sent together with
//! Transfer-Encoding (hyper drops the Content-Length, as RFC 9112 §6.3 allows, so the handler
//! never sees that both came). Each is a way for two HTTP implementations to disagree on where
//! a request ends, which is what request smuggling feeds on; gunicorn refuses all four.
//!
//! `HeadGuard` wraps a connection's stream and scans the bytes hyper reads, request head by
//! request head. It follows the framing only while it is certain of it: a head, then a body of
//! `Content-Length` bytes, then the next head. Once a body is chunked (or anything is unclear)
//! it stops scanning that connection, so it can never mistake body bytes for a head; hyper's own
//! checks still apply to everything. A defect is reported with the index of the head it was in,
//! so that the handler refuses exactly that request (and closes the connection).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The first defect found on a connection: the index of its request (0 for the first) and why.
#[derive(Clone, Default)]
pub struct HeadDefects(Arc<Mutex<Option<(u64, &'static str)>>>);

impl HeadDefects {
    /// Why request number `index` of this connection must be refused, if it must.
    pub fn of_request(&self, index: u64) -> Option<&'static str> {
        match *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((i, why)) if i == index => Some(why),
            _ => None,
        }
    }
}

/// Longest header name the scanner needs to recognise, with room to spare.
const NAME_MAX: usize = 32;
/// Longest Content-Length value it parses; a longer one ends the scan (hyper judges it).
const VALUE_MAX: usize = 24;

const BARE_LF: &str = "a bare LF as a line ending (RFC 9112 §2.2: lines end with CRLF)";
const LONE_CR: &str = "a CR without its LF";

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Before a request line: empty lines seen so far, and whether a CR is pending.
    Leading {
        empty_lines: u8,
        cr: bool,
    },
    RequestLine {
        cr: bool,
    },
    /// Start of a header line, or the empty line that ends the head.
    FieldStart {
        cr: bool,
    },
    FieldName,
    FieldValue {
        cr: bool,
    },
    /// Inside a body of known length: bytes still to skip.
    Body(u64),
    /// Stopped: chunked body, or framing this scanner does not follow.
    Stopped,
}

#[derive(Debug)]
struct Scanner {
    state: State,
    /// Index of the request whose head is being read.
    request: u64,
    name: Vec<u8>,
    value: Vec<u8>,
    /// Which framing headers the current head has.
    content_length: Option<u64>,
    unclear_length: bool,
    transfer_encoding: bool,
}

impl Scanner {
    fn new() -> Scanner {
        Scanner {
            state: State::Leading {
                empty_lines: 0,
                cr: false,
            },
            request: 0,
            name: Vec::with_capacity(NAME_MAX),
            value: Vec::with_capacity(VALUE_MAX),
            content_length: None,
            unclear_length: false,
            transfer_encoding: false,
        }
    }

    /// Scan `bytes`; returns the first defect found, with its request index.
    fn scan(&mut self, mut bytes: &[u8]) -> Option<(u64, &'static str)> {
        while !bytes.is_empty() {
            if let State::Body(left) = self.state {
                let skip = left.min(bytes.len() as u64) as usize;
                bytes = &bytes[skip..];
                self.state = match left - skip as u64 {
                    0 => self.next_head(),
                    rest => State::Body(rest),
                };
                continue;
            }
            if self.state == State::Stopped {
                return None;
            }
            let b = bytes[0];
            bytes = &bytes[1..];
            if let Err(why) = self.step(b) {
                self.state = State::Stopped;
                return Some((self.request, why));
            }
        }
        None
    }

    fn next_head(&mut self) -> State {
        self.request += 1;
        self.content_length = None;
        self.unclear_length = false;
        self.transfer_encoding = false;
        State::Leading {
            empty_lines: 0,
            cr: false,
        }
    }

    fn step(&mut self, b: u8) -> Result<(), &'static str> {
        self.state = match self.state {
            State::Leading { empty_lines, cr } => match (b, cr) {
                (b'\r', false) => State::Leading {
                    empty_lines,
                    cr: true,
                },
                (b'\n', true) => State::Leading {
                    empty_lines: empty_lines.saturating_add(1),
                    cr: false,
                },
                (b'\n', false) => return Err(BARE_LF),
                (_, true) => return Err(LONE_CR),
                _ if empty_lines > 1 => {
                    return Err("more than one empty line before the request line")
                }
                _ => return self.request_line_byte(b, false),
            },
            State::RequestLine { cr } => return self.request_line_byte(b, cr),
            State::FieldStart { cr } => match (b, cr) {
                (b'\r', false) => State::FieldStart { cr: true },
                (b'\n', true) => self.end_of_head()?,
                (b'\n', false) => return Err(BARE_LF),
                (_, true) => return Err(LONE_CR),
                _ => {
                    self.name.clear();
                    self.value.clear();
                    self.name.push(b.to_ascii_lowercase());
                    State::FieldName
                }
            },
            State::FieldName => match b {
                b':' => State::FieldValue { cr: false },
                b'\n' => return Err(BARE_LF),
                _ => {
                    if self.name.len() < NAME_MAX {
                        self.name.push(b.to_ascii_lowercase());
                    }
                    State::FieldName
                }
            },
            State::FieldValue { cr } => match (b, cr) {
                (b'\n', true) => {
                    self.end_of_field();
                    State::FieldStart { cr: false }
                }
                (b'\n', false) => return Err(BARE_LF),
                (b'\r', _) => State::FieldValue { cr: true },
                _ => {
                    if self.value.len() < VALUE_MAX {
                        self.value.push(b);
                    } else if self.name == b"content-length" {
                        self.unclear_length = true;
                    }
                    State::FieldValue { cr: false }
                }
            },
            State::Body(_) | State::Stopped => unreachable!("handled by scan"),
        };
        Ok(())
    }

    fn request_line_byte(&mut self, b: u8, cr: bool) -> Result<(), &'static str> {
        self.state = match b {
            b'\n' if !cr => return Err(BARE_LF),
            b'\n' => State::FieldStart { cr: false },
            b'\r' => State::RequestLine { cr: true },
            0x80.. => {
                return Err("a raw non-ASCII byte in the request line (RFC 9112 §3.2: the target is ASCII; percent-encode other bytes)")
            }
            _ => State::RequestLine { cr: false },
        };
        Ok(())
    }

    fn end_of_field(&mut self) {
        match self.name.as_slice() {
            b"transfer-encoding" => self.transfer_encoding = true,
            b"content-length" => {
                let text = std::str::from_utf8(&self.value).unwrap_or("").trim();
                match (text.parse::<u64>(), self.content_length) {
                    (Ok(n), None) => self.content_length = Some(n),
                    (Ok(n), Some(m)) if n == m => {}
                    _ => self.unclear_length = true,
                }
            }
            _ => {}
        }
    }

    fn end_of_head(&mut self) -> Result<State, &'static str> {
        if self.transfer_encoding && (self.content_length.is_some() || self.unclear_length) {
            return Err("both Content-Length and Transfer-Encoding (RFC 9112 §6.1)");
        }
        Ok(
            match (
                self.transfer_encoding,
                self.unclear_length,
                self.content_length,
            ) {
                (false, false, None | Some(0)) => self.next_head(),
                (false, false, Some(n)) => State::Body(n),
                // Chunked, or a length hyper will judge: stop following this connection.
                _ => State::Stopped,
            },
        )
    }
}

/// A connection's stream, scanned on the way in (see the module comment).
pub struct HeadGuard<S> {
    inner: S,
    scanner: Scanner,
    defects: HeadDefects,
}

impl<S> HeadGuard<S> {
    pub fn new(inner: S) -> (HeadGuard<S>, HeadDefects) {
        let defects = HeadDefects::default();
        (
            HeadGuard {
                inner,
                scanner: Scanner::new(),
                defects: defects.clone(),
            },
            defects,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            if let Some(defect) = this.scanner.scan(&buf.filled()[before..]) {
                *this.defects.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(defect);
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defect of a byte stream fed in one piece, and fed one byte at a time (the scanner
    /// must not depend on how reads split the stream).
    fn defect(stream: &[u8]) -> Option<(u64, &'static str)> {
        let whole = Scanner::new().scan(stream);
        let mut s = Scanner::new();
        let bytewise = stream.chunks(1).find_map(|b| s.scan(b));
        assert_eq!(whole, bytewise);
        whole
    }

    #[test]
    fn clean_requests_pass() {
        assert_eq!(defect(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), None);
        // One empty line before the request line is allowed (RFC 9112 §2.2).
        assert_eq!(defect(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), None);
        // Pipelined, with a body of known length that holds what looks like a bad head.
        let body = b"\n\n\xff\r\n";
        let stream = [
            b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n".as_slice(),
            body,
            b"GET / HTTP/1.1\r\n\r\n",
        ]
        .concat();
        assert_eq!(defect(&stream), None);
    }

    #[test]
    fn each_defect_is_found_in_its_request() {
        let bare_lf = defect(b"GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n").unwrap();
        assert_eq!(bare_lf.0, 0);
        assert!(bare_lf.1.contains("bare LF"));
        let leading = defect(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(leading.1.contains("empty line"));
        let non_ascii = defect(b"GET /\xc3\xa0 HTTP/1.1\r\n\r\n").unwrap();
        assert!(non_ascii.1.contains("non-ASCII"));
        let both = defect(
            b"POST /p HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .unwrap();
        assert!(both.1.contains("Content-Length and Transfer-Encoding"));
        // The second request of a connection.
        let second = defect(b"GET / HTTP/1.1\r\n\r\nGET /b HTTP/1.1\nX: 1\r\n\r\n").unwrap();
        assert_eq!(second.0, 1);
    }

    #[test]
    fn chunked_bodies_stop_the_scan() {
        // Bytes after a chunked body are not judged here (hyper frames them).
        let stream = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n\n\r\n0\r\n\r\nGET /\xff HTTP/1.1\r\n\r\n";
        assert_eq!(defect(stream), None);
    }

    #[test]
    fn defects_name_their_request() {
        let d = HeadDefects::default();
        *d.0.lock().unwrap() = Some((2, "why"));
        assert_eq!(d.of_request(1), None);
        assert_eq!(d.of_request(2), Some("why"));
    }
}
