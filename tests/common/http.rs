//! The tests' one HTTP/1.1 client. Raw, so a test sees the exact bytes the service sent and can
//! send malformed ones; and the parsers of what the service answers (the page, the metrics).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any exchange may take before it counts as no answer.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed response; `raw_body` is exactly what came after the head.
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

    /// N from `Hello World! N times.`; panics on any other body.
    pub fn hits(&self) -> i64 {
        hits_in(&self.raw_body).unwrap_or_else(|| {
            panic!(
                "not a hit page: {:?}",
                String::from_utf8_lossy(&self.raw_body)
            )
        })
    }
}

/// N from a `Hello World! N times.` body, the page's one parser.
pub fn hits_in(body: &[u8]) -> Option<i64> {
    std::str::from_utf8(body)
        .ok()?
        .strip_prefix("Hello World! ")?
        .strip_suffix(" times.")?
        .parse()
        .ok()
}

/// The value of the sample whose line starts with `series` (name and labels, exactly): the
/// metrics' one parser.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// `clients` concurrent visitors, each sending `each` `GET /` one after another; the numbers
/// they were shown, in no particular order. Every answer must be a page.
pub async fn visitors(port: u16, clients: usize, each: usize) -> Vec<i64> {
    let clients: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut numbers = Vec::with_capacity(each);
                for _ in 0..each {
                    numbers.push(get(port, "/").await.expect("an answer").hits());
                }
                numbers
            })
        })
        .collect();
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await.unwrap());
    }
    all
}

/// `GET path` on its own connection (`Connection: close`).
pub async fn get(port: u16, path: &str) -> io::Result<Response> {
    request(port, "GET", path).await
}

/// Does `GET path` answer `200`?
pub async fn is_ok(port: u16, path: &str) -> bool {
    get(port, path).await.is_ok_and(|r| r.status == 200)
}

/// `method path` on its own connection (`Connection: close`).
pub async fn request(port: u16, method: &str, path: &str) -> io::Result<Response> {
    let raw = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    send(port, raw.as_bytes()).await
}

/// Writes `raw` to 127.0.0.1:`port` on a new connection and reads one response: up to its
/// `Content-Length`, or until the server closes. No complete response (the server hung up
/// first, or took longer than [`EXCHANGE_TIMEOUT`]) is an error.
pub async fn send(port: u16, raw: &[u8]) -> io::Result<Response> {
    bounded(async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        exchange(&mut stream, raw).await
    })
    .await
}

/// A client of 127.0.0.1:`port` that sends `GET`s one after another: on one connection kept
/// open between them (`keep_alive`, opened again after an error or a `Connection: close`), or
/// on a new connection each (`Connection: close`).
pub struct Client {
    port: u16,
    keep_alive: bool,
    stream: Option<TcpStream>,
}

impl Client {
    pub fn new(port: u16, keep_alive: bool) -> Self {
        Self {
            port,
            keep_alive,
            stream: None,
        }
    }

    pub async fn get(&mut self, path: &str) -> io::Result<Response> {
        if !self.keep_alive {
            return get(self.port, path).await;
        }
        let raw = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let port = self.port;
        let stream = &mut self.stream;
        let response = bounded(async {
            if stream.is_none() {
                *stream = Some(TcpStream::connect(("127.0.0.1", port)).await?);
            }
            exchange(stream.as_mut().unwrap(), raw.as_bytes()).await
        })
        .await;
        let closes = response.as_ref().map_or(true, |r| {
            r.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        });
        if closes {
            self.stream = None;
        }
        response
    }
}

async fn bounded(exchange: impl Future<Output = io::Result<Response>>) -> io::Result<Response> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

async fn exchange(stream: &mut TcpStream, raw: &[u8]) -> io::Result<Response> {
    // A server may answer and close before reading everything (431, 400): read its answer
    // anyway, and report the write error only if there is none.
    let written = stream.write_all(raw).await;
    let mut bytes = Vec::with_capacity(256);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(response) = parse(&bytes).filter(complete) {
            return Ok(response);
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    match parse(&bytes) {
        Some(response) => Ok(response),
        None => Err(written.err().unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("no HTTP response: {:?}", String::from_utf8_lossy(&bytes)),
            )
        })),
    }
}

/// Writes `raw` (one request) `times` times on one keep-alive connection, without waiting
/// (HTTP/1.1 pipelining), and returns the status of every response, in order. Thousands of
/// requests take a fraction of the time of a connection each. The responses need a
/// `Content-Length` (or must be the last).
pub async fn send_pipelined(port: u16, raw: &[u8], times: usize) -> io::Result<Vec<u16>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut reader, mut writer) = stream.split();
    let requests = raw.repeat(times);
    let write = writer.write_all(&requests);
    let read = async {
        let mut statuses = Vec::with_capacity(times);
        let mut bytes = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        while statuses.len() < times {
            match reader.read(&mut buf).await? {
                0 => break,
                n => bytes.extend_from_slice(&buf[..n]),
            }
            // Take every complete response off the front.
            while let Some(response) = parse(&bytes).filter(complete) {
                let body = response
                    .header("content-length")
                    .map_or(0, |n| n.parse().unwrap_or(0));
                let consumed = bytes.len() - response.raw_body.len() + body;
                statuses.push(response.status);
                bytes.drain(..consumed);
            }
        }
        Ok::<_, io::Error>(statuses)
    };
    let (written, statuses) =
        tokio::time::timeout(EXCHANGE_TIMEOUT, async { tokio::join!(write, read) })
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?;
    written?;
    statuses
}

/// Has the whole body arrived? Only knowable with a `Content-Length`; otherwise the end of
/// the connection says so.
fn complete(response: &Response) -> bool {
    response
        .header("content-length")
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| response.raw_body.len() >= n)
}

/// Parses one response (head, and the rest as body).
pub fn parse(bytes: &[u8]) -> Option<Response> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
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
