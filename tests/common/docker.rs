//! The container tiers' one command runner (docker, Compose, scripts/swarm) and the readers of
//! what those commands print: the replicas' logs, Redis' count, the engine's times.

use std::process::{Command, Output};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::dies_with_test;

/// Runs `command` to completion without blocking the runtime (a load keeps going); it dies
/// with the test.
pub async fn output(mut command: Command) -> Output {
    dies_with_test(&mut command);
    let program = format!("{:?}", command.get_program());
    tokio::process::Command::from(command)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// Runs `command`, which must succeed; its stdout, trimmed.
pub async fn stdout(command: Command) -> String {
    let what = format!(
        "{:?} {:?}",
        command.get_program(),
        command.get_args().collect::<Vec<_>>()
    );
    let out = output(command).await;
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `docker <args>` on this machine's engine, which must succeed.
pub async fn docker(args: &[&str]) -> String {
    let mut command = Command::new("docker");
    command.args(args);
    stdout(command).await
}

/// Requests for `/` a replica logged (one `request` line per request, at `RUST_LOG=info`):
/// those answered `status`, or all of them (`None`).
pub fn page_views(log: &str, status: Option<u16>) -> usize {
    let line = match status {
        Some(status) => format!(r#"path="/" status={status}"#),
        None => r#"path="/" status="#.to_owned(),
    };
    log.lines().filter(|l| l.contains(&line)).count()
}

/// Redis' count as `redis-cli GET hits` prints it: nothing when there is no count yet.
pub fn count(printed: &str) -> i64 {
    match printed.trim() {
        "" => 0,
        n => n
            .parse()
            .unwrap_or_else(|_| panic!("not a count: {printed:?}")),
    }
}

/// Seconds since the Unix epoch of the RFC 3339 time that `line` starts with (as the engine
/// writes them: `2026-11-29T01:44:46.481622338Z ...`).
pub fn unix_seconds(line: &str) -> f64 {
    let time = line.split_whitespace().next().unwrap_or_default();
    let time = OffsetDateTime::parse(time, &Rfc3339)
        .unwrap_or_else(|e| panic!("not an RFC 3339 time ({e}): {line:?}"));
    time.unix_timestamp() as f64 + f64::from(time.nanosecond()) / 1e9
}

#[test]
fn what_cannot_be_read_fails_the_test() {
    assert_eq!(count(""), 0);
    assert_eq!(count("42\n"), 42);
    assert!(std::panic::catch_unwind(|| count("(error) WRONGTYPE")).is_err());
    assert_eq!(
        unix_seconds("2027-01-01T00:00:00.25Z x") - unix_seconds("2026-12-31T23:59:59.75Z"),
        0.5
    );
    assert!(std::panic::catch_unwind(|| unix_seconds("yesterday")).is_err());
    let log = "x path=\"/\" status=200\nx path=\"/\" status=503\nx path=\"/livez\" status=200\n";
    assert_eq!((page_views(log, Some(200)), page_views(log, None)), (1, 2));
}
