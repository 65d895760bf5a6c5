//! `hit-counter healthcheck`: a container health check without curl in the image.
//!
//! GETs `http://127.0.0.1:$PORT/livez` with a 2-second budget and exits 0 on a 200, 1
//! otherwise. Liveness, not readiness: a Redis outage must not get healthy replicas killed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The whole check must finish within this.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Checks `/livez` on `port` of this host. `Err` says why it is not healthy.
pub fn check(port: u16) -> Result<(), String> {
    let started = Instant::now();
    let left = || {
        TIMEOUT
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1))
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("{addr}: {e}"))?;
    // Read only as much as the status line needs; the deadline covers every read.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 1024 {
        stream
            .set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{addr}: {e}")),
        }
        if started.elapsed() >= TIMEOUT {
            return Err(format!("{addr}: no answer within {TIMEOUT:?}"));
        }
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    if status_line.starts_with("HTTP/1.1 200 ") {
        Ok(())
    } else {
        Err(format!("{addr}: unexpected answer {status_line:?}"))
    }
}
