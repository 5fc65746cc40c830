//! Step 4: a fixed pool of threads.
//!
//! Step 3 started a thread for every connection, without limit. Here a fixed number of worker
//! threads (`--workers`) is started once, and the accept loop hands each connection to the pool
//! through a queue. Thread creation leaves the per-connection path, and the number of threads
//! no longer follows the number of clients: the server's footprint is fixed, whatever the load.
//!
//! Cost: a worker is busy for as long as its client stays connected, idle or not, so `workers`
//! slow or idle clients stall everybody else. And the queue in front of the workers must be
//! bounded (`--max-queue`): beyond it, a client is told `503` at once instead of waiting forever.
//!
//! Run it and watch it:
//!
//! ```text
//! cargo run -p step04-pool -- --workers 2
//! nc 127.0.0.1 8080 & nc 127.0.0.1 8080 &        # two idle clients hold both workers
//! curl -v http://127.0.0.1:8080/                 # waits until one of them times out
//! grep Threads /proc/PID/status                   # always workers + 1
//! ```

mod http;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use threadpool::ThreadPool;

use http::{Parse, Response, Status};

fn main() -> anyhow::Result<()> {
    // ANCHOR: setup
    let args = Args::parse();
    let timeout = Duration::from_secs(args.timeout_secs);
    set_fd_limit(args.max_fds)?;
    let listener =
        TcpListener::bind(&args.addr).with_context(|| format!("cannot listen on {}", args.addr))?;
    let mut reserve = Reserve::open()?;
    // ANCHOR: pool
    // All the workers start now, once; they wait on the pool's queue for connections.
    let pool = ThreadPool::with_name("worker".into(), args.workers);
    let capacity = args.workers + args.max_queue; // connections being served or waiting
    let mut refused = 0_u64;
    // ANCHOR_END: pool
    announce(&listener)?;
    // ANCHOR_END: setup

    // ANCHOR: accept_loop
    // The main thread only accepts and queues; a fixed set of workers serves.
    loop {
        match listener.accept() {
            // threadpool's queue has no bound of its own: under overload it would grow without
            // limit, and every queued client would wait longer than the last. So we bound it:
            // when every worker is busy and `--max-queue` connections wait, the answer is 503.
            // The count errs on the safe side: a worker counts as busy until its job returns,
            // a moment after its client has seen the connection close.
            Ok((stream, _)) if pool.active_count() + pool.queued_count() >= capacity => {
                refused += 1;
                if refused.is_power_of_two() {
                    eprintln!("queue full: {refused} connections refused with 503 so far");
                }
                refuse(stream, "all workers are busy and the queue is full");
            }
            Ok((stream, peer)) => pool.execute(move || {
                if let Err(err) = handle_connection(stream, timeout) {
                    eprintln!("{peer}: {err}");
                }
            }),
            Err(err) => reserve.accept_failed(&listener, err),
        }
    }
    // ANCHOR_END: accept_loop
}

// ANCHOR: handle_connection
// ANCHOR: serve
/// Serves one client until it closes, breaks the rules, or keeps us waiting past `timeout`.
fn handle_connection(mut stream: TcpStream, timeout: Duration) -> io::Result<()> {
    // A write blocks while the client's receive window is full; give up on a client that reads
    // nothing at all for `timeout`.
    stream.set_write_timeout(Some(timeout))?;
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
                    return send(&mut stream, &http::reject(status, why));
                }
                Parse::Partial => {}
            }
            if !read_more(&mut stream, &mut received, deadline)? {
                return Ok(()); // the client has left, or the deadline passed: close
            }
        };
        received.drain(..len);
        let response = http::respond(&request);
        send(&mut stream, &response)?;
        if !response.keep_alive {
            return Ok(()); // dropping `stream` closes the socket
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
/// Writes a whole response; `write_all` loops over partial writes for us.
fn send(stream: &mut TcpStream, response: &Response) -> io::Result<()> {
    stream.write_all(&response.bytes)?;
    let mut left = response.more;
    while left > 0 {
        let chunk = http::pattern(left);
        stream.write_all(chunk)?;
        left -= chunk.len() as u64;
    }
    Ok(())
}
// ANCHOR_END: send
// ANCHOR_END: handle_connection

// ANCHOR: reserve
/// A spare descriptor kept open, so that there is one to give back when the process runs out.
///
/// When every descriptor is taken, Linux's `accept` fails with `EMFILE` at once, before it even
/// looks at the queue (it picks the new descriptor's number first): a naive loop spins at 100%
/// CPU, client or no client. Instead we close the spare and wait in `accept` for the next
/// client, answer it `503` from the freed slot, close it, and take the spare back (libev's and
/// libuv's trick). Since we wait with the spare closed, the first client after descriptors free
/// up may still get that `503`; the ones after it are served.
struct Reserve(Option<File>);

impl Reserve {
    fn open() -> anyhow::Result<Reserve> {
        let spare = File::open("/dev/null").context("cannot open the reserve descriptor")?;
        Ok(Reserve(Some(spare)))
    }

    fn accept_failed(&mut self, listener: &TcpListener, err: io::Error) {
        match err.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => self.refuse_one(listener),
            // The kernel is short of memory for sockets: give it a moment rather than spin.
            Some(libc::ENOBUFS | libc::ENOMEM) => {
                eprintln!("accept: {err}; pausing 100 ms");
                thread::sleep(Duration::from_millis(100));
            }
            // Anything else concerns that one connection (say, reset while it was queued).
            _ => eprintln!("accept: {err}"),
        }
    }

    fn refuse_one(&mut self, listener: &TcpListener) {
        self.0 = None; // closes the spare: one descriptor is free now
        match listener.accept() {
            Ok((stream, _)) => {
                eprintln!("accept: out of file descriptors; answering 503");
                refuse(stream, "out of file descriptors");
            }
            Err(err) => {
                eprintln!("accept: {err}; pausing 100 ms");
                thread::sleep(Duration::from_millis(100));
            }
        }
        match File::open("/dev/null") {
            Ok(spare) => self.0 = Some(spare),
            Err(err) => eprintln!("cannot reopen the reserve descriptor: {err}"),
        }
    }
}
// ANCHOR_END: reserve

// ANCHOR: refuse
/// Answers `503` to a connection we cannot serve, and closes it.
fn refuse(mut stream: TcpStream, why: &str) {
    let _ = send(&mut stream, &http::reject(Status::ServiceUnavailable, why)); // best effort
}
// ANCHOR_END: refuse

// ANCHOR: args
/// Step 4: an HTTP server with a fixed pool of worker threads and a bounded queue.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on; port 0 picks a free port
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// Close a connection that has not sent a whole request head for this many seconds
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,
    /// Set the soft limit on open descriptors (RLIMIT_NOFILE) to N [default: the hard limit]
    #[arg(long, value_name = "N")]
    max_fds: Option<u64>,
    // ANCHOR: flags
    /// Worker threads in the pool: at most this many clients are served at once
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    workers: usize,
    /// Connections that may wait for a worker; one more is answered 503
    #[arg(long, value_name = "N", default_value_t = 128,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1_000_000))]
    max_queue: usize,
    // ANCHOR_END: flags
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
    eprintln!(
        "try:   curl -v http://{addr}/   (then hold a connection open with: nc {} {})",
        addr.ip(),
        addr.port()
    );
    eprintln!(
        "watch: grep Threads /proc/{pid}/status   ps -L -o pid,lwp,stat,wchan:16,comm -p {pid}   lsof -p {pid}"
    );
    Ok(())
}
