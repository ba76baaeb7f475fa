//! End-to-end test of the README's command-line session: `trellis run`,
//! `trellis list` and `trellis destroy`, through the real `trellis` binary
//! against a real server. Needs root; see `support` for how it skips.

mod support;

use std::process::{Command, Output, Stdio};

use support::TestServer;

/// Runs the `trellis` binary with `args`, aimed at `server`'s socket
/// through `TRELLIS_TARGET`.
fn trellis(server: &TestServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("TRELLIS_TARGET", &server.socket)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("starting trellis {args:?} failed: {error}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn readme_session() {
    let Some(server) = TestServer::start("readme_session") else { return };

    let ping = trellis(&server, &["ping"]);
    assert!(ping.status.success(), "trellis ping: {}", text(&ping.stderr));

    let run = trellis(&server, &["run", "--", "echo", "hello from the container"]);
    assert_eq!(run.status.code(), Some(0), "trellis run stderr: {}", text(&run.stderr));
    assert_eq!(text(&run.stdout), "hello from the container\n");

    let list = trellis(&server, &["list", "-q"]);
    assert!(list.status.success(), "trellis list: {}", text(&list.stderr));
    let handles: Vec<String> = text(&list.stdout).lines().map(str::to_string).collect();
    assert_eq!(handles.len(), 1, "expected the container created by run, got {handles:?}");
    let handle = &handles[0];

    let created_by = trellis(&server, &["properties", "get", handle, "trellis.created-by"]);
    assert_eq!(text(&created_by.stdout), "run\n", "stderr: {}", text(&created_by.stderr));

    let destroy = trellis(&server, &["destroy", handle]);
    assert!(destroy.status.success(), "trellis destroy: {}", text(&destroy.stderr));
    let list = trellis(&server, &["list", "-q"]);
    assert_eq!(text(&list.stdout), "", "containers left after destroy");
}

#[test]
fn run_that_cannot_start_keeps_nothing() {
    let Some(server) = TestServer::start("run_that_cannot_start") else { return };

    let run = trellis(&server, &["run", "--", "no-such-command"]);
    assert_eq!(run.status.code(), Some(125), "stderr: {}", text(&run.stderr));
    assert!(
        text(&run.stderr).contains("executable file not found in $PATH"),
        "stderr: {}",
        text(&run.stderr)
    );

    let list = trellis(&server, &["list", "-q"]);
    assert!(list.status.success(), "trellis list: {}", text(&list.stderr));
    assert_eq!(text(&list.stdout), "", "the container made for the run was kept");
}

#[test]
fn cli_exit_codes_and_errors() {
    let Some(server) = TestServer::start("cli_exit_codes_and_errors") else { return };
    let handle = server.unique_handle("cli");

    let create = trellis(&server, &["create", &handle, "--property", "team=red"]);
    assert!(create.status.success(), "trellis create: {}", text(&create.stderr));
    assert_eq!(text(&create.stdout), format!("{handle}\n"));

    let run = trellis(&server, &["run", "--handle", &handle, "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(run.status.code(), Some(3));
    assert_eq!(text(&run.stdout), "out\n");
    assert_eq!(text(&run.stderr), "err\n");

    let filtered = trellis(&server, &["list", "-q", "--property", "team=red"]);
    assert_eq!(text(&filtered.stdout), format!("{handle}\n"));
    let filtered = trellis(&server, &["list", "-q", "--property", "team=blue"]);
    assert_eq!(text(&filtered.stdout), "");

    let missing = server.unique_handle("missing");
    let destroy = trellis(&server, &["destroy", &missing]);
    assert!(!destroy.status.success(), "destroying an unknown handle succeeded");
    assert!(
        text(&destroy.stderr).contains(&format!("unknown handle: {missing}")),
        "stderr: {}",
        text(&destroy.stderr)
    );

    let run = trellis(&server, &["run", "--handle", &missing, "--", "true"]);
    assert_eq!(run.status.code(), Some(125), "run in an unknown container");

    let with_rm = trellis(&server, &["run", "--rm", "--", "true"]);
    assert_eq!(with_rm.status.code(), Some(0), "stderr: {}", text(&with_rm.stderr));
    let list = trellis(&server, &["list", "-q"]);
    assert_eq!(text(&list.stdout), format!("{handle}\n"), "run --rm left its container");

    let destroy = trellis(&server, &["destroy", &handle]);
    assert!(destroy.status.success(), "trellis destroy: {}", text(&destroy.stderr));
}

/// Reads one request head and its `Content-Length` body from `stream`.
fn read_request(stream: &mut std::os::unix::net::UnixStream) -> (String, String) {
    use std::io::Read;
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "connection closed inside a request head");
        bytes.push(byte[0]);
    }
    let head = String::from_utf8(bytes).unwrap();
    let length = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_string))
        .map_or(0, |value| value.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

/// Plays a server for `trellis run -- echo hello from the container`:
/// create, run, the two attaches, then the exit status.
fn serve_canned_run(listener: std::os::unix::net::UnixListener, exit_status: i32) {
    use std::io::{Read, Write};
    let (mut create, _) = listener.accept().unwrap();
    let (head, body) = read_request(&mut create);
    assert!(head.starts_with("POST /containers HTTP/1.1\r\n"), "{head}");
    assert!(body.contains("\"trellis.created-by\":\"run\""), "{body}");
    create
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 21\r\n\r\n{\"Handle\":\"canned-1\"}\n")
        .unwrap();
    drop(create);

    let (mut control, _) = listener.accept().unwrap();
    let (head, body) = read_request(&mut control);
    assert!(head.starts_with("POST /containers/canned-1/processes HTTP/1.1\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
    let spec: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(spec["path"], "echo");
    assert_eq!(spec["args"], serde_json::json!(["hello from the container"]));
    control
        .write_all(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{\"process_id\":\"p1\",\"stream_id\":\"1\"}\n")
        .unwrap();

    let (mut stdout, _) = listener.accept().unwrap();
    let (head, _) = read_request(&mut stdout);
    assert!(head.starts_with("GET /containers/canned-1/processes/p1/attaches/1/stdout HTTP/1.1\r\n"), "{head}");
    stdout.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let (mut stderr, _) = listener.accept().unwrap();
    let (head, _) = read_request(&mut stderr);
    assert!(head.starts_with("GET /containers/canned-1/processes/p1/attaches/1/stderr HTTP/1.1\r\n"), "{head}");
    stderr.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();

    // The CLI's stdin is /dev/null, so its first message closes stdin.
    let mut message = Vec::new();
    let mut byte = [0u8; 1];
    while !message.ends_with(b"\n") {
        assert_eq!(control.read(&mut byte).unwrap(), 1, "control connection closed early");
        message.push(byte[0]);
    }
    let close: serde_json::Value = serde_json::from_slice(&message).unwrap();
    assert_eq!(close, serde_json::json!({"process_id": "p1", "source": 0}));

    stdout.write_all(b"hello from the container\n").unwrap();
    drop(stdout);
    drop(stderr);
    control
        .write_all(format!("{{\"process_id\":\"p1\",\"exit_status\":{exit_status}}}\n").as_bytes())
        .unwrap();
}

/// Checks the CLI's output and exit code against canned server bytes; needs
/// no root and no server.
#[test]
fn cli_run_against_canned_server() {
    for exit_status in [0, 3] {
        let directory = tempfile::tempdir().unwrap();
        let socket = directory.path().join("canned.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || serve_canned_run(listener, exit_status));

        let run = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["run", "--target", socket.to_str().unwrap(), "--", "echo", "hello from the container"])
            .env_remove("TRELLIS_TARGET")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        server.join().expect("the canned server's checks passed");
        assert_eq!(text(&run.stdout), "hello from the container\n");
        assert_eq!(text(&run.stderr), "");
        assert_eq!(run.status.code(), Some(exit_status));
    }
}

/// Checks that the CLI prints the server's error message and exits
/// non-zero; needs no root and no server.
#[test]
fn cli_prints_server_error() {
    use std::io::Write;
    let directory = tempfile::tempdir().unwrap();
    let socket = directory.path().join("canned.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let (head, _) = read_request(&mut stream);
        assert!(head.starts_with("DELETE /containers/nope HTTP/1.1\r\n"), "{head}");
        let body = "{\"Type\":\"ContainerNotFoundError\",\"Message\":\"unknown handle: nope\",\"Handle\":\"nope\",\"ProcessID\":\"\",\"Binary\":\"\"}\n";
        let response = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).unwrap();
    });
    let destroy = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["destroy", "nope"])
        .env("TRELLIS_TARGET", &socket)
        .output()
        .unwrap();
    server.join().expect("the canned server's checks passed");
    assert_eq!(destroy.status.code(), Some(1));
    assert_eq!(text(&destroy.stderr), "trellis: unknown handle: nope\n");
    assert_eq!(text(&destroy.stdout), "");
}

#[test]
fn stream_in_ends_when_server_killed() {
    let Some(mut server) = TestServer::start("stream_in_ends_when_server_killed") else { return };
    let handle = server.create("upload");
    let directory = tempfile::Builder::new().prefix("trellis-cli-upload").tempdir().unwrap();
    let source = directory.path().join("big.bin");
    // Incompressible bytes, large enough that the upload is still running
    // when the server is killed.
    let block: Vec<u8> = (0..1 << 20).map(|index: u32| (index.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut file = std::fs::File::create(&source).unwrap();
    for _ in 0..400 {
        std::io::Write::write_all(&mut file, &block).unwrap();
    }
    drop(file);

    let mut upload = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["stream-in", &handle])
        .arg(&source)
        .arg("/tmp/upload")
        .env("TRELLIS_TARGET", &server.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(upload.try_wait().unwrap().is_none(), "the upload ended before the server was killed");
    server.kill_server();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = upload.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = upload.kill();
            let _ = upload.wait();
            panic!("trellis stream-in kept running after its server was killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut upload.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "the upload reported success: {stderr}");
    assert!(!stderr.trim().is_empty(), "the failed upload printed no error");
}
