//! Logging: `RUST_LOG` picks what is logged, `LOG_FORMAT` how (text for people, JSON lines for
//! log shippers). Logs go to stdout, as an event stream (12-factor).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat, filter: &str) {
    // The filter was validated with the configuration.
    let filter = EnvFilter::builder().parse_lossy(filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
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
}
