//! A TCP relay in front of Redis, as a proxy, a DNS name or a Kubernetes Service is: new
//! connections go wherever it points now ([`Relay::send_new_to`]), open ones stay where they
//! were; and it can cut the connections it carries without closing them, as a failover or a
//! network fault leaves connections half-open.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    pub port: u16,
    upstream: Arc<AtomicU16>,
    opened: Arc<AtomicUsize>,
    cut_below: Arc<AtomicUsize>,
}

impl Relay {
    pub async fn to(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = Arc::new(AtomicU16::new(upstream));
        let (opened, cut_below) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (u, o, c) = (upstream.clone(), opened.clone(), cut_below.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = o.fetch_add(1, Ordering::Relaxed);
                // Upstream down: the client's connection closes, as a proxy's would.
                let Ok(server) = TcpStream::connect(("127.0.0.1", u.load(Ordering::Relaxed))).await
                else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(forward(id, client_read, server_write, c.clone()));
                tokio::spawn(forward(id, server_read, client_write, c.clone()));
            }
        });
        Self {
            port,
            upstream,
            opened,
            cut_below,
        }
    }

    /// Connections opened so far.
    pub fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    /// New connections go to `upstream` from now on; open ones stay where they are.
    pub fn send_new_to(&self, upstream: u16) {
        self.upstream.store(upstream, Ordering::Relaxed);
    }

    /// From now on the connections open so far carry nothing, and stay open.
    pub fn cut_open_connections(&self) {
        self.cut_below.store(self.opened(), Ordering::Relaxed);
    }
}

async fn forward(
    id: usize,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    cut_below: Arc<AtomicUsize>,
) {
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if id >= cut_below.load(Ordering::Relaxed) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
