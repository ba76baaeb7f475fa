//! The per-connection demux in front of actix-http.
//!
//! It reads the first request head of a connection (with a timeout and a
//! size cap) and parses it with httparse. A process route is served on the
//! raw socket by [`super::hijack`]. Any other connection is wrapped in a
//! [`Replay`] stream that returns the bytes already read before reading the
//! socket again. That stream goes to actix-http's HTTP/1 service built from
//! the actix-web app, which also serves later requests on a kept-alive
//! connection. Checking only the first request is enough because the Go
//! client opens a new connection for every process route.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::HttpService;
use actix_service::{fn_factory, fn_service, map_config, Service, ServiceFactory};
use actix_web::dev::AppConfig;
use actix_web::{web, App};
use bytes::{Buf, Bytes, BytesMut};
use slog::debug;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::router::match_route;
use super::{hijack, routes, AppState};

/// How long the demux waits for a complete first request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest first request head accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most headers parsed in a request head.
const MAX_HEADERS: usize = 64;

/// A stream that yields `prefix` before reading from `inner`.
pub struct Replay<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Replay<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Replay { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let count = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..count]);
            self.prefix.advance(count);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The parts of the first request head the demux and the process routes use.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: String,
    /// The request target as sent, query included.
    pub target: String,
    pub content_length: Option<usize>,
    /// Length of the head in the buffer, blank line included.
    pub head_len: usize,
}

/// Parses a complete head at the start of `buffer`; `Ok(None)` means more
/// bytes are needed.
pub fn parse_head(buffer: &[u8]) -> Result<Option<RequestHead>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buffer)? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(head_len) => {
            let content_length = request
                .headers
                .iter()
                .find(|header| header.name.eq_ignore_ascii_case("content-length"))
                .and_then(|header| std::str::from_utf8(header.value).ok())
                .and_then(|value| value.trim().parse().ok());
            Ok(Some(RequestHead {
                method: request.method.unwrap_or_default().to_string(),
                target: request.path.unwrap_or_default().to_string(),
                content_length,
                head_len,
            }))
        }
    }
}

/// Builds the per-worker service factory for one listener: the actix-http
/// HTTP/1 service plus the demux in front of it.
pub fn factory<T>(
    state: Arc<AppState>,
) -> impl ServiceFactory<T, Config = (), Response = (), Error = (), InitError = ()>
where
    T: AsyncRead + AsyncWrite + Unpin + PeerAddr + 'static,
{
    fn_factory(move || {
        let state = state.clone();
        async move {
            let app_state = web::Data::from(state.clone());
            let app = App::new()
                .app_data(app_state)
                .default_service(web::to(routes::dispatch));
            let http = HttpService::<Replay<T>, _, _>::build()
                .client_request_timeout(HEAD_TIMEOUT)
                .h1(map_config(app, |_| AppConfig::default()))
                .new_service(())
                .await?;
            let http = Rc::new(http);
            Ok(fn_service(move |io: T| {
                let http = http.clone();
                let state = state.clone();
                async move {
                    serve_connection(io, http, state).await;
                    Ok::<(), ()>(())
                }
            }))
        }
    })
}

/// The peer address of a connection, where there is one.
pub trait PeerAddr {
    fn peer(&self) -> Option<SocketAddr>;
}

impl PeerAddr for actix_rt::net::TcpStream {
    fn peer(&self) -> Option<SocketAddr> {
        self.peer_addr().ok()
    }
}

impl PeerAddr for actix_rt::net::UnixStream {
    fn peer(&self) -> Option<SocketAddr> {
        None
    }
}

async fn serve_connection<T, S>(mut io: T, http: Rc<S>, state: Arc<AppState>)
where
    T: AsyncRead + AsyncWrite + Unpin + PeerAddr + 'static,
    S: Service<(Replay<T>, Option<SocketAddr>)>,
    S::Error: std::fmt::Debug,
{
    let peer = io.peer();
    let mut buffer = BytesMut::with_capacity(4096);
    let head = loop {
        match parse_head(&buffer) {
            Ok(Some(head)) => break Some(head),
            // actix-http rejects a malformed head with its 400 response.
            Err(_) => break None,
            Ok(None) if buffer.len() >= MAX_HEAD_BYTES => break None,
            Ok(None) => {}
        }
        match tokio::time::timeout(HEAD_TIMEOUT, io.read_buf(&mut buffer)).await {
            Ok(Ok(0)) if buffer.is_empty() => return,
            Ok(Ok(0)) => break None,
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                debug!(state.logger, "reading request head failed"; "error" => %error);
                return;
            }
            Err(_) => {
                debug!(state.logger, "request head timed out");
                return;
            }
        }
    };
    if let Some(head) = head {
        let path = head.target.split('?').next().unwrap_or_default();
        if let Ok(found) = match_route(&head.method, path) {
            if found.route.is_hijacked() {
                hijack::serve(io, buffer, head, found, state).await;
                return;
            }
        }
    }
    if let Err(error) = http.call((Replay::new(buffer.freeze(), io), peer)).await {
        debug!(state.logger, "HTTP connection ended with an error"; "error" => format!("{error:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parsing() {
        let request = b"POST /containers/h/processes HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\n{}\n\n\n{\"a\"";
        let head = parse_head(request).unwrap().unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/containers/h/processes");
        assert_eq!(head.content_length, Some(5));
        assert_eq!(&request[head.head_len..head.head_len + 5], b"{}\n\n\n");
        assert!(parse_head(b"GET /ping HTTP/1.1\r\nHost: a").unwrap().is_none());
        assert!(parse_head(b"\x01\x02 nonsense\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn replay_yields_prefix_first() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let mut replay = Replay::new(Bytes::from_static(b"abc"), server);
        let mut out = Vec::new();
        replay.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"abc");
    }
}
