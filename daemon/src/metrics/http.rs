//! The metrics endpoint: `GET /metrics` over HTTP/1.1, one request per
//! connection, on a unix socket and optionally a TCP address.
//!
//! Hand-written on tokio (docs/decisions.md, "Metrics"): a scraper sends
//! one small request and reads one body, so a request head and a
//! `Content-Length` response are all there is. What a hostile client could
//! do is bounded: the head must arrive within [`HEAD_TIMEOUT`] and fit in
//! [`MAX_HEAD`] bytes, the response must be taken within
//! [`WRITE_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served at once
//! (others are closed at once).

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::Format;

/// Largest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// After a refused head, how much more input is read and dropped before
/// closing, and for how long at most.
const LINGER_BYTES: usize = 64 * 1024;
const LINGER_TIMEOUT: Duration = Duration::from_secs(1);

/// A listener that could not be set up.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// The unix socket could not be bound.
    #[error("cannot listen on {}", path.display())]
    Unix {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TCP address could not be bound.
    #[error("cannot listen on {address}")]
    Tcp {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The bound sockets.
#[derive(Debug)]
pub struct Listeners {
    unix: UnixListener,
    tcp: Option<TcpListener>,
}

impl Listeners {
    /// Bind `unix` (a stale socket there is replaced; mode 0666: metrics
    /// are read-only aggregates, as the read-only varlink calls are open
    /// to every local user) and `tcp` when given.
    pub async fn bind(unix: &Path, tcp: Option<SocketAddr>) -> Result<Self, MetricsError> {
        let unix_err = |source| MetricsError::Unix {
            path: unix.to_path_buf(),
            source,
        };
        if std::os::unix::net::UnixStream::connect(unix).is_err() {
            let _ = std::fs::remove_file(unix);
        }
        let listener = UnixListener::bind(unix).map_err(unix_err)?;
        std::fs::set_permissions(unix, std::fs::Permissions::from_mode(0o666)).map_err(unix_err)?;
        info!(path = %unix.display(), "metrics: listening");
        let tcp = match tcp {
            Some(address) => {
                let listener = TcpListener::bind(address)
                    .await
                    .map_err(|source| MetricsError::Tcp { address, source })?;
                info!(%address, "metrics: listening");
                Some(listener)
            }
            None => None,
        };
        Ok(Self {
            unix: listener,
            tcp,
        })
    }
}

/// Serve until the process ends, answering `GET /metrics` with what
/// `render` makes for the format the client accepts.
pub async fn serve<R, F>(listeners: Listeners, render: R)
where
    R: Fn(Format) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = String> + Send,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let unix = {
        let (render, slots) = (render.clone(), slots.clone());
        async move {
            loop {
                match listeners.unix.accept().await {
                    Ok((stream, _)) => start(stream, &slots, &render),
                    Err(e) => pause_after(e).await,
                }
            }
        }
    };
    let tcp = async move {
        let Some(tcp) = listeners.tcp else {
            return std::future::pending().await;
        };
        loop {
            match tcp.accept().await {
                Ok((stream, _)) => start(stream, &slots, &render),
                Err(e) => pause_after(e).await,
            }
        }
    };
    tokio::join!(unix, tcp);
}

/// An accept that failed (out of fds, most likely): say so, wait a little.
async fn pause_after(e: std::io::Error) {
    warn!(error = %e, "metrics: accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Serve one connection on a task of its own, or turn it away when
/// [`MAX_CONNECTIONS`] are being served.
fn start<S, R, F>(mut stream: S, slots: &Arc<Semaphore>, render: &R)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    R: Fn(Format) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = String> + Send,
{
    let slot = slots.clone().try_acquire_owned();
    let render = render.clone();
    tokio::spawn(async move {
        // Turned away at once, unanswered: a reply would need the request
        // read first (or risk a reset), and a flood must not hold fds.
        let Ok(_slot) = slot else {
            return debug!("metrics: too many connections, one closed");
        };
        // Unread input makes the close a reset that can destroy the reply
        // in flight: after a head cut short, some is read and dropped.
        let mut linger = false;
        let reply = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
            Err(_) => return debug!("metrics: a client sent no request in time"),
            Ok(Err(HeadError::Closed)) => return,
            Ok(Err(HeadError::TooLarge)) => {
                linger = true;
                let text = "request head too large\n";
                response(
                    431,
                    "Request Header Fields Too Large",
                    "text/plain",
                    text,
                    true,
                )
            }
            Ok(Ok(head)) => match parse(&head) {
                Err(status) => {
                    let (code, reason) = status;
                    response(code, reason, "text/plain", &format!("{reason}\n"), true)
                }
                Ok(request) => {
                    let body = render(request.format).await;
                    let head_only = request.method == Method::Head;
                    response(200, "OK", request.format.content_type(), &body, !head_only)
                }
            },
        };
        let sent = tokio::time::timeout(WRITE_TIMEOUT, async {
            stream.write_all(&reply).await?;
            stream.shutdown().await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            debug!("metrics: a client did not take its response");
        }
        if linger {
            let mut sink = [0u8; 4096];
            let drain = async {
                let mut left = LINGER_BYTES;
                while left > 0 {
                    match stream.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => left = left.saturating_sub(n),
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER_TIMEOUT, drain).await;
        }
    });
}

/// Why no request head was read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The client closed (or failed) before the blank line.
    Closed,
    /// More than [`MAX_HEAD`] bytes without a blank line.
    TooLarge,
}

/// Read up to the blank line that ends a request head.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Where the head ends (`\r\n\r\n`, or `\n\n` from lax clients).
fn find_end(head: &[u8]) -> Option<usize> {
    let crlf = head.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = head.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
}

/// A request kilnd answers.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: Method,
    format: Format,
}

/// The request in `head`, or the status that refuses it.
fn parse(head: &[u8]) -> Result<Request, (u16, &'static str)> {
    const BAD: (u16, &str) = (400, "Bad Request");
    let text = std::str::from_utf8(head).map_err(|_| BAD)?;
    let mut lines = text.lines();
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let (method, target, version) = (
        request_line.next().unwrap_or(""),
        request_line.next().unwrap_or(""),
        request_line.next().unwrap_or(""),
    );
    if !version.starts_with("HTTP/1.") || request_line.next().is_some() {
        return Err(BAD);
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => return Err((405, "Method Not Allowed")),
    };
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return Err((404, "Not Found"));
    }
    let accept = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("accept").then_some(value)
    });
    Ok(Request {
        method,
        format: Format::from_accept(accept),
    })
}

/// A whole response, closing the connection. `with_body` false (HEAD)
/// still says the body's length.
fn response(code: u16, reason: &str, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if code == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn requests_are_parsed_and_refused_by_status() {
        let get = parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5").unwrap();
        assert_eq!(get.method, Method::Get);
        assert_eq!(get.format, Format::OpenMetrics);
        let plain = parse(b"HEAD /metrics?x=1 HTTP/1.0\r\nAccept: */*").unwrap();
        assert_eq!((plain.method, plain.format), (Method::Head, Format::Text));
        assert_eq!(parse(b"POST /metrics HTTP/1.1").unwrap_err().0, 405);
        assert_eq!(parse(b"GET / HTTP/1.1").unwrap_err().0, 404);
        assert_eq!(parse(b"GET /metrics").unwrap_err().0, 400);
        assert_eq!(parse(b"\xff\xfe").unwrap_err().0, 400);
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n"), None);
    }

    /// The reply to `request`; empty when the server closed without one.
    async fn exchange(path: &Path, request: &[u8]) -> String {
        let mut client = tokio::net::UnixStream::connect(path).await.unwrap();
        let _ = client.write_all(request).await;
        let mut reply = String::new();
        let _ = client.read_to_string(&mut reply).await;
        reply
    }

    #[tokio::test]
    async fn a_scrape_is_answered_and_hostile_clients_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics");
        let listeners = Listeners::bind(&path, None).await.unwrap();
        tokio::spawn(serve(listeners, |format: Format| async move {
            format!("{format:?}\n")
        }));
        let reply = exchange(&path, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(
            reply.contains("Content-Type: text/plain; version=0.0.4"),
            "{reply}"
        );
        assert!(reply.ends_with("\r\n\r\nText\n"), "{reply}");
        let head = exchange(&path, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            head.contains("Content-Length: 5\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );

        // A head that never ends is cut at MAX_HEAD.
        let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let junk = vec![b'a'; MAX_HEAD * 4];
        let _ = client.write_all(&junk).await;
        let mut reply = String::new();
        let _ = client.read_to_string(&mut reply).await;
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");

        // Silent clients hold a slot until HEAD_TIMEOUT: the ones beyond
        // MAX_CONNECTIONS are closed at once, not queued.
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(tokio::net::UnixStream::connect(&path).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let busy = exchange(&path, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(busy, "");
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(silent);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let again = exchange(&path, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(again.starts_with("HTTP/1.1 200 "), "{again}");
    }
}
