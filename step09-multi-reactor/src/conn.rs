//! One connection of an event loop, as a state machine.
//!
//! A blocking server keeps a connection's progress on its thread's stack: which line of
//! `handle_connection` it is at, what it has read, what is left to write. A loop that serves
//! every connection from one thread cannot block in `read` or `write`, so each connection has
//! to remember all of that itself, and pick up where it stopped whenever the loop comes back:
//! the bytes received and not yet parsed, the answer queued and not yet written, the rest of a
//! `/bytes/N` body still to produce, its deadline, and its phase. That memory is this struct.
//!
//! The file is the same in every event-loop step: what changes from step to step is only how
//! the loop *waits* before it calls [`Connection::drive`] again. One part waits for step 8,
//! whose loop hands slow requests to worker threads: a connection can then stop at such a
//! request, give it up as its *job*, and wait (`Phase::Waiting`) until the loop brings the
//! answer back. Until a loop asks for that ([`Connection::offload_slow_work`]), it never happens.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::http::{self, Parse, Request, Response, Route};

// ANCHOR: limits
/// The most bytes one `read` takes. A head is at most 8 KiB, so this holds a whole one.
const READ_CHUNK: usize = 16 * 1024;
/// The most reads, writes and answers one call of [`Connection::drive`] makes before it lets
/// the loop turn to other connections: a client that pipelines a thousand requests, or reads
/// as fast as we write, must not keep the loop to itself.
const TURNS: u32 = 16;
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
    /// Waiting for a request head: wants to read, until the head deadline.
    Reading,
    /// Sending an answer: wants to write. Nothing is read meanwhile (backpressure: a client
    /// that sends and never reads cannot make us buffer without bound).
    Writing,
    /// After an error, our side is shut: reading and throwing away what the client still
    /// sends, for a bounded time and count, so that the close sends FIN and not RST.
    Lingering,
    /// A slow request is out with a worker (step 8 only): nothing is read or written
    /// meanwhile, so requests pipelined behind it wait their turn, and no deadline ends it:
    /// the worker's answer does ([`Connection::finish`]).
    Waiting,
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

/// One client's connection and everything the loop must remember about it.
pub struct Connection {
    /// The socket, in non-blocking mode: a `read` or `write` that would wait fails with
    /// `WouldBlock` instead.
    pub stream: TcpStream,
    pub peer: SocketAddr,
    phase: Phase,
    /// Bytes received and not yet parsed: part of a head, or pipelined requests.
    received: Vec<u8>,
    /// The part of the answer produced and not yet written, and how much of it has gone out.
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
    /// Writing: bytes of the answer written so far. Lingering: bytes thrown away.
    count: u64,
    timeout: Duration,
    /// Whether slow requests are handed out rather than answered here (step 8).
    offload: bool,
    /// Waiting: the slow request, until the loop takes it to hand it to a worker.
    job: Option<Request>,
}
// ANCHOR_END: connection

/// What a call of [`Connection::drive`] came to.
#[derive(Debug)]
pub enum Progress {
    /// Nothing more to do until the socket is ready (see [`Connection::wants`]) or the
    /// deadline passes (see [`Connection::deadline`]).
    Blocked,
    /// Stopped to give other connections their turn: there is more to do at once.
    Yielded,
    /// The connection is finished: dropping it closes the socket. `Some` says what went wrong.
    Closed(Option<io::Error>),
}

/// What this call of `drive` has learnt of the socket's buffers: a short read emptied the
/// receive buffer, a short write filled the send buffer. Either way the next call would only
/// fail with `WouldBlock`, so we do not make it, and say `Blocked` at once.
#[derive(Default)]
struct Seen {
    drained: bool,
    full: bool,
}

/// Where one step of the machine leaves it.
enum Step {
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
            received: Vec::new(),
            output: Vec::new(),
            written: 0,
            body_left: 0,
            after: After::KeepAlive,
            deadline: now + timeout,
            started: now,
            count: 0,
            timeout,
            offload: false,
            job: None,
        }
    }

    /// The phase, which says what the connection waits for: readable in `Reading` and
    /// `Lingering`, writable in `Writing`, nothing from its socket in `Waiting`.
    #[allow(dead_code)] // a loop that never waits (step 5) has no use for it
    pub fn wants(&self) -> Phase {
        self.phase
    }

    /// When the loop must drive this connection even if its socket stays quiet. (`Waiting`
    /// has no deadline: what this says then is stale, and the loop ignores it.)
    #[allow(dead_code)] // likewise
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    // ANCHOR: offload
    /// From now on, a slow request (`/sleep/MS`) is not answered on the loop's thread, where it
    /// would stall every other client: `drive` stops at it, keeps it as the connection's job,
    /// and turns to `Waiting`. The loop then takes the job ([`Connection::take_job`]), has it
    /// done elsewhere, and hands the answer back ([`Connection::finish`]).
    #[allow(dead_code)] // only step 8's loop has anyone to hand work to
    pub fn offload_slow_work(&mut self) {
        self.offload = true;
    }

    /// Waiting: the request to hand out, once (the connection keeps waiting without it).
    #[allow(dead_code)] // likewise
    pub fn take_job(&mut self) -> Option<Request> {
        self.job.take()
    }

    /// Waiting: the job's answer is back. It is queued as `read_request` would have queued it,
    /// and the connection turns to writing; the loop then drives it. A connection that is not
    /// waiting ignores it (the loop checks that an answer is this connection's, not that of an
    /// earlier one with the same descriptor number; this is a second guard).
    #[allow(dead_code)] // likewise
    pub fn finish(&mut self, response: Response, now: Instant) {
        if self.phase == Phase::Waiting {
            let after = self.after(&response, false);
            self.start_answer(response, after, now);
        }
    }

    /// Waiting: nobody can take the job (every worker busy, the queue full): answer `503` at
    /// once, and close politely, since the client may have sent more behind it.
    #[allow(dead_code)] // likewise
    pub fn refuse(&mut self, why: &str, now: Instant) {
        if self.phase == Phase::Waiting {
            self.job = None;
            let response = http::reject(http::Status::ServiceUnavailable, why);
            self.start_answer(response, After::Linger, now);
        }
    }
    // ANCHOR_END: offload

    // ANCHOR: drive
    /// Does everything that can be done now without waiting: reads, answers, writes, until the
    /// socket would block, the connection is finished, or it has had its [`TURNS`].
    pub fn drive(&mut self, now: Instant) -> Progress {
        let mut seen = Seen::default();
        for _ in 0..TURNS {
            let step = match self.phase {
                Phase::Reading => self.read_request(now, &mut seen),
                Phase::Writing => self.write_answer(now, &mut seen),
                Phase::Lingering => self.linger(now, &mut seen),
                // Nothing to do until the loop hands the answer back.
                Phase::Waiting => Step::Stop(Progress::Blocked),
            };
            if let Step::Stop(progress) = step {
                return progress;
            }
        }
        Progress::Yielded
    }
    // ANCHOR_END: drive

    // ANCHOR: read_request
    /// Reading: answer a whole head if one is buffered, else read more (until the deadline).
    fn read_request(&mut self, now: Instant, seen: &mut Seen) -> Step {
        match http::parse(&self.received) {
            Parse::Complete { len, request } => {
                self.received.drain(..len);
                if self.offload && matches!(request.route, Route::Sleep(_)) {
                    // Slow work, to be done elsewhere (step 8). Nothing more is read or parsed
                    // meanwhile, so the answers go out in the order the requests came.
                    self.job = Some(request);
                    self.phase = Phase::Waiting;
                    return Step::Stop(Progress::Blocked);
                }
                let response = http::respond(&request);
                let after = self.after(&response, matches!(request.route, Route::Error(..)));
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
        // End-of-file here means the client has closed its side, and what we hold is not a
        // whole request.
        self.read_some(seen, |conn, bytes| conn.received.extend_from_slice(bytes))
    }

    /// Reads once, and hands what came to `keep`; unless the last read of this turn emptied the
    /// receive buffer already. A read of 0 bytes is end-of-file: the client has closed its side.
    fn read_some(&mut self, seen: &mut Seen, keep: fn(&mut Self, &[u8])) -> Step {
        if seen.drained {
            return Step::Stop(Progress::Blocked);
        }
        let mut chunk = [0; READ_CHUNK];
        match self.stream.read(&mut chunk) {
            Ok(0) => Step::Stop(Progress::Closed(None)),
            Ok(n) => {
                keep(self, &chunk[..n]);
                seen.drained = n < chunk.len();
                Step::Again
            }
            Err(err) => Self::failed(err),
        }
    }
    // ANCHOR_END: read_request

    // ANCHOR: start_answer
    /// How the connection goes on after `response`. An error answer closes, politely, since a
    /// refused body may still be coming; so does any close with pipelined bytes still
    /// unanswered behind it.
    fn after(&self, response: &Response, error: bool) -> After {
        if response.keep_alive {
            After::KeepAlive
        } else if error || !self.received.is_empty() {
            After::Linger
        } else {
            After::Close
        }
    }

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

    /// The write deadline is a rate, not a timeout per `write`: each time it is judged, the
    /// client must have taken `MIN_RATE` bytes a second since the answer began, one window of
    /// grace aside. "Taken" is what its kernel acknowledged, not what we wrote (our send buffer
    /// holds megabytes); and an average, because the client's buffers hold megabytes too, so
    /// that even a steady reader's progress reaches us in lumps, seconds apart.
    fn too_slow(&self, now: Instant) -> io::Result<bool> {
        let owed = MIN_RATE * (now - self.started).saturating_sub(self.timeout).as_secs();
        Ok(self.count.saturating_sub(unacknowledged(&self.stream)?) < owed)
    }
    // ANCHOR_END: start_answer

    // ANCHOR: write_answer
    /// Writing: write what is queued; produce the next chunk of a body; when all is out, go
    /// on as the answer said (next request, close, or linger).
    fn write_answer(&mut self, now: Instant, seen: &mut Seen) -> Step {
        if self.written == self.output.len() {
            if self.body_left > 0 {
                // The next chunk of `/bytes/N`, 64 KiB at most: the whole body never sits in
                // memory, and the buffer is reused.
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
        if seen.full {
            return Step::Stop(Progress::Blocked);
        }
        let pending = &self.output[self.written..];
        match self.stream.write(pending) {
            // A partial write is normal: the socket's send buffer had room for only part.
            Ok(n) => {
                seen.full = n < pending.len();
                self.written += n;
                self.count += n as u64;
                Step::Again
            }
            Err(err) => Self::failed(err),
        }
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
                // FIN first: the answer is complete. Then read until the client stops.
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
    /// Lingering: read and discard until the client closes, or the time or byte bound is hit.
    fn linger(&mut self, now: Instant, seen: &mut Seen) -> Step {
        if now >= self.deadline || self.count >= LINGER_BYTES as u64 {
            return Step::Stop(Progress::Closed(None));
        }
        self.read_some(seen, |conn, bytes| conn.count += bytes.len() as u64)
    }
    // ANCHOR_END: linger

    // ANCHOR: failed
    /// A `read` or `write` failed. `WouldBlock` is no error: the kernel has nothing for us (or
    /// no room) right now, and we come back when the loop says the socket is ready. `EINTR`:
    /// a signal came first; try again. Anything else (a reset, say) ends the connection.
    fn failed(err: io::Error) -> Step {
        match err.kind() {
            io::ErrorKind::WouldBlock => Step::Stop(Progress::Blocked),
            io::ErrorKind::Interrupted => Step::Again,
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
