//! Ctrl-C: the handler only raises a flag; every loop of the bench checks it within a fraction
//! of a second and returns an error, and on the way out the guards kill and reap whatever the
//! bench started. Dying on the signal instead would leave the servers running.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // An atomic store is async-signal-safe; nothing else happens in the handler.
    REQUESTED.store(true, Ordering::Relaxed);
}

/// Makes `SIGINT`, `SIGTERM` and `SIGHUP` raise the flag instead of ending the process.
pub fn install() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler touches nothing but an atomic, so it is async-signal-safe, and no
        // other code of this program installs a handler for these signals.
        unsafe { sigaction(signal, &action) }.with_context(|| format!("sigaction({signal})"))?;
    }
    Ok(())
}

/// Whether the user asked the bench to stop.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// An error once the user asked the bench to stop: `?` then unwinds to `main`.
pub fn check() -> Result<()> {
    if requested() {
        bail!("interrupted");
    }
    Ok(())
}
