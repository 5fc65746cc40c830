//! The worker threads, and the two queues between them and the loop.
//!
//! Out: a bounded channel of jobs. The loop never waits on it: `try_send` either leaves the job
//! for an idle worker or says at once that the queue is full, and the client gets `503`.
//! Back: a `Vec` of answers behind a mutex, and an `eventfd` that the workers write to after
//! pushing one. The eventfd is one more descriptor in the loop's epoll set, so a finished job
//! wakes the loop just as a readable socket does. The loop then takes the whole `Vec` in one
//! swap under the lock: one lock per batch of answers, not per answer, and the workers wait on
//! the lock only for as long as a swap takes.

use std::io::{self, Write};
use std::mem;
use std::os::fd::RawFd;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;

use anyhow::Context;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::http::{self, Request, Response};

// ANCHOR: job
/// A slow request, and the connection it came on: its descriptor number and its generation,
/// since the number may belong to another connection by the time the answer is back.
pub struct Job {
    pub fd: RawFd,
    pub generation: u64,
    pub request: Request,
}

/// A job's answer, for the connection the job named.
pub struct Finished {
    pub fd: RawFd,
    pub generation: u64,
    pub response: Response,
}
// ANCHOR_END: job

// ANCHOR: pool
/// The loop's end of the pool: where jobs go, and where their answers come back.
pub struct Pool {
    jobs: SyncSender<Job>,
    done: Arc<Done>,
    /// Jobs refused so far because the queue was full, for the log.
    refused: u64,
}

/// What the workers share with the loop: the answers, and the bell that says there are some.
struct Done {
    finished: Mutex<Vec<Finished>>,
    bell: EventFd,
}

impl Pool {
    /// Starts `workers` threads, with room for `max_queue` jobs waiting for one of them.
    pub fn start(workers: usize, max_queue: usize) -> anyhow::Result<Pool> {
        // Non-blocking: the loop reads it only to reset its count, and must never sleep there.
        let bell = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .context("eventfd")?;
        let done = Arc::new(Done {
            finished: Mutex::new(Vec::new()),
            bell,
        });
        // A channel with room for `max_queue` jobs; with 0, a job is taken only by a worker
        // that is idle at that moment.
        let (jobs, queue) = mpsc::sync_channel(max_queue);
        let queue = Arc::new(Mutex::new(queue));
        for i in 1..=workers {
            let (queue, done) = (Arc::clone(&queue), Arc::clone(&done));
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || work(&queue, &done))
                .with_context(|| format!("cannot start worker thread {i}"))?;
        }
        Ok(Pool {
            jobs,
            done,
            refused: 0,
        })
    }

    /// Queues `job` for a worker without ever waiting; `false` if the queue is full.
    pub fn submit(&mut self, job: Job) -> bool {
        match self.jobs.try_send(job) {
            Ok(()) => true,
            // Disconnected would mean every worker is gone; they never leave while we live.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.refused += 1;
                if self.refused.is_power_of_two() {
                    log!(
                        "queue full: {} slow requests refused with 503 so far",
                        self.refused
                    );
                }
                false
            }
        }
    }

    /// The descriptor the loop watches: readable once answers are waiting.
    pub fn bell(&self) -> &EventFd {
        &self.done.bell
    }

    /// Takes every answer waiting, in one swap under the lock.
    pub fn finished(&self) -> Vec<Finished> {
        // The bell first: reading resets its count to zero (or fails with EAGAIN if it was
        // zero already, which is no harm). A worker that pushes after our swap rings it again
        // after its push, so no answer is ever left waiting unrung.
        let _ = self.done.bell.read();
        mem::take(&mut *lock(&self.done.finished))
    }
}
// ANCHOR_END: pool

// ANCHOR: work
/// A worker: takes a job, does it (the slow part, away from the loop), pushes its answer and
/// rings the bell. Forever: the workers live as long as the server.
fn work(queue: &Mutex<Receiver<Job>>, done: &Done) {
    loop {
        // One worker at a time waits in `recv` holding the lock; the others wait for the lock.
        // The lock is let go as soon as a job comes (at the end of this statement), before the
        // work: the next idle worker is then the one waiting.
        let job = lock(queue).recv();
        let Ok(job) = job else {
            return; // the loop's end of the channel is gone: no job will ever come
        };
        let response = http::respond(&job.request);
        lock(&done.finished).push(Finished {
            fd: job.fd,
            generation: job.generation,
            response,
        });
        // Adds 1 to the eventfd's count, which makes it readable: the loop wakes. It could
        // fail only if the count were about to overflow 2^64 - 2, which no loop lets happen.
        let _ = done.bell.write(1);
    }
}
// ANCHOR_END: work

/// Takes `mutex`. A thread that panicked while holding it would leave it "poisoned"; what it
/// guards here (a queue, a `Vec`) is whole after any push or swap, so we go on with it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
