//! The in-memory runtime: containers are records, processes are scripts.
//!
//! Tests register a [`ProcessScript`] per process id or per executable path.
//! A scripted process speaks the shim's frames of [`super::stdio`] over an
//! in-process pipe, so the server's process handling is exactly the one used
//! with real shims. Every call the server makes is recorded, so tests can
//! check what the backend was asked to do.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::stdio::{ServerFrame, ShimFrame, StartFailure};
use super::{ContainerConfig, ContainerRuntime, Runtime, RuntimeError, StartedProcess, StdioConnection};
use crate::api::{Capacity, Limits, Metrics, ProcessSpec};

/// One thing a scripted process does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Stdout(Bytes),
    Stderr(Bytes),
    /// Writes the current window size as `stty size` prints it
    /// (`rows columns\r\n`) to stdout.
    StdoutWindowSize,
    /// Ends the process with this status.
    Exit(i32),
}

impl Action {
    pub fn stdout(data: &[u8]) -> Action {
        Action::Stdout(Bytes::copy_from_slice(data))
    }

    pub fn stderr(data: &[u8]) -> Action {
        Action::Stderr(Bytes::copy_from_slice(data))
    }
}

/// The behaviour of a scripted process. Without a rule for it, SIGTERM and
/// SIGKILL end the process with 128 plus the signal number, and other
/// signals are ignored.
#[derive(Debug, Clone, Default)]
pub struct ProcessScript {
    /// The process fails to start with this reason and message.
    pub start_failure: Option<(StartFailure, String)>,
    /// Done right after the start.
    pub on_start: Vec<Action>,
    /// Copies every stdin chunk to stdout, as `cat` does.
    pub echo_stdin: bool,
    /// Done when a stdin chunk equals the given bytes.
    pub on_stdin: Vec<(Bytes, Vec<Action>)>,
    /// Done when stdin is closed.
    pub on_stdin_close: Vec<Action>,
    /// Done on a signal, keyed by the raw signal number.
    pub on_signal: BTreeMap<i32, Vec<Action>>,
    /// Done after every resize.
    pub on_resize: Vec<Action>,
}

impl ProcessScript {
    /// Returns a script that writes `stdout` and exits with `status` at once.
    pub fn output_then_exit(stdout: &[u8], status: i32) -> ProcessScript {
        ProcessScript { on_start: vec![Action::stdout(stdout), Action::Exit(status)], ..ProcessScript::default() }
    }

    /// Returns a script that runs until it is signalled (like `sleep`).
    pub fn sleeper() -> ProcessScript {
        ProcessScript::default()
    }

    /// Returns a script that fails to start because its executable is missing.
    pub fn not_found(message: &str) -> ProcessScript {
        ProcessScript {
            start_failure: Some((StartFailure::ExecutableNotFound, message.to_string())),
            ..ProcessScript::default()
        }
    }
}

#[derive(Default)]
struct State {
    scripts_by_id: HashMap<String, ProcessScript>,
    scripts_by_path: HashMap<String, ProcessScript>,
    ping_error: Option<RuntimeError>,
    create_errors: HashMap<String, RuntimeError>,
    containers: BTreeSet<String>,
    calls: Vec<String>,
    capacity: Capacity,
    /// How long each destroy takes, so tests can overlap two destroys.
    destroy_delay: std::time::Duration,
    /// Archives that stream out returns, by source path.
    stream_out_archives: HashMap<String, Bytes>,
    /// Every archive stream in received, in order.
    stream_in_archives: Vec<Vec<u8>>,
    /// The failure of the next stream in to a destination.
    stream_in_errors: HashMap<String, RuntimeError>,
    /// How long each create takes, so tests can overlap creates.
    create_delay: std::time::Duration,
    /// Control channels of running processes, per container.
    running: HashMap<String, Vec<mpsc::UnboundedSender<i32>>>,
    /// Metrics reported per handle, Age and CPU entitlement included.
    metrics: HashMap<String, Metrics>,
    /// Limits applied through `update_limits`, per handle.
    applied_limits: HashMap<String, Limits>,
}

/// The in-memory runtime. Clones share their state, so a test keeps one
/// clone to script and inspect the runtime the server uses.
#[derive(Clone, Default)]
pub struct MemoryRuntime {
    state: Arc<Mutex<State>>,
}

impl MemoryRuntime {
    pub fn new() -> MemoryRuntime {
        MemoryRuntime::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Scripts the process that Run starts with this id (takes precedence
    /// over a script by path).
    pub fn script_process_id(&self, process_id: &str, script: ProcessScript) {
        self.lock().scripts_by_id.insert(process_id.to_string(), script);
    }

    /// Scripts every process whose spec has this path.
    pub fn script_path(&self, path: &str, script: ProcessScript) {
        self.lock().scripts_by_path.insert(path.to_string(), script);
    }

    /// Makes ping fail with `error` (or succeed again with `None`).
    pub fn set_ping_error(&self, error: Option<RuntimeError>) {
        self.lock().ping_error = error;
    }

    /// Makes the next create of `handle` fail with `error`.
    pub fn fail_create(&self, handle: &str, error: RuntimeError) {
        self.lock().create_errors.insert(handle.to_string(), error);
    }

    /// Sets what capacity reports.
    pub fn set_capacity(&self, capacity: Capacity) {
        self.lock().capacity = capacity;
    }

    /// Makes every destroy take `delay` before it completes.
    pub fn set_destroy_delay(&self, delay: std::time::Duration) {
        self.lock().destroy_delay = delay;
    }

    /// Makes stream out of `source` return `archive`. Other sources fail as
    /// missing.
    pub fn script_stream_out(&self, source: &str, archive: &[u8]) {
        self.lock().stream_out_archives.insert(source.to_string(), Bytes::copy_from_slice(archive));
    }

    /// Makes the next stream in to `destination` fail with `error` after it
    /// has read the whole archive.
    pub fn fail_stream_in(&self, destination: &str, error: RuntimeError) {
        self.lock().stream_in_errors.insert(destination.to_string(), error);
    }

    /// Returns every archive stream in has received, in order.
    pub fn stream_in_archives(&self) -> Vec<Vec<u8>> {
        self.lock().stream_in_archives.clone()
    }

    /// Makes Metrics of `handle` report exactly `metrics`. Without this a
    /// container reports zero usage and its real age.
    pub fn set_metrics(&self, handle: &str, metrics: Metrics) {
        self.lock().metrics.insert(handle.to_string(), metrics);
    }

    /// Returns the limits last applied to a running container, if any.
    pub fn applied_limits(&self, handle: &str) -> Option<Limits> {
        self.lock().applied_limits.get(handle).cloned()
    }

    /// Makes every create take `delay` before it completes.
    pub fn set_create_delay(&self, delay: std::time::Duration) {
        self.lock().create_delay = delay;
    }

    /// Returns every call recorded so far, one line each.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Returns the handles of containers that exist.
    pub fn containers(&self) -> Vec<String> {
        self.lock().containers.iter().cloned().collect()
    }

    fn record(&self, call: String) {
        self.lock().calls.push(call);
    }
}

impl Runtime for MemoryRuntime {
    fn ping(&self) -> Result<(), RuntimeError> {
        match &self.lock().ping_error {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    fn capacity(&self) -> Result<Capacity, RuntimeError> {
        Ok(self.lock().capacity)
    }

    fn create(&self, config: &ContainerConfig) -> Result<Arc<dyn ContainerRuntime>, RuntimeError> {
        let delay = self.lock().create_delay;
        std::thread::sleep(delay);
        let mut state = self.lock();
        state.calls.push(format!(
            "create {} grace_time={} privileged={} mapped_root={:?}",
            config.handle,
            config.spec.grace_time,
            config.spec.privileged,
            config.id_mappings.as_ref().and_then(|mappings| mappings.host_root_uid())
        ));
        if let Some(error) = state.create_errors.remove(&config.handle) {
            return Err(error);
        }
        if !state.containers.insert(config.handle.clone()) {
            return Err(RuntimeError::failed(format!("container {} exists in the runtime", config.handle)));
        }
        Ok(Arc::new(MemoryContainer {
            handle: config.handle.clone(),
            dir: config.container_dir.clone(),
            runtime: self.clone(),
        }))
    }
}

/// One container of the in-memory runtime.
struct MemoryContainer {
    handle: String,
    dir: std::path::PathBuf,
    runtime: MemoryRuntime,
}

impl MemoryContainer {
    fn signal_all(&self, signal: i32) {
        let mut state = self.runtime.lock();
        if let Some(processes) = state.running.get_mut(&self.handle) {
            processes.retain(|control| control.send(signal).is_ok());
        }
    }
}

impl ContainerRuntime for MemoryContainer {
    fn run(&self, process_id: &str, spec: &ProcessSpec) -> Result<StartedProcess, RuntimeError> {
        let script = {
            let mut state = self.runtime.lock();
            state.calls.push(format!(
                "run {} id={} path={} args={:?} dir={} user={} tty={:?}",
                self.handle, process_id, spec.path, spec.args, spec.dir, spec.user, spec.tty
            ));
            state.scripts_by_id.get(process_id).or_else(|| state.scripts_by_path.get(&spec.path)).cloned()
        };
        let script = script.unwrap_or_else(|| {
            ProcessScript::not_found(&format!("exec: \"{}\": executable file not found in $PATH", spec.path))
        });
        if let Some((failure, message)) = script.start_failure.clone() {
            return Err(match failure {
                StartFailure::ExecutableNotFound => RuntimeError::ExecutableNotFound { message },
                StartFailure::InvalidRequest => RuntimeError::InvalidRequest { message },
                StartFailure::Other => RuntimeError::Failed { message },
            });
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| RuntimeError::failed("the in-memory runtime needs a tokio runtime"))?;
        let (server_end, process_end) = tokio::io::duplex(64 * 1024);
        let (control, control_receiver) = mpsc::unbounded_channel();
        self.runtime.lock().running.entry(self.handle.clone()).or_default().push(control);
        let window = spec.tty.and_then(|tty| tty.window_size).unwrap_or_default();
        let window = (
            if window.columns == 0 { 80 } else { window.columns },
            if window.rows == 0 { 24 } else { window.rows },
        );
        let process = ScriptedProcess { script, window, runtime: self.runtime.clone(), process_id: process_id.to_string() };
        runtime.spawn(process.run(process_end, control_receiver));
        Ok(StartedProcess { pid: 0, stdio: StdioConnection::Memory(server_end) })
    }

    fn stop(&self, kill: bool) -> Result<(), RuntimeError> {
        self.runtime.record(format!("stop {} kill={kill}", self.handle));
        self.signal_all(if kill { 9 } else { 15 });
        Ok(())
    }

    fn destroy(&self) -> Result<(), RuntimeError> {
        self.runtime.record(format!("destroy {}", self.handle));
        let delay = self.runtime.lock().destroy_delay;
        std::thread::sleep(delay);
        self.signal_all(9);
        let mut state = self.runtime.lock();
        state.running.remove(&self.handle);
        state.containers.remove(&self.handle);
        drop(state);
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(RuntimeError::failed(format!("cannot remove {}: {error}", self.dir.display()))),
        }
    }

    /// Reads the whole archive, records the call with its size and keeps
    /// the archive for [`MemoryRuntime::stream_in_archives`].
    fn stream_in(&self, destination: &str, user: &str, tar: &mut dyn std::io::Read) -> Result<(), RuntimeError> {
        let mut archive = Vec::new();
        tar.read_to_end(&mut archive).map_err(|error| RuntimeError::failed(format!("error streaming in: {error}")))?;
        self.runtime.record(format!(
            "stream-in {} destination={destination} user={user} bytes={}",
            self.handle,
            archive.len()
        ));
        let mut state = self.runtime.lock();
        state.stream_in_archives.push(archive);
        match state.stream_in_errors.remove(destination) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn stream_out(&self, source: &str, user: &str) -> Result<Box<dyn std::io::Read + Send>, RuntimeError> {
        self.runtime.record(format!("stream-out {} source={source} user={user}", self.handle));
        match self.runtime.lock().stream_out_archives.get(source) {
            Some(archive) => Ok(Box::new(std::io::Cursor::new(archive.clone()))),
            None => Err(RuntimeError::invalid(format!("error streaming out: {source}: No such file or directory (os error 2)"))),
        }
    }

    fn update_limits(&self, _current: &Limits, requested: &Limits) -> Result<(), RuntimeError> {
        let mut state = self.runtime.lock();
        state.calls.push(format!("update_limits {} {}", self.handle, serde_json::to_string(requested).unwrap_or_default()));
        state.applied_limits.insert(self.handle.clone(), requested.clone());
        Ok(())
    }

    fn reported_limits(&self, set: &Limits) -> Limits {
        set.clone()
    }

    fn metrics(&self, age: std::time::Duration) -> Result<Metrics, RuntimeError> {
        let state = self.runtime.lock();
        Ok(state.metrics.get(&self.handle).cloned().unwrap_or_else(|| Metrics {
            age: i64::try_from(age.as_nanos()).unwrap_or(i64::MAX),
            ..Metrics::default()
        }))
    }

    fn net_in(&self, host_port: u16, container_port: u16) -> Result<(), RuntimeError> {
        self.runtime.record(format!("net-in {} host_port={host_port} container_port={container_port}", self.handle));
        Ok(())
    }

    /// Records one line per rule, in the rule's JSON form.
    fn net_out(&self, rules: &[crate::api::NetOutRule]) -> Result<(), RuntimeError> {
        for rule in rules {
            self.runtime.record(format!("net-out {} {}", self.handle, serde_json::to_string(rule).unwrap_or_default()));
        }
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "runtime": "memory", "handle": self.handle })
    }
}

struct ScriptedProcess {
    script: ProcessScript,
    window: (u16, u16),
    runtime: MemoryRuntime,
    process_id: String,
}

enum Step {
    Continue,
    Exit(i32),
}

impl ScriptedProcess {
    async fn run(mut self, stream: tokio::io::DuplexStream, mut control: mpsc::UnboundedReceiver<i32>) {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut out = BytesMut::new();
        let on_start = self.script.on_start.clone();
        let mut step = self.act(&on_start, &mut out);
        let mut input = BytesMut::new();
        while let Step::Continue = step {
            if writer.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            step = tokio::select! {
                read = reader.read_buf(&mut input) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => self.handle_input(&mut input, &mut out),
                },
                Some(signal) = control.recv() => self.handle_signal(signal, &mut out),
            };
        }
        if let Step::Exit(status) = step {
            ShimFrame::Exited { status }.encode(&mut out);
            let _ = writer.write_all(&out).await;
            let _ = writer.shutdown().await;
        }
    }

    fn handle_input(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Step {
        loop {
            let frame = match ServerFrame::decode(input) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Step::Continue,
                Err(_) => return Step::Exit(255),
            };
            let step = match frame {
                ServerFrame::Stdin(data) => {
                    self.runtime.record(format!("stdin {} {:?}", self.process_id, String::from_utf8_lossy(&data)));
                    let mut actions = Vec::new();
                    if self.script.echo_stdin {
                        actions.push(Action::Stdout(data.clone()));
                    }
                    for (pattern, pattern_actions) in &self.script.on_stdin {
                        if *pattern == data {
                            actions.extend(pattern_actions.iter().cloned());
                        }
                    }
                    self.act(&actions, out)
                }
                ServerFrame::CloseStdin => {
                    self.runtime.record(format!("close-stdin {}", self.process_id));
                    let actions = self.script.on_stdin_close.clone();
                    self.act(&actions, out)
                }
                ServerFrame::Signal { signal } => self.handle_signal(signal, out),
                // Scripted processes speak protocol version 1, so the server
                // sends them no acknowledgements.
                ServerFrame::Ack { .. } => Step::Continue,
                ServerFrame::Resize { columns, rows } => {
                    self.runtime.record(format!("resize {} {columns}x{rows}", self.process_id));
                    self.window = (columns, rows);
                    let actions = self.script.on_resize.clone();
                    self.act(&actions, out)
                }
            };
            if let Step::Exit(status) = step {
                return Step::Exit(status);
            }
        }
    }

    fn handle_signal(&mut self, signal: i32, out: &mut BytesMut) -> Step {
        self.runtime.record(format!("signal {} {signal}", self.process_id));
        match self.script.on_signal.get(&signal).cloned() {
            Some(actions) => self.act(&actions, out),
            None if signal == 9 || signal == 15 => Step::Exit(128 + signal),
            None => Step::Continue,
        }
    }

    fn act(&mut self, actions: &[Action], out: &mut BytesMut) -> Step {
        for action in actions {
            match action {
                Action::Stdout(data) => ShimFrame::Stdout(data.clone()).encode(out),
                Action::Stderr(data) => ShimFrame::Stderr(data.clone()).encode(out),
                Action::StdoutWindowSize => {
                    let (columns, rows) = self.window;
                    ShimFrame::Stdout(Bytes::from(format!("{rows} {columns}\r\n"))).encode(out)
                }
                Action::Exit(status) => return Step::Exit(*status),
            }
        }
        Step::Continue
    }
}
