//! A raw HTTP client: it sends exactly the bytes a test chooses and reads responses one at a
//! time, with deadlines, keeping whatever arrives after one response for the next.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};

/// How long [`Client::get`] waits for its answer before calling the server stuck.
pub const RESPONSE_WITHIN: Duration = Duration::from_secs(10);

/// The most bytes one `read` asks for: 16 KiB, small enough that a big body takes many reads.
const READ_CHUNK: usize = 16 * 1024;

/// The most headers a response may carry (`httparse` fills a fixed array).
const MAX_HEADERS: usize = 64;

/// One HTTP response, as it came over the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, such as 200 or 404.
    pub status: u16,
    /// The headers in the order the server sent them, values decoded lossily as UTF-8.
    pub headers: Vec<(String, String)>,
    /// The body: exactly `Content-Length` bytes (none for an answer to `HEAD`).
    pub body: Vec<u8>,
}

/// Shows the body shortened, so that a failing test on a 16 MiB answer prints a few lines.
impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &preview(&self.body))
            .finish()
    }
}

impl Response {
    /// The value of the first header called `name`, compared case-insensitively as HTTP says.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The `Content-Length` header as a number, if present and well-formed.
    pub fn content_length(&self) -> Option<usize> {
        self.header("Content-Length")?.trim().parse().ok()
    }
}

/// A connection to a server, plus the bytes received but not yet claimed by a response.
///
/// Because several pipelined responses may arrive in one read, the client buffers what follows
/// a response and starts the next [`Client::read_response`] from there.
pub struct Client {
    /// The socket itself, for tests that need to do something unusual with it.
    pub stream: TcpStream,
    /// Received bytes not yet handed out as part of a response.
    pending: Vec<u8>,
}

impl Client {
    /// Wraps a connected socket.
    pub fn new(stream: TcpStream) -> Client {
        Client {
            stream,
            pending: Vec::new(),
        }
    }

    /// Sends all of `bytes`; panics if the server has gone away.
    #[track_caller]
    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes)
            .expect("sending a request: the server closed or reset the connection");
    }

    /// Sends all of `bytes`, reporting failure: after the server closed, a write fails with
    /// `EPIPE` or `ECONNRESET` (though the first one may still succeed, before the kernel hears
    /// of the close).
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads exactly one response, waiting no longer than `within` in all.
    ///
    /// The head is parsed with `httparse`; the body is `Content-Length` bytes, or none if
    /// `head_only` (the answer to a `HEAD`). A response without `Content-Length` is an error,
    /// because the contract demands one on every response. Errors: `TimedOut` if the deadline
    /// passes, `UnexpectedEof` if the server closes first, `InvalidData` for a bad response.
    pub fn read_response(&mut self, head_only: bool, within: Duration) -> io::Result<Response> {
        let deadline = Instant::now() + within;
        let (head_len, status, headers) = loop {
            if let Some(head) = parse_head(&self.pending)? {
                break head;
            }
            self.fill(deadline)?;
        };
        self.pending.drain(..head_len);
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let length = response.content_length().ok_or_else(|| {
            invalid(format!(
                "response {status} has no valid Content-Length (the contract requires one): {:?}",
                response.headers
            ))
        })?;
        if !head_only {
            while self.pending.len() < length {
                self.fill(deadline)?;
            }
            let rest = self.pending.split_off(length);
            response.body = std::mem::replace(&mut self.pending, rest);
        }
        Ok(response)
    }

    /// Sends `GET path` over HTTP/1.1 and reads the answer; panics on any error or after 10 s.
    #[track_caller]
    pub fn get(&mut self, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
        match self.read_response(false, RESPONSE_WITHIN) {
            Ok(response) => response,
            Err(err) => panic!("GET {path}: no response: {err}"),
        }
    }

    /// Whether the server closes the connection within `within` without sending anything more.
    ///
    /// A close shows up as end-of-file, or as `ECONNRESET` when the server closed with our
    /// bytes still unread in its socket (the kernel then resets instead of finishing politely).
    /// Returns `false` if the connection is still open when time is up; panics if more bytes
    /// arrive, since that means the server answered something we did not expect.
    #[track_caller]
    pub fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if !self.pending.is_empty() {
                panic!(
                    "expected the connection to close, but the server sent more: {}",
                    preview(&self.pending)
                );
            }
            match self.fill(deadline) {
                Ok(()) => {} // bytes arrived: the check above reports them
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return true,
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(err) if err.kind() == io::ErrorKind::TimedOut => return false,
                Err(err) => panic!("waiting for the server to close: {err}"),
            }
        }
    }

    /// Keeps `bytes`, read from [`Client::stream`] directly, as received: the next
    /// [`Client::read_response`] starts with them.
    pub fn keep(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Reads `chunk` bytes every 100 ms for `during` (or as fast as it can, if `chunk` is 1 MiB or
    /// more) and keeps them for a later [`Client::read_response`]. Returns how many bytes came, and
    /// how the connection ended if it did: `Some(error)` for end-of-file or a reset.
    pub fn read_paced(&mut self, chunk: usize, during: Duration) -> (usize, Option<String>) {
        let started = Instant::now();
        let pause = if chunk >= 1 << 20 {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        let mut got = 0;
        let mut buffer = vec![0; chunk];
        self.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set_read_timeout");
        while started.elapsed() < during {
            match self.stream.read(&mut buffer) {
                Ok(0) => return (got, Some("end-of-file".into())),
                Ok(k) => {
                    got += k;
                    self.keep(&buffer[..k]);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if pause.is_zero() {
                        return (got, Some("nothing for 5 s".into()));
                    }
                }
                Err(err) => return (got, Some(err.to_string())),
            }
            thread::sleep(pause);
        }
        (got, None)
    }

    /// Reads until the server ends the connection, within `within`: `Ok` for a polite end
    /// (end-of-file: the server sent FIN), `Err` with `ConnectionReset` for a reset (RST), or
    /// `TimedOut`. Panics if more bytes arrive, since the server was expected to be done.
    pub fn end_within(&mut self, within: Duration) -> io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if !self.pending.is_empty() {
                panic!(
                    "expected the connection to end, but the server sent more: {}",
                    preview(&self.pending)
                );
            }
            match self.fill(deadline) {
                Ok(()) => {} // bytes arrived: the check above reports them
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    }

    /// Closes our sending side (`shutdown(SHUT_WR)`): the server reads end-of-file, but can
    /// still answer, since the other direction stays open.
    #[track_caller]
    pub fn shutdown_write(&self) {
        self.stream
            .shutdown(Shutdown::Write)
            .expect("shutdown(SHUT_WR)");
    }

    /// Closes the connection abruptly: with `SO_LINGER` set to zero, `close` discards unsent
    /// data and sends a reset (RST) instead of the polite FIN.
    #[track_caller]
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        setsockopt(&self.stream, sockopt::Linger, &linger).expect("setsockopt(SO_LINGER, 0)");
        // Dropping `self` closes the socket, which now sends the reset.
    }

    /// Reads once, waiting no later than `deadline`, and appends what came to `pending`.
    fn fill(&mut self, deadline: Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.failure(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut chunk = [0; READ_CHUNK];
        let read = loop {
            match self.stream.read(&mut chunk) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match read {
            // A read of 0 bytes is end-of-file: the server closed its side.
            Ok(0) => {
                Err(self.failure(io::ErrorKind::UnexpectedEof, "server closed the connection"))
            }
            Ok(n) => {
                self.pending.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            // With a read timeout, "nothing came in time" is reported as EAGAIN.
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                Err(self.failure(io::ErrorKind::TimedOut, "nothing more arrived in time"))
            }
            Err(err) => Err(err),
        }
    }

    /// An error of `kind` that also shows what was received so far, to help the reader.
    fn failure(&self, kind: io::ErrorKind, what: &str) -> io::Error {
        io::Error::new(kind, format!("{what}; holding {}", preview(&self.pending)))
    }
}

/// A response head: its length in bytes, the status code, and the headers.
type Head = (usize, u16, Vec<(String, String)>);

/// Parses a response head at the start of `bytes`: `None` while it is incomplete.
fn parse_head(bytes: &[u8]) -> io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut headers);
    let len = match head.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => {
            return Err(invalid(format!(
                "malformed response head ({err}): {}",
                preview(bytes)
            )));
        }
    };
    let status = head
        .code
        .ok_or_else(|| invalid("response without a status".into()))?;
    let headers = head
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    Ok(Some((len, status, headers)))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A short, printable view of some bytes, for failure messages.
pub fn preview(bytes: &[u8]) -> String {
    const SHOWN: usize = 200;
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(SHOWN)]);
    if bytes.len() > SHOWN {
        format!("{} bytes, starting {shown:?}", bytes.len())
    } else {
        format!("{} bytes {shown:?}", bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_head_and_finds_headers_case_insensitively() {
        let bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nX-A: b\r\n\r\nabc";
        let (len, status, headers) = parse_head(bytes)
            .expect("a valid head")
            .expect("a complete head");
        assert_eq!((len, status), (bytes.len() - 3, 200));
        let response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        assert_eq!(response.header("Content-Length"), Some("3"));
        assert_eq!(response.content_length(), Some(3));
        assert_eq!(response.header("x-a"), Some("b"));
        assert_eq!(response.header("Connection"), None);
    }

    #[test]
    fn an_incomplete_head_is_none_and_garbage_is_an_error() {
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-"),
            Ok(None)
        ));
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
    }

    #[test]
    fn preview_shortens_long_input() {
        assert_eq!(preview(b"ab"), "2 bytes \"ab\"");
        assert!(preview(&[b'x'; 1000]).starts_with("1000 bytes, starting"));
    }
}
