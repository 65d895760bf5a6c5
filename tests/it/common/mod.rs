//! Test harness: a real `redis-server` per test, the real service on a free port, and a raw
//! HTTP/1.1 client (raw, so tests see the exact bytes and can send malformed ones).

#![allow(dead_code)] // Each test module uses a different part of the harness.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use hit_counter::{App, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A port nobody listens on right now (the OS picked it, and we let it go).
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
    while started.elapsed() < within {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
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
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts on a free port with extra `redis-server` arguments (e.g. `--appendonly yes`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Self {
            port: free_port(),
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.restart();
        server
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

    /// (Re)starts the server on the same port, with the same data directory, and waits until
    /// it answers PING.
    pub fn restart(&mut self) {
        self.spawn();
        let started = Instant::now();
        while !self.ping() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Restarts with `extra` arguments replacing the previous ones, and returns as soon as the
    /// port accepts connections (Redis may still be loading its data).
    pub fn restart_unready(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.spawn();
        let started = Instant::now();
        while !accepts(self.port) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "local"])
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
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            let _ = child.wait();
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

    /// Runs a command that blocks Redis (e.g. `DEBUG SLEEP`) on its own thread.
    pub fn in_background(&self, args: &[&str]) -> std::thread::JoinHandle<()> {
        let mut conn = self.conn();
        let cmd = command(args);
        std::thread::spawn(move || {
            let _: redis::Value = cmd.query(&mut conn).unwrap();
        })
    }
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
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            eprintln!("---- redis-server log (port {}) ----\n{log}", self.port);
        }
    }
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
        let raw =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        send(self.port, raw.as_bytes()).await
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

/// A parsed HTTP/1.1 response; `raw_body` is exactly what came after the head.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub raw_body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body(&self) -> String {
        String::from_utf8(self.raw_body.clone()).unwrap()
    }

    /// N from `Hello World! N times.`
    pub fn hits(&self) -> i64 {
        let body = self.body();
        body.strip_prefix("Hello World! ")
            .and_then(|rest| rest.strip_suffix(" times."))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a hit page: {body:?}"))
    }
}

/// Writes `raw` to 127.0.0.1:`port` and reads until the server closes (requests should say
/// `Connection: close`). Panics after 10 s.
pub async fn send(port: u16, raw: &[u8]) -> Response {
    let bytes = tokio::time::timeout(Duration::from_secs(10), send_raw(port, raw))
        .await
        .expect("no complete answer within 10 s")
        .expect("the exchange failed");
    parse(&bytes).unwrap_or_else(|| {
        panic!(
            "not an HTTP response: {:?}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// Writes `raw`, then reads everything until EOF.
pub async fn send_raw(port: u16, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(raw).await?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await?;
    Ok(bytes)
}

/// Parses one response (head and the rest as body).
pub fn parse(bytes: &[u8]) -> Option<Response> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Some(Response {
        status,
        headers,
        raw_body: bytes[end + 4..].to_vec(),
    })
}

/// Is something accepting connections on 127.0.0.1:`port`?
pub fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// The `hit-counter` binary under test: the one cargo built for these tests, or the one
/// `HIT_COUNTER_BIN` names (CI points it at the static musl build the image ships).
pub fn binary() -> Command {
    let path = std::env::var_os("HIT_COUNTER_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_hit-counter").into());
    let mut command = Command::new(path);
    command
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
    /// Starts the binary and waits until it accepts connections.
    pub fn start(vars: &[(&str, &str)]) -> Self {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = binary()
            .env("PORT", port.to_string())
            .envs(vars.iter().copied())
            .stdout(log.reopen().unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let service = Self { port, child, log };
        let started = Instant::now();
        while !accepts(port) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the service did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        service
    }

    /// Starts the binary against the Redis on 127.0.0.1:`redis_port`, with `extra` settings.
    pub fn with_redis(redis_port: u16, extra: &[(&str, &str)]) -> Self {
        let port = redis_port.to_string();
        let mut vars = vec![("HOST_REDIS", "127.0.0.1"), ("PORT_REDIS", port.as_str())];
        vars.extend_from_slice(extra);
        Self::start(&vars)
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

    /// Waits for the service to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait()
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

/// A tiny deterministic PRNG (xorshift64*), so generated inputs are the same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// `GET path` with `Connection: close`, blocking, for tests that drive the binary from threads.
pub fn blocking_get(port: u16, path: &str) -> Option<Response> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).ok()?;
    parse(&bytes)
}
