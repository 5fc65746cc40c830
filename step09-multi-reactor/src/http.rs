//! Just enough HTTP/1.1 for `curl`, `wrk`, `ab` and browsers.
//!
//! `httparse` finds the request line and the headers. It caps nothing and checks no framing, so
//! the 8 KiB limit on a request head and the rules that keep one request from hiding another
//! (request smuggling) are ours, here. This file is the same in every step: the lesson of a step
//! is how it *schedules* this work, never the work itself.

use std::thread;
use std::time::Duration;

// ANCHOR: limits
/// The largest request head we accept, blank line included. A client that sends more without
/// finishing its head gets `431` and is closed, so it cannot make us buffer without bound.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most headers `httparse` may find in one head (it needs a fixed array to fill).
const MAX_HEADERS: usize = 64;
/// `/bytes/N` serves at most this much.
pub const MAX_BYTES: u64 = 64 * 1024 * 1024;
/// `/sleep/MS` waits at most this long.
pub const MAX_SLEEP_MS: u64 = 60_000;
// ANCHOR_END: limits

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// No whole request head yet: read more, unless the deadline has passed.
    Partial,
    /// A whole head of `len` bytes: answer it, then drop those bytes (what follows them is the
    /// next pipelined request).
    Complete { len: usize, request: Request },
    /// Bytes that are not a request we can frame: answer with this status and close.
    Invalid(Status, &'static str),
}

/// A request head we could read, and what to answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `HEAD`: the same headers as `GET`, and no body.
    pub head_only: bool,
    /// Whether the client lets us keep the connection open after the answer.
    pub keep_alive: bool,
    pub route: Route,
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /`
    Hello,
    /// `GET /bytes/N`: N bytes of body.
    Bytes(u64),
    /// `GET /sleep/MS`: slow work, then the hello.
    Sleep(u64),
    /// A well-framed request we refuse; the connection closes after the answer.
    Error(Status, &'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 200,
    BadRequest = 400,
    NotFound = 404,
    MethodNotAllowed = 405,
    PayloadTooLarge = 413,
    HeaderFieldsTooLarge = 431,
    NotImplemented = 501,
    ServiceUnavailable = 503,
}

impl Status {
    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::PayloadTooLarge => "Payload Too Large",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::NotImplemented => "Not Implemented",
            Status::ServiceUnavailable => "Service Unavailable",
        }
    }
}

/// An answer, ready to send: `bytes` first, then `more` bytes of the `/bytes/N` pattern, which
/// [`pattern`] hands out a chunk at a time so that a 64 MiB answer never sits in memory.
pub struct Response {
    pub bytes: Vec<u8>,
    pub more: u64,
    pub keep_alive: bool,
}

/// Looks for one request head at the start of `received`.
pub fn parse(received: &[u8]) -> Parse {
    // ANCHOR: head_parse
    // Never look past the limit: a head that is not complete within it is too large.
    let window = &received[..received.len().min(MAX_HEAD)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let len = match head.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if window.len() == MAX_HEAD => {
            return Parse::Invalid(Status::HeaderFieldsTooLarge, "request head over 8 KiB");
        }
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parse::Invalid(Status::HeaderFieldsTooLarge, "more than 64 headers");
        }
        Err(_) => return Parse::Invalid(Status::BadRequest, "malformed request head"),
    };
    // ANCHOR_END: head_parse
    // ANCHOR: framing
    let head_only = head.method == Some("HEAD");
    // HTTP/1.1 keeps alive by default, 1.0 only if asked; `close` anywhere wins over all else.
    let (mut asked_keep_alive, mut asked_close) = (false, false);
    let mut content_length = None;
    let mut transfer_encoding = false;
    let mut hosts = 0;
    let mut refuse = None;
    for header in head.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("Content-Length") {
            let value = header.value;
            if content_length.is_some() {
                refuse = refuse.or(Some("two Content-Length headers"));
            } else if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                refuse = refuse.or(Some("Content-Length is not plain digits"));
            }
            // All digits: only overflow can fail, and a huge length is a body all the same.
            let digits = std::str::from_utf8(value).unwrap_or("");
            content_length = Some(digits.parse::<u64>().unwrap_or(u64::MAX));
        } else if name.eq_ignore_ascii_case("Transfer-Encoding") {
            transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("Host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("Connection") {
            // A list, which may also be split over several Connection headers.
            for token in header.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                asked_close |= token.eq_ignore_ascii_case(b"close");
                asked_keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let http11 = head.version == Some(1);
    let keep_alive = !asked_close && (http11 || asked_keep_alive);
    // Framing first: if we cannot tell where this request ends, we cannot trust what follows it.
    // Then `Host`, which names the site asked for: HTTP/1.1 requires it (RFC 9112 §3.2), and two
    // of them could make a proxy and a server disagree about the site. Then method and path.
    let route = if let Some(why) = refuse {
        Route::Error(Status::BadRequest, why)
    } else if transfer_encoding && content_length.is_some() {
        Route::Error(
            Status::BadRequest,
            "both Content-Length and Transfer-Encoding",
        )
    } else if transfer_encoding {
        Route::Error(Status::NotImplemented, "Transfer-Encoding is not supported")
    } else if content_length.is_some_and(|n| n > 0) {
        Route::Error(Status::PayloadTooLarge, "this server takes no request body")
    } else if hosts > 1 {
        Route::Error(Status::BadRequest, "more than one Host header")
    } else if http11 && hosts == 0 {
        Route::Error(Status::BadRequest, "HTTP/1.1 needs a Host header")
    } else if !matches!(head.method, Some("GET" | "HEAD")) {
        Route::Error(Status::MethodNotAllowed, "only GET and HEAD")
    } else {
        route(head.path.unwrap_or("/"))
    };
    // ANCHOR_END: framing
    let request = Request {
        head_only,
        keep_alive,
        route,
    };
    Parse::Complete { len, request }
}

/// Maps a request target to what it asks for.
fn route(target: &str) -> Route {
    let Some(path) = path_of(target) else {
        let why = "the target must be a path (/bytes/10) or a URL (http://host/bytes/10)";
        return Route::Error(Status::BadRequest, why);
    };
    if path == "/" {
        return Route::Hello;
    }
    if let Some(n) = path.strip_prefix("/bytes/").and_then(number) {
        return match n {
            n if n <= MAX_BYTES => Route::Bytes(n),
            _ => Route::Error(Status::BadRequest, "/bytes/N takes N up to 67108864"),
        };
    }
    if let Some(ms) = path.strip_prefix("/sleep/").and_then(number) {
        return match ms {
            ms if ms <= MAX_SLEEP_MS => Route::Sleep(ms),
            _ => Route::Error(Status::BadRequest, "/sleep/MS takes MS up to 60000"),
        };
    }
    Route::Error(Status::NotFound, "try /, /bytes/N or /sleep/MS")
}

/// The path a target names, without its query string. A client sends a server the path alone,
/// `/bytes/10` (origin form); to a proxy it sends the whole URL, `http://host:8080/bytes/10`
/// (absolute form), which RFC 9112 §3.2.2 has servers accept too. We serve one site only, so
/// the scheme and the host tell us nothing: we drop them. `None` for the other two forms, `*`
/// (for `OPTIONS`) and `host:port` (for `CONNECT`): they name nothing we serve.
fn path_of(target: &str) -> Option<&str> {
    let target = target.split('?').next().unwrap_or(target);
    if target.starts_with('/') {
        return Some(target);
    }
    // The scheme is case-insensitive (`HTTP://` is the same URL). `split_at_checked` rather
    // than `[..7]`: a target of a few bytes, or with a multi-byte character there, must not panic.
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        let (head, rest) = target.split_at_checked(scheme.len())?;
        head.eq_ignore_ascii_case(scheme).then_some(rest)
    })?;
    // What follows the host (and port) is the path; none at all means `/`.
    Some(rest.find('/').map_or("/", |slash| &rest[slash..]))
}

/// Plain decimal digits only (no sign, no spaces); too many digits count as too large.
fn number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u64::MAX))
}

/// Does the work a request asks for and builds its answer. `/sleep/MS` blocks the calling
/// thread: that is the point, it shows which models let one slow request stall everybody.
pub fn respond(request: &Request) -> Response {
    // The body's length, and its first bytes: all of it for the hello, the first chunk of the
    // pattern for `/bytes/N`, sent with the head in the same write.
    let (length, first): (u64, &[u8]) = match request.route {
        Route::Hello => (HELLO.len() as u64, HELLO),
        Route::Bytes(n) => (n, pattern(n)),
        Route::Sleep(ms) => {
            thread::sleep(Duration::from_millis(ms));
            (HELLO.len() as u64, HELLO)
        }
        Route::Error(status, why) => return answer(status, why, request.head_only),
    };
    let mut response = header(Status::Ok, length, request.keep_alive);
    if !request.head_only {
        response.bytes.extend_from_slice(first);
        response.more = length - first.len() as u64;
    }
    response
}

const HELLO: &[u8] = b"Hello, world!\n";

/// An error answer (`Connection: close`) for input we refuse or load we cannot take.
pub fn reject(status: Status, why: &str) -> Response {
    answer(status, why, false)
}

fn answer(status: Status, why: &str, head_only: bool) -> Response {
    let text = format!("{} {}: {why}\n", status as u16, status.reason());
    let mut response = header(status, text.len() as u64, false);
    if !head_only {
        response.bytes.extend_from_slice(text.as_bytes());
    }
    response
}

// ANCHOR: header
/// The status line and headers. Every answer has a `Content-Length`, so the client knows where
/// it ends without our closing the connection; every error closes it all the same.
fn header(status: Status, content_length: u64, keep_alive: bool) -> Response {
    let keep_alive = keep_alive && status == Status::Ok;
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {content_length}\r\nConnection: {}\r\n",
        status as u16,
        status.reason(),
        env!("CARGO_PKG_NAME"),
        if keep_alive { "keep-alive" } else { "close" },
    );
    if status == Status::MethodNotAllowed {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    Response {
        bytes: head.into_bytes(),
        more: 0,
        keep_alive,
    }
}
// ANCHOR_END: header

/// The body of `/bytes/N` repeats one 64-byte line, so a client can check every byte it got.
pub const LINE: &[u8; 64] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.\n";
/// 64 KiB of repeated lines: a whole number of lines, so chunks follow each other seamlessly.
static PATTERN: [u8; 64 * 1024] = {
    let mut chunk = [0; 64 * 1024];
    let mut i = 0;
    while i < chunk.len() {
        chunk[i] = LINE[i % LINE.len()];
        i += 1;
    }
    chunk
};

/// The next chunk of a `/bytes/N` body when `left` bytes of it remain to be sent.
pub fn pattern(left: u64) -> &'static [u8] {
    let n = usize::try_from(left)
        .unwrap_or(usize::MAX)
        .min(PATTERN.len());
    &PATTERN[..n]
}
