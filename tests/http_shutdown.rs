//! Graceful stop of `trellis server`: after SIGTERM or SIGINT it accepts
//! no new connection, lets a request in flight finish and exits 0. Uses
//! the in-memory runtime, so it needs no container support, only the
//! right to create a network namespace.

#[path = "http_support.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// Starts a memory-runtime server on a Unix socket in `directory` and
/// waits until it accepts connections.
fn start_server(directory: &Path) -> (Child, std::path::PathBuf) {
    let socket = directory.join("garden.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["server", "--runtime", "memory", "--log-level", "info", "--bind-socket"])
        .arg(&socket)
        .arg("--depot")
        .arg(directory.join("depot"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server socket did not appear within 20 seconds");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, socket)
}

/// Sends one request and returns the whole reply.
fn exchange(socket: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(support::READ_TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    String::from_utf8_lossy(&reply).into_owned()
}

/// Builds a tar archive with one 64 KiB file.
fn small_archive() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let data = vec![b'x'; 64 * 1024];
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, "payload.bin", data.as_slice()).unwrap();
    builder.into_inner().unwrap()
}

/// Waits for the server to exit, killing it after 30 seconds.
fn wait_for_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not exit within 30 seconds of the stop signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn request_in_flight_finishes(signal: Signal) {
    support::enter_private_network();
    let directory = tempfile::Builder::new().prefix("trellis-test-shutdown").tempdir().unwrap();
    let (mut child, socket) = start_server(directory.path());
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);

    let created = exchange(
        &socket,
        b"POST /containers HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"handle\":\"kept-1\"}",
    );
    assert!(created.starts_with("HTTP/1.1 200 OK\r\n"), "{created}");

    // Send the head and half of the body, so the request is in flight
    // when the signal arrives.
    let archive = small_archive();
    let (first, rest) = archive.split_at(archive.len() / 2);
    let mut in_flight = UnixStream::connect(&socket).unwrap();
    in_flight.set_read_timeout(Some(support::READ_TIMEOUT)).unwrap();
    let head = format!(
        "PUT /containers/kept-1/files?destination=/data HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        archive.len()
    );
    in_flight.write_all(head.as_bytes()).unwrap();
    in_flight.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    nix::sys::signal::kill(pid, signal).unwrap();
    // The listener closes at once; poll until a new connection fails.
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_ok() {
        assert!(Instant::now() < deadline, "the server still accepts connections 10 seconds after {signal}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "the server exited before the request in flight finished");

    in_flight.write_all(rest).unwrap();
    let mut reply = Vec::new();
    in_flight.read_to_end(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "the request in flight got: {reply}");

    let status = wait_for_exit(&mut child);
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(status.success(), "exit {status:?}, log {log}");
    assert!(log.contains(&format!("\"signal\":\"{signal}\"")), "{log}");
    assert!(!log.contains("\"route\":\"Destroy\""), "a stop must not destroy containers: {log}");
}

#[test]
fn sigterm_lets_request_finish() {
    request_in_flight_finishes(Signal::SIGTERM);
}

#[test]
fn sigint_lets_request_finish() {
    request_in_flight_finishes(Signal::SIGINT);
}

#[test]
fn stalled_request_does_not_block_stop() {
    support::enter_private_network();
    let directory = tempfile::Builder::new().prefix("trellis-test-shutdown").tempdir().unwrap();
    let (mut child, socket) = start_server(directory.path());
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);

    let created = exchange(
        &socket,
        b"POST /containers HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"handle\":\"stall-1\"}",
    );
    assert!(created.starts_with("HTTP/1.1 200 OK\r\n"), "{created}");

    // A body that never arrives: the server waits for it only until its
    // stop timeout, then closes the connection and exits.
    let mut stalled = UnixStream::connect(&socket).unwrap();
    stalled
        .write_all(b"PUT /containers/stall-1/files?destination=/data HTTP/1.1\r\nHost: api\r\nContent-Length: 1048576\r\n\r\npartial")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();

    let status = wait_for_exit(&mut child);
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(status.success(), "exit {status:?}, log {log}");
    stalled.set_read_timeout(Some(support::READ_TIMEOUT)).unwrap();
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"), "the stalled request was served");
}

/// Returns the inode and change time of the file at `path`, if it exists:
/// a new file may reuse an old one's inode number.
fn inode(path: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|metadata| (metadata.ino(), metadata.ctime(), metadata.ctime_nsec()))
}

/// Kills and reaps a server that a failing test left running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn stop_keeps_socket_of_newer_server() {
    support::enter_private_network();
    let directory = tempfile::Builder::new().prefix("trellis-test-shutdown").tempdir().unwrap();
    let (first, socket) = start_server(directory.path());
    let mut first = KillOnDrop(first);
    let first_socket = inode(&socket).expect("the first server's socket file");

    // A second server on the same path replaces the socket file while the
    // first still runs, as an upgrade that starts the new server first does.
    let second = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["server", "--runtime", "memory", "--log-level", "info", "--bind-socket"])
        .arg(&socket)
        .arg("--depot")
        .arg(directory.path().join("second-depot"))
        .args(["--debug-bind-port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut second = KillOnDrop(second);
    let deadline = Instant::now() + Duration::from_secs(20);
    while inode(&socket) == Some(first_socket) || inode(&socket).is_none() {
        assert!(Instant::now() < deadline, "the second server did not bind the socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.0.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_for_exit(&mut first.0).success());
    assert!(inode(&socket).is_some(), "the stopping server removed the newer server's socket");
    let reply = exchange(&socket, b"GET /ping HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(second.0.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_for_exit(&mut second.0).success());
    assert!(inode(&socket).is_none(), "the last server left its socket file");
}
