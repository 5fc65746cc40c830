//! Step 3: a thread per connection.
//!
//! The accept loop again, but each connection gets a thread instead of a process. Threads
//! share the process: one descriptor table, one address space. So there is no copy of the
//! connection to close in the parent, nothing to reap (a detached thread's resources are freed
//! when it returns), and a thread costs far less to start than a process.
//!
//! Cost: every client still holds a whole thread, stack and kernel task, for as long as it stays
//! connected, idle or not; a thousand idle clients are a thousand threads.
//!
//! Run it and watch it:
//!
//! ```text
//! cargo run -p step03-threads
//! wrk -c 200 -d 10s http://127.0.0.1:8080/      # terminal 2
//! grep Threads /proc/PID/status                  # terminal 3: 201 during the run, 1 after
//! ps -L -o pid,lwp,stat,comm -p PID              # one line per thread
//! ```

mod http;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use http::{Parse, Response, Status};

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
    // The main thread only accepts; each connection gets a thread of its own.
    loop {
        match listener.accept() {
            Ok((stream, peer)) => spawn_handler(stream, peer, timeout),
            Err(err) => reserve.accept_failed(&listener, err),
        }
    }
    // ANCHOR_END: accept_loop
}

// ANCHOR: spawn_handler
// ANCHOR: stack_size
/// The stack each connection's thread gets. Rust's default is 2 MiB; a handler needs a few
/// KiB (a 4 KiB read buffer, httparse's 64 headers), so 128 KiB leaves a wide margin. Only the
/// pages a thread touches take memory, but every stack reserves its whole size of address
/// space, plus a guard page that turns an overflow into a crash instead of silent corruption.
const STACK_SIZE: usize = 128 * 1024;
// ANCHOR_END: stack_size

// ANCHOR: spawn
/// Starts a thread to serve this connection, or answers `503` if no thread can be had.
fn spawn_handler(stream: TcpStream, peer: SocketAddr, timeout: Duration) {
    // The connection is handed over only once the thread exists: if `spawn` fails, it drops
    // the closure, and whatever the closure had taken with it would be closed unanswered.
    let (handover, arrival) = mpsc::sync_channel::<TcpStream>(1);
    let spawned = thread::Builder::new()
        .name("handler".into()) // shows in `ps -L` and `top -H`
        .stack_size(STACK_SIZE)
        .spawn(move || {
            let Ok(stream) = arrival.recv() else { return };
            if let Err(err) = handle_connection(stream, timeout) {
                eprintln!("{peer}: {err}");
            }
        });
    match spawned {
        // Dropping the JoinHandle detaches the thread: nobody joins it, and the kernel and the
        // thread library free its stack when it returns (no zombie threads to reap).
        Ok(_detached) => {
            let _ = handover.send(stream); // the channel has room for one: this never blocks
        }
        // EAGAIN: out of threads (RLIMIT_NPROC, threads-max, pid_max) or of memory for a stack.
        Err(err) => {
            eprintln!("spawn: {err}; answering 503");
            refuse(stream, "cannot start a thread for this connection");
        }
    }
}
// ANCHOR_END: spawn
// ANCHOR_END: spawn_handler

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
/// Step 3: an HTTP server that starts a thread per connection.
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
        "watch: grep Threads /proc/{pid}/status   ps -L -o pid,lwp,stat,comm -p {pid}   lsof -p {pid}"
    );
    Ok(())
}
