//! Stream in (`PUT /containers/:handle/files`) and stream out
//! (`GET /containers/:handle/files`).
//!
//! Both move tar bytes between the HTTP connection and a blocking runtime
//! call through a bounded channel, so memory stays flat however large the
//! archive is. The container's grace timer is paused until the response
//! has been sent in full.

use std::io::{self, Read};
use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::routes::{lookup, query_pairs};
use super::{AppState, PauseGuard};
use crate::actors::container::{blocking, GetRuntime};
use crate::actors::ContainerError;
use crate::api;

/// Chunks in flight between the connection and the runtime call.
const CHANNEL_CHUNKS: usize = 8;
/// Size of one read from a stream out archive.
const READ_CHUNK: usize = 64 * 1024;
/// Request body read and discarded after a stream in failed early, so the
/// client sees the error instead of a connection reset.
const DISCARD_LIMIT: usize = 16 * 1024 * 1024;

/// Returns the first value of `key` in the query, or an empty string.
fn query_value(pairs: &[(String, String)], key: &str) -> String {
    pairs.iter().find(|(name, _)| name == key).map(|(_, value)| value.clone()).unwrap_or_default()
}

async fn container_runtime(state: &AppState, handle: &str) -> Result<Arc<dyn crate::runtime::ContainerRuntime>, ApiError> {
    let addr = lookup(state, handle).await?;
    addr.send(GetRuntime)
        .await
        .map_err(|_| ContainerError::Mailbox { operation: "reading the container's runtime" })?
        .map_err(ApiError::from)
}

/// Reads and drops up to [`DISCARD_LIMIT`] bytes of the body.
async fn discard_body(payload: &mut web::Payload) {
    let mut discarded = 0;
    while let Some(Ok(chunk)) = payload.next().await {
        discarded += chunk.len();
        if discarded > DISCARD_LIMIT {
            break;
        }
    }
}

/// Serves a stream in: the body goes to the runtime as it arrives.
pub async fn stream_in(request: &HttpRequest, mut payload: web::Payload, state: &Arc<AppState>, handle: &str) -> Result<HttpResponse, ApiError> {
    let query = query_pairs(request.query_string());
    let destination = query_value(&query, "destination");
    let user = query_value(&query, "user");
    let runtime = match container_runtime(state, handle).await {
        Ok(runtime) => runtime,
        Err(error) => {
            discard_body(&mut payload).await;
            return Err(error);
        }
    };
    let _pause = PauseGuard::new(state, handle);

    let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    let extraction = blocking(move || runtime.stream_in(&destination, &user, &mut ChannelReader::new(receiver)));
    let feed = async move {
        let mut sender = Some(sender);
        let mut discarded = 0;
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|error| io::Error::other(format!("failed to read the request body: {error}")));
            let failed = chunk.is_err();
            match &sender {
                Some(open) => {
                    // A closed channel means extraction ended early; the
                    // rest of the body is discarded up to a limit.
                    if open.send(chunk).await.is_err() {
                        sender = None;
                    }
                }
                None => {
                    discarded += chunk.as_ref().map_or(0, |bytes| bytes.len());
                    if discarded > DISCARD_LIMIT {
                        break;
                    }
                }
            }
            if failed {
                break;
            }
        }
        // Dropping the sender ends the archive for the runtime.
        drop(sender);
    };
    let (result, ()) = tokio::join!(extraction, feed);
    result?;
    Ok(HttpResponse::Ok().content_type("application/json").body(api::encode(&serde_json::json!({}))))
}

/// Serves a stream out. Errors known before the first byte get the error
/// envelope. A failure later ends the body with an error, which aborts the
/// connection without the final chunk.
pub async fn stream_out(request: &HttpRequest, state: &Arc<AppState>, handle: &str, logger: &slog::Logger) -> Result<HttpResponse, ApiError> {
    let query = query_pairs(request.query_string());
    let source = query_value(&query, "source");
    let user = query_value(&query, "user");
    let runtime = container_runtime(state, handle).await?;
    let pause = PauseGuard::new(state, handle);
    let mut archive = blocking(move || runtime.stream_out(&source, &user)).await?;

    let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    let logger = logger.clone();
    tokio::task::spawn_blocking(move || loop {
        let mut buffer = BytesMut::zeroed(READ_CHUNK);
        let item = match archive.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => {
                buffer.truncate(count);
                Ok(buffer.freeze())
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                // The 200 head has gone out, so this is the only report.
                slog::warn!(logger, "stream out aborted"; "error" => %error);
                Err(error)
            }
        };
        let failed = item.is_err();
        // A closed channel means the client went away; dropping the
        // archive stops its producer.
        if sender.blocking_send(item).is_err() || failed {
            break;
        }
    });
    // The pause guard lives in the body stream, so the grace timer stays
    // paused until the last byte has been sent or the client has gone.
    let body = futures_util::stream::unfold((receiver, pause), |(mut receiver, pause)| async move {
        receiver.recv().await.map(|item| (item, (receiver, pause)))
    });
    Ok(HttpResponse::Ok().content_type("application/octet-stream").streaming(body))
}

/// A blocking reader over the chunks of a channel.
struct ChannelReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    fn new(receiver: mpsc::Receiver<io::Result<Bytes>>) -> ChannelReader {
        ChannelReader { receiver, current: Bytes::new() }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(error)) => return Err(error),
                None => return Ok(0),
            }
        }
        let count = buffer.len().min(self.current.len());
        buffer[..count].copy_from_slice(&self.current.split_to(count));
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_reader_joins_chunks_and_ends() {
        let (sender, receiver) = mpsc::channel(4);
        sender.try_send(Ok(Bytes::from_static(b"abc"))).unwrap();
        sender.try_send(Ok(Bytes::from_static(b"defg"))).unwrap();
        drop(sender);
        let mut text = String::new();
        ChannelReader::new(receiver).read_to_string(&mut text).unwrap();
        assert_eq!(text, "abcdefg");
    }

    #[test]
    fn channel_reader_passes_errors_on() {
        let (sender, receiver) = mpsc::channel(4);
        sender.try_send(Ok(Bytes::from_static(b"ab"))).unwrap();
        sender.try_send(Err(io::Error::other("connection reset"))).unwrap();
        let mut reader = ChannelReader::new(receiver);
        let mut buffer = [0u8; 8];
        assert_eq!(reader.read(&mut buffer).unwrap(), 2);
        assert_eq!(reader.read(&mut buffer).unwrap_err().to_string(), "connection reset");
    }

    #[test]
    fn missing_query_keys_are_empty() {
        let pairs = query_pairs("destination=%2Fhome%2Fvcap&user=");
        assert_eq!(query_value(&pairs, "destination"), "/home/vcap");
        assert_eq!(query_value(&pairs, "user"), "");
        assert_eq!(query_value(&pairs, "source"), "");
    }
}
