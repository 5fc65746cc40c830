//! Step 6: the loop of step 5, but it sleeps in `select(2)` until a socket is ready.
//!
//! Step 5 asked every socket "anything for me?" without end, and burnt a core doing it. Here
//! the loop hands the kernel two sets of descriptors, those it wants to read from and those it
//! wants to write to, and `select` puts the thread to sleep until one of them is ready or the
//! nearest deadline comes. Then only the ready connections get a turn. The connections, their
//! state machine (`conn.rs`) and the HTTP are step 5's, unchanged: only the waiting changed.
//!
//! Cost: the sets are rebuilt before every call and the kernel scans all of them, and we scan
//! them again after: each wake-up costs O(watched), not O(ready). And a set is a bitmap of
//! `FD_SETSIZE` (1024) bits: a descriptor numbered 1024 or more cannot be watched at all.
//!
//! Run it and watch it:
//!
//! ```text
//! cargo run -p step06-select
//! top -p PID                                     # 0% CPU while idle: it sleeps in select
//! strace -T -e trace=pselect6 -p PID             # one select per wake-up (glibc calls pselect6)
//! wrk -c 100 -d 5s http://127.0.0.1:8080/
//! ```

mod conn;
mod http;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nix::errno::Errno;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::select::{FdSet, select};
use nix::sys::time::{TimeVal, TimeValLike};

use conn::{Connection, Phase, Progress};
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
    // The model: sleep in `select` until a socket is ready or a deadline comes, then give a
    // turn to the connections that are ready, due, or left with work from their last turn.
    let mut connections: Vec<Connection> = Vec::new();
    // One flag per connection: it stopped last time with more to do (`Yielded`).
    let mut again: Vec<bool> = Vec::new();
    loop {
        // ANCHOR: wait
        let (listener_ready, ready) = {
            // The sets are rebuilt for every call: `select` overwrites them with its answer.
            let mut readable = FdSet::new();
            let mut writable = FdSet::new();
            readable.insert(listener.as_fd());
            for conn in &connections {
                match conn.wants() {
                    Phase::Writing => writable.insert(conn.stream.as_fd()),
                    Phase::Reading | Phase::Lingering => readable.insert(conn.stream.as_fd()),
                    Phase::Waiting => {} // step 8's: a worker has its request
                }
            }
            let mut sleep = sleep_until(&connections, &again);
            // `select` is never restarted after a signal, SA_RESTART or not: EINTR, go round.
            match select(None, &mut readable, &mut writable, None, sleep.as_mut()) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(err) => return Err(err).context("select"),
            }
            // The kernel scanned every descriptor; now we scan them all again for its answer.
            let ready: Vec<bool> = (connections.iter().zip(&again))
                .map(|(conn, &again)| {
                    let fd = conn.stream.as_fd();
                    again || readable.contains(fd) || writable.contains(fd)
                })
                .collect();
            (readable.contains(listener.as_fd()), ready)
        };
        // ANCHOR_END: wait
        if listener_ready {
            accept_all(&listener, &mut reserve, &mut connections, timeout);
        }
        let now = Instant::now();
        let mut turn = ready.into_iter();
        again.clear();
        connections.retain_mut(|conn| {
            // New connections (beyond `ready`) get a turn at once: their request is likely in.
            let due = turn.next().unwrap_or(true) || conn.deadline() <= now;
            let progress = if due {
                conn.drive(now)
            } else {
                Progress::Blocked
            };
            match progress {
                Progress::Blocked | Progress::Yielded => {
                    again.push(matches!(progress, Progress::Yielded));
                    true
                }
                Progress::Closed(why) => {
                    if let Some(err) = why {
                        log!("{}: {err}", conn.peer);
                    }
                    false // dropping the connection closes its socket
                }
            }
        });
    }
    // ANCHOR_END: event_loop
}

// ANCHOR: sleep_until
/// How long `select` may sleep: not at all if a connection has work left from its last turn,
/// else until the nearest deadline (a head, a write window, a lingering close), or without end
/// when there is no connection.
fn sleep_until(connections: &[Connection], again: &[bool]) -> Option<TimeVal> {
    if again.contains(&true) {
        return Some(TimeVal::zero());
    }
    let nearest = connections.iter().map(Connection::deadline).min()?;
    let left = nearest.saturating_duration_since(Instant::now());
    // Rounded up, so that we do not wake a moment early and go round for nothing.
    let micros = i64::try_from(left.as_micros()).unwrap_or(i64::MAX);
    Some(TimeVal::microseconds(micros.saturating_add(1)))
}
// ANCHOR_END: sleep_until

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
        // `FD_SETSIZE`: an `fd_set` is a bitmap of 1024 bits, so select cannot watch a
        // descriptor numbered 1024 or more (and nix's `FdSet::insert` would panic on it).
        // Such a connection is refused before it is ever inserted.
        if stream.as_raw_fd() >= libc::FD_SETSIZE as i32 {
            log!(
                "{peer}: descriptor {} is beyond FD_SETSIZE; answering 503",
                stream.as_raw_fd()
            );
            refuse(stream, "too many connections for select");
            continue;
        }
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
/// libuv's trick). Either way the queue is emptied, so `select` does not report the listener
/// ready again at once: the loop sleeps instead of spinning.
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
/// Step 6: an HTTP server whose one thread sleeps in select(2) until a socket is ready.
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
    log!("watch: strace -T -e trace=pselect6 -p {pid}   top -p {pid}   lsof -p {pid}");
    Ok(())
}
