//! A single-producer single-consumer ring: a fixed array of slots, and two counters, `head` and
//! `tail`, that each side moves and the other only reads. No lock: one worker pushes answers at
//! `tail`, the loop pops them at `head`, and neither ever waits for the other.
//!
//! The rules (siddontang's "lock-free ring buffer"): `head == tail` means empty; one slot is
//! always left unused, so that a full ring (`tail + 1 == head`, around the ring) does not also
//! read `head == tail`. A ring of `capacity` slots therefore holds `capacity - 1` items.
//!
//! Being single-producer and single-consumer is what makes it simple, and the types enforce it:
//! [`ring`] returns one [`Producer`] and one [`Consumer`], neither can be cloned, and `push` and
//! `pop` take `&mut self`, so no two threads can push (or pop) at once.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize; // EXERCISE: and `Ordering`, for the loads and stores

/// What both ends share: the slots and the two positions, each in `0..slots.len()`.
struct Shared<T> {
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    /// The next slot to pop. Written only by the consumer.
    head: AtomicUsize,
    /// The next slot to push into. Written only by the producer.
    tail: AtomicUsize,
}

// SAFETY: the ring moves `T`s from one thread to another, so `T: Send` is required, and is
// enough: a slot is only ever touched by one side at a time (see `push` and `pop`), so no `T`
// is ever shared between threads, which is what would need `T: Sync`.
unsafe impl<T: Send> Sync for Shared<T> {}

/// The pushing end: one thread's.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
}

/// The popping end: one thread's.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
}

/// A ring of `capacity` slots, which holds `capacity - 1` items; `capacity` must be at least 2.
pub fn ring<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(
        capacity >= 2,
        "a ring of {capacity} slots could hold nothing"
    );
    let slots = (0..capacity)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let shared = Arc::new(Shared {
        slots,
        head: AtomicUsize::new(0),
        tail: AtomicUsize::new(0),
    });
    (
        Producer {
            shared: Arc::clone(&shared),
        },
        Consumer { shared },
    )
}

impl<T> Shared<T> {
    /// The position after `at`, around the ring.
    fn next(&self, at: usize) -> usize {
        if at + 1 == self.slots.len() {
            0
        } else {
            at + 1
        }
    }
}

impl<T> Producer<T> {
    /// Puts `value` at the tail, or gives it back if the ring is full.
    pub fn push(&mut self, value: T) -> Result<(), T> {
        let _ring = &*self.shared; // the slots, `head` and `tail`
        // EXERCISE: if the slot after `tail` is `head`, the ring is full: give `value` back.
        // Otherwise write it into slot `tail` (an `unsafe` write into the `UnsafeCell`, with a
        // `// SAFETY:` comment saying why the consumer cannot be reading that slot), then
        // store the next position into `tail`. Which loads need `Acquire`, which store
        // `Release`? For now the ring takes nothing: it always says it is full.
        Err(value)
    }
}

impl<T> Consumer<T> {
    /// Takes the item at the head, if there is one.
    pub fn pop(&mut self) -> Option<T> {
        let _ring = &*self.shared;
        // EXERCISE: if `head == tail`, the ring is empty. Otherwise move the value out of slot
        // `head` (`assume_init_read`, with its `// SAFETY:` comment), then store the next
        // position into `head`, which hands the slot back to the producer. For now the ring
        // gives nothing: it always says it is empty.
        None
    }
}

impl<T> Drop for Shared<T> {
    /// Drops the items still in the ring (answers nobody popped), once both ends are gone.
    fn drop(&mut self) {
        let tail = *self.tail.get_mut();
        let mut at = *self.head.get_mut();
        while at != tail {
            // SAFETY: `&mut self`: both ends are gone, and slots `head..tail` hold values
            // pushed and never popped, each dropped here once.
            unsafe { self.slots[at].get_mut().assume_init_drop() };
            at = self.next(at);
        }
    }
}
