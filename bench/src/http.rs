//! Checking what a server answers: where a response ends, and whether it is the one we expect.
//!
//! The load generator asks for `/` (and `/sleep/100`), so every answer must be `200` with a
//! `Content-Length` of exactly [`BODY`]'s length and that many bytes of body. Anything else is
//! counted as an error of one [`ErrorKind`], never silently taken as a fast answer.

use std::fmt;
use std::io;

/// The body every server answers to `GET /` and `GET /sleep/MS`.
pub const BODY: &[u8] = b"Hello, world!\n";

/// A head longer than this is not a response to our requests: give up on the connection.
const MAX_HEAD: usize = 16 * 1024;
/// A body longer than this is not a response to our requests either, and is not buffered.
const MAX_BODY: usize = 1024 * 1024;

/// The ways a request can fail, as the tables count them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The connection was refused (`ECONNREFUSED`): nobody listens, or the queue is full.
    Refused,
    /// The connection was reset or closed before any byte of the answer came.
    Reset,
    /// No complete answer within the timeout.
    Timeout,
    /// A well-formed answer, but not `200`.
    Status,
    /// A `200` whose `Content-Length` is missing, repeated, or not the expected length.
    Length,
    /// The connection ended in the middle of an answer.
    Short,
    /// Bytes that are not an HTTP response.
    Malformed,
}

impl ErrorKind {
    /// Every kind, in the order the tables list them.
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::Refused,
        ErrorKind::Reset,
        ErrorKind::Timeout,
        ErrorKind::Status,
        ErrorKind::Length,
        ErrorKind::Short,
        ErrorKind::Malformed,
    ];

    /// The kind of a failed `connect`, `read` or `write`.
    pub fn of(err: &io::Error) -> ErrorKind {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
            io::ErrorKind::TimedOut => ErrorKind::Timeout,
            // ECONNRESET, EPIPE, ECONNABORTED and the rest: the connection is gone.
            _ => ErrorKind::Reset,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Reset => "reset",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Status => "bad status",
            ErrorKind::Length => "bad length",
            ErrorKind::Short => "short body",
            ErrorKind::Malformed => "malformed",
        }
    }
}

/// How many errors of each kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Errors([u64; ErrorKind::ALL.len()]);

impl Errors {
    /// Counts one error of `kind`.
    pub fn add(&mut self, kind: ErrorKind) {
        self.0[kind as usize] += 1;
    }

    /// Adds another count to this one.
    pub fn merge(&mut self, other: &Errors) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }

    /// How many errors of `kind`.
    pub fn count(&self, kind: ErrorKind) -> u64 {
        self.0[kind as usize]
    }

    /// How many errors of any kind.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// `reset 3, timeout 1`: the kinds that occurred, or `none`.
impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        for kind in ErrorKind::ALL {
            let count = self.count(kind);
            if count > 0 {
                let comma = if any { ", " } else { "" };
                write!(f, "{comma}{} {count}", kind.name())?;
                any = true;
            }
        }
        if !any {
            write!(f, "none")?;
        }
        Ok(())
    }
}

/// What the bytes at the start of a connection's input hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole response yet: read more.
    Partial,
    /// A whole response of `len` bytes, good or not; `close` if the server said it will close
    /// the connection after it (`Connection: close`).
    Complete {
        len: usize,
        verdict: Result<(), ErrorKind>,
        close: bool,
    },
    /// Where this response ends cannot be known (no usable `Content-Length`, or not HTTP):
    /// the connection cannot be used any more.
    Unframed(ErrorKind),
}

/// Finds the first response in `input` and checks it: status `200`, one `Content-Length` equal
/// to [`BODY`]'s length, and that many bytes of body.
pub fn parse(input: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(input) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) if input.len() <= MAX_HEAD => return Parsed::Partial,
        Ok(httparse::Status::Partial) | Err(_) => return Parsed::Unframed(ErrorKind::Malformed),
    };
    let mut lengths = response
        .headers
        .iter()
        .filter(|header| header.name.eq_ignore_ascii_case("content-length"));
    let length = match (lengths.next(), lengths.next()) {
        (Some(header), None) => content_length(header.value),
        _ => None,
    };
    let Some(length) = length.filter(|&length| length <= MAX_BODY) else {
        return Parsed::Unframed(ErrorKind::Length);
    };
    if input.len() < head + length {
        return Parsed::Partial;
    }
    let close = response.headers.iter().any(|header| {
        header.name.eq_ignore_ascii_case("connection")
            && header.value.eq_ignore_ascii_case(b"close")
    });
    let verdict = if response.code != Some(200) {
        Err(ErrorKind::Status)
    } else if length != BODY.len() {
        Err(ErrorKind::Length)
    } else {
        Ok(())
    };
    Parsed::Complete {
        len: head + length,
        verdict,
        close,
    }
}

/// What it means that the connection ended while `input` held no whole response: nothing of
/// an answer came (a reset, or a close), or an answer was cut short.
pub fn cut_short(input: &[u8]) -> ErrorKind {
    if input.is_empty() {
        ErrorKind::Reset
    } else {
        ErrorKind::Short
    }
}

/// The value of a `Content-Length` header: plain digits only.
fn content_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nHello, world!\n";

    fn complete(len: usize, verdict: Result<(), ErrorKind>, close: bool) -> Parsed {
        Parsed::Complete {
            len,
            verdict,
            close,
        }
    }

    #[test]
    fn a_good_answer_is_complete_and_good() {
        assert_eq!(parse(GOOD), complete(GOOD.len(), Ok(()), false));
        let two = [GOOD, GOOD].concat();
        assert_eq!(parse(&two), complete(GOOD.len(), Ok(()), false));
        let close =
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 14\r\n\r\nHello, world!\n";
        assert_eq!(parse(close), complete(close.len(), Ok(()), true));
    }

    #[test]
    fn a_partial_answer_asks_for_more() {
        for cut in 0..GOOD.len() {
            assert_eq!(parse(&GOOD[..cut]), Parsed::Partial, "cut at {cut}");
        }
    }

    #[test]
    fn a_short_body_is_an_error_when_the_connection_ends() {
        let short = &GOOD[..GOOD.len() - 3];
        assert_eq!(parse(short), Parsed::Partial);
        assert_eq!(cut_short(short), ErrorKind::Short);
        assert_eq!(cut_short(&GOOD[..10]), ErrorKind::Short);
    }

    #[test]
    fn nothing_before_the_end_is_a_reset() {
        assert_eq!(cut_short(b""), ErrorKind::Reset);
    }

    #[test]
    fn a_wrong_length_is_an_error_but_keeps_the_framing() {
        let wrong = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello, world!";
        assert_eq!(
            parse(wrong),
            complete(wrong.len(), Err(ErrorKind::Length), false)
        );
    }

    #[test]
    fn another_status_is_an_error() {
        let busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy";
        assert_eq!(
            parse(busy),
            complete(busy.len(), Err(ErrorKind::Status), true)
        );
    }

    #[test]
    fn unusable_framing_ends_the_connection() {
        let cases: [&[u8]; 5] = [
            b"HTTP/1.1 200 OK\r\n\r\nHello, world!\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nContent-Length: 14\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +14\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        for case in cases {
            let text = String::from_utf8_lossy(case);
            assert_eq!(parse(case), Parsed::Unframed(ErrorKind::Length), "{text}");
        }
        assert_eq!(
            parse(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Parsed::Unframed(ErrorKind::Malformed)
        );
        let endless = [b"HTTP/1.1 200 OK\r\n".as_slice(), &[b'x'; MAX_HEAD]].concat();
        assert_eq!(parse(&endless), Parsed::Unframed(ErrorKind::Malformed));
    }

    #[test]
    fn errors_are_counted_and_named_by_kind() {
        let mut errors = Errors::default();
        assert_eq!(errors.to_string(), "none");
        errors.add(ErrorKind::Reset);
        errors.add(ErrorKind::Reset);
        let mut more = Errors::default();
        more.add(ErrorKind::Timeout);
        errors.merge(&more);
        assert_eq!(errors.total(), 3);
        assert_eq!(errors.to_string(), "reset 2, timeout 1");
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(ErrorKind::of(&refused), ErrorKind::Refused);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(ErrorKind::of(&reset), ErrorKind::Reset);
    }
}
