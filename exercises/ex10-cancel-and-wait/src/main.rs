//! # Exercise: cancel, and wait for the completion
//!
//! This crate is a copy of `step10-io-uring` (Step 10) with one rule taken out, the one the step
//! is built around: a connection whose `recv` or `send` is in flight is never dropped. The task
//! (the book, chapter "Step 10", section "Exercises"):
//!
//! Here, `close` drops a connection at once, even with an operation in flight: its buffer is
//! freed while the kernel may still write into it, and the socket stays open inside the kernel
//! (the operation holds it), so a silent client whose deadline has passed never sees the close.
//! Make `close` cancel the operation in flight instead (`opcode::AsyncCancel`, aimed at the
//! operation's `user_data`), keep the connection in the table, marked as closing, serve it no
//! more, and close it when the operation's completion arrives (`ECANCELED`, or a result that
//! came first).
//!
//! The place to start is marked `EXERCISE`. Check your work from the workspace root with
//! `./exercises/check ex10-cancel-and-wait`: it runs the contract every server keeps and this
//! exercise's own claims, and says which still fail. The reference solution is `solution.patch`
//! beside this crate: try first.
//!
//! What follows is step10-io-uring's own description.
//!
//! Step 10: a proactor on `io_uring(7)`: the loop no longer asks which socket is ready; it
//! hands the kernel the operations themselves, and reaps their results.
//!
//! Steps 6 and 7 were *reactors*: the kernel said "this socket is ready", and we then made the
//! `read` or `write` ourselves, one system call each. Here the kernel does the I/O. We write
//! requests (`accept`, `recv`, `send`, `close`, a timeout) into a *submission queue*, a ring in
//! memory that the kernel shares with us, and one `io_uring_enter` hands it all of them; when
//! each is done, the kernel writes its result into a *completion queue*, the other ring, where
//! we read it without any system call. Each request carries a tag of ours (`user_data`): which
//! connection, which operation, and a generation, so that a late completion is never mistaken
//! for one of the next connection that gets the same descriptor number. Under load, one
//! `io_uring_enter` submits many operations and collects many results: the system calls per
//! request fall below one. `http.rs` is step 7's unchanged; `uring_conn.rs` is step 7's
//! `conn.rs` turned from "call `read`, stop at `WouldBlock`" into "submit `recv`, take the
//! completion".
//!
//! Cost: ownership. A buffer handed to the kernel with a `recv` or `send` is the kernel's until
//! its completion arrives: it must not move, be reused or be freed meanwhile, whatever else
//! happens (a deadline, a reset, a close). So each connection owns its buffers, has at most
//! one operation in flight, and is freed only after that operation completes: to close early we
//! cancel and wait. And every idle connection keeps a 16 KiB buffer lent to a `recv`. Still one
//! thread: a slow request (`/sleep/MS`) stalls everybody, as in step 7.
//!
//! Run it and watch it:
//!
//! ```text
//! cargo run -p step10-io-uring
//! wrk -c 100 -d 5s http://127.0.0.1:8080/     # a hundred clients, one thread
//! strace -c -f -p PID                         # io_uring_enter, and no read, write or epoll_wait
//! ls -l /proc/PID/fd                          # anon_inode:[io_uring]: the rings
//! ```

mod http;
mod uring_conn;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use io_uring::{IoUring, opcode, squeue, types};

use plumbing::{Reserve, set_fd_limit};
use uring_conn::{Connection, Io, Progress, Step};

/// `eprintln!` that never panics. Logging must never be fatal, and `eprintln!` panics when the
/// write fails: with stderr piped into `head -1`, say, once `head` has left (`EPIPE`). A log
/// line that cannot be written is dropped.
macro_rules! log {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), $($arg)*);
    }};
}

// After the macro, which it uses.
mod plumbing;

fn main() -> anyhow::Result<()> {
    // ANCHOR: setup
    let args = Args::parse();
    let timeout = Duration::from_secs(args.timeout_secs);
    set_fd_limit(args.max_fds)?;
    let listener =
        TcpListener::bind(&args.addr).with_context(|| format!("cannot listen on {}", args.addr))?;
    // Non-blocking, for the reserve descriptor's own `accept` calls, which must never wait. The
    // ring's `accept` waits all the same: the kernel arms it to retry when a client comes.
    listener
        .set_nonblocking(true)
        .context("cannot make the listener non-blocking")?;
    let mut reserve = Reserve::open()?;
    let mut ring = Ring::new(args.entries)?;
    announce(&listener)?;
    // ANCHOR_END: setup

    // ANCHOR: event_loop
    // The model: keep an operation in flight for everything we wait for (an `accept` on the
    // listener, a `recv` or a `send` per connection, one timeout for the earliest deadline);
    // hand the new ones to the kernel and sleep until at least one completes, in one call;
    // then take every completion, and give the connections concerned their turn.
    let mut table = Table::default();
    let mut timers = Timers::default();
    let mut listening = Listening::Accept;
    ring.push(&listening.entry(&listener));
    loop {
        // ANCHOR: wait
        timers.arm(Instant::now(), &mut ring);
        // One system call: submit everything queued since the last, and wait for one result.
        // A signal cuts the wait short (EINTR); a full completion ring (EBUSY) is emptied below.
        match ring.uring.submit_and_wait(1) {
            Ok(_) => {}
            Err(err) if matches!(err.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
            Err(err) => return Err(err).context("io_uring_enter"),
        }
        // ANCHOR_END: wait
        let now = Instant::now();
        let mut due = Vec::new();
        // The completions, read from the shared ring without a system call. Copied out first:
        // handling them pushes new submissions on the same ring.
        let done: Vec<(u64, i32)> = ring
            .uring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in done {
            let tag = Tag::decode(user_data);
            match tag.op {
                Op::Accept => {
                    listening = match accepted(result, &listener, &mut reserve) {
                        Ok((stream, peer)) => {
                            // Due at once: its request has often arrived with it.
                            due.push(table.insert(Connection::new(stream, peer, now, timeout)));
                            Listening::Accept
                        }
                        Err(Refused::OutOfFds) => Listening::Poll,
                        Err(Refused::Other) => Listening::Accept,
                    };
                    ring.push(&listening.entry(&listener));
                }
                Op::Listen => {
                    // A client waits, and we were out of descriptors: try `accept` again.
                    listening = Listening::Accept;
                    ring.push(&listening.entry(&listener));
                }
                Op::Timer => timers.fired(tag.generation),
                Op::Recv | Op::Send => {
                    complete(tag, outcome(result), &mut table, &mut ring, &mut due)
                }
                Op::Cancel | Op::Close | Op::Unknown => {} // nothing waits on these
            }
        }
        timers.expire(now, &mut table, &mut due);
        // A connection may be due twice (a completion and a timer): once is enough.
        due.sort_unstable();
        due.dedup();
        for fd in due {
            serve(fd, now, &mut table, &mut ring, &mut timers);
        }
    }
    // ANCHOR_END: event_loop
}

// ANCHOR: complete
/// The `recv` or `send` of connection `tag.fd` has completed: its buffer is ours again.
fn complete(
    tag: Tag,
    result: io::Result<usize>,
    table: &mut Table,
    ring: &mut Ring,
    due: &mut Vec<RawFd>,
) {
    let Some(slot) = table.get_mut(tag.fd) else {
        return; // never: a connection stays until its operation completes
    };
    if slot.generation != tag.generation {
        return; // never either: that was another connection on the same number
    }
    let step = slot.conn.completed(result);
    match step {
        Step::Stop(Progress::Closed(why)) => close(tag.fd, why, table, ring),
        Step::Again | Step::Stop(_) => due.push(tag.fd),
    }
}
// ANCHOR_END: complete

// ANCHOR: serve
/// Gives connection `fd` its turn: submits what it asks for next, or closes it; then brings
/// its deadline up to date.
fn serve(fd: RawFd, now: Instant, table: &mut Table, ring: &mut Ring, timers: &mut Timers) {
    let Some(slot) = table.get_mut(fd) else {
        return; // closed earlier in this same turn
    };
    match slot.conn.drive(now) {
        Progress::Submit(io) => {
            let tag = Tag::new(io.into(), fd, slot.generation);
            let entry = match io {
                Io::Recv => {
                    let (buffer, len) = slot.conn.recv_buffer();
                    opcode::Recv::new(types::Fd(fd), buffer, len).build()
                }
                Io::Send => {
                    let (buffer, len) = slot.conn.send_buffer();
                    opcode::Send::new(types::Fd(fd), buffer, len)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                }
            };
            // SAFETY: the buffer is the connection's own (`inbox` for a `recv`, `output` for a
            // `send`), on the heap, so it does not move when the table does. From now until
            // this operation's completion the connection is `busy`: it neither touches, resizes
            // nor frees that buffer, and starts no other operation. (EXERCISE: and `close` does
            // not yet keep it in the table until then: that is the task.)
            unsafe { ring.push_unchecked(&entry.user_data(tag.encode())) };
        }
        Progress::Waiting => {}
        Progress::Closed(why) => {
            close(fd, why, table, ring);
            return;
        }
    }
    timers.follow(fd, slot);
}
// ANCHOR_END: serve

// ANCHOR: close
/// Closes connection `fd`, logging `why`. If an operation is still in flight, the kernel may
/// still be using its buffer: ask for it to be cancelled, and close once its completion (of
/// `ECANCELED`, or of a result that came first) arrives. Otherwise the socket goes to the
/// kernel with a `close` operation, and the connection, buffers and all, is dropped.
fn close(fd: RawFd, why: Option<io::Error>, table: &mut Table, ring: &mut Ring) {
    let Some(slot) = table.remove(fd) else {
        return;
    };
    if let Some(err) = why {
        log!("{}: {err}", slot.conn.peer);
    }
    // EXERCISE: if an operation is in flight (`slot.conn.busy()`), the kernel may still write
    // into this connection's buffer, and holds its socket open: the connection must not be
    // dropped yet. Cancel the operation, keep the connection (closing), and close it when the
    // operation's completion arrives.
    let tag = Tag::new(Op::Close, fd, slot.generation).encode();
    let close = opcode::Close::new(types::Fd(slot.conn.into_fd())).build();
    ring.push(&close.user_data(tag));
}
// ANCHOR_END: close

// ANCHOR: tag
/// What a submission is, in the 64 bits of `user_data` that its completion brings back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// `accept` on the listener.
    Accept,
    /// Out of descriptors: wait for the listener to have a client (`poll`), then `accept`.
    Listen,
    /// The timeout for the earliest deadline.
    Timer,
    Recv,
    Send,
    Cancel,
    Close,
    Unknown,
}

impl From<Io> for Op {
    fn from(io: Io) -> Op {
        match io {
            Io::Recv => Op::Recv,
            Io::Send => Op::Send,
        }
    }
}

/// The operation, the connection's descriptor and its generation: bits 56 to 63, 0 to 31 and
/// 32 to 55. The generation tells two connections apart that had the same descriptor number
/// one after the other, so that a completion, or a cancellation, is never applied to the
/// wrong one.
#[derive(Clone, Copy, Debug)]
struct Tag {
    op: Op,
    fd: RawFd,
    generation: u32,
}

const OPS: [Op; 7] = [
    Op::Accept,
    Op::Listen,
    Op::Timer,
    Op::Recv,
    Op::Send,
    Op::Cancel,
    Op::Close,
];

impl Tag {
    fn new(op: Op, fd: RawFd, generation: u32) -> Tag {
        Tag { op, fd, generation }
    }

    fn encode(self) -> u64 {
        let op = OPS
            .iter()
            .position(|&op| op == self.op)
            .unwrap_or(OPS.len()) as u64;
        let generation = u64::from(self.generation & 0xff_ffff);
        (op << 56) | (generation << 32) | u64::from(self.fd as u32)
    }

    fn decode(user_data: u64) -> Tag {
        let op = usize::try_from(user_data >> 56).unwrap_or(usize::MAX);
        Tag {
            op: OPS.get(op).copied().unwrap_or(Op::Unknown),
            fd: user_data as u32 as RawFd,
            generation: ((user_data >> 32) & 0xff_ffff) as u32,
        }
    }
}
// ANCHOR_END: tag

/// A completion's result: bytes moved (or a new descriptor), or `-errno`.
fn outcome(result: i32) -> io::Result<usize> {
    usize::try_from(result).map_err(|_| io::Error::from_raw_os_error(-result))
}

// ANCHOR: ring
/// The submission and completion queues, and what it takes to fill the first.
struct Ring {
    uring: IoUring,
}

impl Ring {
    /// Sets up the rings with room for `entries` submissions at a time (the completion ring
    /// gets twice that). A kernel that refuses (too old: `ENOSYS`; `io_uring` turned off by the
    /// sysctl `kernel.io_uring_disabled` or blocked by a seccomp filter, as container runtimes
    /// do: `EPERM`) ends the server here, with one line that says so.
    fn new(entries: u32) -> anyhow::Result<Ring> {
        match IoUring::new(entries) {
            Ok(uring) => Ok(Ring { uring }),
            Err(err) => Err(anyhow::anyhow!(
                "this kernel refuses io_uring (io_uring_setup: {err}); see \
                 /proc/sys/kernel/io_uring_disabled, or the seccomp profile of this container"
            )),
        }
    }

    /// Queues an operation that lends the kernel no memory of ours (accept, poll, cancel,
    /// close, timeout).
    fn push(&mut self, entry: &squeue::Entry) {
        // SAFETY: these operations lend the kernel no memory of ours beyond their submission:
        // a timeout's `timespec` is read when the entry is submitted, and it lives in
        // `Timers`, which outlives the loop.
        unsafe { self.push_unchecked(entry) }
    }

    /// Queues an operation; when the submission ring is full, hands it to the kernel first.
    ///
    /// # Safety
    /// Whatever memory `entry` points to must stay valid and untouched until its completion.
    unsafe fn push_unchecked(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: passed on to the caller.
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                return;
            }
            if let Err(err) = self.uring.submit() {
                log!("io_uring_enter: {err}");
            }
        }
    }
}
// ANCHOR_END: ring

// ANCHOR: accept
/// What the listener has in flight: an `accept`, or, while we are out of descriptors, a `poll`
/// for the next client. (An `accept` without a free descriptor fails at once, client or not:
/// submitting it again at once would spin.)
#[derive(Clone, Copy)]
enum Listening {
    Accept,
    Poll,
}

impl Listening {
    fn entry(self, listener: &TcpListener) -> squeue::Entry {
        let fd = types::Fd(listener.as_raw_fd());
        let (entry, op) = match self {
            Listening::Accept => (
                opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                    .flags(libc::SOCK_CLOEXEC)
                    .build(),
                Op::Accept,
            ),
            Listening::Poll => (
                opcode::PollAdd::new(fd, libc::POLLIN as u32).build(),
                Op::Listen,
            ),
        };
        entry.user_data(Tag::new(op, 0, 0).encode())
    }
}

/// Why an `accept` gave us no connection to serve.
enum Refused {
    /// No descriptor is free: the next `accept` would fail at once.
    OutOfFds,
    /// That one client only (reset while queued, say).
    Other,
}

/// An `accept` has completed: the new connection, or why there is none. A failure is met as
/// in step 7: with the reserve descriptor, which also takes the clients queued meanwhile,
/// serving the first if descriptors are back and refusing the others.
fn accepted(
    result: i32,
    listener: &TcpListener,
    reserve: &mut Reserve,
) -> Result<(TcpStream, SocketAddr), Refused> {
    let stream = match outcome(result) {
        // SAFETY: the kernel has just made this descriptor for us, and nothing else owns it.
        Ok(fd) => unsafe { TcpStream::from_raw_fd(fd as RawFd) },
        Err(err) => {
            let out_of_fds = matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
            return match reserve.accept_failed(listener, err) {
                Some(accepted) => Ok(accepted), // taken with the spare descriptor: serve it
                None if out_of_fds => Err(Refused::OutOfFds),
                None => Err(Refused::Other),
            };
        }
    };
    let peer = match stream.peer_addr() {
        Ok(peer) => peer,
        Err(_) => return Err(Refused::Other), // reset while queued: nothing to serve
    };
    // Answers are small and sent whole: send them at once, without Nagle's wait for the
    // acknowledgement of the previous segment.
    let _ = stream.set_nodelay(true);
    Ok((stream, peer))
}
// ANCHOR_END: accept

// ANCHOR: table
/// A connection in the table, with what the ring and the timers hold of it.
struct Slot {
    conn: Connection,
    /// Which connection this is: a descriptor number is reused as soon as it is closed.
    generation: u32,
    /// The time of its live entry in the timer heap, if it has one.
    timer: Option<Instant>,
}

/// The connections, indexed by descriptor number (libev's `anfd[fd]`), as in step 7.
#[derive(Default)]
struct Table {
    slots: Vec<Option<Slot>>,
    /// How many slots hold a connection: counted, never found by a scan.
    live: usize,
    generations: u32,
}

impl Table {
    /// Puts a new connection in the table, at its descriptor's number, which it returns.
    fn insert(&mut self, conn: Connection) -> RawFd {
        let fd = conn.stream.as_raw_fd();
        let Ok(at) = usize::try_from(fd) else {
            return fd;
        };
        if self.slots.len() <= at {
            self.slots.resize_with(at + 1, || None);
        }
        self.generations = self.generations.wrapping_add(1);
        self.live += 1;
        self.slots[at] = Some(Slot {
            conn,
            generation: self.generations,
            timer: None,
        });
        fd
    }

    fn get_mut(&mut self, fd: RawFd) -> Option<&mut Slot> {
        self.slots.get_mut(usize::try_from(fd).ok()?)?.as_mut()
    }

    /// Takes the connection out of the table.
    fn remove(&mut self, fd: RawFd) -> Option<Slot> {
        let slot = usize::try_from(fd)
            .ok()
            .and_then(|at| self.slots.get_mut(at))?
            .take();
        if slot.is_some() {
            self.live -= 1;
        }
        slot
    }
}
// ANCHOR_END: table

// ANCHOR: timers
/// The deadlines, earliest first, as in step 7, and one `timeout` operation in the ring for
/// the earliest of them: its completion wakes the loop as `epoll_wait`'s timeout did.
///
/// A deadline moves with every request. Moving it later costs nothing here: the old entry
/// stays, and when it comes due we find the connection's real deadline later and put it back
/// for then. Only an earlier deadline (a lingering close's second) needs a new entry, and a
/// new timeout if it is earlier than the one in flight; the old one still fires, and wakes the
/// loop for nothing.
#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Instant, RawFd, u32)>>,
    /// The timeout in flight: when it fires, and its number (the generation of its tag).
    armed: Option<(Instant, u32)>,
    count: u32,
    /// How long the last timeout submitted waits. The kernel reads it when the entry is
    /// submitted, so it must live until then: here, it does.
    timespec: types::Timespec,
}

impl Timers {
    /// Makes sure a timeout is in flight for the earliest deadline.
    fn arm(&mut self, now: Instant, ring: &mut Ring) {
        let Some(&Reverse((at, _, _))) = self.heap.peek() else {
            return;
        };
        if self.armed.is_some_and(|(armed, _)| armed <= at) {
            return;
        }
        self.count = self.count.wrapping_add(1);
        self.armed = Some((at, self.count));
        self.timespec = types::Timespec::from(at.saturating_duration_since(now));
        let timeout = opcode::Timeout::new(&self.timespec).build();
        ring.push(&timeout.user_data(Tag::new(Op::Timer, 0, self.count).encode()));
    }

    /// A timeout has fired (or been cut short): if it was the one in flight, none is now.
    fn fired(&mut self, number: u32) {
        if self
            .armed
            .is_some_and(|(_, armed)| armed & 0xff_ffff == number)
        {
            self.armed = None;
        }
    }

    /// Makes sure the heap holds an entry for `fd` no later than its deadline.
    fn follow(&mut self, fd: RawFd, slot: &mut Slot) {
        let deadline = slot.conn.deadline();
        if slot.timer.is_none_or(|at| deadline < at) {
            self.heap.push(Reverse((deadline, fd, slot.generation)));
            slot.timer = Some(deadline);
        }
    }

    /// Takes the entries that have come due: connections past their deadline go to `due`;
    /// those whose deadline moved later get an entry for then.
    fn expire(&mut self, now: Instant, table: &mut Table, due: &mut Vec<RawFd>) {
        while let Some(&Reverse((at, fd, generation))) = self.heap.peek() {
            if at > now {
                break;
            }
            self.heap.pop();
            let Some(slot) = table.get_mut(fd) else {
                continue; // closed since
            };
            if slot.generation != generation || slot.timer != Some(at) {
                continue; // another connection on that number now, or a superseded entry
            }
            slot.timer = None;
            if slot.conn.deadline() <= now {
                due.push(fd); // its turn will close it, or start its next write window
            } else {
                self.follow(fd, slot);
            }
        }
        if self.heap.len() > 2 * table.live + 1024 {
            self.rebuild(table);
        }
    }

    /// Keeps only the live entries.
    fn rebuild(&mut self, table: &Table) {
        self.heap.retain(|&Reverse((at, fd, generation))| {
            let slot = usize::try_from(fd).ok().and_then(|at| table.slots.get(at));
            slot.and_then(Option::as_ref)
                .is_some_and(|slot| slot.generation == generation && slot.timer == Some(at))
        });
    }
}
// ANCHOR_END: timers

// ANCHOR: args
/// Step 10: an HTTP server whose one thread submits its I/O to io_uring(7) and reaps the results.
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
    // ANCHOR: flags
    /// Room in the submission ring, rounded up to a power of two; the completion ring gets twice
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(2..=4096))]
    entries: u32,
    // ANCHOR_END: flags
}
// ANCHOR_END: args

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
    log!("watch: lsof -p {pid}   strace -c -f -p {pid}   grep VmRSS /proc/{pid}/status");
    Ok(())
}
