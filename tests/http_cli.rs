//! Checks of the `trellis server` command: configuration errors stop it
//! with a message naming the file and key, and SIGTERM stops a running
//! server with exit code 0.

#[path = "http_support.rs"]
mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn trellis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
}

#[test]
fn invalid_config_names_file_and_key() {
    let dir = tempfile::Builder::new().prefix("trellis-test-cli").tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "bind-port = 99999\n").unwrap();
    let output = trellis().args(["server", "--config"]).arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("bind-port"), "{stderr}");

    std::fs::write(&path, "bind-adress = \"127.0.0.1\"\n").unwrap();
    let output = trellis().args(["server", "--config"]).arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown key `bind-adress`"), "{stderr}");

    let output = trellis().args(["server", "--default-grace-time", "soon"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("command line"), "{stderr}");
    assert!(stderr.contains("default-grace-time"), "{stderr}");
}

#[test]
fn sigterm_stops_server_with_exit_zero() {
    support::enter_private_network();
    let dir = tempfile::Builder::new().prefix("trellis-test-cli").tempdir().unwrap();
    let socket = dir.path().join("garden.sock");
    let depot = dir.path().join("depot");
    let mut child = trellis()
        .args(["server", "--runtime", "memory", "--log-level", "warn", "--bind-socket"])
        .arg(&socket)
        .arg("--depot")
        .arg(&depot)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let started = Instant::now();
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(stream) => break stream,
            Err(_) if started.elapsed() < Duration::from_secs(20) => std::thread::sleep(Duration::from_millis(50)),
            Err(error) => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                panic!("server socket never appeared: {error}");
            }
        }
    };
    stream.set_read_timeout(Some(support::READ_TIMEOUT)).unwrap();
    stream.write_all(b"GET /ping HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").unwrap();
    let mut received = Vec::new();
    stream.read_to_end(&mut received).unwrap();
    assert!(received.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&received));

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "exit {status:?}, stderr {stderr}");
    assert!(!socket.exists(), "socket file removed at stop");
}
