//! Progress: a bar on a terminal, plain lines otherwise (a log file, CI, a pipe). Progress
//! goes to stderr; the tables go to stdout, so `bench > tables.md` keeps only the tables.

use std::io::{self, IsTerminal, Write};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    started: Instant,
}

impl Progress {
    /// Progress through `total` measurements.
    pub fn new(total: u64) -> Progress {
        let bar = io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            total,
            done: 0,
            started: Instant::now(),
        }
    }

    /// Says what is measured next.
    pub fn start(&mut self, what: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(what.to_string()),
            None => {
                let elapsed = self.started.elapsed().as_secs();
                let line = format!("[{}/{} {elapsed}s] {what}", self.done + 1, self.total);
                // A progress line that cannot be written is not worth stopping for.
                let _ = writeln!(io::stderr(), "{line}");
            }
        }
    }

    /// One measurement done.
    pub fn finish_one(&mut self) {
        self.done += 1;
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// Prints `text` on stdout, clear of the bar.
    pub fn print(&self, text: &str) -> Result<()> {
        let print = || -> Result<()> {
            let mut out = io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("writing to stdout")
        };
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
