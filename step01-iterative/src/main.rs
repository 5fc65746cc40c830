//! Step 1: the iterative server.
//!
//! One loop: `accept` a connection, serve it until the client leaves, then `accept` the next.
//! While one client is being served, every other client waits in the kernel's accept queue: they
//! are connected (the kernel finished the TCP handshake for us) but nobody reads what they send.
//! It is the simplest correct server, and the baseline every later step improves on.
//!
//! Cost: one client stalls everyone for as long as it holds its connection: an idle one until
//! `--timeout-secs` passes, a slow request (`/sleep/MS`) until it is done, and a slow reader for
//! as long as it keeps taking at least 16 KiB a second, however long its download.
//!
//! Run it and watch it:
//!
//! ```text
//! cargo run -p step01-iterative
//! nc 127.0.0.1 8080                # terminal 2: connect and say nothing
//! curl -v http://127.0.0.1:8080/   # terminal 3: waits until nc leaves or times out
//! lsof -p PID                      # one listening socket, one connection at most
//! ```

mod http;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use http::{Parse, Response, Route, Status};

/// `eprintln!` that never panics. Logging must never be fatal, and `eprintln!` panics when the
/// write fails: with stderr piped into `head -1`, say, once `head` has left (`EPIPE`). A log
/// line that cannot be written is dropped.
macro_rules! log {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}

fn main() -> anyhow::Result<()> {
    // ANCHOR: setup
    let args = Args::parse();
    let timeout = Duration::from_secs(args.timeout_secs);
    set_fd_limit(args.max_fds)?;
    let listener =
        TcpListener::bind(&args.addr).with_context(|| format!("cannot listen on {}", args.addr))?;
    let mut reserve = Reserve::open()?;
    announce(&listener)?;
    // ANCHOR_END: setup

    // ANCHOR: accept_loop
    // The whole model: take one connection, serve it to the end, then take the next. Meanwhile
    // the kernel completes other clients' handshakes and queues them, up to the listen backlog.
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) => match reserve.accept_failed(&listener, err) {
                Some(accepted) => accepted, // taken with the spare descriptor: serve it
                None => continue,
            },
        };
        if let Err(err) = handle_connection(stream, timeout) {
            log!("{peer}: {err}");
        }
    }
    // ANCHOR_END: accept_loop
}

// ANCHOR: handle_connection
// ANCHOR: serve
/// Serves one client until it closes, breaks the rules, or keeps us waiting past `timeout`.
fn handle_connection(mut stream: TcpStream, timeout: Duration) -> io::Result<()> {
    // Bytes received and not yet answered: part of a head, or requests sent back to back
    // (pipelined) that we answer one after the other, in order.
    let mut received = Vec::new();
    loop {
        // One deadline for the whole head, not one per read: a client that dribbles a byte a
        // second must not hold the server forever. An idle keep-alive connection gets the same.
        let deadline = Instant::now() + timeout;
        let (len, request) = loop {
            match http::parse(&received) {
                Parse::Complete { len, request } => break (len, request),
                Parse::Invalid(status, why) => {
                    send(&mut stream, &http::reject(status, why), timeout)?;
                    linger(stream); // the rest of that head may still be coming
                    return Ok(());
                }
                Parse::Partial => {}
            }
            if !read_more(&mut stream, &mut received, deadline)? {
                return Ok(()); // the client has left, or the deadline passed: close
            }
        };
        received.drain(..len);
        let response = http::respond(&request);
        send(&mut stream, &response, timeout)?;
        if !response.keep_alive {
            // A refused request's body may still be on its way, or requests pipelined after
            // this one: then close politely. Otherwise dropping `stream` closes the socket.
            if matches!(request.route, Route::Error(..)) || !received.is_empty() {
                linger(stream);
            }
            return Ok(());
        }
    }
}
// ANCHOR_END: serve

// ANCHOR: read_more
/// Reads whatever the client sent next, waiting no later than `deadline`. Returns `false` if
/// the client closed its side (a read of 0 bytes is end-of-file) or the deadline passed.
fn read_more(
    stream: &mut TcpStream,
    received: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<bool> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(false);
    }
    stream.set_read_timeout(Some(left))?;
    let mut chunk = [0; 4096];
    match stream.read(&mut chunk) {
        Ok(0) => Ok(false),
        Ok(n) => {
            received.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        // With a read timeout set, the kernel reports "nothing came in time" as EAGAIN.
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(err) if err.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(err) => Err(err),
    }
}
// ANCHOR_END: read_more

// ANCHOR: send
/// Writes a whole response, as long as the client takes it fast enough (see [`Pace`]).
fn send(stream: &mut TcpStream, response: &Response, timeout: Duration) -> io::Result<()> {
    let mut pace = Pace::new(timeout);
    pace.write_all(stream, &response.bytes)?;
    let mut left = response.more;
    while left > 0 {
        let chunk = http::pattern(left);
        pace.write_all(stream, chunk)?;
        left -= chunk.len() as u64;
    }
    Ok(())
}
// ANCHOR_END: send

// ANCHOR: pace
/// The slowest a client may take a response, on average: this many bytes a second.
const MIN_RATE: u64 = 16 * 1024;

/// The write deadline of one response. A write blocks while the client's receive window is
/// full, and a timeout per `write` call would not bound that: a client that takes a few bytes
/// just before each timeout would hold us forever. So the deadline is a rate: at the end of
/// each window of `--timeout-secs`, the client must have taken `MIN_RATE` bytes a second since
/// the answer began, one window of grace aside, or it loses the response.
///
/// "Taken" is what the client's kernel has acknowledged, not what we have written: our own send
/// buffer holds megabytes, and would make a client that reads nothing look busy. And it is an
/// average, not a count per window: the client's buffers hold megabytes too, so even a steady
/// reader's progress reaches us in lumps, many seconds apart.
struct Pace {
    started: Instant,
    window: Duration,
    /// When the rate is next judged.
    check: Instant,
    /// Bytes of this response written so far.
    written: u64,
}

impl Pace {
    fn new(window: Duration) -> Pace {
        let started = Instant::now();
        Pace {
            started,
            window,
            check: started + window,
            written: 0,
        }
    }

    /// `write_all`, but each `write` may block only until the rate is next judged.
    fn write_all(&mut self, stream: &mut TcpStream, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let now = Instant::now();
            if now >= self.check {
                let owed = MIN_RATE * (now - self.started).saturating_sub(self.window).as_secs();
                if self.written.saturating_sub(unacknowledged(stream)?) < owed {
                    let why = format!("client reads slower than {MIN_RATE} bytes/s; abandoned");
                    return Err(io::Error::new(io::ErrorKind::TimedOut, why));
                }
                self.check = now + self.window;
            }
            stream.set_write_timeout(Some(self.check - now))?;
            match stream.write(bytes) {
                // A blocking write returns early only if the timeout (or a signal) cut it
                // short: it then reports how much went out, or EAGAIN if nothing did.
                Ok(n) => {
                    bytes = &bytes[n..];
                    self.written += n as u64;
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

/// How many of the bytes written to `stream` still wait in our send buffer, unacknowledged by
/// the client's kernel: `SIOCOUTQ` (Linux gives it the number of `TIOCOUTQ`, the name the libc
/// crate has), which std and nix do not offer.
fn unacknowledged(stream: &TcpStream) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ on a socket writes one c_int through the pointer, to `queued`, which
    // lives until the call returns.
    let done = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}
// ANCHOR_END: pace

// ANCHOR: linger
/// How long a lingering close waits for the client to stop sending, and how much it reads.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 4 << 20;

/// Closes a connection whose client may still be sending (RFC 9112 §9.6, nginx's
/// `lingering_close`). Closing a socket that has unread bytes in it makes the kernel send a
/// reset (RST) instead of the polite end-of-stream (FIN), and a reset can destroy our answer
/// before the client has read it. So: send FIN first (shut down our writing side), read and
/// throw away what still comes for a bounded time and byte count, and only then close.
fn linger(mut stream: TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return; // already gone
    }
    let deadline = Instant::now() + LINGER_TIME;
    let (mut discarded, mut total) = (Vec::new(), 0);
    while total < LINGER_BYTES
        && matches!(read_more(&mut stream, &mut discarded, deadline), Ok(true))
    {
        total += discarded.len();
        discarded.clear();
    }
} // `stream` is dropped: closed
// ANCHOR_END: linger
// ANCHOR_END: handle_connection

// ANCHOR: reserve
/// A spare descriptor kept open, so that there is one to give back when the process runs out.
///
/// When every descriptor is taken, Linux's `accept` fails with `EMFILE` at once, before it even
/// looks at the queue (it picks the new descriptor's number first): a naive loop spins at 100%
/// CPU, client or no client. Instead we close the spare and wait in `accept` for the next
/// client, with the freed slot (libev's and libuv's trick). When one comes, we first try to
/// take the spare back: if that works, descriptors have come back meanwhile and the client is
/// served like any other; only if it fails is the client answered `503`.
struct Reserve(Option<File>);

impl Reserve {
    fn open() -> anyhow::Result<Reserve> {
        let spare = File::open("/dev/null").context("cannot open the reserve descriptor")?;
        Ok(Reserve(Some(spare)))
    }

    /// `accept` failed with `err`. Returns a connection to serve if the spare got us one.
    fn accept_failed(
        &mut self,
        listener: &TcpListener,
        err: io::Error,
    ) -> Option<(TcpStream, SocketAddr)> {
        match err.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => return self.accept_with_spare(listener),
            // The kernel is short of memory for sockets: give it a moment rather than spin.
            Some(libc::ENOBUFS | libc::ENOMEM) => {
                log!("accept: {err}; pausing 100 ms");
                thread::sleep(Duration::from_millis(100));
            }
            // Anything else concerns that one connection (say, reset while it was queued).
            _ => log!("accept: {err}"),
        }
        None
    }

    fn accept_with_spare(&mut self, listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
        self.0 = None; // closes the spare: one descriptor is free now
        let accepted = listener.accept(); // blocks until a client comes: no spinning
        self.0 = File::open("/dev/null").ok(); // the spare first: is there room again?
        match accepted {
            Ok(accepted) if self.0.is_some() => Some(accepted),
            Ok((stream, _)) => {
                log!("accept: out of file descriptors; answering 503");
                refuse(stream, "out of file descriptors");
                self.0 = File::open("/dev/null").ok(); // the refused client's slot
                None
            }
            Err(err) => {
                log!("accept: {err}; pausing 100 ms");
                thread::sleep(Duration::from_millis(100));
                None
            }
        }
    }
}
// ANCHOR_END: reserve

// ANCHOR: refuse
/// Answers `503` to a connection we cannot serve, before reading its request, and closes it.
fn refuse(mut stream: TcpStream, why: &str) {
    let answer = http::reject(Status::ServiceUnavailable, why);
    // Best effort, and quick: a client that does not read its 503 is not worth waiting for.
    if send(&mut stream, &answer, Duration::from_secs(1)).is_ok() {
        linger(stream); // its request is still unread
    }
}
// ANCHOR_END: refuse

// ANCHOR: args
/// Step 1: an iterative HTTP server that serves one connection at a time.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on; port 0 picks a free port
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// Close a connection that has not sent a whole request head for this many seconds
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout_secs: u64,
    /// Set the soft limit on open descriptors (RLIMIT_NOFILE) to N [default: the hard limit]
    #[arg(long, value_name = "N")]
    max_fds: Option<u64>,
}
// ANCHOR_END: args

// ANCHOR: set_fd_limit
/// Sets the soft limit on open file descriptors: to `max_fds` if given, so that running out is
/// cheap to try, or else up to the hard limit, as servers do.
fn set_fd_limit(max_fds: Option<u64>) -> anyhow::Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    let soft = max_fds.unwrap_or(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)
        .with_context(|| format!("cannot set RLIMIT_NOFILE to {soft} (hard limit {hard})"))
}
// ANCHOR_END: set_fd_limit

/// Prints the banner that tests and the benchmark read, then hints for a human.
fn announce(listener: &TcpListener) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("getsockname")?;
    let pid = std::process::id();
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "listening on http://{addr} (pid {pid})")?;
    stdout.flush()?;
    log!(
        "try:   curl -v http://{addr}/   (then hold a connection open with: nc {} {})",
        addr.ip(),
        addr.port()
    );
    log!("watch: lsof -p {pid}   ps -o pid,stat,wchan:20,cmd -p {pid}");
    Ok(())
}
