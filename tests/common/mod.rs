//! Test harness of every tier: a real `redis-server` per test, the service on a free port (in
//! this process, or the built binary), the one HTTP client ([`http`]), the one polling helper
//! ([`eventually`]), the one load generator ([`load`]) and the one command runner of the
//! container tiers ([`docker`]).

#![allow(dead_code)] // Each test module uses a different part of the harness.

pub mod docker;
pub mod http;
pub mod load;
pub mod relay;

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use hit_counter::{App, Config};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use http::Response;

/// How often a server that lost its port to another test is started again on a new one.
const START_ATTEMPTS: usize = 5;

/// A port nobody listens on right now (the OS picked it, and we let it go). Tests run in
/// parallel, so another test may take it before the server meant for it binds: the servers
/// started here check that they got it ([`listens_on`]) and try another port if not.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 10 ms until it is true or `within` has passed; returns how long it took.
pub async fn eventually(
    within: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if check().await {
            return Some(started.elapsed());
        }
        if started.elapsed() >= within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What `probe` returns once it has not changed for `quiet` (a count or a log that stops
/// moving), if that comes within `within` more.
pub async fn settled<T: PartialEq>(
    quiet: Duration,
    within: Duration,
    mut probe: impl AsyncFnMut() -> T,
) -> Option<T> {
    let mut last = probe().await;
    let mut since = Instant::now();
    eventually(within, async || {
        let now = probe().await;
        if now != last {
            (last, since) = (now, Instant::now());
        }
        since.elapsed() >= quiet
    })
    .await?;
    Some(last)
}

/// Is something accepting connections on 127.0.0.1:`port`?
pub async fn accepts(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// Makes the process `command` starts die (SIGKILL) when the test that starts it dies, by any
/// signal: a test binary killed by a timeout, CI's time limit, the OOM killer or Ctrl-C runs
/// no `Drop`. Linux's parent-death signal follows the thread that spawned the child, so spawn
/// from the test's own thread (or a runtime worker), never from a short-lived thread.
pub fn dies_with_test(command: &mut Command) -> &mut Command {
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure only makes two async-signal-safe calls.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The test may have died before the signal was set up.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the test process is gone"));
            }
            Ok(())
        })
    }
}

/// Is process `pid` (itself, not a child of it) listening on TCP port `port`? Tells a server
/// that bound its port from one that lost it to another test's server.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let sockets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .map(|row| row.split_whitespace().collect::<Vec<_>>())
            // local address, state (0A: LISTEN), inode
            .any(|f| {
                f.len() > 9
                    && f[1].ends_with(&port)
                    && f[3] == "0A"
                    && sockets.contains(&f[9].to_owned())
            })
    })
}

/// Waits for `child` to exit, at most `within`.
pub async fn exited(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let mut status = None;
    eventually(within, async || {
        status = child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    status
}

/// A throwaway `redis-server` on 127.0.0.1, killed on drop; its log is printed if the test
/// failed.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts on a free port, without persistence.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts on a free port with extra `redis-server` arguments (e.g. `--appendonly yes`).
    pub async fn start_with(extra: &[&str]) -> Self {
        let mut server = Self::not_started(0);
        server.extra = extra.iter().map(|s| s.to_string()).collect();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            if server.launch(true).await {
                return server;
            }
        }
        panic!("redis-server did not start:\n{}", server.log());
    }

    /// A server that will listen on `port` once [`restart`](Self::restart)ed, not before.
    pub fn not_started(port: u16) -> Self {
        Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: Vec::new(),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// (Re)starts the server on the same port, with the same data directory, and waits until
    /// it answers PING.
    pub async fn restart(&mut self) {
        let up = self.launch(true).await;
        assert!(
            up,
            "redis-server did not start on port {}:\n{}",
            self.port,
            self.log()
        );
    }

    /// Restarts with `extra` arguments replacing the previous ones, and returns as soon as it
    /// listens (Redis may still be loading its data).
    pub async fn restart_unready(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        let up = self.launch(false).await;
        assert!(
            up,
            "redis-server did not start on port {}:\n{}",
            self.port,
            self.log()
        );
    }

    /// Spawns on `self.port` and waits until this very process listens there (and answers
    /// PING, if `ready`). False if it exited instead, as it does when the port is taken.
    async fn launch(&mut self, ready: bool) -> bool {
        self.spawn();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let child = self.child.as_mut().unwrap();
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                return false;
            }
            let pid = child.id();
            if listens_on(pid, self.port) && (!ready || self.ping()) {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        require_redis_7();
        let child = dies_with_test(&mut Command::new("redis-server"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "local"])
            // A replica syncs at once, not after the default 5 s wait for more replicas.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it on Debian)");
        self.child = Some(child);
    }

    fn ping(&self) -> bool {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(100)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// SIGKILL: Redis vanishes at once, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for the server to exit (it writes its AOF first).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            let status = exited(&mut child, Duration::from_secs(10)).await;
            assert!(status.is_some(), "redis-server ignored SIGTERM");
        }
    }

    /// A synchronous connection for arranging and checking state.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }

    /// The `hits` key, or `None` when it does not exist.
    pub fn hits(&self) -> Option<i64> {
        redis::cmd("GET")
            .arg("hits")
            .query(&mut self.conn())
            .unwrap()
    }

    /// Runs one command (e.g. `["CONFIG", "SET", "maxmemory", "1"]`), which must succeed.
    pub fn run(&self, args: &[&str]) {
        let _: redis::Value = command(args).query(&mut self.conn()).unwrap();
    }

    /// Puts Redis to sleep (`DEBUG SLEEP`) for `seconds`, from a thread of its own, and
    /// returns once Redis has stopped answering. Join the handle to wait for it to wake.
    pub async fn asleep_for(&self, seconds: f64) -> std::thread::JoinHandle<()> {
        let mut conn = self.conn();
        let sleeping = std::thread::spawn(move || {
            let _: redis::Value = command(&["DEBUG", "SLEEP", &seconds.to_string()])
                .query(&mut conn)
                .unwrap();
        });
        let port = self.port;
        let asleep = eventually(Duration::from_secs(2), async || {
            // A PING on a fresh connection that gets no answer within 50 ms.
            let ping = tokio::task::spawn_blocking(move || {
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
                stream.set_read_timeout(Some(Duration::from_millis(50)))?;
                std::io::Write::write_all(&mut stream, b"PING\r\n")?;
                std::io::Read::read(&mut stream, &mut [0u8; 16])
            });
            ping.await.unwrap().is_err()
        })
        .await;
        assert!(asleep.is_some(), "Redis never went to sleep");
        sleeping
    }
}

/// The harness needs Redis 7 or later (`--enable-debug-command`): with an older one every test
/// would fail with "redis-server did not start". Says so once, and ends the test binary.
fn require_redis_7() {
    static CHECKED: Once = Once::new();
    CHECKED.call_once(|| {
        let version = Command::new("redis-server")
            .arg("--version")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
        let major = version.as_deref().ok().and_then(|v| {
            v.split("v=").nth(1)?.split('.').next()?.parse::<u32>().ok()
        });
        if major.is_none_or(|major| major < 7) {
            // Straight to stderr: libtest captures eprintln!, and exit skips printing it.
            let _ = writeln!(
                std::io::stderr(),
                "these tests need redis-server 7 or later on PATH (scripts/test installs it on Debian); found: {}",
                version.map_or_else(|e| e.to_string(), |v| v.trim().to_owned())
            );
            std::process::exit(1);
        }
    });
}

/// The tiers beyond `cargo test` start HAProxy, compose stacks or a Docker Swarm: each test of
/// theirs runs only when `HIT_COUNTER_TIERS` (comma-separated) names its tier, as scripts/test
/// sets it. Otherwise it fails at once, starting nothing, so `cargo test -- --include-ignored`
/// never starts a container.
pub fn tier(name: &str) {
    let asked = std::env::var("HIT_COUNTER_TIERS").unwrap_or_default();
    assert!(
        asked.split(',').any(|t| t.trim() == name),
        "the {name} tier runs only when asked: HIT_COUNTER_TIERS={name} (scripts/test sets it)"
    );
}

fn command(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- redis-server log (port {}) ----\n{}",
                self.port,
                self.log()
            );
        }
    }
}

/// Settings that point the service at the Redis on 127.0.0.1:`redis_port`, and `extra` ones.
fn redis_vars(redis_port: u16, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let port = redis_port.to_string();
    [("HOST_REDIS", "127.0.0.1"), ("PORT_REDIS", port.as_str())]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Sends a signal by PID with kill(1): only to processes this test started.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// App logs go to the test's captured output, so a failing test shows them.
fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// The configuration tests start from: defaults, pointed at `redis_port`, port 0.
pub fn test_config(redis_port: u16) -> Config {
    let mut config = Config::from_lookup(|_| None).unwrap();
    config.redis_host = "127.0.0.1".to_owned();
    config.redis_port = redis_port;
    config.port = 0;
    config
}

/// The service, running in this test's runtime until dropped.
pub struct TestApp {
    pub port: u16,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Starts the service against Redis on `redis_port` with default settings.
pub async fn spawn_app(redis_port: u16) -> TestApp {
    spawn_app_with(test_config(redis_port)).await
}

/// Starts the service with `config` (its `port` should be 0).
pub async fn spawn_app_with(config: Config) -> TestApp {
    init_logs();
    let app = App::build(config).await.expect("the app binds");
    let port = app.port();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        port,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestApp {
    pub async fn get(&self, path: &str) -> Response {
        self.request("GET", path).await
    }

    pub async fn request(&self, method: &str, path: &str) -> Response {
        http::request(self.port, method, path)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Begins a graceful shutdown and waits for it to finish.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The `hit-counter` binary under test: the one cargo built for these tests, or the one
/// `HIT_COUNTER_BIN` names (CI points it at the static musl build the image ships).
pub fn binary() -> Command {
    let path = std::env::var_os("HIT_COUNTER_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_hit-counter").into());
    let mut command = Command::new(path);
    dies_with_test(&mut command)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

/// The real binary, serving on a free port with `vars` in its environment. Killed (SIGKILL) on
/// drop; its log is printed if the test failed.
pub struct ServiceProcess {
    pub port: u16,
    child: Child,
    log: tempfile::NamedTempFile,
}

impl ServiceProcess {
    /// Starts the binary on a free port and waits until it listens there.
    pub async fn start(vars: &[(&str, &str)]) -> Self {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Self::launch(&vars.collect::<Vec<_>>(), false).await
    }

    /// Starts the binary against the Redis on 127.0.0.1:`redis_port`, with `extra` settings.
    pub async fn with_redis(redis_port: u16, extra: &[(&str, &str)]) -> Self {
        Self::launch(&redis_vars(redis_port, extra), false).await
    }

    /// As [`with_redis`](Self::with_redis), its stdout a pipe for the test to read (or not:
    /// [`take_stdout`](Self::take_stdout)).
    pub async fn with_redis_piped(redis_port: u16, extra: &[(&str, &str)]) -> Self {
        Self::launch(&redis_vars(redis_port, extra), true).await
    }

    async fn launch(vars: &[(String, String)], piped: bool) -> Self {
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let log = tempfile::NamedTempFile::new().unwrap();
            let stdout = if piped {
                Stdio::piped()
            } else {
                log.reopen().unwrap().into()
            };
            let mut child = binary()
                .env("PORT", port.to_string())
                .envs(vars.iter().cloned())
                .stdout(stdout)
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let pid = child.id();
            let mut exit = None;
            let up = eventually(Duration::from_secs(5), async || {
                exit = child.try_wait().unwrap();
                exit.is_some() || listens_on(pid, port)
            })
            .await;
            match exit {
                None => {
                    assert!(up.is_some(), "the service did not start");
                    return Self { port, child, log };
                }
                // Exit code 1: it could not listen; another test took the port first.
                Some(status) if status.code() == Some(1) => continue,
                Some(status) => panic!("the service exited at start-up: {status}"),
            }
        }
        panic!("the service found no free port in {START_ATTEMPTS} attempts");
    }

    /// The service's stdout, when started with a pipe for it.
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child
            .stdout
            .take()
            .expect("started with a piped stdout")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, in KiB.
    pub fn rss_kb(&self) -> u64 {
        proc_status_kb(self.pid(), "VmRSS")
    }

    /// CPU time used so far (user + system), in clock ticks (1/100 s).
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends a signal (by name, e.g. "TERM") to the service.
    pub fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }

    /// Waits for the service to exit (at most 20 s: longer than the default drain).
    pub async fn wait(&mut self) -> ExitStatus {
        exited(&mut self.child, Duration::from_secs(20))
            .await
            .expect("the service did not exit")
    }

    /// SIGTERM, then wait for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait().await
    }

    /// Everything the service logged so far (complete once it has exited).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- service log (last lines) ----");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A `/proc/<pid>/status` field in KiB.
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Requests an HAProxy access log (its default HTTP format) shows as sent more than once: the
/// retries field (`+N` when redispatched) is not 0. A line it cannot read fails the test.
pub fn haproxy_retried(log: &str) -> usize {
    let retries = |line: &str| {
        let counters = line.split(' ').nth(10)?;
        counters
            .rsplit('/')
            .next()?
            .trim_start_matches('+')
            .parse::<u32>()
            .ok()
    };
    log.lines()
        .filter(|line| line.contains("\"GET "))
        .filter(|line| {
            retries(line).unwrap_or_else(|| panic!("not an HAProxy HTTP log line: {line:?}")) > 0
        })
        .count()
}

#[test]
fn haproxy_logs_are_read_or_fail() {
    let line = |retries: &str| {
        format!(
            "127.0.0.1:1 [04/Dec/2026:13:00:00.000] http web/r1 0/0/0/1/1 200 120 - - ---- 3/3/0/0/{retries} 0/0 \"GET / HTTP/1.1\"\n"
        )
    };
    let log = [line("0"), line("2"), line("+1")].concat();
    assert_eq!(haproxy_retried(&log), 2);
    assert!(std::panic::catch_unwind(|| haproxy_retried("a \"GET / HTTP/1.1\" line")).is_err());
}
