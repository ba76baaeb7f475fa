//! Client tests against canned server bytes: the golden Garden wire
//! transcripts (captured between the Go client and the Go server).
//!
//! A small TCP server plays the server's side of one transcript: it checks
//! each request and message the client sends against the Go client's bytes
//! (request line exactly, JSON bodies by meaning, other bodies byte for
//! byte) and answers with the Go server's bytes. The client makes the call
//! that the transcript records, and the test checks what the call returned.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};

use super::http::{self, BodyReader, ResponseFraming};
use super::{Client, ClientError, ProcessIo, Signal, Target};
use crate::api::{self, ContainerSpec, NetOutRule, ProcessSpec, Properties};

/// How long any single step of a replay may take before the test fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ClientToServer,
    ServerToClient,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Open(usize),
    Data {
        connection: usize,
        direction: Direction,
        bytes: Vec<u8>,
    },
    Eof {
        connection: usize,
        direction: Direction,
    },
    LeftOpen,
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/wire")
}

/// Parses a transcript file (format 1 of the fixtures' README).
fn parse_transcript(name: &str) -> Vec<Event> {
    let path = fixtures_dir().join(format!("{name}.txt"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read transcript {}: {error}", path.display()));
    let mut lines = text.lines().filter(|line| !line.is_empty() && !line.starts_with('#'));
    let mut events = Vec::new();
    while let Some(line) = lines.next() {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            [">>>", "end"] => return events,
            [">>>", "conn", number, "open"] => events.push(Event::Open(number.parse().unwrap())),
            [">>>", "conn", _, "left-open"] => events.push(Event::LeftOpen),
            [">>>", "conn", number, direction, rest @ ..] => {
                let connection = number.parse().unwrap();
                let direction = match *direction {
                    "client->server" => Direction::ClientToServer,
                    "server->client" => Direction::ServerToClient,
                    other => panic!("{name}: unknown direction {other}"),
                };
                match rest {
                    ["eof"] => events.push(Event::Eof { connection, direction }),
                    [length, "bytes"] => {
                        let literal = lines.next().expect("byte line after a data header");
                        let decoded: String = serde_json::from_str(literal).unwrap();
                        // Each character is one byte (code points up to U+00FF).
                        let bytes: Vec<u8> = decoded.chars().map(|character| character as u32 as u8).collect();
                        assert_eq!(bytes.len(), length.parse::<usize>().unwrap(), "{name}: byte count");
                        events.push(Event::Data {
                            connection,
                            direction,
                            bytes,
                        });
                    }
                    _ => panic!("{name}: malformed line {line:?}"),
                }
            }
            _ => panic!("{name}: malformed line {line:?}"),
        }
    }
    panic!("{name}: transcript has no end line, so it is truncated");
}

/// A request as the replay server compares it.
#[derive(Debug, PartialEq)]
struct ParsedRequest {
    method: String,
    target: String,
    connection_close: bool,
    json: bool,
    body: Vec<u8>,
}

/// Parses one complete request from the start of `buffer` and removes it,
/// reading more from `reader` as needed.
async fn read_request<R: tokio::io::AsyncRead + Unpin>(reader: &mut R, buffer: &mut BytesMut) -> ParsedRequest {
    let (method, target, headers) = loop {
        let mut header_slots = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut header_slots);
        if let httparse::Status::Complete(length) = request.parse(buffer).expect("valid request head") {
            let headers: Vec<(String, String)> = request
                .headers
                .iter()
                .map(|header| (header.name.to_ascii_lowercase(), String::from_utf8_lossy(header.value).into_owned()))
                .collect();
            let parsed = (request.method.unwrap().to_string(), request.path.unwrap().to_string(), headers);
            bytes::Buf::advance(buffer, length);
            break parsed;
        }
        let read = http::fill(reader, buffer).await.unwrap();
        assert!(read > 0, "connection closed inside a request head");
    };
    let header = |name: &str| headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone());
    let framing = if header("transfer-encoding").is_some_and(|value| value.contains("chunked")) {
        ResponseFraming::Chunked
    } else {
        ResponseFraming::Length(header("content-length").map_or(0, |value| value.parse().unwrap()))
    };
    let mut body_reader = BodyReader::new(reader, std::mem::take(buffer), framing);
    let body = body_reader.read_to_end(1 << 24).await.unwrap();
    let (_, rest) = body_reader.into_parts();
    *buffer = rest;
    ParsedRequest {
        method,
        target,
        connection_close: header("connection").is_some_and(|value| value.eq_ignore_ascii_case("close")),
        json: header("content-type").is_some_and(|value| value == "application/json"),
        body,
    }
}

/// Parses every JSON value in `bytes`.
fn json_values(bytes: &[u8]) -> Vec<Value> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Value>()
        .map(|value| value.expect("transcript message is JSON"))
        .collect()
}

struct ReplayConnection {
    stream: TcpStream,
    buffer: BytesMut,
    requested: bool,
}

/// Plays the server side of `events` on `listener`, checking what the client
/// sends. Panics at the first difference.
async fn serve_transcript(name: &'static str, listener: TcpListener, events: Vec<Event>) {
    let mut connections: HashMap<usize, ReplayConnection> = HashMap::new();
    for event in events {
        match event {
            Event::Open(number) => {
                let (stream, _) = step(name, "accept", listener.accept()).await.unwrap();
                connections.insert(
                    number,
                    ReplayConnection {
                        stream,
                        buffer: BytesMut::new(),
                        requested: false,
                    },
                );
            }
            Event::Data {
                connection,
                direction: Direction::ClientToServer,
                bytes,
            } => {
                let state = connections.get_mut(&connection).expect("data on an open connection");
                if state.requested {
                    check_messages(name, state, &bytes).await;
                } else {
                    check_request(name, state, &bytes).await;
                    state.requested = true;
                }
            }
            Event::Data {
                connection,
                direction: Direction::ServerToClient,
                bytes,
            } => {
                let state = connections.get_mut(&connection).expect("data on an open connection");
                state.stream.write_all(&bytes).await.unwrap();
            }
            Event::Eof {
                connection,
                direction: Direction::ServerToClient,
            } => {
                let state = connections.get_mut(&connection).expect("eof on an open connection");
                state.stream.shutdown().await.unwrap();
            }
            // When the client closes is not fixed across runs (fixtures
            // README, "Ordering"), and a left-open connection carries no
            // protocol behaviour.
            Event::Eof { .. } | Event::LeftOpen => {}
        }
    }
}

async fn step<F: std::future::Future>(name: &str, what: &str, future: F) -> F::Output {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{name}: timed out waiting for {what}"))
}

async fn check_request(name: &'static str, state: &mut ReplayConnection, expected_bytes: &[u8]) {
    let expected = read_request(&mut &expected_bytes[..], &mut BytesMut::new()).await;
    let actual = step(name, "the request", read_request(&mut state.stream, &mut state.buffer)).await;
    assert_eq!(actual.method, expected.method, "{name}: method");
    assert_eq!(actual.target, expected.target, "{name}: request target");
    assert_eq!(actual.connection_close, expected.connection_close, "{name}: Connection: close");
    if expected.json && !expected.body.is_empty() {
        assert!(actual.json, "{name}: JSON body without Content-Type application/json");
        assert_eq!(json_values(&actual.body), json_values(&expected.body), "{name}: JSON body");
    } else {
        assert_eq!(actual.body, expected.body, "{name}: body bytes");
    }
}

async fn check_messages(name: &'static str, state: &mut ReplayConnection, expected_bytes: &[u8]) {
    for expected in json_values(expected_bytes) {
        let actual = step(name, "a process message", async {
            loop {
                if let Some((value, used)) = api::parse_stream_value(&state.buffer).unwrap() {
                    bytes::Buf::advance(&mut state.buffer, used);
                    return value;
                }
                let read = http::fill(&mut state.stream, &mut state.buffer).await.unwrap();
                assert!(read > 0, "{name}: connection closed before message {expected}");
            }
        })
        .await;
        assert_eq!(actual, expected, "{name}: process message");
    }
}

/// Starts the replay server for transcript `name` and returns a client for it
/// and the server task.
async fn replay(name: &'static str) -> (Client, tokio::task::JoinHandle<()>) {
    let events = parse_transcript(name);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = Target::Tcp(listener.local_addr().unwrap().to_string());
    let server = tokio::spawn(serve_transcript(name, listener, events));
    (Client::new(target), server)
}

/// Returns the body of the first request of connection 1 in `name`.
async fn request_body(name: &str) -> Vec<u8> {
    let first = parse_transcript(name)
        .into_iter()
        .find_map(|event| match event {
            Event::Data {
                direction: Direction::ClientToServer,
                bytes,
                ..
            } => Some(bytes),
            _ => None,
        })
        .unwrap();
    read_request(&mut &first[..], &mut BytesMut::new()).await.body
}

/// Returns the de-framed body of the first response in `name`.
async fn response_body(name: &str) -> Vec<u8> {
    let first = parse_transcript(name)
        .into_iter()
        .find_map(|event| match event {
            Event::Data {
                direction: Direction::ServerToClient,
                bytes,
                ..
            } => Some(bytes),
            _ => None,
        })
        .unwrap();
    let mut reader = &first[..];
    let mut buffer = BytesMut::new();
    let head = http::read_head(&mut reader, &mut buffer, name).await.unwrap();
    let mut body = BodyReader::new(reader, buffer, head.framing().unwrap());
    body.read_to_end(1 << 24).await.unwrap()
}

async fn finish(server: tokio::task::JoinHandle<()>) {
    step("replay", "the replay server to finish", server).await.unwrap();
}

fn output_pipe() -> (Box<DuplexStream>, DuplexStream) {
    let (writer, reader) = tokio::io::duplex(1 << 16);
    (Box::new(writer), reader)
}

async fn read_exact_text(reader: &mut DuplexStream, length: usize) -> String {
    let mut bytes = vec![0; length];
    step("replay", "process output", reader.read_exact(&mut bytes)).await.unwrap();
    String::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn transcripts_are_present() {
    let count = std::fs::read_dir(fixtures_dir())
        .expect("the wire transcripts are in ../shared/fixtures/wire")
        .filter(|entry| entry.as_ref().unwrap().path().extension().is_some_and(|ext| ext == "txt"))
        .count();
    assert_eq!(count, 37);
}

#[tokio::test]
async fn replay_ping_and_capacity() {
    let (client, server) = replay("01-ping").await;
    client.ping().await.unwrap();
    finish(server).await;

    let (client, server) = replay("02-capacity").await;
    let capacity = client.capacity().await.unwrap();
    assert_eq!(capacity.memory_in_bytes, 17179869184);
    assert_eq!(capacity.disk_in_bytes, 107374182400);
    assert_eq!(capacity.schedulable_disk_in_bytes, 96636764160);
    assert_eq!(capacity.max_containers, 250);
    finish(server).await;
}

#[tokio::test]
async fn replay_create_and_duplicate() {
    let spec: ContainerSpec = api::decode(&request_body("03-create").await).unwrap();
    let (client, server) = replay("03-create").await;
    assert_eq!(client.create(&spec).await.unwrap(), "web-1");
    finish(server).await;

    let (client, server) = replay("04-create-duplicate-handle").await;
    let error = client.create(&spec).await.unwrap_err();
    assert!(matches!(&error, ClientError::Server { status: 500, .. }), "{error:?}");
    assert_eq!(error.to_string(), "Handle 'web-1' already in use");
    finish(server).await;
}

#[tokio::test]
async fn replay_list_and_lookup() {
    let (client, server) = replay("05-containers").await;
    assert_eq!(client.list(&Properties::new()).await.unwrap(), ["web-1", "worker-2"]);
    finish(server).await;

    let (client, server) = replay("06-containers-filtered").await;
    let filter = Properties::from([("team".into(), "platform".into()), ("tier".into(), "web".into())]);
    assert_eq!(client.list(&filter).await.unwrap(), ["web-1"]);
    finish(server).await;

    let (client, server) = replay("07-lookup").await;
    client.lookup("web-1").await.unwrap();
    finish(server).await;

    let (client, server) = replay("08-lookup-unknown").await;
    let error = client.lookup("missing-9").await.unwrap_err();
    assert!(matches!(&error, ClientError::ContainerNotFound { handle } if handle == "missing-9"));
    finish(server).await;
}

#[tokio::test]
async fn replay_info_and_bulk() {
    let (client, server) = replay("09-info").await;
    let info = client.info("web-1").await.unwrap();
    assert_eq!(info.state, "active");
    let ports = info.mapped_ports.unwrap();
    assert_eq!((ports[0].host_port, ports[0].container_port), (61001, 8080));
    finish(server).await;

    let (client, server) = replay("10-info-unknown").await;
    let error = client.info("missing-9").await.unwrap_err();
    assert!(matches!(&error, ClientError::ContainerNotFound { handle } if handle == "missing-9"));
    finish(server).await;

    let (client, server) = replay("11-bulk-info").await;
    let entries = client.bulk_info(&["web-1", "missing-9"]).await.unwrap();
    assert!(entries["web-1"].err.is_none());
    assert_eq!(entries["web-1"].info.state, "active");
    let missing = entries["missing-9"].err.as_ref().expect("an error for missing-9");
    assert!(missing.message.contains("missing-9"), "{missing:?}");
    finish(server).await;

    let (client, server) = replay("12-bulk-metrics").await;
    let entries = client.bulk_metrics(&["web-1", "worker-2"]).await.unwrap();
    assert!(entries["web-1"].err.is_none());
    assert!(entries["web-1"].metrics.network_stat.is_some());
    assert!(entries["worker-2"].metrics.network_stat.is_none());
    finish(server).await;
}

#[tokio::test]
async fn replay_stream_in_and_out() {
    let archive = request_body("13-stream-in").await;
    assert_eq!(archive.len(), 2048);
    let (client, server) = replay("13-stream-in").await;
    client
        .stream_in("web-1", "/home/vcap/app", "vcap", &mut &archive[..])
        .await
        .unwrap();
    finish(server).await;

    let expected = response_body("14-stream-out").await;
    assert_eq!(expected.len(), 3584);
    let (client, server) = replay("14-stream-out").await;
    let mut stream = client.stream_out("web-1", "/home/vcap/logs/", "vcap").await.unwrap();
    let mut received = Vec::new();
    stream.read_to_end(&mut received).await.unwrap();
    assert_eq!(received, expected);
    finish(server).await;
}

#[tokio::test]
async fn replay_limits_and_metrics() {
    let (client, server) = replay("15-current-bandwidth-limits").await;
    let limits = client.bandwidth_limits("web-1").await.unwrap();
    assert_eq!((limits.rate, limits.burst), (1048576, 2097152));
    finish(server).await;

    let (client, server) = replay("16-current-cpu-limits").await;
    assert_eq!(client.cpu_limits("web-1").await.unwrap().weight, 512);
    finish(server).await;

    let (client, server) = replay("17-current-disk-limits").await;
    let limits = client.disk_limits("web-1").await.unwrap();
    assert_eq!((limits.inode_hard, limits.byte_hard, limits.scope), (200000, 1073741824, 1));
    finish(server).await;

    let (client, server) = replay("18-current-memory-limits").await;
    assert_eq!(client.memory_limits("web-1").await.unwrap().limit_in_bytes, 268435456);
    finish(server).await;

    let expected: crate::api::Metrics = api::decode(&response_body("28-metrics").await).unwrap();
    let (client, server) = replay("28-metrics").await;
    assert_eq!(client.metrics("web-1").await.unwrap(), expected);
    finish(server).await;
}

#[tokio::test]
async fn replay_network_routes() {
    let (client, server) = replay("19-net-in").await;
    let ports = client.net_in("web-1", 0, 8080).await.unwrap();
    assert_eq!((ports.host_port, ports.container_port), (61001, 8080));
    finish(server).await;

    for name in ["20-net-out-tcp", "21-net-out-icmp"] {
        let rule: NetOutRule = api::decode(&request_body(name).await).unwrap();
        let (client, server) = replay(name).await;
        client.net_out("web-1", &rule).await.unwrap();
        finish(server).await;
    }

    let rules: Vec<NetOutRule> = api::decode(&request_body("22-bulk-net-out").await).unwrap();
    assert_eq!(rules.len(), 3);
    let (client, server) = replay("22-bulk-net-out").await;
    client.bulk_net_out("web-1", &rules).await.unwrap();
    finish(server).await;
}

#[tokio::test]
async fn replay_grace_time_and_properties() {
    let (client, server) = replay("23-set-grace-time").await;
    client.set_grace_time("web-1", Duration::from_secs(600)).await.unwrap();
    finish(server).await;

    let (client, server) = replay("24-properties").await;
    let properties = client.properties("web-1").await.unwrap();
    assert_eq!(properties.get("team").map(String::as_str), Some("platform"));
    assert_eq!(properties.get("tier").map(String::as_str), Some("web"));
    finish(server).await;

    let (client, server) = replay("25-property").await;
    assert_eq!(client.property("web-1", "tier").await.unwrap(), "web");
    finish(server).await;

    let (client, server) = replay("26-set-property").await;
    client.set_property("web-1", "release", "v1.4.2").await.unwrap();
    finish(server).await;

    let (client, server) = replay("27-remove-property").await;
    client.remove_property("web-1", "release").await.unwrap();
    finish(server).await;
}

#[tokio::test]
async fn replay_run_with_stdio() {
    let spec: ProcessSpec = api::decode(&request_body("29-run").await).unwrap();
    let (client, server) = replay("29-run").await;
    let (stdout_writer, mut stdout) = output_pipe();
    let (stderr_writer, mut stderr) = output_pipe();
    let io = ProcessIo {
        stdin: None,
        stdout: Some(stdout_writer),
        stderr: Some(stderr_writer),
    };
    let mut process = client.run("web-1", &spec, io).await.unwrap();
    assert_eq!(process.id(), "3f6b1c2e-9a4d-4e8b-b7c5-2d1e0f9a8b7c");
    assert_eq!(process.stream_id(), "1");

    process.write_stdin(b"ping\n").await.unwrap();
    assert_eq!(read_exact_text(&mut stdout, 5).await, "ping\n");
    process.signal(Signal::Terminate).await.unwrap();
    assert_eq!(read_exact_text(&mut stderr, 5).await, "term\n");
    process.resize(132, 43).await.unwrap();
    process.close_stdin().await.unwrap();
    assert_eq!(read_exact_text(&mut stderr, 5).await, "done\n");

    assert_eq!(step("29-run", "wait", process.wait()).await.unwrap(), 3);
    drop(process);
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "unexpected stdout {rest:?}");
    finish(server).await;
}

#[tokio::test]
async fn replay_run_with_tty() {
    let spec: ProcessSpec = api::decode(&request_body("30-run-tty").await).unwrap();
    assert!(spec.tty.is_some());
    let (client, server) = replay("30-run-tty").await;
    let (stdout_writer, mut stdout) = output_pipe();
    let (stderr_writer, mut stderr) = output_pipe();
    let io = ProcessIo {
        stdin: None,
        stdout: Some(stdout_writer),
        stderr: Some(stderr_writer),
    };
    let mut process = client.run("web-1", &spec, io).await.unwrap();
    assert_eq!(process.id(), "tty-shell-1");
    assert_eq!(step("30-run-tty", "wait", process.wait()).await.unwrap(), 0);
    drop(process);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    stdout.read_to_end(&mut out).await.unwrap();
    stderr.read_to_end(&mut err).await.unwrap();
    assert_eq!(out, b"24 80\r\n");
    assert!(err.is_empty());
    finish(server).await;
}

#[tokio::test]
async fn replay_attach_and_kill() {
    let (client, server) = replay("31-attach").await;
    let (stdout_writer, mut stdout) = output_pipe();
    let (stderr_writer, mut stderr) = output_pipe();
    let io = ProcessIo {
        stdin: None,
        stdout: Some(stdout_writer),
        stderr: Some(stderr_writer),
    };
    let process_id = "8c0d4f2a-5e6b-4a7c-9d1e-0b2f3a4c5d6e";
    let mut process = client.attach("web-1", process_id, io).await.unwrap();
    assert_eq!(process.id(), process_id);
    assert_eq!(process.stream_id(), "3");
    assert_eq!(read_exact_text(&mut stdout, 17).await, "GET /healthz 200\n");
    assert_eq!(read_exact_text(&mut stderr, 19).await, "slow request: 1.2s\n");
    process.signal(Signal::Kill).await.unwrap();
    assert_eq!(step("31-attach", "wait", process.wait()).await.unwrap(), 137);
    finish(server).await;
}

#[tokio::test]
async fn replay_process_errors() {
    let (client, server) = replay("32-attach-unknown-process").await;
    let (stdout_writer, _stdout) = output_pipe();
    let io = ProcessIo {
        stdout: Some(stdout_writer),
        ..ProcessIo::default()
    };
    let error = client.attach("web-1", "idontexist", io).await.err().expect("attach fails");
    assert!(matches!(&error, ClientError::ProcessNotFound { process_id } if process_id == "idontexist"));
    finish(server).await;

    let spec: ProcessSpec = api::decode(&request_body("33-run-executable-not-found").await).unwrap();
    let (client, server) = replay("33-run-executable-not-found").await;
    let error = client.run("web-1", &spec, ProcessIo::default()).await.err().expect("run fails");
    let ClientError::ExecutableNotFound { message } = &error else {
        panic!("expected ExecutableNotFound, got {error:?}");
    };
    assert!(message.contains("/usr/local/bin/migrate-db"), "{message}");
    finish(server).await;
}

#[tokio::test]
async fn replay_stop_destroy_and_unavailable() {
    let (client, server) = replay("34-stop").await;
    client.stop("web-1", false).await.unwrap();
    finish(server).await;

    let (client, server) = replay("35-destroy").await;
    client.destroy("web-1").await.unwrap();
    finish(server).await;

    let (client, server) = replay("36-destroy-unknown").await;
    let error = client.destroy("missing-9").await.unwrap_err();
    assert_eq!(error.to_string(), "unknown handle: missing-9");
    finish(server).await;

    let (client, server) = replay("37-ping-service-unavailable").await;
    let error = client.ping().await.unwrap_err();
    assert!(
        matches!(&error, ClientError::ServiceUnavailable { cause } if cause == "backend is starting up: image store not mounted yet"),
        "{error:?}"
    );
    finish(server).await;
}

/// A server that announces `Connection: close` on a process route breaks
/// the Go client, so this client rejects it too.
#[tokio::test]
async fn hijacked_head_with_close_is_rejected() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = Client::new(Target::Tcp(listener.local_addr().unwrap().to_string()));
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let _request = read_request(&mut stream, &mut BytesMut::new()).await;
        stream
            .write_all(b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 0\r\n\r\n{\"process_id\":\"p\",\"stream_id\":\"1\"}\n")
            .await
            .unwrap();
    });
    let spec = ProcessSpec {
        path: "true".into(),
        ..ProcessSpec::default()
    };
    let error = client.run("h", &spec, ProcessIo::default()).await.err().expect("run fails");
    assert!(matches!(error, ClientError::Protocol { .. }), "{error:?}");
    finish(server).await;
}

/// The exit status arrives before the output ends; `wait` must still return
/// only after every output byte was written.
#[tokio::test]
async fn wait_returns_after_all_output() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = Client::new(Target::Tcp(listener.local_addr().unwrap().to_string()));
    let output: Vec<u8> = (0..3_000_000u32).map(|n| (n % 253) as u8).collect();
    let sent = output.clone();

    let server = tokio::spawn(async move {
        let (mut control, _) = listener.accept().await.unwrap();
        let _run = read_request(&mut control, &mut BytesMut::new()).await;
        control
            .write_all(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n{\"process_id\":\"p\",\"stream_id\":\"7\"}\n")
            .await
            .unwrap();
        let (mut stdout, _) = listener.accept().await.unwrap();
        let request = read_request(&mut stdout, &mut BytesMut::new()).await;
        assert_eq!(request.target, "/containers/h/processes/p/attaches/7/stdout");
        stdout
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        control.write_all(b"{\"process_id\":\"p\",\"exit_status\":42}\n").await.unwrap();
        control.shutdown().await.unwrap();
        stdout.write_all(&sent).await.unwrap();
        stdout.shutdown().await.unwrap();
    });

    let received = SharedOutput::default();
    let spec = ProcessSpec {
        path: "true".into(),
        ..ProcessSpec::default()
    };
    let io = ProcessIo {
        stdout: Some(Box::new(received.clone())),
        ..ProcessIo::default()
    };
    let mut process = client.run("h", &spec, io).await.unwrap();
    assert_eq!(step("synthetic", "wait", process.wait()).await.unwrap(), 42);
    // Checked right after `wait` returned, with no further reading.
    let received = received.0.lock().unwrap().clone();
    assert_eq!(received.len(), output.len());
    assert!(received == output, "output bytes differ");
    finish(server).await;
}

/// An output writer that appends to a shared buffer.
#[derive(Clone, Default)]
struct SharedOutput(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl tokio::io::AsyncWrite for SharedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        std::task::Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
