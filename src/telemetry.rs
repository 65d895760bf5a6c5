//! Logging: `RUST_LOG` picks what is logged, `LOG_FORMAT` how (text for people, JSON lines for
//! log shippers). Logs go to stdout, as an event stream (12-factor).
//!
//! Every request is one line, so the event loop must not pay a `write(2)` per line. Lines go
//! through tracing-appender's non-blocking writer: the event loop only queues them, and its
//! thread drains the queue into a buffer and writes it out whenever the queue runs empty, so
//! under load many lines share one system call. If stdout cannot keep up and the queue is full
//! ([`QUEUED_LINES`]), lines are dropped rather than the service blocked; the number dropped is
//! logged when the process exits. A normal exit writes every queued line.

use std::io::{BufWriter, IsTerminal, Write};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Bytes of log lines gathered before a write, when they come faster than stdout takes them.
const WRITE_BUFFER: usize = 64 * 1024;
/// Lines that may wait for the writer: 70 ms at 60,000 requests a second (its thread writes
/// them far faster). The queue is allocated whole at start-up, so it is much smaller than
/// tracing-appender's default (docs/performance.md has what each size cost).
const QUEUED_LINES: usize = 4 * 1024;

/// Keeps the log writer running; [`finish`](Self::finish) it (or drop it) at exit to write
/// what is still queued.
#[must_use = "dropping it stops log output"]
pub struct Logs {
    writer: WorkerGuard,
    dropped: ErrorCounter,
    json: bool,
}

impl Logs {
    /// Writes everything queued, then says how many lines were dropped because stdout fell
    /// behind, if any (directly: the queue is gone by then, and might have been full).
    pub fn finish(self) {
        drop(self.writer);
        let dropped = self.dropped.dropped_lines();
        if dropped > 0 {
            let mut stdout = std::io::stdout();
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
    }
}

/// Installs the global subscriber and starts the writer thread. Call once, before anything
/// logs.
pub fn init(format: LogFormat, filter: &str) -> Logs {
    let stdout = BufWriter::with_capacity(WRITE_BUFFER, std::io::stdout());
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(stdout);
    let dropped = writer.error_counter();
    // The filter was validated with the configuration.
    let filter = EnvFilter::builder().parse_lossy(filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    Logs {
        writer: guard,
        dropped,
        json: format == LogFormat::Json,
    }
}
