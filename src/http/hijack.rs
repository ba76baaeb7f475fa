//! The four process routes, served on the raw connection.
//!
//! Run (201) and Attach (200) write a response head with
//! `Transfer-Encoding: chunked` and then carry newline-delimited JSON in
//! both directions with no chunk framing (C1). The stdout and stderr
//! attaches (C2, C3) write their head at once and then the raw output of
//! their stream until it finishes. The heads match the Go server's byte for
//! byte apart from the date; error responses carry `Content-Length` and no
//! `Connection: close`, because the Go client fails any head that announces
//! a close.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::Addr;
use bytes::{Buf, BytesMut};
use slog::{debug, info, o, warn, Logger};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::demux::{RequestHead, HEAD_TIMEOUT};
use super::error::ApiError;
use super::metrics::Operation;
use super::router::{Route, RouteMatch};
use super::routes::lookup;
use super::{AppState, PauseGuard};
use crate::actors::container::{FindProcess, ForgetProcess, RunProcess};
use crate::actors::process::{AttachOutput, CloseStream, ExitOutcome, OpenStream, OutputKind, Process, StreamHandle};
use crate::actors::ContainerError;
use crate::api::{self, ProcessPayload, ProcessSpec, SIGNAL_KILL, SIGNAL_TERMINATE};
use crate::runtime::stdio::ServerFrame;

/// How long an error response waits for the client to close before the
/// server closes the connection.
const ERROR_LINGER: Duration = Duration::from_secs(5);

fn http_date() -> String {
    httpdate::fmt_http_date(SystemTime::now())
}

/// Returns the head of a successful Run (201) or Attach (200).
pub fn process_head(status_line: &str) -> String {
    format!("HTTP/1.1 {status_line}\r\nContent-Type: application/json\r\nDate: {}\r\nTransfer-Encoding: chunked\r\n\r\n", http_date())
}

/// Returns the head of a stdout or stderr attach.
pub fn output_head() -> String {
    format!("HTTP/1.1 200 OK\r\nDate: {}\r\nTransfer-Encoding: chunked\r\n\r\n", http_date())
}

/// Returns a framed error response without `Connection: close`.
pub fn error_response(error: &ApiError) -> Vec<u8> {
    let (status, body) = error.body();
    let reason = actix_web::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|code| code.canonical_reason())
        .unwrap_or("Error");
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nDate: {}\r\nContent-Length: {}\r\n\r\n",
        http_date(),
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    response
}

/// Serves one process-route connection whose head is in `buffer`.
pub async fn serve<T>(io: T, buffer: BytesMut, head: RequestHead, found: RouteMatch, state: Arc<AppState>)
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let logger = state.request_logger(found.route, &found);
    match found.route {
        Route::Stdout => serve_output(io, found.param("streamid").to_string(), OutputKind::Stdout, state, logger).await,
        Route::Stderr => serve_output(io, found.param("streamid").to_string(), OutputKind::Stderr, state, logger).await,
        Route::Run | Route::Attach => serve_process(io, buffer, head, found, state, logger).await,
        _ => unreachable!("only process routes are hijacked"),
    }
}

async fn serve_process<T>(mut io: T, mut buffer: BytesMut, head: RequestHead, found: RouteMatch, state: Arc<AppState>, logger: Logger)
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let started = Instant::now();
    info!(logger, "started");
    let body_len = head.content_length.unwrap_or(0);
    let opened = async {
        if body_len > state.max_body_bytes {
            return Err(ApiError::BodyTooLarge { limit: state.max_body_bytes });
        }
        while buffer.len() < head.head_len + body_len {
            match tokio::time::timeout(HEAD_TIMEOUT, io.read_buf(&mut buffer)).await {
                Ok(Ok(0)) => return Err(ApiError::BodyRead { reason: "the client closed the connection".into() }),
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(ApiError::BodyRead { reason: error.to_string() }),
                Err(_) => return Err(ApiError::BodyRead { reason: "timed out".into() }),
            }
        }
        buffer.advance(head.head_len);
        let body = buffer.split_to(body_len);
        let handle = found.param("handle");
        let (container, process, pause) = if found.route == Route::Run {
            // Like the Go server, the body is decoded before the lookup.
            let spec: ProcessSpec = api::decode(&body)?;
            let container = lookup(&state, handle).await?;
            let pause = PauseGuard::new(&state, handle);
            let process = container
                .send(RunProcess { spec })
                .await
                .map_err(|_| ContainerError::Mailbox { operation: "starting the process" })??;
            (container, process, pause)
        } else {
            let container = lookup(&state, handle).await?;
            let pause = PauseGuard::new(&state, handle);
            let process = container
                .send(FindProcess { process_id: found.param("pid").to_string() })
                .await
                .map_err(|_| ContainerError::Mailbox { operation: "finding the process" })??;
            (container, process, pause)
        };
        let stream_id = state.stream_ids.next();
        let stream = process
            .send(OpenStream { stream_id })
            .await
            .map_err(|_| ContainerError::Mailbox { operation: "opening the process stream" })?;
        Ok((container, process, stream, pause))
    }
    .await;

    // The grace timer stays paused until the process connection ends.
    let (container, process, stream, _pause) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            let status = error.to_envelope().0;
            state.metrics.record_request(found.route.name(), status, started.elapsed());
            let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            if error.is_client_error() {
                info!(logger, "failed"; "status" => status, "duration_ms" => duration_ms, "error" => %error);
            } else {
                warn!(logger, "failed"; "status" => status, "duration_ms" => duration_ms, "error" => %error);
            }
            write_error_and_close(io, &error).await;
            return;
        }
    };
    let logger = logger.new(o!("process_id" => stream.process_id.clone(), "stream_id" => stream.stream_id.clone()));
    let (status_line, status) = if found.route == Route::Run { ("201 Created", 201) } else { ("200 OK", 200) };
    state.metrics.record_request(found.route.name(), status, started.elapsed());
    if found.route == Route::Run {
        state.metrics.record_operation(Operation::Run, started.elapsed());
    }
    let process_id = stream.process_id.clone();
    let end = run_process_connection(io, buffer, process.clone(), stream, status_line, &state, &logger).await;
    if end == EXIT_SENT && state.cleanup_process_dirs_on_wait {
        container.do_send(ForgetProcess { process_id, process });
    }
    info!(logger, "finished"; "status" => status_line, "end" => end, "duration_ms" => started.elapsed().as_secs_f64() * 1000.0);
}

/// Writes an error response, then closes once the client has closed or
/// after a short wait, so the client reads the whole response before the
/// close (closing with unread input could reset the connection).
async fn write_error_and_close<T: AsyncRead + AsyncWrite + Unpin>(mut io: T, error: &ApiError) {
    if io.write_all(&error_response(error)).await.is_err() {
        return;
    }
    let _ = io.flush().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(ERROR_LINGER, async {
        while let Ok(read) = io.read(&mut sink).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
}

/// Serves C1 after the process was found or started. Returns why the
/// connection ended, for the log.
async fn run_process_connection<T>(
    io: T,
    mut input: BytesMut,
    process: Addr<Process>,
    stream: StreamHandle,
    status_line: &str,
    state: &AppState,
    logger: &Logger,
) -> &'static str
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let StreamHandle { process_id, stream_id, shim, tty, stdin_closed, mut exit, mut liveness } = stream;
    let process_input = ProcessInput { shim: &shim, tty, stdin_closed: &stdin_closed };
    let handshake = ProcessPayload { process_id: process_id.clone(), stream_id: stream_id.clone(), ..ProcessPayload::default() };
    let mut head = process_head(status_line).into_bytes();
    head.extend_from_slice(&api::encode(&handshake));
    if writer.write_all(&head).await.is_err() {
        process.do_send(CloseStream { stream_id });
        return "client gone before handshake";
    }

    let outcome = loop {
        forward_messages(&mut input, &process_input, logger).await;
        tokio::select! {
            read = reader.read_buf(&mut input) => match read {
                Ok(0) | Err(_) => {
                    // The client closed C1: detach. The process keeps running.
                    // NOTE: the reference backend also closes the process's
                    // stdin here; Trellis leaves it open, because other
                    // attachments of the same process may still write to it.
                    process.do_send(CloseStream { stream_id: stream_id.clone() });
                    break None;
                }
                Ok(_) => {}
            },
            changed = exit.wait_for(|outcome| outcome.is_some()) => {
                match changed {
                    Ok(outcome) => break outcome.clone(),
                    // The process actor stopped without an exit outcome.
                    Err(_) => break Some(ExitOutcome::Error("the process record was removed".into())),
                }
            }
            _ = state.shutdown.cancelled() => {
                process.do_send(CloseStream { stream_id: stream_id.clone() });
                let _ = writer.shutdown().await;
                return "server stopping";
            }
        }
    };
    let Some(outcome) = outcome else {
        let _ = writer.shutdown().await;
        return "client detached";
    };

    // The exit message goes out only after this stream's stdout and stderr
    // connections have written everything and closed.
    tokio::select! {
        _ = async { while liveness.recv().await.is_some() {} } => {}
        _ = state.shutdown.cancelled() => {
            let _ = writer.shutdown().await;
            return "server stopping";
        }
    }
    let message = match outcome {
        ExitOutcome::Status(status) => ProcessPayload { process_id, exit_status: Some(i64::from(status)), ..ProcessPayload::default() },
        ExitOutcome::Error(error) => ProcessPayload { process_id, error: Some(error), ..ProcessPayload::default() },
    };
    let _ = writer.write_all(&api::encode(&message)).await;
    let _ = writer.shutdown().await;
    EXIT_SENT
}

/// How [`run_process_connection`] reports that it sent the exit message.
const EXIT_SENT: &str = "process exited";

/// Where a process connection's messages go, and what decides whether one
/// is ignored.
struct ProcessInput<'a> {
    shim: &'a tokio::sync::mpsc::Sender<ServerFrame>,
    tty: bool,
    stdin_closed: &'a std::sync::atomic::AtomicBool,
}

/// Decodes every complete message in `input` and forwards it to the shim.
/// Messages that cannot act on the process (an unknown signal, stdin after
/// close, a resize without a TTY) are logged and ignored; the connection
/// keeps working.
async fn forward_messages(input: &mut BytesMut, process: &ProcessInput<'_>, logger: &Logger) {
    use std::sync::atomic::Ordering;
    let shim = process.shim;
    loop {
        let (value, used) = match api::parse_stream_value(input) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return,
            Err(error) => {
                warn!(logger, "invalid message on process connection discarded"; "error" => %error, "bytes" => input.len());
                input.clear();
                return;
            }
        };
        input.advance(used);
        let payload: ProcessPayload = match api::decode_value(value) {
            Ok(payload) => payload,
            Err(error) => {
                warn!(logger, "invalid message on process connection discarded"; "error" => %error);
                continue;
            }
        };
        let frame = if let Some(tty) = payload.tty {
            match tty.window_size {
                Some(size) => {
                    if !process.tty {
                        // Still forwarded, as the Go server does: the runtime
                        // ignores a resize of a process without a terminal.
                        warn!(logger, "resize ignored: the process has no tty"; "columns" => size.columns, "rows" => size.rows);
                    }
                    ServerFrame::Resize { columns: size.columns, rows: size.rows }
                }
                None => continue,
            }
        } else if payload.source.is_some() {
            if process.stdin_closed.load(Ordering::SeqCst) {
                warn!(logger, "stdin ignored: the process's stdin was already closed"; "close" => payload.data.is_none());
                continue;
            }
            match payload.data {
                Some(data) if data.is_empty() => continue,
                Some(data) => ServerFrame::Stdin(data.into_bytes().into()),
                None => {
                    process.stdin_closed.store(true, Ordering::SeqCst);
                    ServerFrame::CloseStdin
                }
            }
        } else if let Some(signal) = payload.signal {
            match signal {
                SIGNAL_TERMINATE => ServerFrame::Signal { signal: libc::SIGTERM },
                SIGNAL_KILL => ServerFrame::Signal { signal: libc::SIGKILL },
                other => {
                    warn!(logger, "unknown signal ignored"; "signal" => other);
                    continue;
                }
            }
        } else {
            warn!(logger, "unknown message on process connection ignored");
            continue;
        };
        debug!(logger, "forwarding to process"; "frame" => frame_name(&frame));
        if shim.send(frame).await.is_err() {
            debug!(logger, "process shim connection closed; message dropped");
        }
    }
}

fn frame_name(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Stdin(_) => "stdin",
        ServerFrame::CloseStdin => "close-stdin",
        ServerFrame::Signal { .. } => "signal",
        ServerFrame::Resize { .. } => "resize",
        ServerFrame::Ack { .. } => "ack",
    }
}

/// Serves C2 or C3: the head without waiting for output, then the
/// stream's output until it finishes. An unknown stream id gets the head and an immediate close.
async fn serve_output<T>(mut io: T, stream_id: String, kind: OutputKind, state: Arc<AppState>, logger: Logger)
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let logger = logger.new(o!("stream_id" => stream_id.clone(), "stream" => kind.name()));
    let started = Instant::now();
    info!(logger, "started");
    // The reader is registered before the head goes out, so output the
    // process writes after the client has seen the head reaches this
    // connection. The registration does not wait for output.
    let process = state.stream_table.get(&stream_id).map(|entry| entry.value().clone());
    let subscription = match process {
        Some(process) => process.send(AttachOutput { stream_id: stream_id.clone(), kind }).await.ok().flatten(),
        None => None,
    };
    let route = if kind == OutputKind::Stdout { Route::Stdout } else { Route::Stderr };
    state.metrics.record_request(route.name(), 200, started.elapsed());
    if io.write_all(output_head().as_bytes()).await.is_err() {
        return;
    }
    let mut bytes = 0u64;
    let end = match subscription {
        None => "unknown stream",
        Some(mut subscription) => {
            let end = loop {
                tokio::select! {
                    chunk = subscription.chunks.recv() => match chunk {
                        Some(chunk) => {
                            bytes += chunk.len() as u64;
                            if io.write_all(&chunk).await.is_err() {
                                break "client gone";
                            }
                            subscription.written(chunk.len());
                        }
                        None => break "stream finished",
                    },
                    _ = state.shutdown.cancelled() => {
                        // Flush what is queued, then close.
                        while let Ok(chunk) = subscription.chunks.try_recv() {
                            if io.write_all(&chunk).await.is_err() {
                                break;
                            }
                            subscription.written(chunk.len());
                        }
                        break "server stopping";
                    }
                }
            };
            let _ = io.shutdown().await;
            drop(subscription.liveness);
            end
        }
    };
    let _ = io.shutdown().await;
    info!(logger, "finished"; "end" => end, "bytes" => bytes, "duration_ms" => started.elapsed().as_secs_f64() * 1000.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_have_go_layout() {
        let head = process_head("201 Created");
        assert!(head.starts_with("HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nDate: "));
        assert!(head.ends_with(" GMT\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert_eq!(head.len(), "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nDate: \r\nTransfer-Encoding: chunked\r\n\r\n".len() + 29);
        let head = output_head();
        assert_eq!(head.len(), 84);
    }

    #[test]
    fn error_response_is_framed_without_close() {
        let error = ApiError::from(ContainerError::ProcessNotFound { process_id: "idontexist".into() });
        let text = String::from_utf8(error_response(&error)).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nDate: "));
        assert!(text.contains("\r\nContent-Length: 121\r\n\r\n"));
        assert!(!text.to_ascii_lowercase().contains("connection"));
    }
}
