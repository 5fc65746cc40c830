//! One connection of a proactor, as a state machine.
//!
//! Step 7's `conn.rs` called `read` and `write` itself, and stopped at `WouldBlock`. Here the
//! loop never calls them: it *submits* a `recv` or a `send` to the kernel and later *reaps* its
//! completion. So this machine no longer does the I/O; it says which operation comes next
//! ([`Progress::Submit`]), lends the buffer for it ([`Connection::recv_buffer`],
//! [`Connection::send_buffer`]), and takes the result when it completes
//! ([`Connection::completed`]). Everything else is step 7's: the phases, the deadlines, the
//! rules of what follows an answer, pipelining, the write rate; with the same names, so that
//! `diff step07-epoll/src/conn.rs step10-io-uring/src/uring_conn.rs` shows the one change.
//!
//! The lesson is ownership. While a `recv` is in flight the kernel may write into `inbox` at
//! any moment; while a `send` is, it reads `output`. So at most one operation is in flight per
//! connection ([`Connection::busy`]), and neither buffer is touched, moved or freed until its
//! completion arrives: the loop keeps a connection whose operation is in flight, even one it
//! wants to close, until the kernel hands the buffer back.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::http::{self, Parse, Response, Route};

// ANCHOR: limits
/// The most bytes one `recv` takes. A head is at most 8 KiB, so this holds a whole one.
const READ_CHUNK: usize = 16 * 1024;
/// The slowest a client may take its answer, on average: this many bytes a second.
const MIN_RATE: u64 = 16 * 1024;
/// How long a lingering close waits for the client to stop sending, and how much it reads.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 4 << 20;
// ANCHOR_END: limits

// ANCHOR: connection
/// What a connection is doing, and so what it waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a request head: a `recv` in flight, until the head deadline.
    Reading,
    /// Sending an answer: a `send` in flight. Nothing is read meanwhile (backpressure: a client
    /// that sends and never reads cannot make us buffer without bound).
    Writing,
    /// After an error, our side is shut: receiving and throwing away what the client still
    /// sends, for a bounded time and count, so that the close sends FIN and not RST.
    Lingering,
}

/// What to do once the answer being written is all out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// Read the next request.
    KeepAlive,
    /// Close: nothing more can be coming.
    Close,
    /// Close politely: the client may still be sending (a refused body, pipelined requests).
    Linger,
}

/// The operations a connection submits: never more than one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// `recv` into [`Connection::recv_buffer`].
    Recv,
    /// `send` from [`Connection::send_buffer`].
    Send,
}

/// One client's connection and everything the loop must remember about it.
pub struct Connection {
    /// The socket, left in blocking mode: we never call `read` or `write` on it; the kernel
    /// waits on our behalf, inside the operations we submit.
    pub stream: TcpStream,
    pub peer: SocketAddr,
    phase: Phase,
    /// The operation in flight, if any: while it is, its buffer is the kernel's.
    busy: Option<Io>,
    /// The buffer a `recv` fills. A `Box`, so that it stays at one address even if the
    /// `Connection` moves; lent to the kernel for the length of a `recv`.
    inbox: Box<[u8]>,
    /// Bytes received and not yet parsed: part of a head, or pipelined requests.
    received: Vec<u8>,
    /// The part of the answer produced and not yet sent, and how much of it has gone out; lent
    /// to the kernel for the length of a `send`.
    output: Vec<u8>,
    written: usize,
    /// The rest of a `/bytes/N` body, produced a 64 KiB chunk at a time once `output` is out.
    body_left: u64,
    after: After,
    /// When this phase runs out: the head deadline, the next judging of the write rate, or
    /// the end of lingering.
    deadline: Instant,
    /// Writing: when the answer began.
    started: Instant,
    /// Writing: bytes of the answer sent so far. Lingering: bytes thrown away.
    count: u64,
    timeout: Duration,
}
// ANCHOR_END: connection

/// What a call of [`Connection::drive`] came to.
#[derive(Debug)]
pub enum Progress {
    /// Submit this operation; the connection is [`Connection::busy`] until it completes.
    Submit(Io),
    /// An operation is in flight: nothing to do until it completes, or the deadline passes
    /// (see [`Connection::deadline`]).
    Waiting,
    /// The connection is finished: once nothing is in flight, close the socket. `Some` says
    /// what went wrong.
    Closed(Option<io::Error>),
}

/// Where one step of the machine leaves it.
pub enum Step {
    /// Go on: the state changed and may allow more.
    Again,
    /// Stop here, with this outcome.
    Stop(Progress),
}

impl Connection {
    /// A connection just accepted, waiting for its first request head until `timeout`.
    pub fn new(stream: TcpStream, peer: SocketAddr, now: Instant, timeout: Duration) -> Self {
        Connection {
            stream,
            peer,
            phase: Phase::Reading,
            busy: None,
            inbox: vec![0; READ_CHUNK].into_boxed_slice(),
            received: Vec::new(),
            output: Vec::new(),
            written: 0,
            body_left: 0,
            after: After::KeepAlive,
            deadline: now + timeout,
            started: now,
            count: 0,
            timeout,
        }
    }

    /// The operation in flight, if any.
    pub fn busy(&self) -> Option<Io> {
        self.busy
    }

    /// When the loop must drive this connection even if no operation completes.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Where a `recv` may write, and how much: the whole inbox.
    pub fn recv_buffer(&mut self) -> (*mut u8, u32) {
        (self.inbox.as_mut_ptr(), READ_CHUNK as u32)
    }

    /// What a `send` should send: the part of the answer not yet out.
    pub fn send_buffer(&self) -> (*const u8, u32) {
        let pending = &self.output[self.written..];
        let len = u32::try_from(pending.len()).unwrap_or(u32::MAX);
        (pending.as_ptr(), len)
    }

    /// Gives up the socket, to be closed by a `close` operation. Only once nothing is in flight:
    /// the buffers go with the rest of the connection.
    pub fn into_fd(self) -> RawFd {
        self.stream.into_raw_fd()
    }

    // ANCHOR: drive
    /// Does everything that can be done now without waiting, and says what to submit next:
    /// answers the heads already received; asks for a `recv` or a `send`; or closes. Every
    /// answer costs at least one completion, so no connection can keep the loop to itself.
    pub fn drive(&mut self, now: Instant) -> Progress {
        loop {
            let step = match self.phase {
                Phase::Reading => self.read_request(now),
                Phase::Writing => self.write_answer(now),
                Phase::Lingering => self.linger(now),
            };
            if let Step::Stop(progress) = step {
                if let Progress::Submit(io) = progress {
                    self.busy = Some(io);
                }
                return progress;
            }
        }
    }
    // ANCHOR_END: drive

    // ANCHOR: completed
    /// The operation in flight has completed with `result` (bytes moved, or the error). From
    /// now on its buffer is ours again.
    pub fn completed(&mut self, result: io::Result<usize>) -> Step {
        let Some(io) = self.busy.take() else {
            return Step::Again;
        };
        match (io, result) {
            (_, Err(err)) => Self::failed(err),
            // A `recv` of 0 bytes is end-of-file: the client has closed its side, and what we
            // hold is not a whole request.
            (Io::Recv, Ok(0)) => Step::Stop(Progress::Closed(None)),
            (Io::Recv, Ok(n)) => {
                if self.phase == Phase::Lingering {
                    self.count += n as u64;
                } else {
                    self.received.extend_from_slice(&self.inbox[..n]);
                }
                Step::Again
            }
            // A partial send is normal: the socket's send buffer had room for only part. The
            // next `drive` submits the rest.
            (Io::Send, Ok(n)) => {
                self.written += n;
                self.count += n as u64;
                Step::Again
            }
        }
    }
    // ANCHOR_END: completed

    // ANCHOR: read_request
    /// Reading: answer a whole head if one is buffered, else receive more (until the deadline).
    fn read_request(&mut self, now: Instant) -> Step {
        match http::parse(&self.received) {
            Parse::Complete { len, request } => {
                self.received.drain(..len);
                let response = http::respond(&request);
                // An error answer closes, politely, since a refused body may still be coming;
                // so does any close with pipelined bytes still unanswered behind it.
                let after = if response.keep_alive {
                    After::KeepAlive
                } else if matches!(request.route, Route::Error(..)) || !self.received.is_empty() {
                    After::Linger
                } else {
                    After::Close
                };
                return self.start_answer(response, after, now);
            }
            Parse::Invalid(status, why) => {
                return self.start_answer(http::reject(status, why), After::Linger, now);
            }
            Parse::Partial => {}
        }
        if now >= self.deadline {
            return Step::Stop(Progress::Closed(None)); // no whole head in time: close
        }
        self.submit(Io::Recv)
    }
    // ANCHOR_END: read_request

    /// Asks for `io`, unless an operation is in flight already: then wait for it.
    fn submit(&self, io: Io) -> Step {
        match self.busy {
            Some(_) => Step::Stop(Progress::Waiting),
            None => Step::Stop(Progress::Submit(io)),
        }
    }

    // ANCHOR: start_answer
    /// Queues an answer and turns to writing it; its write rate is first judged one window of
    /// `--timeout-secs` from now.
    fn start_answer(&mut self, response: Response, after: After, now: Instant) -> Step {
        self.output = response.bytes;
        self.written = 0;
        self.body_left = response.more;
        self.after = after;
        self.phase = Phase::Writing;
        self.started = now;
        self.deadline = now + self.timeout;
        self.count = 0;
        Step::Again
    }

    /// The write deadline is a rate, not a timeout per `send`: each time it is judged, the
    /// client must have taken `MIN_RATE` bytes a second since the answer began, one window of
    /// grace aside. "Taken" is what its kernel acknowledged, not what we sent (our send buffer
    /// holds megabytes); and an average, because the client's buffers hold megabytes too, so
    /// that even a steady reader's progress reaches us in lumps, seconds apart.
    fn too_slow(&self, now: Instant) -> io::Result<bool> {
        let owed = MIN_RATE * (now - self.started).saturating_sub(self.timeout).as_secs();
        Ok(self.count.saturating_sub(unacknowledged(&self.stream)?) < owed)
    }
    // ANCHOR_END: start_answer

    // ANCHOR: write_answer
    /// Writing: send what is queued; produce the next chunk of a body; when all is out, go on
    /// as the answer said (next request, close, or linger).
    fn write_answer(&mut self, now: Instant) -> Step {
        if self.written == self.output.len() && self.busy.is_none() {
            if self.body_left > 0 {
                // The next chunk of `/bytes/N`, 64 KiB at most: the whole body never sits in
                // memory, and the buffer is reused (no `send` is in flight: it is ours).
                let chunk = http::pattern(self.body_left);
                self.body_left -= chunk.len() as u64;
                self.output.clear();
                self.output.extend_from_slice(chunk);
                self.written = 0;
                return Step::Again;
            }
            return self.answered(now);
        }
        if now >= self.deadline {
            match self.too_slow(now) {
                Ok(false) => self.deadline = now + self.timeout,
                Ok(true) => {
                    let why = format!("client reads slower than {MIN_RATE} bytes/s; abandoned");
                    let err = io::Error::new(io::ErrorKind::TimedOut, why);
                    return Step::Stop(Progress::Closed(Some(err)));
                }
                Err(err) => return Step::Stop(Progress::Closed(Some(err))),
            }
        }
        self.submit(Io::Send)
    }

    /// The answer is all out.
    fn answered(&mut self, now: Instant) -> Step {
        match self.after {
            After::KeepAlive => {
                self.phase = Phase::Reading;
                self.deadline = now + self.timeout; // the next head's deadline
                Step::Again
            }
            After::Close => Step::Stop(Progress::Closed(None)),
            After::Linger => {
                // FIN first: the answer is complete. Then receive until the client stops.
                if self.stream.shutdown(Shutdown::Write).is_err() {
                    return Step::Stop(Progress::Closed(None));
                }
                self.phase = Phase::Lingering;
                self.deadline = now + LINGER_TIME;
                self.count = 0;
                Step::Again
            }
        }
    }
    // ANCHOR_END: write_answer

    // ANCHOR: linger
    /// Lingering: receive and discard until the client closes, or the time or byte bound is hit.
    fn linger(&mut self, now: Instant) -> Step {
        if now >= self.deadline || self.count >= LINGER_BYTES as u64 {
            return Step::Stop(Progress::Closed(None));
        }
        self.submit(Io::Recv)
    }
    // ANCHOR_END: linger

    // ANCHOR: failed
    /// An operation failed. `EINTR` or `EAGAIN` (the kernel waits for us, so neither should
    /// come): submit it again. Anything else (a reset, say) ends the connection.
    fn failed(err: io::Error) -> Step {
        match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Step::Again,
            _ => Step::Stop(Progress::Closed(Some(err))),
        }
    }
    // ANCHOR_END: failed
}

// ANCHOR: unacknowledged
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
// ANCHOR_END: unacknowledged
