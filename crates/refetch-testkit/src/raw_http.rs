//! A hostile HTTP server on 127.0.0.1 that writes raw bytes, for answers a well-behaved server
//! library cannot produce: truncated or invalid chunked encoding, a `Content-Length` that is
//! never reached, a declared 10 MB body, garbage instead of a status line, headers sent one byte
//! at a time (slowloris), wrong content types.
//!
//! Every request's last path segment (percent-decoded) selects the canned [`RawAnswer`] set with
//! [`RawHttpServer::answer`]; ids without one get a well-formed `200 application/json` answer
//! `{"id": ID}` with a `Content-Length`. The connection is closed after each answer, so a broken
//! answer never leaks into the next request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A canned answer of [`RawHttpServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawAnswer {
    /// These exact bytes, then close.
    Bytes(Vec<u8>),
    /// These bytes, one byte every interval (a slow trickle from the first byte of the head).
    Trickle(Vec<u8>, Duration),
}

impl RawAnswer {
    /// A complete response with `status`, `content_type` (omitted when `None`), a correct
    /// `Content-Length` and `body`.
    pub fn response(status: u16, content_type: Option<&str>, body: &[u8]) -> RawAnswer {
        let mut out = format!("HTTP/1.1 {status} X\r\n");
        if let Some(ct) = content_type {
            out.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        RawAnswer::Bytes(bytes)
    }

    /// A `200 application/json` chunked response made of `chunks` written verbatim after the
    /// head (the caller writes the chunk framing, valid or not).
    pub fn chunked(framing: &[u8]) -> RawAnswer {
        let mut bytes = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        bytes.extend_from_slice(framing);
        RawAnswer::Bytes(bytes)
    }
}

struct Shared {
    answers: Mutex<HashMap<String, RawAnswer>>,
    requests: Mutex<HashMap<String, u64>>,
    total: AtomicU64,
}

/// The raw server; see the [module docs](self). Dropping it stops the server.
pub struct RawHttpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for RawHttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawHttpServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RawHttpServer {
    /// Binds 127.0.0.1 on a free port and serves until dropped.
    pub async fn start() -> anyhow::Result<RawHttpServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            answers: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, s.clone()));
            }
        });
        Ok(RawHttpServer { addr, shared, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers requests for `id` with `answer` from now on.
    pub fn answer(&self, id: &str, answer: RawAnswer) {
        if let Ok(mut a) = self.shared.answers.lock() {
            a.insert(id.to_owned(), answer);
        }
    }

    /// Answers `id` normally again.
    pub fn heal(&self, id: &str) {
        if let Ok(mut a) = self.shared.answers.lock() {
            a.remove(id);
        }
    }

    /// Requests received for `id`.
    pub fn requests_for(&self, id: &str) -> u64 {
        self.shared
            .requests
            .lock()
            .map(|r| r.get(id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Requests received in total.
    pub fn total_requests(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }
}

impl Drop for RawHttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn last_segment(target: &str) -> String {
    let path = target.split('?').next().unwrap_or("");
    let seg = path.rsplit('/').next().unwrap_or("");
    percent_encoding::percent_decode_str(seg)
        .decode_utf8_lossy()
        .into_owned()
}

async fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the end of the request head (GET requests carry no body).
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let line = String::from_utf8_lossy(&head);
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let id = last_segment(&target);
    shared.total.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut r) = shared.requests.lock() {
        *r.entry(id.clone()).or_default() += 1;
    }
    let answer = shared
        .answers
        .lock()
        .ok()
        .and_then(|a| a.get(&id).cloned())
        .unwrap_or_else(|| {
            let body = serde_json::json!({ "id": id }).to_string();
            RawAnswer::response(200, Some("application/json"), body.as_bytes())
        });
    match answer {
        RawAnswer::Bytes(bytes) => {
            let _ = stream.write_all(&bytes).await;
        }
        RawAnswer::Trickle(bytes, every) => {
            for b in bytes {
                if stream.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        }
    }
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn canned_and_default_answers_by_last_segment() -> anyhow::Result<()> {
        let server = RawHttpServer::start().await?;
        server.answer("bad", RawAnswer::chunked(b"zz\r\nnope"));
        let normal = get(server.addr, "/customer/a%20b").await?;
        let text = String::from_utf8_lossy(&normal);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with(r#"{"id":"a b"}"#), "{text}");
        let bad = get(server.addr, "/customer/bad").await?;
        assert!(bad.ends_with(b"zz\r\nnope"));
        assert_eq!(server.requests_for("bad"), 1);
        assert_eq!(server.total_requests(), 2);
        server.heal("bad");
        let healed = get(server.addr, "/customer/bad").await?;
        assert!(healed.ends_with(br#"{"id":"bad"}"#));
        Ok(())
    }
}
