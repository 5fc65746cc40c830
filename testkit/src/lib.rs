//! Test helpers shared by every step: start a step's server, talk raw HTTP to it, and read what
//! the kernel knows about it in `/proc`.
//!
//! - [`Server`] starts a step's binary on a free port, reads its banner, and kills and reaps it
//!   (and everything it forked) when dropped.
//! - [`Client`] sends raw bytes and reads raw responses, always with a deadline, so a server
//!   that hangs fails a test instead of freezing it.
//! - [`procfs`] reads descriptors, threads, children, CPU time and memory of a process.
//! - [`shared`] holds claims that several steps make, but not all.
//! - [`contract`] holds one function per behaviour that every step's server keeps, and
//!   [`contract_suite!`] turns them into one `#[test]` each.
//!
//! Every wait here is bounded, nothing uses a fixed port, and nothing forks inside the test
//! process except through [`std::process::Command`].

#![warn(missing_docs)]

pub mod client;
pub mod contract;
pub mod procfs;
pub mod server;
pub mod shared;

pub use client::{Client, Response};
pub use procfs::wait_until;
pub use server::Server;
