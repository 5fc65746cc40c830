//! The worker threads, and the two queues between them and the loop.
//!
//! Out: a channel of jobs. The loop never waits on it, and it is never full: the loop itself
//! counts the jobs it has handed out and not yet had back, and refuses with `503`, at once, a
//! job beyond `workers + max_queue` of them: as many as the workers can run, plus the queue.
//! Back: a `Vec` of answers behind a mutex, and an `eventfd` that the workers write to after
//! pushing one. The eventfd is one more descriptor in the loop's epoll set, so a finished job
//! wakes the loop just as a readable socket does. The loop then takes the whole `Vec` in one
//! swap under the lock: one lock per batch of answers, not per answer, and the workers wait on
//! the lock only for as long as a swap takes.

use std::io::{self, Write};
use std::mem;
use std::os::fd::RawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;

use anyhow::Context;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::http::{self, Request, Response, Status};

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
    /// Jobs handed out and not yet back, and the most there may be: `workers + max_queue`.
    /// Counted here, on the loop, rather than read off the channel: a channel of room `n`
    /// holds `n` jobs *not yet taken*, and a woken worker takes its job microseconds later, so
    /// a burst of slow requests in one batch would find it full while workers sit idle.
    in_flight: usize,
    capacity: usize,
    /// Jobs refused so far because the queue was full, for the log.
    refused: u64,
}

/// What the workers share with the loop: the answers, and the bell that says there are some.
// EXERCISE: one ring per worker instead of this `Vec` behind a lock (the `Producer` for the
// worker, the `Consumer` for the loop, in the `Pool`), and `finished` empties every ring.
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
        // Room for every job the loop may hand out, so that `try_send` never finds it full.
        let capacity = workers + max_queue;
        let (jobs, queue) = mpsc::sync_channel(capacity);
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
            in_flight: 0,
            capacity,
            refused: 0,
        })
    }

    /// Queues `job` for a worker without ever waiting; `false` if the workers are all busy and
    /// the queue is full.
    pub fn submit(&mut self, job: Job) -> bool {
        let sent = self.in_flight < self.capacity && self.jobs.try_send(job).is_ok();
        match sent {
            true => {
                self.in_flight += 1;
                true
            }
            // (`try_send` cannot fail here: the channel has room for `capacity` jobs, and
            // every worker outlives the loop. It is checked all the same.)
            false => {
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
    pub fn finished(&mut self) -> Vec<Finished> {
        // The bell first: reading resets its count to zero (or fails with EAGAIN if it was
        // zero already, which is no harm). A worker that pushes after our swap rings it again
        // after its push, so no answer is ever left waiting unrung.
        let _ = self.done.bell.read();
        let finished = mem::take(&mut *lock(&self.done.finished));
        self.in_flight -= finished.len();
        finished
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
        // A job that panicked would leave its client waiting for ever, since a waiting
        // connection has no deadline: it gets a `503` instead, and the worker goes on.
        let response = panic::catch_unwind(AssertUnwindSafe(|| http::respond(&job.request)))
            .unwrap_or_else(|_| http::reject(Status::ServiceUnavailable, "the job failed"));
        // EXERCISE: push onto this worker's ring; while it is full, wait a little and retry.
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
