//! Logging: `RUST_LOG` picks what is logged, `LOG_FORMAT` how (text for people, JSON lines for
//! log shippers). Logs go to stdout, as an event stream (12-factor).
//!
//! Every request is one line, so at tens of thousands of requests a second a `write(2)` per
//! line would cost more than the request itself. Lines are therefore appended to a buffer in
//! memory and written in batches by a small thread, at least every [`FLUSH_EVERY`] and
//! whenever [`FLUSH_AT`] bytes are waiting. The event loop never blocks on stdout: if the
//! reader falls [`MAX_PENDING`] behind, further lines are dropped and the drop is reported.
//! A SIGKILL loses at most the last [`FLUSH_EVERY`] of lines; a normal exit loses none.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

use crate::config::LogFormat;

/// Longest a line waits in memory.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Waiting bytes that wake the writer early.
const FLUSH_AT: usize = 64 * 1024;
/// Waiting bytes beyond which lines are dropped rather than memory grown.
const MAX_PENDING: usize = 4 * 1024 * 1024;

/// Writes what is still buffered when dropped; keep it alive until the process ends.
#[must_use = "dropping the guard flushes and stops log output"]
pub struct LogGuard(Arc<Shared>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// Installs the global subscriber and starts the writer thread. Call once, before anything
/// logs.
pub fn init(format: LogFormat, filter: &str) -> std::io::Result<LogGuard> {
    let shared = Arc::new(Shared {
        json: format == LogFormat::Json,
        ..Shared::default()
    });
    let writer = BatchedStdout(shared.clone());
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn({
            let shared = shared.clone();
            move || shared.run()
        })?;

    // The filter was validated with the configuration.
    let filter = EnvFilter::builder().parse_lossy(filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(CachedClock::default())
        .with_writer(writer)
        // Colours only for a person at a terminal, never into files or log collectors.
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    Ok(LogGuard(shared))
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    json: bool,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    dropped_lines: u64,
}

impl Shared {
    fn append(&self, line: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.bytes.len() + line.len() > MAX_PENDING {
            pending.dropped_lines += 1;
            return;
        }
        pending.bytes.extend_from_slice(line);
        if pending.bytes.len() >= FLUSH_AT {
            self.wake.notify_one();
        }
    }

    /// The writer thread: wakes on a full buffer or every `FLUSH_EVERY`, and writes.
    fn run(&self) {
        loop {
            let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (pending, _) = self
                .wake
                .wait_timeout_while(pending, FLUSH_EVERY, |p| p.bytes.len() < FLUSH_AT)
                .unwrap_or_else(|e| e.into_inner());
            drop(pending);
            self.flush();
        }
    }

    fn flush(&self) {
        let (bytes, dropped) = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            (
                std::mem::take(&mut pending.bytes),
                std::mem::take(&mut pending.dropped_lines),
            )
        };
        let mut stdout = std::io::stdout().lock();
        // Nowhere to report a failed write to stdout; keep serving.
        let _ = stdout.write_all(&bytes);
        if dropped > 0 {
            let _ = if self.json {
                writeln!(
                    stdout,
                    r#"{{"level":"WARN","message":"log output fell behind","dropped_lines":{dropped}}}"#
                )
            } else {
                writeln!(
                    stdout,
                    "WARN log output fell behind: {dropped} lines dropped"
                )
            };
        }
        let _ = stdout.flush();
    }
}

/// RFC 3339 UTC timestamps with microseconds, like tracing's default, but the calendar part
/// is worked out once a second instead of for every line: it was the most expensive part of
/// formatting an access-log line.
#[derive(Default)]
struct CachedClock {
    /// The whole second the prefix is for, and `YYYY-MM-DDTHH:MM:SS.` for it.
    second: Mutex<(u64, String)>,
}

impl FormatTime for CachedClock {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut cached = self.second.lock().unwrap_or_else(|e| e.into_inner());
        if cached.1.is_empty() || cached.0 != now.as_secs() {
            let mut full = String::with_capacity(32);
            tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut full))?;
            // "2026-11-28T19:23:41.123456Z": keep up to and including the '.'.
            let prefix = full.find('.').map_or(full.len(), |dot| dot + 1);
            full.truncate(prefix);
            *cached = (now.as_secs(), full);
        }
        write!(w, "{}{:06}Z", cached.1, now.subsec_micros())
    }
}

/// The `MakeWriter` handed to tracing: each event arrives as one complete line.
struct BatchedStdout(Arc<Shared>);

impl<'a> MakeWriter<'a> for BatchedStdout {
    type Writer = LineSink<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineSink(&self.0)
    }
}

struct LineSink<'a>(&'a Shared);

impl Write for LineSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
