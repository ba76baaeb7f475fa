//! Raw-HTTP checks of the process protocol (Run, Attach, stdout and stderr
//! attaches) against scripted processes of the in-memory runtime.

#[path = "http_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use support::{assert_eof, find, read_exact_buffered, read_until, Harness, Response};
use trellis::runtime::memory::{Action, ProcessScript};

/// One Run or Attach connection (C1).
struct ProcessConnection {
    stream: TcpStream,
    buffer: Vec<u8>,
    head: Vec<u8>,
    process_id: String,
    stream_id: String,
}

impl ProcessConnection {
    fn send(&mut self, message: &serde_json::Value) {
        let mut bytes = serde_json::to_vec(message).unwrap();
        bytes.push(b'\n');
        self.stream.write_all(&bytes).unwrap();
    }

    fn send_stdin(&mut self, data: &str) {
        let message = serde_json::json!({"process_id": self.process_id, "source": 0, "data": data});
        self.send(&message);
    }

    fn close_stdin(&mut self) {
        let message = serde_json::json!({"process_id": self.process_id, "source": 0});
        self.send(&message);
    }

    fn signal(&mut self, signal: i64) {
        let message = serde_json::json!({"process_id": self.process_id, "signal": signal});
        self.send(&message);
    }

    /// Reads the next message line.
    fn read_message(&mut self) -> (Vec<u8>, serde_json::Value) {
        let line = read_until(&mut self.stream, &mut self.buffer, b"\n");
        let value = serde_json::from_slice(&line).unwrap();
        (line, value)
    }

    /// Reads the exit message, checks its exact bytes, then the close.
    fn expect_exit(&mut self, status: i64) {
        let (line, _) = self.read_message();
        let expected = format!("{{\"process_id\":\"{}\",\"exit_status\":{status}}}\n", self.process_id);
        assert_eq!(String::from_utf8_lossy(&line), expected);
        assert_eof(&mut self.stream, &self.buffer);
    }
}

fn run(harness: &Harness, handle: &str, body: &str) -> ProcessConnection {
    open_process(harness, &format!(
        "POST /containers/{handle}/processes HTTP/1.1\r\nHost: api\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n{body}",
        body.len()
    ))
}

fn attach(harness: &Harness, handle: &str, process_id: &str) -> ProcessConnection {
    open_process(harness, &format!(
        "GET /containers/{handle}/processes/{process_id} HTTP/1.1\r\nHost: api\r\nUser-Agent: Go-http-client/1.1\r\n\r\n"
    ))
}

fn open_process(harness: &Harness, request: &str) -> ProcessConnection {
    let mut stream = harness.connect();
    stream.write_all(request.as_bytes()).unwrap();
    let mut buffer = Vec::new();
    let head = read_until(&mut stream, &mut buffer, b"\r\n\r\n");
    let text = String::from_utf8_lossy(&head).into_owned();
    assert!(text.starts_with("HTTP/1.1 20"), "process route failed: {text}{}", String::from_utf8_lossy(&buffer));
    assert!(text.contains("\r\nTransfer-Encoding: chunked\r\n"), "{text}");
    assert!(!text.to_ascii_lowercase().contains("connection:"), "{text}");
    let line = read_until(&mut stream, &mut buffer, b"\n");
    let handshake: serde_json::Value = serde_json::from_slice(&line).unwrap();
    let process_id = handshake["process_id"].as_str().unwrap().to_string();
    let stream_id = handshake["stream_id"].as_str().unwrap().to_string();
    assert!(!process_id.is_empty(), "{handshake}");
    assert!(!stream_id.is_empty(), "{handshake}");
    assert_eq!(handshake.as_object().unwrap().len(), 2, "{handshake}");
    ProcessConnection { stream, buffer, head, process_id, stream_id }
}

/// Sends a raw process request that must fail; returns the response.
fn failed_process_request(harness: &Harness, request: &str) -> Response {
    let mut stream = harness.connect();
    stream.write_all(request.as_bytes()).unwrap();
    let mut buffer = Vec::new();
    let head = read_until(&mut stream, &mut buffer, b"\r\n\r\n");
    let text = String::from_utf8_lossy(&head).into_owned();
    assert!(!text.to_ascii_lowercase().contains("connection: close"), "{text}");
    let length: usize = text
        .split("\r\n")
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .unwrap_or_else(|| panic!("error head without Content-Length: {text}"))
        .parse()
        .unwrap();
    let body = read_exact_buffered(&mut stream, &mut buffer, length);
    let mut whole = head;
    whole.extend_from_slice(&body);
    Response::parse(&whole).unwrap()
}

/// Opens a stdout or stderr attach (C2 or C3) and checks its head.
fn attach_output(harness: &Harness, connection: &ProcessConnection, stream_name: &str) -> (TcpStream, Vec<u8>) {
    attach_output_ids(harness, &connection.process_id, &connection.stream_id, stream_name)
}

fn attach_output_ids(harness: &Harness, process_id: &str, stream_id: &str, stream_name: &str) -> (TcpStream, Vec<u8>) {
    let mut stream = harness.connect();
    let request = format!(
        "GET /containers/h/processes/{process_id}/attaches/{stream_id}/{stream_name} HTTP/1.1\r\nHost: api\r\nUser-Agent: Go-http-client/1.1\r\nContent-Type: application/json\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut buffer = Vec::new();
    let head = read_until(&mut stream, &mut buffer, b"\r\n\r\n");
    let text = String::from_utf8_lossy(&head).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\nDate: "), "{text}");
    assert!(text.ends_with("\r\nTransfer-Encoding: chunked\r\n\r\n"), "{text}");
    (stream, buffer)
}

/// Reads an output connection to its close.
fn read_output(mut stream: TcpStream, mut buffer: Vec<u8>) -> Vec<u8> {
    stream.read_to_end(&mut buffer).unwrap();
    buffer
}

fn harness_with_container() -> Harness {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h"}"#);
    harness
}

fn cat_script() -> ProcessScript {
    ProcessScript { echo_stdin: true, on_stdin_close: vec![Action::Exit(0)], ..ProcessScript::default() }
}

#[test]
fn run_echo_hands_shake_then_output_then_exit() {
    let harness = harness_with_container();
    harness.runtime.script_path("echo", ProcessScript::output_then_exit(b"hi\n", 0));
    let mut first = run(&harness, "h", r#"{"path":"echo","args":["hi"],"rlimits":{},"image":{}}"#);
    assert!(first.head.starts_with(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nDate: "));
    let (stdout, buffer) = attach_output(&harness, &first, "stdout");
    let (stderr, stderr_buffer) = attach_output(&harness, &first, "stderr");
    assert_eq!(read_output(stdout, buffer), b"hi\n");
    assert_eq!(read_output(stderr, stderr_buffer), b"");
    first.expect_exit(0);

    let second = run(&harness, "h", r#"{"path":"echo","rlimits":{},"image":{}}"#);
    assert_ne!(second.stream_id, first.stream_id);
    assert_ne!(second.process_id, first.process_id);
}

#[test]
fn exit_status_without_attaches() {
    let harness = harness_with_container();
    harness.runtime.script_path("sh", ProcessScript { on_start: vec![Action::Exit(42)], ..ProcessScript::default() });
    let mut connection = run(&harness, "h", r#"{"path":"sh","args":["-c","exit 42"],"rlimits":{},"image":{}}"#);
    connection.expect_exit(42);
}

#[test]
fn output_before_attach_is_kept() {
    let harness = harness_with_container();
    harness.runtime.script_path(
        "early",
        ProcessScript { on_start: vec![Action::stdout(b"early\n")], ..ProcessScript::default() },
    );
    let mut connection = run(&harness, "h", r#"{"path":"early","rlimits":{},"image":{}}"#);
    std::thread::sleep(Duration::from_millis(300));
    let (mut stdout, mut buffer) = attach_output(&harness, &connection, "stdout");
    assert_eq!(read_exact_buffered(&mut stdout, &mut buffer, 6), b"early\n");
    connection.signal(0);
    assert_eq!(read_output(stdout, buffer), b"", "stdout closes once the process has exited");
    connection.expect_exit(143);
}

#[test]
fn late_attach_after_exit_gets_output() {
    let harness = harness_with_container();
    harness.runtime.script_path("fast", ProcessScript::output_then_exit(b"done quickly\n", 0));
    let mut connection = run(&harness, "h", r#"{"path":"fast","rlimits":{},"image":{}}"#);
    connection.expect_exit(0);
    std::thread::sleep(Duration::from_millis(500));
    let (stdout, buffer) = attach_output(&harness, &connection, "stdout");
    assert_eq!(read_output(stdout, buffer), b"done quickly\n");
}

#[test]
fn unknown_stream_gets_head_and_close() {
    let harness = harness_with_container();
    let (stdout, buffer) = attach_output_ids(&harness, "p", "99999", "stdout");
    assert_eq!(read_output(stdout, buffer), b"");
}

#[test]
fn stdin_data_and_close() {
    let harness = harness_with_container();
    harness.runtime.script_path("cat", cat_script());
    let mut connection = run(&harness, "h", r#"{"path":"cat","rlimits":{},"image":{}}"#);
    let (stdout, buffer) = attach_output(&harness, &connection, "stdout");
    let (stderr, stderr_buffer) = attach_output(&harness, &connection, "stderr");
    connection.send_stdin("");
    connection.send_stdin("abc");
    connection.close_stdin();
    assert_eq!(read_output(stdout, buffer), b"abc");
    assert_eq!(read_output(stderr, stderr_buffer), b"");
    connection.expect_exit(0);
    let calls = harness.runtime.calls();
    let stdin_calls: Vec<_> = calls.iter().filter(|call| call.starts_with("stdin ")).collect();
    assert_eq!(stdin_calls.len(), 1, "empty data writes nothing: {calls:?}");
}

#[test]
fn messages_back_to_back_and_split() {
    let harness = harness_with_container();
    harness.runtime.script_path("cat", cat_script());
    let mut connection = run(&harness, "h", r#"{"path":"cat","rlimits":{},"image":{}}"#);
    let (stdout, buffer) = attach_output(&harness, &connection, "stdout");
    let pid = connection.process_id.clone();
    let messages = format!(
        "{{\"process_id\":\"{pid}\",\"source\":0,\"data\":\"one\"}}{{\"process_id\":\"{pid}\",\"source\":0,\"data\":\"two\"}}  {{\"process_id\":\"{pid}\",\"source\":0}}"
    );
    let bytes = messages.as_bytes();
    for piece in bytes.chunks(7) {
        connection.stream.write_all(piece).unwrap();
        connection.stream.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_output(stdout, buffer), b"onetwo");
    connection.expect_exit(0);
}

#[test]
fn large_stdin_message_round_trips() {
    let harness = harness_with_container();
    harness.runtime.script_path("cat", cat_script());
    let mut connection = run(&harness, "h", r#"{"path":"cat","rlimits":{},"image":{}}"#);
    let (stdout, buffer) = attach_output(&harness, &connection, "stdout");
    let data: String = (0..3 * 1024 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let mut writer = connection.stream.try_clone().unwrap();
    let message = serde_json::json!({"process_id": connection.process_id, "source": 0, "data": data});
    let close = serde_json::json!({"process_id": connection.process_id, "source": 0});
    let sender = std::thread::spawn(move || {
        writer.write_all(format!("{message}\n{close}\n").as_bytes()).unwrap();
    });
    let output = read_output(stdout, buffer);
    sender.join().unwrap();
    assert_eq!(output.len(), data.len());
    assert!(output == data.as_bytes(), "stdout differs from stdin");
    connection.expect_exit(0);
}

#[test]
fn signals_terminate_and_kill() {
    let harness = harness_with_container();
    harness.runtime.script_path("sleep", ProcessScript::sleeper());
    harness.runtime.script_path(
        "trap",
        ProcessScript { on_signal: [(15, vec![])].into_iter().collect(), ..ProcessScript::default() },
    );
    let mut sleeper = run(&harness, "h", r#"{"path":"sleep","args":["100"],"rlimits":{},"image":{}}"#);
    sleeper.signal(7);
    sleeper.signal(0);
    sleeper.expect_exit(143);

    let mut trapper = run(&harness, "h", r#"{"path":"trap","rlimits":{},"image":{}}"#);
    trapper.signal(0);
    trapper.signal(1);
    trapper.expect_exit(137);
    let calls = harness.runtime.calls();
    assert!(!calls.iter().any(|call| call.ends_with(" 7")), "signal 7 must not be forwarded: {calls:?}");
}

#[test]
fn tty_resize_changes_window_size() {
    let harness = harness_with_container();
    harness.runtime.script_path(
        "sh",
        ProcessScript {
            on_stdin: vec![(bytes::Bytes::from_static(b"stty size\n"), vec![Action::StdoutWindowSize])],
            on_stdin_close: vec![Action::Exit(0)],
            ..ProcessScript::default()
        },
    );
    let mut connection = run(&harness, "h", r#"{"path":"sh","rlimits":{},"tty":{"window_size":{"columns":100,"rows":30}},"image":{}}"#);
    let (mut stdout, mut buffer) = attach_output(&harness, &connection, "stdout");
    connection.send_stdin("stty size\n");
    assert_eq!(read_exact_buffered(&mut stdout, &mut buffer, 8), b"30 100\r\n");
    let resize = serde_json::json!({"process_id": connection.process_id, "tty": {"window_size": {"columns": 120, "rows": 40}}});
    connection.send(&resize);
    connection.send_stdin("stty size\n");
    assert_eq!(read_exact_buffered(&mut stdout, &mut buffer, 8), b"40 120\r\n");
    connection.close_stdin();
    assert_eq!(read_output(stdout, buffer), b"");
    connection.expect_exit(0);
}

#[test]
fn duplicate_process_id_rejected() {
    let harness = harness_with_container();
    harness.runtime.script_path("sleep", ProcessScript::sleeper());
    let first = run(&harness, "h", r#"{"id":"p1","path":"sleep","rlimits":{},"image":{}}"#);
    assert_eq!(first.process_id, "p1");
    let body = r#"{"id":"p1","path":"sleep","rlimits":{},"image":{}}"#;
    let response = failed_process_request(
        &harness,
        &format!("POST /containers/h/processes HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
    );
    assert_eq!(response.assert_envelope(500, "")["Message"], "process ID 'p1' already in use");
}

#[test]
fn run_errors_are_framed() {
    let harness = harness_with_container();
    let body = r#"{"path":"true","rlimits":{},"image":{}}"#;
    let response = failed_process_request(
        &harness,
        &format!("POST /containers/nope/processes HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
    );
    assert_eq!(response.assert_envelope(404, "ContainerNotFoundError")["Handle"], "nope");

    let body = r#"{"path":"/does/not/exist","rlimits":{},"image":{}}"#;
    let response = failed_process_request(
        &harness,
        &format!("POST /containers/h/processes HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
    );
    response.assert_envelope(500, "ExecutableNotFoundError");

    let response = failed_process_request(
        &harness,
        "POST /containers/h/processes HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\n\r\n{x}",
    );
    response.assert_envelope(500, "");

    let response = failed_process_request(&harness, "GET /containers/h/processes/idontexist HTTP/1.1\r\nHost: api\r\n\r\n");
    assert_eq!(response.status_line, "HTTP/1.1 404 Not Found");
    let envelope = response.assert_envelope(404, "ProcessNotFoundError");
    assert_eq!(envelope["ProcessID"], "idontexist");
    assert_eq!(envelope["Message"], "unknown process: idontexist");

    // The server keeps serving.
    assert_eq!(harness.request("GET", "/ping", None).status, 200);
}

#[test]
fn run_on_stopped_container_fails() {
    let harness = harness_with_container();
    harness.runtime.script_path("true", ProcessScript::output_then_exit(b"", 0));
    assert_eq!(harness.request("PUT", "/containers/h/stop", Some(r#"{"kill":true}"#)).status, 200);
    let body = r#"{"path":"true","rlimits":{},"image":{}}"#;
    let response = failed_process_request(
        &harness,
        &format!("POST /containers/h/processes HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
    );
    assert_eq!(response.assert_envelope(500, "")["Message"], "container is stopped");
}

#[test]
fn attach_fans_out_and_both_get_exit() {
    let harness = harness_with_container();
    harness.runtime.script_path("cat", cat_script());
    let mut runner = run(&harness, "h", r#"{"id":"shared","path":"cat","rlimits":{},"image":{}}"#);
    let (run_stdout, run_buffer) = attach_output(&harness, &runner, "stdout");
    let mut attacher = attach(&harness, "h", "shared");
    assert!(attacher.head.starts_with(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: "));
    assert_eq!(attacher.process_id, "shared");
    assert_ne!(attacher.stream_id, runner.stream_id);
    let (attach_stdout, attach_buffer) = attach_output(&harness, &attacher, "stdout");
    // Stdin from either connection reaches the same process.
    runner.send_stdin("from run;");
    attacher.send_stdin("from attach");
    std::thread::sleep(Duration::from_millis(100));
    attacher.close_stdin();
    assert_eq!(read_output(run_stdout, run_buffer), b"from run;from attach");
    assert_eq!(read_output(attach_stdout, attach_buffer), b"from run;from attach");
    runner.expect_exit(0);
    attacher.expect_exit(0);
}

#[test]
fn closing_run_connection_detaches() {
    let harness = harness_with_container();
    harness.runtime.script_path("sleep", ProcessScript::sleeper());
    let runner = run(&harness, "h", r#"{"id":"sleeper","path":"sleep","args":["5"],"rlimits":{},"image":{}}"#);
    let (stdout, buffer) = attach_output(&harness, &runner, "stdout");
    runner.stream.shutdown(Shutdown::Both).unwrap();
    drop(runner);
    // The stdout attach of the detached stream closes.
    assert_eq!(read_output(stdout, buffer), b"");
    let mut again = attach(&harness, "h", "sleeper");
    again.signal(0);
    again.expect_exit(143);
}

#[test]
fn stdin_close_then_disconnect_closes_outputs() {
    let harness = harness_with_container();
    harness.runtime.script_path("sleep", ProcessScript::sleeper());
    let mut runner = run(&harness, "h", r#"{"id":"s","path":"sleep","rlimits":{},"image":{}}"#);
    let (stdout, buffer) = attach_output(&harness, &runner, "stdout");
    let (stderr, stderr_buffer) = attach_output(&harness, &runner, "stderr");
    runner.close_stdin();
    std::thread::sleep(Duration::from_millis(50));
    runner.stream.shutdown(Shutdown::Both).unwrap();
    assert_eq!(read_output(stdout, buffer), b"");
    assert_eq!(read_output(stderr, stderr_buffer), b"");
    // The process still runs and can be signalled after a new attach.
    let mut again = attach(&harness, "h", "s");
    again.signal(1);
    again.expect_exit(137);
}

#[test]
fn cat_then_stderr_then_exit_seven() {
    let harness = harness_with_container();
    harness.runtime.script_path(
        "sh",
        ProcessScript {
            echo_stdin: true,
            on_stdin_close: vec![Action::stderr(b"e\n"), Action::Exit(7)],
            ..ProcessScript::default()
        },
    );
    let mut connection = run(&harness, "h", r#"{"path":"sh","args":["-c","cat; echo e >&2; exit 7"],"rlimits":{},"image":{}}"#);
    let (stdout, buffer) = attach_output(&harness, &connection, "stdout");
    let (stderr, stderr_buffer) = attach_output(&harness, &connection, "stderr");
    connection.send_stdin("x\n");
    connection.close_stdin();
    assert_eq!(read_output(stdout, buffer), b"x\n");
    assert_eq!(read_output(stderr, stderr_buffer), b"e\n");
    connection.expect_exit(7);
}

#[test]
fn disconnected_reader_does_not_stall_others() {
    let harness = harness_with_container();
    harness.runtime.script_path("cat", cat_script());
    let mut runner = run(&harness, "h", r#"{"id":"fan","path":"cat","rlimits":{},"image":{}}"#);
    let (gone, _) = attach_output(&harness, &runner, "stdout");
    drop(gone);
    let attacher = attach(&harness, "h", "fan");
    let (stdout, buffer) = attach_output(&harness, &attacher, "stdout");
    let chunk = "z".repeat(32 * 1024);
    for _ in 0..64 {
        runner.send_stdin(&chunk);
    }
    runner.close_stdin();
    let output = read_output(stdout, buffer);
    assert_eq!(output.len(), 64 * chunk.len());
    runner.expect_exit(0);
}

#[test]
fn server_stop_ends_process_connections() {
    let mut harness = harness_with_container();
    harness.runtime.script_path("sleep", ProcessScript::sleeper());
    let mut runner = run(&harness, "h", r#"{"path":"sleep","rlimits":{},"image":{}}"#);
    let (stdout, buffer) = attach_output(&harness, &runner, "stdout");
    harness.server.take().unwrap().stop();
    // No exit message: the connection just ends.
    let mut rest = std::mem::take(&mut runner.buffer);
    runner.stream.read_to_end(&mut rest).unwrap();
    assert!(find(&rest, b"exit_status").is_none(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(read_output(stdout, buffer), b"");
    assert!(!harness.runtime.calls().iter().any(|call| call.starts_with("destroy")), "containers survive a stop");
}

/// Returns the stdout byte count the process actor `process_id` has taken
/// from its shim, from the debug snapshot.
fn stdout_bytes_taken(harness: &Harness, process_id: &str) -> u64 {
    let snapshot = harness.introspect();
    for container in snapshot["registry"]["containers"].as_array().unwrap() {
        for process in container["container"]["processes"].as_array().unwrap() {
            if process["process_id"] == process_id {
                return process["outputs"][0]["total_bytes"].as_u64().unwrap();
            }
        }
    }
    panic!("process {process_id} not in snapshot {snapshot}");
}

#[test]
fn slow_reader_applies_backpressure() {
    let harness = harness_with_container();
    let chunk = bytes::Bytes::from(vec![b'y'; 64 * 1024]);
    let mut flood: Vec<Action> = (0..100).map(|_| Action::Stdout(chunk.clone())).collect();
    flood.push(Action::Exit(0));
    harness.runtime.script_path(
        "flood",
        ProcessScript { on_stdin: vec![(bytes::Bytes::from_static(b"go"), flood)], ..ProcessScript::default() },
    );
    let mut connection = run(&harness, "h", r#"{"id":"flood","path":"flood","rlimits":{},"image":{}}"#);
    let (stdout, buffer) = attach_output(&harness, &connection, "stdout");
    connection.send_stdin("go");
    std::thread::sleep(Duration::from_millis(500));
    let taken = stdout_bytes_taken(&harness, "flood");
    assert!(taken < 100 * 64 * 1024, "the shim was read to the end ({taken} bytes) while the reader read nothing");
    let output = read_output(stdout, buffer);
    assert_eq!(output.len(), 100 * 64 * 1024, "nothing is dropped while a reader is attached");
    connection.expect_exit(0);
}

#[test]
fn unattached_output_is_bounded_and_never_blocks() {
    let harness = harness_with_container();
    // More than the stream's reserved reader queues: once the reservation
    // for the never-attached output lapses, the rest goes to the ring.
    let mut actions: Vec<Action> = (0..48u8).map(|i| Action::Stdout(bytes::Bytes::from(vec![b'a' + i; 64 * 1024]))).collect();
    actions.push(Action::Exit(0));
    harness.runtime.script_path("noisy", ProcessScript { on_start: actions, ..ProcessScript::default() });
    let started = std::time::Instant::now();
    let mut connection = run(&harness, "h", r#"{"path":"noisy","rlimits":{},"image":{}}"#);
    // No reader is attached, so the process runs to its exit after the
    // reservation has lapsed.
    connection.expect_exit(0);
    assert!(started.elapsed() >= trellis::actors::process::EXPECTED_ATTACH_WAIT, "the reservation held the output first");
    let (stdout, buffer) = attach_output(&harness, &connection, "stdout");
    let output = read_output(stdout, buffer);
    let kept = trellis::actors::process::UNATTACHED_BUFFER_BYTES;
    assert_eq!(output.len(), kept, "the most recent output is kept");
    assert!(output.ends_with(&vec![b'a' + 47; 64 * 1024]), "the newest chunk is kept");
}

#[test]
fn output_before_late_attach_is_complete() {
    let harness = harness_with_container();
    // 1 MiB written at once, before the client attaches stdout: the stream's
    // reserved reader keeps all of it, more than the ring buffer holds.
    let actions: Vec<Action> = (0..16u8)
        .map(|i| Action::Stdout(bytes::Bytes::from(vec![b'a' + i; 64 * 1024])))
        .chain([Action::Exit(0)])
        .collect();
    harness.runtime.script_path("burst", ProcessScript { on_start: actions, ..ProcessScript::default() });
    let mut connection = run(&harness, "h", r#"{"path":"burst","rlimits":{},"image":{}}"#);
    connection.expect_exit(0);
    let (stdout, buffer) = attach_output(&harness, &connection, "stdout");
    let output = read_output(stdout, buffer);
    assert_eq!(output.len(), 16 * 64 * 1024, "every byte written before the attach arrives");
    assert!(output.starts_with(&vec![b'a'; 64 * 1024]), "the oldest chunk comes first");
}

#[test]
fn run_body_split_across_writes() {
    let harness = harness_with_container();
    harness.runtime.script_path("cat", cat_script());
    let body = r#"{"path":"cat","rlimits":{},"image":{}}"#;
    let head = format!("POST /containers/h/processes HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n", body.len());
    let mut stream = harness.connect();
    stream.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    stream.write_all(&body.as_bytes()[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    stream.write_all(&body.as_bytes()[10..]).unwrap();
    let mut buffer = Vec::new();
    let response_head = read_until(&mut stream, &mut buffer, b"\r\n\r\n");
    assert!(response_head.starts_with(b"HTTP/1.1 201 Created\r\n"), "{}", String::from_utf8_lossy(&response_head));
    let handshake: serde_json::Value = serde_json::from_slice(&read_until(&mut stream, &mut buffer, b"\n")).unwrap();
    let process_id = handshake["process_id"].as_str().unwrap().to_string();
    let stream_id = handshake["stream_id"].as_str().unwrap().to_string();
    let mut connection = ProcessConnection { stream, buffer, head: response_head, process_id, stream_id };
    connection.close_stdin();
    connection.expect_exit(0);
}

#[test]
fn attach_on_unknown_container_is_404() {
    let harness = harness_with_container();
    let response = failed_process_request(&harness, "GET /containers/nope/processes/p HTTP/1.1\r\nHost: api\r\n\r\n");
    assert_eq!(response.assert_envelope(404, "ContainerNotFoundError")["Handle"], "nope");
}

/// Returns the sorted ids of the process records container `handle` keeps,
/// from the debug snapshot.
fn kept_process_ids(harness: &Harness, handle: &str) -> Vec<String> {
    let snapshot = harness.introspect();
    let containers = snapshot["registry"]["containers"].as_array().expect("containers in the snapshot");
    let container = containers
        .iter()
        .find(|container| container["container"]["handle"] == handle)
        .unwrap_or_else(|| panic!("container {handle} not in snapshot {snapshot}"));
    let mut ids: Vec<String> = container["container"]["processes"]
        .as_array()
        .expect("processes in the snapshot")
        .iter()
        .map(|process| process["process_id"].as_str().unwrap_or_else(|| panic!("process without an id: {process}")).to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn finished_records_capped_in_snapshot() {
    const MAX_FINISHED: usize = 4;
    const RUNS: usize = 30;
    let harness = Harness::start_with(|config| config.max_finished_processes = MAX_FINISHED);
    harness.create(r#"{"handle":"h"}"#);
    harness.runtime.script_path("cat", cat_script());
    harness.runtime.script_path("quick", ProcessScript { on_start: vec![Action::Exit(3)], ..ProcessScript::default() });

    // A running process never counts against the maximum.
    let mut running = run(&harness, "h", r#"{"id":"running","path":"cat","rlimits":{},"image":{}}"#);
    for number in 0..RUNS {
        let mut connection = run(&harness, "h", &format!(r#"{{"id":"quick-{number:02}","path":"quick","rlimits":{{}},"image":{{}}}}"#));
        connection.expect_exit(3);
    }
    let mut expected: Vec<String> = (RUNS - MAX_FINISHED..RUNS).map(|number| format!("quick-{number:02}")).collect();
    expected.push("running".into());
    expected.sort();
    assert_eq!(kept_process_ids(&harness, "h"), expected);

    let response = failed_process_request(&harness, "GET /containers/h/processes/quick-00 HTTP/1.1\r\nHost: api\r\n\r\n");
    assert_eq!(response.assert_envelope(404, "ProcessNotFoundError")["ProcessID"], "quick-00");
    let mut newest = attach(&harness, "h", &format!("quick-{:02}", RUNS - 1));
    newest.expect_exit(3);

    // Once the running process finishes, it pushes out the oldest kept one.
    running.close_stdin();
    running.expect_exit(0);
    let mut expected: Vec<String> = (RUNS - MAX_FINISHED + 1..RUNS).map(|number| format!("quick-{number:02}")).collect();
    expected.push("running".into());
    expected.sort();
    assert_eq!(kept_process_ids(&harness, "h"), expected);
}

#[test]
fn late_output_attach_after_record_dropped() {
    // Both ways a record goes: forgotten once its exit status was sent,
    // and pushed out by a newer finished process.
    let adjustments: [(&str, fn(&mut trellis::config::Config)); 2] = [
        ("cleanup-process-dirs-on-wait", |config| config.cleanup_process_dirs_on_wait = true),
        ("max-finished-processes = 1", |config| config.max_finished_processes = 1),
    ];
    for (setting, adjust) in adjustments {
        let harness = Harness::start_with(adjust);
        harness.create(r#"{"handle":"h"}"#);
        harness.runtime.script_path("fast", ProcessScript::output_then_exit(b"late reader\n", 0));
        let mut first = run(&harness, "h", r#"{"id":"first","path":"fast","rlimits":{},"image":{}}"#);
        first.expect_exit(0);
        let mut second = run(&harness, "h", r#"{"id":"second","path":"fast","rlimits":{},"image":{}}"#);
        second.expect_exit(0);
        assert!(!kept_process_ids(&harness, "h").contains(&"first".to_string()), "{setting}: the first record is still kept");

        // The Run's own stdout connection arrives after the record was
        // dropped and still receives the output.
        let (stdout, buffer) = attach_output(&harness, &first, "stdout");
        assert_eq!(read_output(stdout, buffer), b"late reader\n", "{setting}");
    }
}
