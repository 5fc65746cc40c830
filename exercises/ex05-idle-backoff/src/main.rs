//! # Exercise: back off when idle
//!
//! This crate is a copy of `step05-busy-poll` (Step 5). The task (the book, chapter "Step 5",
//! section "Exercises"):
//!
//! Keep the busy loop, but stop it burning a core when nothing happens: when a whole pass over
//! the listener and every connection made no progress at all, sleep a little before the next pass
//! (say 1 ms, doubling while nothing happens, up to 20 ms, and back to none as soon as something
//! does). Tell "progress" from "nothing": `accept` found a client, or a connection's `drive` did
//! something other than return `Blocked` at once (you may compare what it wants before and after,
//! or count the bytes it holds). Measure idle CPU with `top` before and after, and the latency it
//! costs with `curl -w '%{time_total}'`.
//!
//! The place to start is marked `EXERCISE`. Check your work from the workspace root with
//! `./exercises/check ex05-idle-backoff`: it runs the contract every server keeps and this exercise's own
//! claims, and says which still fail. The reference solution is `solution.patch` beside this
//! crate: try first.
//!
//! What follows is step05-busy-poll's own description.
//!
//! Step 5: one thread, non-blocking sockets, and a loop that never sleeps.
//!
//! Steps 2 to 4 gave each client a process or a thread that could block in `read` and `write`
//! while the others went on. Here there is one thread for everybody, so it must never block:
//! the listener and every connection are put in non-blocking mode, where a call that would wait
//! fails with `WouldBlock` instead. The loop accepts whoever is waiting, then gives every
//! connection a turn, and starts again at once. Each connection remembers where it stopped in a
//! small state machine (`conn.rs`), the piece every later event loop reuses unchanged.
//!
//! Cost: the loop never sleeps, so the process burns a whole core even with no client at all;
//! and a slow request (`/sleep/MS`) runs on the one thread, so it stalls everybody.
//!
//! Run it and watch it:
//!
//! ```text
//! cargo run -p step05-busy-poll
//! top -p PID                                     # 100% CPU, with no client at all
//! wrk -c 100 -d 5s http://127.0.0.1:8080/        # a hundred clients, one thread
//! grep Threads /proc/PID/status                  # 1
//! ```

mod conn;
mod http;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use conn::{Connection, Progress};
use http::Status;

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
    // Non-blocking: `accept` with nobody waiting fails with `WouldBlock` instead of sleeping.
    listener
        .set_nonblocking(true)
        .context("cannot make the listener non-blocking")?;
    let mut reserve = Reserve::open()?;
    announce(&listener)?;
    // ANCHOR_END: setup

    // ANCHOR: event_loop
    // The whole model: one thread, one loop, never a wait. Accept whoever is there, give every
    // connection a turn, and start again at once, whether or not anything happened.
    // EXERCISE: sleep a little when a whole pass did nothing.
    let mut connections: Vec<Connection> = Vec::new();
    loop {
        accept_all(&listener, &mut reserve, &mut connections, timeout);
        let now = Instant::now();
        connections.retain_mut(|conn| match conn.drive(now) {
            Progress::Blocked | Progress::Yielded => true,
            Progress::Closed(why) => {
                if let Some(err) = why {
                    log!("{}: {err}", conn.peer);
                }
                false // dropping the connection closes its socket
            }
        });
    }
    // ANCHOR_END: event_loop
}

// ANCHOR: accept_all
/// Accepts every client waiting in the listen queue, until `accept` says `WouldBlock`.
fn accept_all(
    listener: &TcpListener,
    reserve: &mut Reserve,
    connections: &mut Vec<Connection>,
    timeout: Duration,
) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return, // nobody waits
            Err(err) => match reserve.accept_failed(listener, err) {
                Some(accepted) => accepted, // taken with the spare descriptor: serve it
                None => return,
            },
        };
        // An accepted socket does not inherit the listener's non-blocking mode on Linux.
        if let Err(err) = stream.set_nonblocking(true) {
            log!("{peer}: cannot make the socket non-blocking: {err}");
            continue;
        }
        connections.push(Connection::new(stream, peer, Instant::now(), timeout));
    }
}
// ANCHOR_END: accept_all

// ANCHOR: reserve
/// A spare descriptor kept open, so that there is one to give back when the process runs out.
///
/// When every descriptor is taken, Linux's `accept` fails with `EMFILE` at once and leaves the
/// client queued. We close the spare, accept the client with the freed slot, and try to take
/// the spare back first: if that works, descriptors have come back and the client is served
/// like any other; only if it fails is the client answered `503` and closed (libev's and
/// libuv's trick). In this loop, which polls without end anyway, `accept` is tried on every
/// turn; with nobody waiting it just says `WouldBlock`.
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

    /// Takes the clients queued while we are out of descriptors, one at a time with the spare's
    /// slot: the first for whom the spare can be taken back is served; the others are refused,
    /// until the queue is empty (an edge-triggered loop hears of the queue only once).
    fn accept_with_spare(&mut self, listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
        loop {
            self.0 = None; // closes the spare: one descriptor is free now
            let accepted = listener.accept();
            self.0 = File::open("/dev/null").ok(); // the spare first: is there room again?
            match accepted {
                Ok(accepted) if self.0.is_some() => return Some(accepted),
                Ok((stream, _)) => {
                    log!("accept: out of file descriptors; answering 503");
                    refuse(stream, "out of file descriptors");
                    self.0 = File::open("/dev/null").ok(); // the refused client's slot
                }
                Err(_) => return None, // the queue is empty (WouldBlock), or the client gone
            }
        }
    }
}
// ANCHOR_END: reserve

// ANCHOR: refuse
/// Answers `503` to a connection we cannot keep, and closes it, without ever waiting: the
/// answer is written if the socket has room (a new socket has), our side is shut (FIN), and
/// what the client has already sent is read and dropped, so that the close is not a reset.
fn refuse(mut stream: TcpStream, why: &str) {
    let answer = http::reject(Status::ServiceUnavailable, why);
    let _ = stream.set_nonblocking(true);
    let _ = stream.write(&answer.bytes); // best effort
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.read(&mut [0; 4096]);
}
// ANCHOR_END: refuse

// ANCHOR: args
/// Step 5: an HTTP server whose one thread polls non-blocking sockets in a loop that never sleeps.
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
    log!(
        "watch: top -p {pid} (100% CPU, even idle)   grep Threads /proc/{pid}/status   lsof -p {pid}"
    );
    Ok(())
}
