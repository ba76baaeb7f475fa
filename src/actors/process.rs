//! The Process actor: one per container process.
//!
//! A reader task decodes the shim's frames and hands each output chunk to
//! the actor, waiting for the actor's reply before it reads the next frame.
//! That wait is the backpressure. While at least one client is attached to
//! a stream, a chunk is only done once every attached reader's queue has
//! room for it. So the shim, and then the process, stops when the slowest
//! reader falls a bounded amount behind. While no client is attached, the
//! chunk goes into a ring buffer that keeps the most recent output and never
//! blocks; the next attacher receives it.
//!
//! A Run or Attach client connects its stdout and stderr attaches only
//! after the handshake, one after the other. So that a process writing fast
//! loses nothing in that gap, opening a stream reserves an expected reader
//! per output, which queues and applies backpressure like a connected one.
//! The stdout or stderr connection takes it over when it arrives. A client
//! that never attaches an output (the Go client without a writer for it)
//! gives the reservation up after [`EXPECTED_ATTACH_WAIT`], and the output
//! then goes to the ring buffer again, so a process blocks on an absent
//! reader for that long at most.
//!
//! A shim of protocol version 2 keeps each output frame until the actor
//! acknowledges it, and sends the unacknowledged frames again to the next
//! server after a restart. The actor acknowledges output once it has been
//! written to an attached client's connection or dropped by the ring
//! buffer's bound. Output still in the ring buffer or in a reader's queue
//! is not acknowledged, so a crash of the server does not lose it. A crash
//! between a write to a client and its acknowledgement makes the shim send
//! that chunk again, so the next attacher may receive up to one chunk
//! twice.
//!
//! Each Run or Attach opens a stream with a server-wide id. The client's C1
//! handler holds the stream's exit receiver and a liveness channel: it sends
//! the exit message only after every stdout or stderr connection of its
//! stream has written its queued output and closed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use slog::{debug, info, o, warn, Logger};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::stats::{measure_mailbox, MailboxStats};
use super::{Introspect, StreamTable};
use crate::runtime::stdio::{ServerFrame, ShimFrame, MAX_FRAME_PAYLOAD};

/// Bytes of recent output kept per stream while no client is attached.
pub const UNATTACHED_BUFFER_BYTES: usize = 256 * 1024;

/// Chunks queued per attached reader before the shim is no longer read.
const READER_QUEUE_CHUNKS: usize = 16;

/// Frames queued for the shim (stdin, signals, resizes).
const SHIM_QUEUE_FRAMES: usize = 64;

/// Spare buffer space kept for each read from a shim, in bytes.
const SHIM_READ_BYTES: usize = 256 * 1024;

/// How long a stream's reserved stdout and stderr readers wait for their
/// connections before the output goes to the ring buffer instead.
pub const EXPECTED_ATTACH_WAIT: Duration = Duration::from_secs(5);

/// How long a finished stream stays attachable.
pub const FINISHED_STREAM_RETENTION: Duration = Duration::from_secs(60);

/// An output stream of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputKind {
    Stdout,
    Stderr,
}

impl OutputKind {
    fn index(self) -> usize {
        match self {
            OutputKind::Stdout => 0,
            OutputKind::Stderr => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutputKind::Stdout => "stdout",
            OutputKind::Stderr => "stderr",
        }
    }
}

/// The end of a process, as sent on the Run or Attach connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitOutcome {
    /// The exit status (exit code, or 128 plus the signal number).
    Status(i32),
    /// Waiting for the process failed.
    Error(String),
}

/// A ring of recent output that drops the oldest bytes beyond its capacity.
#[derive(Debug)]
pub struct RecentOutput {
    chunks: VecDeque<Bytes>,
    len: usize,
    capacity: usize,
}

impl RecentOutput {
    pub fn new(capacity: usize) -> Self {
        RecentOutput { chunks: VecDeque::new(), len: 0, capacity }
    }

    /// Appends `data`, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, data: Bytes) {
        self.len += data.len();
        self.chunks.push_back(data);
        while self.len > self.capacity {
            let excess = self.len - self.capacity;
            let front = self.chunks.front_mut().expect("length counts queued chunks");
            if front.len() <= excess {
                self.len -= front.len();
                self.chunks.pop_front();
            } else {
                *front = front.slice(excess..);
                self.len -= excess;
            }
        }
    }

    /// Returns a copy of everything kept, as one chunk.
    pub fn snapshot(&self) -> Option<Bytes> {
        if self.len == 0 {
            return None;
        }
        let mut joined = BytesMut::with_capacity(self.len);
        for chunk in &self.chunks {
            joined.extend_from_slice(chunk);
        }
        Some(joined.freeze())
    }

    /// Drops everything kept and frees its memory.
    pub fn clear(&mut self) {
        *self = RecentOutput::new(self.capacity);
    }

    /// Removes and returns everything kept, as one chunk.
    pub fn take(&mut self) -> Option<Bytes> {
        if self.len == 0 {
            return None;
        }
        let mut joined = BytesMut::with_capacity(self.len);
        for chunk in self.chunks.drain(..) {
            joined.extend_from_slice(&chunk);
        }
        self.len = 0;
        Some(joined.freeze())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

struct Reader {
    stream_id: String,
    sender: mpsc::Sender<Bytes>,
    /// False while the reader is a reservation its connection has not
    /// taken over yet.
    connected: bool,
}

struct OutputState {
    /// Output produced while no connected reader existed, since a
    /// connection last took it. Reservations get a copy of it too, so a
    /// client that attaches while another client's reservation holds the
    /// early output still receives it.
    unattached: RecentOutput,
    readers: Vec<Reader>,
    delivered_bytes: u64,
    /// Payload bytes received on the current shim connection.
    received: u64,
    /// Bytes of the output, from the start of the shim connection, that
    /// the actor is done with: written to a client or dropped.
    done: u64,
}

impl OutputState {
    fn has_connected_reader(&self) -> bool {
        self.readers.iter().any(|reader| reader.connected)
    }
}

impl Default for OutputState {
    fn default() -> Self {
        OutputState { unattached: RecentOutput::new(UNATTACHED_BUFFER_BYTES), readers: Vec::new(), delivered_bytes: 0, received: 0, done: 0 }
    }
}

struct StreamRecord {
    finished: bool,
    /// Dropped when the stream finishes. Each attached output connection
    /// keeps a clone, so the C1 handler's receiver ends once all are done.
    liveness: Option<mpsc::Sender<()>>,
    /// The queues of the stream's reserved readers, by output, with the
    /// position of their first chunk, until the stdout or stderr
    /// connection takes them over.
    expected: [Option<(mpsc::Receiver<Bytes>, u64)>; 2],
}

/// The actor of one process.
pub struct Process {
    process_id: String,
    pid: u32,
    tty: bool,
    logger: Logger,
    /// `None` once the process has exited. Dropping the sender ends the
    /// shim writer task, which closes the shim's socket, so a finished
    /// process holds no file descriptor and no task.
    shim: Option<mpsc::Sender<ServerFrame>>,
    /// Set by the first stdin close of any attachment.
    stdin_closed: Arc<AtomicBool>,
    exit: watch::Sender<Option<ExitOutcome>>,
    outputs: [OutputState; 2],
    streams: HashMap<String, StreamRecord>,
    stream_table: StreamTable,
    /// Lets the shim reader start. Reading waits for the first stream, the
    /// Run's own, so that its reserved readers exist before any output.
    start_reading: Option<oneshot::Sender<()>>,
    mailbox: MailboxStats,
    /// Recipient of [`ProcessExited`], sent once when the process exits:
    /// the container, which records the exit status in its state file and
    /// bounds how many finished processes it keeps.
    exit_listener: Option<Recipient<ProcessExited>>,
    /// Whether the shim expects acknowledgements (protocol version 2).
    acknowledge: bool,
}

/// Everything the process actor needs at start.
pub struct ProcessStart {
    pub process_id: String,
    pub pid: u32,
    pub tty: bool,
    pub logger: Logger,
    pub stream_table: StreamTable,
    /// Frames already read past the start frame.
    pub leftover: BytesMut,
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    pub writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// Whether the shim expects acknowledgements of its output.
    pub acknowledge: bool,
    /// Receives [`ProcessExited`] once the process has exited.
    pub exit_listener: Option<Recipient<ProcessExited>>,
}

/// Tells the container that one of its processes has exited.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProcessExited {
    pub process_id: String,
    /// Tells this process apart from a later one with the same id.
    pub process: Addr<Process>,
    /// The exit status; `None` when waiting for the process failed.
    pub exit_status: Option<i32>,
}

impl Process {
    /// Starts the actor and its shim reader and writer tasks.
    pub fn start_with(start: ProcessStart) -> Addr<Process> {
        let (shim, shim_receiver) = mpsc::channel(SHIM_QUEUE_FRAMES);
        let (exit, _) = watch::channel(None);
        let (start_reading, reading_allowed) = oneshot::channel();
        let logger = start.logger.new(o!("process_id" => start.process_id.clone()));
        let process = Process {
            process_id: start.process_id,
            pid: start.pid,
            tty: start.tty,
            logger: logger.clone(),
            shim: Some(shim),
            stdin_closed: Arc::new(AtomicBool::new(false)),
            exit,
            outputs: [OutputState::default(), OutputState::default()],
            streams: HashMap::new(),
            stream_table: start.stream_table,
            start_reading: Some(start_reading),
            mailbox: MailboxStats::default(),
            exit_listener: start.exit_listener,
            acknowledge: start.acknowledge,
        };
        let addr = process.start();
        actix_rt::spawn(write_shim_frames(start.writer, shim_receiver, logger.clone()));
        actix_rt::spawn(read_shim_frames(start.reader, start.leftover, reading_allowed, addr.clone(), logger));
        addr
    }

    /// Registers a reader for `kind` on behalf of a stream whose output
    /// connection has not arrived yet. The first reader of an output also
    /// receives what the ring buffer kept.
    fn reserve_reader(&mut self, stream_id: &str, kind: OutputKind) -> Option<(mpsc::Receiver<Bytes>, u64)> {
        let (sender, receiver) = mpsc::channel(READER_QUEUE_CHUNKS);
        let output = &mut self.outputs[kind.index()];
        output.readers.retain(|reader| !reader.sender.is_closed());
        let mut start = output.received;
        if !output.has_connected_reader() {
            if let Some(kept) = output.unattached.snapshot() {
                start -= kept.len() as u64;
                sender.try_send(kept).expect("a new queue has room for one chunk");
            }
        }
        output.readers.push(Reader { stream_id: stream_id.to_string(), sender, connected: false });
        Some((receiver, start))
    }

    /// Sends the shim the positions the actor is done with, when the shim
    /// expects acknowledgements. A full queue skips this one: the next
    /// acknowledgement covers it, because the counts are cumulative.
    fn acknowledge(&mut self) {
        if !self.acknowledge {
            return;
        }
        if let Some(shim) = &self.shim {
            let _ = shim.try_send(ServerFrame::Ack { stdout: self.outputs[0].done, stderr: self.outputs[1].done });
        }
    }

    /// Gives up the reserved readers of a stream whose output connections
    /// did not arrive in time. What they queued is dropped: output produced
    /// while no reader was connected is in the ring buffer already, and
    /// output produced while one was connected reached that reader.
    fn release_reservations(&mut self, stream_id: &str) {
        let Some(record) = self.streams.get_mut(stream_id) else {
            return;
        };
        if record.finished {
            return;
        }
        for kind in [OutputKind::Stdout, OutputKind::Stderr] {
            let Some((mut receiver, _)) = record.expected[kind.index()].take() else {
                continue;
            };
            let output = &mut self.outputs[kind.index()];
            // Closing first makes a send blocked on this full queue fail and
            // return its chunk, which the output handler then keeps.
            receiver.close();
            output.readers.retain(|reader| !reader.sender.is_closed());
            while receiver.try_recv().is_ok() {}
            debug!(self.logger, "output attach did not arrive"; "stream_id" => stream_id, "stream" => kind.name());
        }
    }

    /// Marks a stream finished. A detached stream (`reclaim`) drops its
    /// unclaimed reserved readers: what they queued while no reader was
    /// connected is in the ring buffer already, for the next attacher. A
    /// stream that ended with the process keeps them for a late stdout or
    /// stderr connection of its own.
    fn finish_stream(&mut self, stream_id: &str, reclaim: bool, ctx: &mut Context<Self>) {
        let Some(record) = self.streams.get_mut(stream_id) else {
            return;
        };
        if record.finished {
            return;
        }
        record.finished = true;
        record.liveness = None;
        for output in &mut self.outputs {
            output.readers.retain(|reader| reader.stream_id != stream_id);
        }
        if reclaim {
            for kind in [OutputKind::Stdout, OutputKind::Stderr] {
                let Some((mut receiver, _)) = record.expected[kind.index()].take() else {
                    continue;
                };
                receiver.close();
                while receiver.try_recv().is_ok() {}
            }
        }
        debug!(self.logger, "stream finished"; "stream_id" => stream_id);
        let stream_id = stream_id.to_string();
        ctx.run_later(FINISHED_STREAM_RETENTION, move |process, _| {
            process.streams.remove(&stream_id);
            process.stream_table.remove(&stream_id);
        });
    }
}

impl Actor for Process {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for stream_id in self.streams.keys() {
            self.stream_table.remove(stream_id);
        }
    }
}

/// The handles a Run or Attach connection (C1) uses for its stream.
pub struct StreamHandle {
    pub process_id: String,
    pub stream_id: String,
    /// Stdin, signals and resizes for the shim. Closed for a process that
    /// has exited.
    pub shim: mpsc::Sender<ServerFrame>,
    /// Whether the process has a TTY; resizes without one are ignored.
    pub tty: bool,
    /// Whether an attachment has closed the process's stdin; later stdin
    /// is ignored.
    pub stdin_closed: Arc<AtomicBool>,
    /// Becomes `Some` once the process has ended.
    pub exit: watch::Receiver<Option<ExitOutcome>>,
    /// Ends (returns `None`) once the stream has finished and every output
    /// connection of the stream has written its output and closed.
    pub liveness: mpsc::Receiver<()>,
}

/// Opens a new stream (a Run or Attach) on the process.
#[derive(Message)]
#[rtype(result = "StreamHandle")]
pub struct OpenStream {
    pub stream_id: String,
}

impl Handler<OpenStream> for Process {
    type Result = MessageResult<OpenStream>;

    fn handle(&mut self, message: OpenStream, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let (liveness_sender, liveness) = mpsc::channel(1);
        let finished = self.exit.borrow().is_some();
        let expected = [OutputKind::Stdout, OutputKind::Stderr].map(|kind| self.reserve_reader(&message.stream_id, kind));
        self.streams.insert(
            message.stream_id.clone(),
            StreamRecord { finished: false, liveness: Some(liveness_sender), expected },
        );
        self.stream_table.insert(message.stream_id.clone(), ctx.address());
        let stream_id = message.stream_id.clone();
        ctx.run_later(EXPECTED_ATTACH_WAIT, move |process, _| process.release_reservations(&stream_id));
        if let Some(start_reading) = self.start_reading.take() {
            let _ = start_reading.send(());
        }
        if finished {
            // The process has already ended: the stream only serves the kept
            // output to late output attaches.
            self.finish_stream(&message.stream_id, false, ctx);
        }
        MessageResult(StreamHandle {
            process_id: self.process_id.clone(),
            stream_id: message.stream_id,
            shim: self.shim.clone().unwrap_or_else(|| mpsc::channel(1).0),
            tty: self.tty,
            stdin_closed: self.stdin_closed.clone(),
            exit: self.exit.subscribe(),
            liveness,
        })
    }
}

/// Ends a stream without an exit message: the client closed C1, or the
/// server is stopping. The process keeps running.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseStream {
    pub stream_id: String,
}

impl Handler<CloseStream> for Process {
    type Result = ();

    fn handle(&mut self, message: CloseStream, ctx: &mut Context<Self>) {
        self.mailbox.count();
        self.finish_stream(&message.stream_id, true, ctx);
    }
}

/// The queue a stdout or stderr connection reads from.
pub struct OutputSubscription {
    pub chunks: mpsc::Receiver<Bytes>,
    /// Held until the connection has written everything and closed.
    pub liveness: Option<mpsc::Sender<()>>,
    /// The connection's position in its output, reported to the actor.
    progress: OutputProgress,
}

impl OutputSubscription {
    /// Records that the connection wrote `bytes` more bytes of output to
    /// its client, so the shim may forget them.
    pub fn written(&mut self, bytes: usize) {
        self.progress.position += bytes as u64;
        let progress = &self.progress;
        progress.process.do_send(OutputWritten { kind: progress.kind, position: progress.position });
    }
}

/// A reader's position in its output.
struct OutputProgress {
    process: Addr<Process>,
    kind: OutputKind,
    position: u64,
}

/// A stdout or stderr connection has written the output up to `position`.
#[derive(Message)]
#[rtype(result = "()")]
struct OutputWritten {
    kind: OutputKind,
    position: u64,
}

impl Handler<OutputWritten> for Process {
    type Result = ();

    fn handle(&mut self, message: OutputWritten, _ctx: &mut Context<Self>) {
        self.mailbox.count();
        let output = &mut self.outputs[message.kind.index()];
        if message.position > output.done {
            output.done = message.position;
            self.acknowledge();
        }
    }
}

/// Attaches a stdout or stderr connection (C2 or C3) to a stream. Returns
/// `None` for a stream the process does not have.
#[derive(Message)]
#[rtype(result = "Option<OutputSubscription>")]
pub struct AttachOutput {
    pub stream_id: String,
    pub kind: OutputKind,
}

impl Handler<AttachOutput> for Process {
    type Result = MessageResult<AttachOutput>;

    fn handle(&mut self, message: AttachOutput, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let Some(record) = self.streams.get_mut(&message.stream_id) else {
            return MessageResult(None);
        };
        let output = &mut self.outputs[message.kind.index()];
        let progress = |position| OutputProgress { process: ctx.address(), kind: message.kind, position };
        if let Some((chunks, start)) = record.expected[message.kind.index()].take() {
            // The reservation's queue holds the kept output, so the ring
            // buffer is not given to anyone again.
            for reader in output.readers.iter_mut().filter(|reader| reader.stream_id == message.stream_id) {
                reader.connected = true;
            }
            output.unattached.clear();
            debug!(self.logger, "output attached"; "stream_id" => &message.stream_id, "stream" => message.kind.name());
            return MessageResult(Some(OutputSubscription { chunks, liveness: record.liveness.clone(), progress: progress(start) }));
        }
        let (sender, chunks) = mpsc::channel(READER_QUEUE_CHUNKS);
        output.readers.retain(|reader| !reader.sender.is_closed());
        let mut start = output.received;
        if !output.has_connected_reader() {
            if let Some(kept) = output.unattached.take() {
                start -= kept.len() as u64;
                sender.try_send(kept).expect("a new queue has room for one chunk");
            }
        }
        let liveness = record.liveness.clone();
        if !record.finished {
            output.readers.push(Reader { stream_id: message.stream_id.clone(), sender, connected: true });
        }
        debug!(self.logger, "output attached"; "stream_id" => &message.stream_id, "stream" => message.kind.name());
        MessageResult(Some(OutputSubscription { chunks, liveness, progress: progress(start) }))
    }
}

/// One chunk of output read from the shim.
#[derive(Message)]
#[rtype(result = "()")]
struct ShimOutput {
    kind: OutputKind,
    data: Bytes,
}

impl Handler<ShimOutput> for Process {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, message: ShimOutput, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let kind = message.kind;
        let output = &mut self.outputs[kind.index()];
        output.readers.retain(|reader| !reader.sender.is_closed());
        output.delivered_bytes += message.data.len() as u64;
        output.received += message.data.len() as u64;
        let mirrored = !output.has_connected_reader();
        if mirrored {
            output.unattached.push(message.data.clone());
            // What the ring buffer's bound dropped is done with.
            let ring_start = output.received - output.unattached.len() as u64;
            if ring_start > output.done {
                output.done = ring_start;
                self.acknowledge();
            }
        }
        let output = &mut self.outputs[kind.index()];
        if output.readers.is_empty() {
            return Box::pin(actix::fut::ready(()));
        }
        let senders: Vec<_> = output.readers.iter().map(|reader| reader.sender.clone()).collect();
        let data = message.data;
        let deliver = async move {
            // A reader that has disconnected fails at once; a slow one
            // holds up the shim, which is the intended backpressure.
            let mut delivered = false;
            for sender in senders {
                delivered |= sender.send(data.clone()).await.is_ok();
            }
            (delivered, data)
        };
        Box::pin(deliver.into_actor(self).map(move |(delivered, data), process, _| {
            // Every reader went away while the chunk waited: keep it for the
            // next attacher instead of losing it.
            if !delivered && !mirrored {
                process.outputs[kind.index()].unattached.push(data);
            }
        }))
    }
}

/// The shim reported the end of the process.
#[derive(Message)]
#[rtype(result = "()")]
struct ShimExited {
    outcome: ExitOutcome,
}

impl Handler<ShimExited> for Process {
    type Result = ();

    fn handle(&mut self, message: ShimExited, ctx: &mut Context<Self>) {
        self.mailbox.count();
        match &message.outcome {
            ExitOutcome::Status(status) => {
                info!(self.logger, "process exited"; "exit_status" => status);
            }
            ExitOutcome::Error(error) => warn!(self.logger, "process wait failed"; "error" => error),
        }
        let exit_status = match &message.outcome {
            ExitOutcome::Status(status) => Some(*status),
            ExitOutcome::Error(_) => None,
        };
        // `send_replace` stores the outcome even while no stream is open.
        self.exit.send_replace(Some(message.outcome));
        self.shim = None;
        // Output nobody attached for is kept as long as a finished stream
        // stays attachable, then freed: a finished process keeps only its
        // exit outcome and a few ids.
        ctx.run_later(FINISHED_STREAM_RETENTION, |process, _| {
            for output in &mut process.outputs {
                output.unattached.clear();
                output.readers.clear();
            }
        });
        let stream_ids: Vec<String> = self.streams.keys().cloned().collect();
        for stream_id in stream_ids {
            self.finish_stream(&stream_id, false, ctx);
        }
        if let Some(listener) = &self.exit_listener {
            listener.do_send(ProcessExited { process_id: self.process_id.clone(), process: ctx.address(), exit_status });
        }
    }
}

/// Returns the exit outcome, if the process has ended.
#[derive(Message)]
#[rtype(result = "Option<ExitOutcome>")]
pub struct GetExit;

impl Handler<GetExit> for Process {
    type Result = MessageResult<GetExit>;

    fn handle(&mut self, _message: GetExit, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        MessageResult(self.exit.borrow().clone())
    }
}

impl Handler<Introspect> for Process {
    type Result = ResponseFuture<serde_json::Value>;

    fn handle(&mut self, _message: Introspect, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let mailbox = measure_mailbox(self, ctx);
        let exit = match &*self.exit.borrow() {
            None => serde_json::Value::Null,
            Some(ExitOutcome::Status(status)) => serde_json::json!({ "exit_status": status }),
            Some(ExitOutcome::Error(error)) => serde_json::json!({ "error": error }),
        };
        let outputs: Vec<_> = [OutputKind::Stdout, OutputKind::Stderr]
            .iter()
            .map(|kind| {
                let output = &self.outputs[kind.index()];
                serde_json::json!({
                    "stream": kind.name(),
                    "readers": output.readers.iter().map(|reader| reader.stream_id.clone()).collect::<Vec<_>>(),
                    "kept_bytes": output.unattached.len(),
                    "total_bytes": output.delivered_bytes,
                })
            })
            .collect();
        let streams: Vec<_> = self
            .streams
            .iter()
            .map(|(id, record)| serde_json::json!({ "stream_id": id, "finished": record.finished }))
            .collect();
        let mut snapshot = serde_json::json!({
            "process_id": self.process_id,
            "pid": self.pid,
            "tty": self.tty,
            "exit": exit,
            "outputs": outputs,
            "streams": streams,
        });
        Box::pin(async move {
            snapshot["mailbox"] = mailbox.await;
            snapshot
        })
    }
}

crate::impl_mailbox_probe!(Process, mailbox);

/// Reads frames from the shim and hands them to the actor one at a time.
async fn read_shim_frames(
    mut reader: Box<dyn AsyncRead + Send + Unpin>,
    mut buffer: BytesMut,
    reading_allowed: oneshot::Receiver<()>,
    addr: Addr<Process>,
    logger: Logger,
) {
    // Without a stream after the wait (its connection failed), read anyway,
    // so output goes to the ring buffer and the exit status is recorded.
    let _ = tokio::time::timeout(EXPECTED_ATTACH_WAIT, reading_allowed).await;
    let outcome = loop {
        match ShimFrame::decode(&mut buffer) {
            Ok(Some(ShimFrame::Stdout(data))) => {
                if addr.send(ShimOutput { kind: OutputKind::Stdout, data }).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Some(ShimFrame::Stderr(data))) => {
                if addr.send(ShimOutput { kind: OutputKind::Stderr, data }).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Some(ShimFrame::Exited { status })) => break ExitOutcome::Status(status),
            // A process that could not be reattached after a restart is
            // replayed as this frame, so its attach reports why.
            Ok(Some(ShimFrame::StartFailed { message, .. })) => break ExitOutcome::Error(message),
            Ok(Some(other)) => {
                debug!(logger, "unexpected shim frame ignored"; "frame" => format!("{other:?}"));
                continue;
            }
            Ok(None) => {}
            Err(error) => break ExitOutcome::Error(format!("invalid frame from the process shim: {error}")),
        }
        // read_buf reads only into spare capacity, so keep room for a
        // whole frame of output: a nearly full buffer would make every
        // read a few bytes long.
        if buffer.capacity() - buffer.len() < SHIM_READ_BYTES {
            buffer.reserve(SHIM_READ_BYTES);
        }
        match reader.read_buf(&mut buffer).await {
            Ok(0) => break ExitOutcome::Error("the process shim closed its connection before reporting an exit status".into()),
            Ok(_) => {}
            Err(error) => break ExitOutcome::Error(format!("reading from the process shim failed: {error}")),
        }
    };
    addr.do_send(ShimExited { outcome });
}

/// Writes stdin, signal and resize frames to the shim, splitting stdin
/// larger than one frame.
async fn write_shim_frames(
    mut writer: Box<dyn AsyncWrite + Send + Unpin>,
    mut frames: mpsc::Receiver<ServerFrame>,
    logger: Logger,
) {
    let mut buffer = BytesMut::new();
    while let Some(frame) = frames.recv().await {
        match frame {
            ServerFrame::Stdin(data) if data.len() > MAX_FRAME_PAYLOAD => {
                for piece in data.chunks(MAX_FRAME_PAYLOAD) {
                    ServerFrame::Stdin(Bytes::copy_from_slice(piece)).encode(&mut buffer);
                }
            }
            frame => frame.encode(&mut buffer),
        }
        if let Err(error) = writer.write_all(&buffer).await {
            debug!(logger, "writing to the process shim failed"; "error" => %error);
            return;
        }
        buffer.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_output_keeps_newest_bytes() {
        let mut ring = RecentOutput::new(8);
        ring.push(Bytes::from_static(b"abcd"));
        ring.push(Bytes::from_static(b"efgh"));
        ring.push(Bytes::from_static(b"ijk"));
        assert_eq!(ring.len(), 8);
        assert_eq!(ring.take().unwrap(), Bytes::from_static(b"defghijk"));
        assert!(ring.is_empty());
        assert_eq!(ring.take(), None);
    }

    #[test]
    fn recent_output_drops_whole_oversized_chunk_prefix() {
        let mut ring = RecentOutput::new(4);
        ring.push(Bytes::from_static(b"0123456789"));
        assert_eq!(ring.take().unwrap(), Bytes::from_static(b"6789"));
    }

    #[actix::test]
    async fn start_failed_frame_ends_with_its_message() {
        let mut frames = BytesMut::new();
        let message = "the shim speaks protocol version 9".to_string();
        ShimFrame::StartFailed { failure: crate::runtime::stdio::StartFailure::Other, message: message.clone() }.encode(&mut frames);
        let process = Process::start_with(ProcessStart {
            process_id: "p".into(),
            pid: 0,
            tty: false,
            logger: Logger::root(slog::Discard, o!()),
            stream_table: StreamTable::default(),
            leftover: BytesMut::new(),
            reader: Box::new(std::io::Cursor::new(frames.to_vec())),
            writer: Box::new(tokio::io::sink()),
            acknowledge: false,
            exit_listener: None,
        });
        let mut stream = process.send(OpenStream { stream_id: "1".into() }).await.unwrap();
        let outcome = stream.exit.wait_for(Option::is_some).await.unwrap().clone();
        assert_eq!(outcome, Some(ExitOutcome::Error(message)));
    }
}
