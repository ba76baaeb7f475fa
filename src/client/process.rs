//! The process protocol of Run and Attach: a control connection carrying
//! newline-delimited JSON messages both ways, and one raw output connection
//! each for stdout and stderr.
//!
//! Run (`POST /containers/:handle/processes`) or Attach
//! (`GET /containers/:handle/processes/:pid`) opens the control connection.
//! Its first message names the process id and a stream id. The client then
//! opens the stdout attach and, once that head has arrived, the stderr
//! attach, both keyed by the stream id. [`Process::wait`] returns the exit
//! status only after both output connections reached end of stream, so all
//! output has been written when it returns.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::error::{ClientError, ClientResult};
use super::http::{self, io_error, protocol, BodyReader, Connection, RequestFraming, RequestHead, Target};
use crate::api::{self, ProcessPayload, TtySpec, WindowSize, SIGNAL_KILL, SIGNAL_TERMINATE};

/// Largest error body read from a process route, in bytes.
const MAX_ERROR_BODY_BYTES: usize = 1 << 20;
/// Stdin bytes sent per message. The Go client sends chunks of up to 32 KiB
/// from a streaming reader too.
const STDIN_CHUNK_BYTES: usize = 32 * 1024;
/// Output bytes read per read from an attach connection.
const OUTPUT_CHUNK_BYTES: usize = 256 * 1024;

/// A reader the client copies to the process's stdin.
pub type StdinReader = Box<dyn AsyncRead + Send + Unpin>;
/// A writer the client copies a process output stream to.
pub type OutputWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// The stdio of a process as the caller sees it. A stream left as `None` is
/// not attached: with no `stdin` the client sends no stdin messages at all
/// (the process's stdin stays open), and with no `stdout` or `stderr` the
/// client opens no attach connection for that stream.
#[derive(Default)]
pub struct ProcessIo {
    /// Copied to the process's stdin in the background; stdin is closed when
    /// it reaches end of file.
    pub stdin: Option<StdinReader>,
    pub stdout: Option<OutputWriter>,
    pub stderr: Option<OutputWriter>,
}

/// A signal the server can deliver to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM (signal value 0 on the wire).
    Terminate,
    /// SIGKILL (signal value 1 on the wire).
    Kill,
}

impl Signal {
    fn wire_value(self) -> i64 {
        match self {
            Signal::Terminate => SIGNAL_TERMINATE,
            Signal::Kill => SIGNAL_KILL,
        }
    }
}

/// Shared write side of the control connection. Each message is written
/// whole under the lock, so messages from the stdin copy and from
/// `signal`/`resize` never interleave.
type ControlWriter = Arc<Mutex<WriteHalf<Connection>>>;

/// A running (or finished) process reached through Run or Attach.
pub struct Process {
    id: String,
    stream_id: String,
    control: ControlWriter,
    exit: Option<JoinHandle<ClientResult<i64>>>,
    outputs: Vec<(&'static str, JoinHandle<ClientResult<()>>)>,
    stdin_copy: Option<JoinHandle<()>>,
}

/// Request that opens the control connection.
pub(crate) struct ControlRequest<'a> {
    pub method: &'a str,
    pub path: String,
    /// The JSON body of Run; Attach has none.
    pub body: Option<Vec<u8>>,
    /// The path of the attach routes, up to and without `/attaches/...`,
    /// for example `/containers/h/processes`. The process id is added.
    pub processes_path: String,
}

impl Process {
    /// Opens the control connection, reads the handshake, attaches the
    /// requested output streams and starts copying stdin.
    pub(crate) async fn start(
        target: &Target,
        connect_timeout: Duration,
        request: ControlRequest<'_>,
        io: ProcessIo,
    ) -> ClientResult<Process> {
        let route = format!("{} {}", request.method, request.path);
        let (connection, mut buffer) = open_hijacked(
            target,
            connect_timeout,
            request.method,
            &request.path,
            request.body.as_deref(),
            &route,
        )
        .await?;
        let (mut reader, writer) = tokio::io::split(connection);
        let handshake = read_message(&mut reader, &mut buffer, &route)
            .await?
            .ok_or_else(|| protocol(&route, "connection closed before the process handshake"))?;
        if handshake.process_id.is_empty() || handshake.stream_id.is_empty() {
            return Err(protocol(&route, "handshake without a process_id or stream_id"));
        }
        let control: ControlWriter = Arc::new(Mutex::new(writer));
        let id = handshake.process_id;
        let stream_id = handshake.stream_id;

        let stdin_copy = io.stdin.map(|stdin| {
            tokio::spawn(copy_stdin(stdin, control.clone(), id.clone()))
        });

        // The stderr attach is opened only after the stdout head arrived, as
        // the Go client does; servers may rely on that order.
        let mut outputs = Vec::new();
        let attach_base = format!("{}/{}/attaches/{}", request.processes_path, escape(&id), escape(&stream_id));
        for (stream, writer) in [("stdout", io.stdout), ("stderr", io.stderr)] {
            let Some(writer) = writer else { continue };
            let path = format!("{attach_base}/{stream}");
            let attached = open_output(target, connect_timeout, &path).await;
            let (connection, leftover) = match attached {
                Ok(parts) => parts,
                Err(source) => {
                    if let Some(task) = &stdin_copy {
                        task.abort();
                    }
                    return Err(ClientError::AttachStream {
                        process_id: id,
                        stream,
                        source: Box::new(source),
                    });
                }
            };
            let task = tokio::spawn(copy_output(connection, leftover, writer, path));
            outputs.push((stream, task));
        }

        let exit = tokio::spawn(read_exit(reader, buffer, route, id.clone()));
        Ok(Process {
            id,
            stream_id,
            control,
            exit: Some(exit),
            outputs,
            stdin_copy,
        })
    }

    /// Returns the process id, chosen by the caller or generated by the
    /// server.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Returns the server's stream id of this Run or Attach.
    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    /// Returns a handle for sending signals, resizes and stdin while
    /// another task waits for the process.
    pub fn controller(&self) -> ProcessController {
        ProcessController {
            id: self.id.clone(),
            control: self.control.clone(),
        }
    }

    /// Sends `signal` to the process; see [`ProcessController::signal`].
    pub async fn signal(&self, signal: Signal) -> ClientResult<()> {
        self.controller().signal(signal).await
    }

    /// Sets the TTY window size; see [`ProcessController::resize`].
    pub async fn resize(&self, columns: u16, rows: u16) -> ClientResult<()> {
        self.controller().resize(columns, rows).await
    }

    /// Writes to the process's stdin; see [`ProcessController::write_stdin`].
    pub async fn write_stdin(&self, data: &[u8]) -> ClientResult<()> {
        self.controller().write_stdin(data).await
    }

    /// Closes the process's stdin; see [`ProcessController::close_stdin`].
    pub async fn close_stdin(&self) -> ClientResult<()> {
        self.controller().close_stdin().await
    }

    /// Waits for the exit status, then for both output streams to reach end
    /// of stream, and returns the exit status.
    ///
    /// Fails with [`ClientError::Process`] when the server reports that
    /// waiting failed, and with [`ClientError::NoExitStatus`] when the control
    /// connection ends without an exit status (the process keeps running
    /// then). Can be called once.
    pub async fn wait(&mut self) -> ClientResult<i64> {
        let exit = self.exit.take().ok_or_else(|| ClientError::AlreadyWaited {
            process_id: self.id.clone(),
        })?;
        let status = join(exit).await;
        let mut output_result = Ok(());
        for (_, task) in self.outputs.drain(..) {
            if let Err(error) = join(task).await {
                output_result = output_result.and(Err(error));
            }
        }
        if let Some(stdin_copy) = self.stdin_copy.take() {
            // The process is gone, so stdin has nowhere to go.
            stdin_copy.abort();
        }
        // Closing the control connection signals the server that this
        // client is done, in case it still waits for messages.
        let _ = self.control.lock().await.shutdown().await;
        let status = status?;
        output_result?;
        Ok(status)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Tasks that outlive the handle would keep copying into writers the
        // caller gave up; a dropped handle detaches from the process.
        for (_, task) in &self.outputs {
            task.abort();
        }
        if let Some(task) = &self.exit {
            task.abort();
        }
        if let Some(task) = &self.stdin_copy {
            task.abort();
        }
    }
}

/// Sends messages on a process's control connection. Clones share the
/// connection; each message is written whole.
#[derive(Clone)]
pub struct ProcessController {
    id: String,
    control: ControlWriter,
}

impl ProcessController {
    /// Sends `signal` to the process. The server sends no reply, so success
    /// means only that the message was written.
    pub async fn signal(&self, signal: Signal) -> ClientResult<()> {
        self.send(ProcessPayload {
            process_id: self.id.clone(),
            signal: Some(signal.wire_value()),
            ..ProcessPayload::default()
        })
        .await
    }

    /// Sets the window size of the process's TTY, in character cells. The
    /// server ignores it for a process without a TTY.
    pub async fn resize(&self, columns: u16, rows: u16) -> ClientResult<()> {
        self.send(ProcessPayload {
            process_id: self.id.clone(),
            tty: Some(TtySpec {
                window_size: Some(WindowSize { columns, rows }),
            }),
            ..ProcessPayload::default()
        })
        .await
    }

    /// Writes `data` to the process's stdin as one message. The protocol
    /// carries stdin as a JSON string, so invalid UTF-8 becomes U+FFFD.
    pub async fn write_stdin(&self, data: &[u8]) -> ClientResult<()> {
        self.send(stdin_message(&self.id, String::from_utf8_lossy(data).into_owned()))
            .await
    }

    /// Closes the process's stdin, so the process reads end of file.
    pub async fn close_stdin(&self) -> ClientResult<()> {
        self.send(ProcessPayload {
            process_id: self.id.clone(),
            source: Some(0),
            ..ProcessPayload::default()
        })
        .await
    }

    async fn send(&self, message: ProcessPayload) -> ClientResult<()> {
        write_message(&self.control, &message)
            .await
            .map_err(|source| io_error("process control connection", source))
    }
}

async fn join<T>(task: JoinHandle<ClientResult<T>>) -> ClientResult<T> {
    match task.await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(protocol("process", "background task was cancelled")),
    }
}

/// Escapes one path segment; see [`super::escape_segment`].
fn escape(segment: &str) -> String {
    super::escape_segment(segment)
}

/// Opens a hijacked connection: writes the request, reads the head, and on
/// success returns the connection with the bytes read after the head.
/// An error status is turned into the typed error of its envelope.
pub(crate) async fn open_hijacked(
    target: &Target,
    connect_timeout: Duration,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    route: &str,
) -> ClientResult<(Connection, BytesMut)> {
    let mut connection = http::connect(target, connect_timeout).await?;
    let head = RequestHead {
        method,
        target: path,
        content_type: Some("application/json"),
        framing: body.map_or(RequestFraming::None, |body| RequestFraming::Length(body.len())),
        close: false,
    };
    let mut request = head.to_bytes();
    request.extend_from_slice(body.unwrap_or_default());
    connection
        .write_all(&request)
        .await
        .map_err(|source| io_error(route, source))?;
    connection.flush().await.map_err(|source| io_error(route, source))?;

    let mut buffer = BytesMut::new();
    let response = http::read_head(&mut connection, &mut buffer, route).await?;
    let framing = response.framing().map_err(|reason| protocol(route, reason))?;
    if !response.is_success() {
        let mut body = BodyReader::new(&mut connection, buffer, framing);
        let bytes = body
            .read_to_end(MAX_ERROR_BODY_BYTES)
            .await
            .map_err(|source| io_error(route, source))?;
        return Err(ClientError::from_error_body(response.status, &bytes));
    }
    // The Go client rejects these heads with "persistent connection closed";
    // failing here keeps this client as strict as the clients a server must
    // serve.
    if response.closes_connection() {
        return Err(protocol(route, "response head announces that the connection closes"));
    }
    if framing == http::ResponseFraming::Close {
        return Err(protocol(route, "response head has neither Content-Length nor chunked framing"));
    }
    Ok((connection, buffer))
}

/// Opens one output attach connection.
async fn open_output(target: &Target, connect_timeout: Duration, path: &str) -> ClientResult<(Connection, BytesMut)> {
    let route = format!("GET {path}");
    open_hijacked(target, connect_timeout, "GET", path, None, &route).await
}

/// Copies raw output bytes from an attach connection to `writer` until the
/// server closes the connection.
async fn copy_output(
    mut connection: Connection,
    leftover: BytesMut,
    mut writer: OutputWriter,
    path: String,
) -> ClientResult<()> {
    let route = format!("GET {path}");
    let fail = |source| io_error(&route, source);
    if !leftover.is_empty() {
        writer.write_all(&leftover).await.map_err(fail)?;
    }
    let mut buffer = vec![0u8; OUTPUT_CHUNK_BYTES];
    loop {
        let read = connection.read(&mut buffer).await.map_err(fail)?;
        if read == 0 {
            break;
        }
        writer.write_all(&buffer[..read]).await.map_err(fail)?;
    }
    writer.flush().await.map_err(fail)?;
    Ok(())
}

/// Reads messages on the control connection until one carries an exit
/// status or an error; other messages are skipped, as the Go client does.
async fn read_exit(
    mut reader: ReadHalf<Connection>,
    mut buffer: BytesMut,
    route: String,
    process_id: String,
) -> ClientResult<i64> {
    loop {
        let Some(message) = read_message(&mut reader, &mut buffer, &route).await? else {
            return Err(ClientError::NoExitStatus { process_id });
        };
        if let Some(error) = message.error {
            return Err(ClientError::Process { message: error });
        }
        if let Some(status) = message.exit_status {
            return Ok(status);
        }
    }
}

/// Reads the next JSON message; returns `None` at end of stream between
/// messages. Messages may share a read or be split across reads.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut BytesMut,
    route: &str,
) -> ClientResult<Option<ProcessPayload>> {
    loop {
        let parsed = api::parse_stream_value(buffer)
            .map_err(|error| protocol(route, format!("invalid message: {error}")))?;
        if let Some((value, used)) = parsed {
            buffer.advance(used);
            let message = api::decode_value::<ProcessPayload>(value)
                .map_err(|error| protocol(route, format!("invalid message: {error}")))?;
            return Ok(Some(message));
        }
        let read = http::fill(reader, buffer).await.map_err(|source| io_error(route, source))?;
        if read == 0 {
            if buffer.iter().all(u8::is_ascii_whitespace) {
                return Ok(None);
            }
            return Err(protocol(route, "connection closed inside a message"));
        }
    }
}

fn stdin_message(process_id: &str, data: String) -> ProcessPayload {
    ProcessPayload {
        process_id: process_id.to_string(),
        source: Some(0),
        data: Some(data),
        ..ProcessPayload::default()
    }
}

async fn write_message(control: &ControlWriter, message: &ProcessPayload) -> std::io::Result<()> {
    let bytes = api::encode(message);
    let mut writer = control.lock().await;
    writer.write_all(&bytes).await?;
    writer.flush().await
}

/// Copies `stdin` to the process as data messages, then closes its stdin.
/// When a write fails because the connection is gone, it stops without
/// sending a close, because no server is left to receive it.
async fn copy_stdin(mut stdin: StdinReader, control: ControlWriter, process_id: String) {
    let mut buffer = vec![0u8; STDIN_CHUNK_BYTES];
    let mut pending = Vec::new();
    loop {
        // NOTE: a failed local read is treated as end of input, because
        // the process would otherwise wait for stdin forever.
        let read = stdin.read(&mut buffer).await.unwrap_or(0);
        if read == 0 {
            break;
        }
        pending.extend_from_slice(&buffer[..read]);
        let text = take_utf8_prefix(&mut pending);
        if text.is_empty() {
            continue;
        }
        if write_message(&control, &stdin_message(&process_id, text)).await.is_err() {
            return;
        }
    }
    if !pending.is_empty() {
        let text = String::from_utf8_lossy(&pending).into_owned();
        if write_message(&control, &stdin_message(&process_id, text)).await.is_err() {
            return;
        }
    }
    let close = ProcessPayload {
        process_id,
        source: Some(0),
        ..ProcessPayload::default()
    };
    let _ = write_message(&control, &close).await;
}

/// Removes and returns the longest prefix of `pending` that can be sent as
/// text. A multi-byte character cut off at the end stays in `pending` for
/// the next read, so it reaches the process whole. Other invalid bytes
/// become U+FFFD, because the protocol carries stdin as JSON strings.
fn take_utf8_prefix(pending: &mut Vec<u8>) -> String {
    let rest = pending.split_off(incomplete_tail_start(pending));
    let text = String::from_utf8_lossy(pending).into_owned();
    *pending = rest;
    text
}

/// Returns where a multi-byte character that is cut off at the end of
/// `bytes` starts, or `bytes.len()` when the end is not such a character.
fn incomplete_tail_start(bytes: &[u8]) -> usize {
    // A UTF-8 character has at most 4 bytes, so a cut one has at most 3.
    let first_candidate = bytes.len().saturating_sub(3);
    (first_candidate..bytes.len())
        .find(|&start| match std::str::from_utf8(&bytes[start..]) {
            Err(error) => error.valid_up_to() == 0 && error.error_len().is_none(),
            Ok(_) => false,
        })
        .unwrap_or(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_prefix_keeps_cut_character() {
        let mut pending = "aé".as_bytes().to_vec();
        pending.pop();
        assert_eq!(take_utf8_prefix(&mut pending), "a");
        assert_eq!(pending, vec![0xc3]);
        pending.push(0xa9);
        assert_eq!(take_utf8_prefix(&mut pending), "é");
        assert!(pending.is_empty());
    }

    #[test]
    fn utf8_prefix_replaces_invalid_bytes() {
        let mut pending = vec![b'x', 0xff, b'y', 0xe2, 0x82];
        assert_eq!(take_utf8_prefix(&mut pending), "x\u{fffd}y");
        assert_eq!(pending, vec![0xe2, 0x82]);
    }

    #[tokio::test]
    async fn messages_split_and_joined() {
        let bytes: &[u8] = b"{\"process_id\":\"p\",\"stream_id\":\"1\"}{\"process_id\":\"p\",\n\"exit_status\":0}\n";
        let mut reader = bytes;
        let mut buffer = BytesMut::new();
        let first = read_message(&mut reader, &mut buffer, "t").await.unwrap().unwrap();
        assert_eq!(first.stream_id, "1");
        let second = read_message(&mut reader, &mut buffer, "t").await.unwrap().unwrap();
        assert_eq!(second.exit_status, Some(0));
        assert!(read_message(&mut reader, &mut buffer, "t").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn message_cut_by_close_fails() {
        let mut reader: &[u8] = b"{\"process_id\":\"p\",\"exit_st";
        let mut buffer = BytesMut::new();
        let error = read_message(&mut reader, &mut buffer, "t").await.unwrap_err();
        assert!(matches!(error, ClientError::Protocol { .. }));
    }
}
