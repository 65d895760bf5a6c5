//! Every setting the service reads, its default and its validation.
//!
//! Configuration comes only from the environment (12-factor). It is parsed from an injected
//! lookup so tests never touch the process environment. A bad value is a [`ConfigError`] that
//! names the variable and the value; `main` prints it on one line and exits with code 2.

use std::time::Duration;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    /// The value as `LOG_FORMAT` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// The whole configuration of one process.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `HOST_REDIS`: Redis host name or IP address. Resolved lazily, so a name that does not
    /// resolve yet is a runtime condition (reported by `/readyz`), not a start-up error.
    pub redis_host: String,
    /// `PORT_REDIS`: Redis port.
    pub redis_port: u16,
    /// `PORT`: the port the service listens on, on all interfaces.
    pub port: u16,
    /// `LOG_FORMAT`: `text` or `json`.
    pub log_format: LogFormat,
    /// `RUST_LOG`: the tracing filter; validated here so a typo is not silently ignored.
    pub log_filter: String,
    /// `REDIS_TIMEOUT_MS`: the most one Redis operation (connect included) may take before the
    /// request is answered 503.
    pub redis_timeout: Duration,
    /// `REDIS_WAIT_REPLICAS`: a page view's number is shown only once this many Redis replicas
    /// hold it (`WAIT`); fewer within half of `REDIS_TIMEOUT_MS` is a 503. 0: no waiting, for a
    /// Redis without replicas.
    pub redis_wait_replicas: u32,
    /// `DRAIN_TIMEOUT_MS`: how long in-flight requests get to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// `HEADER_READ_TIMEOUT_MS`: a request head must arrive completely within this long of the
    /// connection starting to wait for it (cuts off slowloris clients).
    pub header_read_timeout: Duration,
    /// `IDLE_TIMEOUT_MS`: a connection that moves no byte in either direction for this long is
    /// closed (idle keep-alive connections, clients that stopped reading their responses).
    pub idle_timeout: Duration,
    /// `MAX_CONNECTIONS`: open client connections; beyond it new ones get a fast 503.
    pub max_connections: usize,
    /// `MAX_HEADER_BYTES`: request line plus headers; beyond it the answer is 431.
    pub max_header_bytes: usize,
}

/// A setting with a bad value: names the variable and the value as given. `{:?}` quotes the
/// value and escapes control characters and whitespace, so an empty string or a stray space is
/// visible in the message.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?} {expected}")]
pub struct ConfigError {
    var: &'static str,
    value: String,
    expected: String,
}

/// The documented defaults, one place.
pub mod defaults {
    pub const HOST_REDIS: &str = "redis";
    pub const PORT_REDIS: u16 = 6379;
    pub const PORT: u16 = 5000;
    pub const RUST_LOG: &str = "info";
    pub const REDIS_TIMEOUT_MS: u64 = 500;
    pub const REDIS_WAIT_REPLICAS: u32 = 0;
    pub const DRAIN_TIMEOUT_MS: u64 = 10_000;
    pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
    pub const IDLE_TIMEOUT_MS: u64 = 5_000;
    pub const MAX_CONNECTIONS: usize = 1024;
    pub const MAX_HEADER_BYTES: usize = 16 * 1024;
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(env_var)
    }

    /// `PORT` alone, from the process environment: all `hit-counter healthcheck` needs, so an
    /// unrelated bad variable does not make a running replica look unhealthy.
    pub fn port_from_env() -> Result<u16, ConfigError> {
        Env(&env_var).parse("PORT", defaults::PORT, parse_port)
    }

    /// Reads the configuration through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        Ok(Self {
            redis_host: env.parse("HOST_REDIS", defaults::HOST_REDIS.to_owned(), parse_host)?,
            redis_port: env.parse("PORT_REDIS", defaults::PORT_REDIS, parse_port)?,
            port: env.parse("PORT", defaults::PORT, parse_port)?,
            log_format: env.parse("LOG_FORMAT", LogFormat::Text, parse_log_format)?,
            log_filter: env.parse("RUST_LOG", defaults::RUST_LOG.to_owned(), parse_filter)?,
            redis_timeout: env.millis("REDIS_TIMEOUT_MS", defaults::REDIS_TIMEOUT_MS, 60_000)?,
            redis_wait_replicas: env.parse(
                "REDIS_WAIT_REPLICAS",
                defaults::REDIS_WAIT_REPLICAS,
                range(0, 100),
            )?,
            drain_timeout: env.millis("DRAIN_TIMEOUT_MS", defaults::DRAIN_TIMEOUT_MS, 600_000)?,
            header_read_timeout: env.millis(
                "HEADER_READ_TIMEOUT_MS",
                defaults::HEADER_READ_TIMEOUT_MS,
                600_000,
            )?,
            idle_timeout: env.millis("IDLE_TIMEOUT_MS", defaults::IDLE_TIMEOUT_MS, 3_600_000)?,
            max_connections: env.parse(
                "MAX_CONNECTIONS",
                defaults::MAX_CONNECTIONS,
                range(1, 1_000_000),
            )?,
            max_header_bytes: env.parse(
                "MAX_HEADER_BYTES",
                defaults::MAX_HEADER_BYTES,
                range(1024, 1024 * 1024),
            )?,
        })
    }
}

fn env_var(key: &str) -> Option<String> {
    match std::env::var(key) {
        Ok(value) => Some(value),
        Err(std::env::VarError::NotPresent) => None,
        // Not UTF-8: keep it (lossily) so validation rejects it and names it.
        Err(std::env::VarError::NotUnicode(raw)) => Some(raw.to_string_lossy().into_owned()),
    }
}

struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    /// The variable's parsed value, or `default` when it is not set at all. Set but empty is an
    /// error: `PORT=` is far more likely a broken template than a wish for the default.
    fn parse<T>(
        &self,
        var: &'static str,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let Some(value) = (self.0)(var) else {
            return Ok(default);
        };
        parse(&value).map_err(|expected| ConfigError {
            var,
            value,
            expected,
        })
    }

    fn millis(&self, var: &'static str, default: u64, max: u64) -> Result<Duration, ConfigError> {
        self.parse(var, default, range(1, max))
            .map(Duration::from_millis)
    }
}

/// Strict decimal: digits only (no sign, no spaces, no `0x`); empty or too large is `None`.
fn parse_decimal(value: &str) -> Option<u64> {
    // `u64::from_str` alone would accept a leading `+`.
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn range<T: TryFrom<u64>>(min: u64, max: u64) -> impl Fn(&str) -> Result<T, String> {
    move |value| {
        parse_decimal(value)
            .filter(|n| (min..=max).contains(n))
            .and_then(|n| T::try_from(n).ok())
            .ok_or_else(|| format!("is not a whole number from {min} to {max}"))
    }
}

fn parse_port(value: &str) -> Result<u16, String> {
    range(1, 65_535)(value).map_err(|_| "is not a port number (1-65535)".to_owned())
}

fn parse_host(value: &str) -> Result<String, String> {
    // Names and IPv4/IPv6 literals only. Whether the name resolves is checked at run time.
    let valid = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err("is not a host name or IP address".to_owned())
    }
}

fn parse_log_format(value: &str) -> Result<LogFormat, String> {
    match value {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("is not a log format (text or json)".to_owned()),
    }
}

fn parse_filter(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err("is not a log filter (e.g. info or hit_counter=debug)".to_owned());
    }
    // tracing-subscriber 0.3.23 trims the filter before it walks it, then slices the untrimmed
    // one with those offsets: leading white space before a multi-byte character panics
    // (`RUST_LOG=" A🟰="`, found by the generated test below). Such a value is a typo anyway.
    if value.trim() != value {
        return Err("is not a log filter (white space around it)".to_owned());
    }
    EnvFilter::builder()
        .parse(value)
        .map(|_| value.to_owned())
        .map_err(|e| format!("is not a log filter ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|key| map.get(key).cloned())
    }

    fn error(var: &str, value: &str) -> String {
        config(&[(var, value)]).unwrap_err().to_string()
    }

    #[test]
    fn defaults_match_the_original() {
        let c = config(&[]).unwrap();
        assert_eq!(c.redis_host, "redis");
        assert_eq!(c.redis_port, 6379);
        assert_eq!(c.port, 5000);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_filter, "info");
        assert_eq!(c.redis_timeout, Duration::from_millis(500));
        assert_eq!(c.max_header_bytes, 16384);
    }

    /// The defaults a person reads (README's table, `.env.example`) are the ones in effect:
    /// both must set every variable, and setting each to its documented default must give
    /// the configuration an empty environment gives. (scripts/check-deploy holds
    /// docker-compose.yml to `.env.example`.)
    #[test]
    fn the_documented_defaults_are_the_ones_in_effect() {
        let env_example: Vec<(String, String)> = include_str!("../.env.example")
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split_once('=').expect("VAR=value"))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let readme: Vec<(String, String)> = include_str!("../README.md")
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                let value = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
                name.chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_')
                    .then(|| (name.to_owned(), value.to_owned()))
            })
            .collect();
        let by_name = |pairs: &[(String, String)]| {
            let mut names: Vec<String> = pairs.iter().map(|(k, _)| k.clone()).collect();
            names.sort();
            names
        };
        assert_eq!(
            by_name(&readme),
            by_name(&env_example),
            "README's table vs .env.example"
        );
        assert_eq!(
            env_example.len(),
            12,
            "a variable is missing from .env.example"
        );
        for documented in [&readme, &env_example] {
            let pairs: Vec<(&str, &str)> = documented
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(config(&pairs).unwrap(), config(&[]).unwrap(), "{pairs:?}");
        }
    }

    #[test]
    fn every_variable_is_read() {
        let c = config(&[
            ("HOST_REDIS", "10.0.0.7"),
            ("PORT_REDIS", "6380"),
            ("PORT", "8080"),
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "hit_counter=debug,warn"),
            ("REDIS_TIMEOUT_MS", "250"),
            ("REDIS_WAIT_REPLICAS", "2"),
            ("DRAIN_TIMEOUT_MS", "3000"),
            ("HEADER_READ_TIMEOUT_MS", "2000"),
            ("IDLE_TIMEOUT_MS", "1000"),
            ("MAX_CONNECTIONS", "10"),
            ("MAX_HEADER_BYTES", "8192"),
        ])
        .unwrap();
        assert_eq!(c.redis_host, "10.0.0.7");
        assert_eq!(c.redis_port, 6380);
        assert_eq!(c.port, 8080);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.log_filter, "hit_counter=debug,warn");
        assert_eq!(c.redis_timeout, Duration::from_millis(250));
        assert_eq!(c.redis_wait_replicas, 2);
        assert_eq!(c.drain_timeout, Duration::from_secs(3));
        assert_eq!(c.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.idle_timeout, Duration::from_secs(1));
        assert_eq!(c.max_connections, 10);
        assert_eq!(c.max_header_bytes, 8192);
    }

    #[test]
    fn ipv6_and_names_with_dashes_are_hosts() {
        assert_eq!(config(&[("HOST_REDIS", "::1")]).unwrap().redis_host, "::1");
        let c = config(&[("HOST_REDIS", "redis-0.redis.default.svc")]).unwrap();
        assert_eq!(c.redis_host, "redis-0.redis.default.svc");
    }

    #[test]
    fn bad_ports_name_the_variable_and_the_value() {
        assert_eq!(
            error("PORT_REDIS", "abc"),
            r#"PORT_REDIS="abc" is not a port number (1-65535)"#
        );
        assert_eq!(
            error("PORT_REDIS", "70000"),
            r#"PORT_REDIS="70000" is not a port number (1-65535)"#
        );
        assert_eq!(
            error("PORT", "-1"),
            r#"PORT="-1" is not a port number (1-65535)"#
        );
        for bad in [
            "",
            " ",
            "0",
            " 5000",
            "5000 ",
            "+5000",
            "0x10",
            "5e3",
            "99999999999999999999",
        ] {
            assert!(
                error("PORT", bad).starts_with("PORT="),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn both_log_formats_are_accepted() {
        let format = |value| config(&[("LOG_FORMAT", value)]).unwrap().log_format;
        assert_eq!(format("text"), LogFormat::Text);
        assert_eq!(format("json"), LogFormat::Json);
    }

    #[test]
    fn bad_log_format_is_rejected() {
        assert_eq!(
            error("LOG_FORMAT", "xml"),
            r#"LOG_FORMAT="xml" is not a log format (text or json)"#
        );
        assert!(error("LOG_FORMAT", "JSON").starts_with("LOG_FORMAT="));
        assert!(error("LOG_FORMAT", "").starts_with("LOG_FORMAT="));
    }

    #[test]
    fn bad_hosts_are_rejected_but_unresolvable_names_are_not() {
        for bad in [
            "",
            " ",
            "red is",
            "redis\n",
            "redis/0",
            "redis:6379/0",
            "ré",
        ] {
            assert!(
                error("HOST_REDIS", bad).starts_with("HOST_REDIS="),
                "{bad:?}"
            );
        }
        let long = "a".repeat(254);
        assert!(error("HOST_REDIS", &long).starts_with("HOST_REDIS="));
        assert!(config(&[("HOST_REDIS", "no-such-host.invalid")]).is_ok());
    }

    #[test]
    fn control_characters_are_escaped_in_the_message() {
        assert_eq!(
            error("HOST_REDIS", "a\tb"),
            r#"HOST_REDIS="a\tb" is not a host name or IP address"#
        );
    }

    #[test]
    fn numeric_limits_are_range_checked() {
        assert_eq!(
            error("REDIS_TIMEOUT_MS", "0"),
            r#"REDIS_TIMEOUT_MS="0" is not a whole number from 1 to 60000"#
        );
        assert!(error("REDIS_TIMEOUT_MS", "60001").starts_with("REDIS_TIMEOUT_MS="));
        assert_eq!(
            error("REDIS_WAIT_REPLICAS", "-1"),
            r#"REDIS_WAIT_REPLICAS="-1" is not a whole number from 0 to 100"#
        );
        assert!(error("REDIS_WAIT_REPLICAS", "101").starts_with("REDIS_WAIT_REPLICAS="));
        assert!(error("DRAIN_TIMEOUT_MS", "1.5").starts_with("DRAIN_TIMEOUT_MS="));
        assert!(error("HEADER_READ_TIMEOUT_MS", "").starts_with("HEADER_READ_TIMEOUT_MS="));
        assert!(error("IDLE_TIMEOUT_MS", "-5").starts_with("IDLE_TIMEOUT_MS="));
        assert!(error("MAX_CONNECTIONS", "0").starts_with("MAX_CONNECTIONS="));
        assert!(error("MAX_HEADER_BYTES", "100").starts_with("MAX_HEADER_BYTES="));
        assert!(error("MAX_HEADER_BYTES", "2000000").starts_with("MAX_HEADER_BYTES="));
    }

    const VARS: [&str; 12] = [
        "HOST_REDIS",
        "PORT_REDIS",
        "PORT",
        "LOG_FORMAT",
        "RUST_LOG",
        "REDIS_TIMEOUT_MS",
        "REDIS_WAIT_REPLICAS",
        "DRAIN_TIMEOUT_MS",
        "HEADER_READ_TIMEOUT_MS",
        "IDLE_TIMEOUT_MS",
        "MAX_CONNECTIONS",
        "MAX_HEADER_BYTES",
    ];

    /// Pieces values are made of: digits at and around the limits, signs, white space, control
    /// and non-ASCII characters, a number past u64.
    const PIECES: [&str; 16] = [
        "0",
        "1",
        "9",
        "65535",
        "65536",
        "-",
        "+",
        " ",
        "\t",
        "\n",
        "\0",
        "a",
        ".",
        ":",
        "é",
        "18446744073709551616",
    ];

    use proptest::prelude::*;

    proptest! {
        // A stand-in for a fuzzer (cargo fuzz needs a nightly toolchain).
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Parsing never panics, and every rejection names the variable and quotes the value,
        /// on one line.
        #[test]
        fn arbitrary_values_never_panic_and_every_error_names_its_variable(
            var in proptest::sample::select(&VARS[..]),
            value in prop_oneof![
                proptest::collection::vec(proptest::sample::select(&PIECES[..]), 0..6)
                    .prop_map(|pieces| pieces.concat()),
                any::<String>(),
            ],
        ) {
            if let Err(e) = config(&[(var, value.as_str())]) {
                let message = e.to_string();
                prop_assert!(
                    message.starts_with(&format!("{var}={value:?} ")),
                    "{}",
                    message
                );
                prop_assert!(!message.contains('\n'), "one line: {}", message);
            }
        }
    }

    #[test]
    fn bad_log_filter_is_rejected() {
        assert!(error("RUST_LOG", "").starts_with("RUST_LOG="));
        assert_eq!(
            error("RUST_LOG", " A\u{1F7F0}="),
            "RUST_LOG=\" A\u{1F7F0}=\" is not a log filter (white space around it)"
        );
        assert!(error("RUST_LOG", "info,[").starts_with("RUST_LOG="));
        assert!(config(&[("RUST_LOG", "debug")]).is_ok());
    }
}
