//! Helpers shared by the HTTP and wire replay tests: an in-process server
//! on the in-memory runtime, and raw HTTP over std sockets.
//!
//! Included by the test files with `#[path]`; as a test target of its own
//! it contains only the self-checks at the bottom.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use trellis::config::Config;
use trellis::http::TestServer;
use trellis::runtime::memory::MemoryRuntime;

/// How long a test waits for any single read.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A server on the in-memory runtime with its depot in a temporary
/// directory; both go away when this is dropped.
pub struct Harness {
    pub server: Option<TestServer>,
    pub runtime: MemoryRuntime,
    pub depot: tempfile::TempDir,
}

impl Harness {
    /// Starts a server on 127.0.0.1 port 0 after `adjust` has changed the
    /// configuration.
    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> Harness {
        enter_private_network();
        let depot = tempfile::Builder::new().prefix("trellis-test-depot").tempdir().unwrap();
        let mut config = Config {
            bind_ip: "127.0.0.1".parse().unwrap(),
            bind_port: 0,
            debug_bind_port: 0,
            depot: depot.path().to_path_buf(),
            network_pool: "10.200.0.0/22".parse().unwrap(),
            ..Config::default()
        };
        adjust(&mut config);
        let runtime = MemoryRuntime::new();
        let logger = test_logger();
        let server = TestServer::start(config, Arc::new(runtime.clone()), logger).unwrap();
        Harness { server: Some(server), runtime, depot }
    }

    pub fn start() -> Harness {
        Harness::start_with(|_| {})
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().tcp_addr()
    }

    /// Sends one plain request the way the Go client does and reads the
    /// whole response.
    pub fn request(&self, method: &str, target: &str, body: Option<&str>) -> Response {
        let mut request = format!("{method} {target} HTTP/1.1\r\nHost: api\r\nUser-Agent: Go-http-client/1.1\r\n");
        if let Some(body) = body {
            request.push_str(&format!("Content-Length: {}\r\nContent-Type: application/json\r\n", body.len()));
        }
        request.push_str("Accept-Encoding: gzip\r\nConnection: close\r\n\r\n");
        if let Some(body) = body {
            request.push_str(body);
        }
        self.raw(request.as_bytes())
    }

    /// Sends raw bytes on a new connection and reads until the server closes.
    pub fn raw(&self, bytes: &[u8]) -> Response {
        let mut stream = self.connect();
        stream.write_all(bytes).unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).unwrap();
        Response::parse(&received).unwrap_or_else(|| panic!("unparsable response {:?}", String::from_utf8_lossy(&received)))
    }

    /// Returns the actor snapshot of the debug listener.
    pub fn introspect(&self) -> serde_json::Value {
        let mut stream = TcpStream::connect(self.server.as_ref().unwrap().debug_addr()).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.write_all(b"GET /debug/introspect HTTP/1.1\r\nHost: debug\r\nConnection: close\r\n\r\n").unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).unwrap();
        let response = Response::parse(&received).unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()
    }

    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr()).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream
    }

    /// Creates a container and returns its handle.
    pub fn create(&self, body: &str) -> String {
        let response = self.request("POST", "/containers", Some(body));
        assert_eq!(response.status, 200, "create failed: {}", response.text());
        response.json()["Handle"].as_str().unwrap().to_string()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }
}

/// Moves the calling test thread into a new network namespace with only a
/// loopback interface, so the server it starts (its threads inherit the
/// namespace) has no route out of the machine. Needs CAP_SYS_ADMIN.
pub fn enter_private_network() {
    let host = std::fs::read_link("/proc/1/ns/net").ok();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("tests need CAP_SYS_ADMIN to start the server in a private network namespace");
    assert_ne!(std::fs::read_link("/proc/thread-self/ns/net").ok(), host, "the test thread is still in the host's network namespace");
    // Bring `lo` up with SIOCGIFFLAGS/SIOCSIFFLAGS; a new namespace starts
    // with it down.
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(socket >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut request: libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *slot = *byte as libc::c_char;
        }
        assert_eq!(libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request), 0, "SIOCGIFFLAGS: {}", std::io::Error::last_os_error());
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(socket, libc::SIOCSIFFLAGS, &request), 0, "SIOCSIFFLAGS: {}", std::io::Error::last_os_error());
        libc::close(socket);
    }
}

/// Returns a logger that prints when `TRELLIS_TEST_LOG` is set and
/// discards otherwise.
pub fn test_logger() -> slog::Logger {
    use slog::Drain;
    if std::env::var_os("TRELLIS_TEST_LOG").is_some() {
        let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
        let drain = slog_term::FullFormat::new(decorator).build().fuse();
        slog::Logger::root(drain, slog::o!())
    } else {
        slog::Logger::root(slog::Discard, slog::o!())
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status_line: String,
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when it was chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// Parses a complete response (head and body).
    pub fn parse(bytes: &[u8]) -> Option<Response> {
        let head_end = find(bytes, b"\r\n\r\n")?;
        let head = std::str::from_utf8(&bytes[..head_end]).ok()?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next()?.to_string();
        let status = status_line.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap_or((line, ""));
                (name.trim().to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        let raw_body = &bytes[head_end + 4..];
        let chunked = headers.iter().any(|(name, value)| name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked"));
        let body = if chunked { dechunk(raw_body)? } else { raw_body.to_vec() };
        Some(Response { status_line, status, headers, body })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(found, _)| found == name).map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| panic!("body {:?} is not JSON: {error}", self.text()))
    }

    /// Checks the conventions of every JSON response: the content type and
    /// exactly one value followed by one newline.
    pub fn assert_json_convention(&self) {
        assert_eq!(self.header("content-type"), Some("application/json"), "{self:?}");
        assert!(self.body.ends_with(b"\n"), "body does not end in a newline: {:?}", self.text());
        let text = self.text();
        let trimmed = &text[..text.len() - 1];
        assert!(!trimmed.contains('\n'), "body has more than one line: {text:?}");
        let _: serde_json::Value = serde_json::from_str(trimmed).unwrap();
    }

    /// Checks an error envelope: five string keys and the given type.
    pub fn assert_envelope(&self, status: u16, error_type: &str) -> serde_json::Value {
        assert_eq!(self.status, status, "{}", self.text());
        self.assert_json_convention();
        let envelope = self.json();
        let object = envelope.as_object().unwrap();
        assert_eq!(object.len(), 5, "{envelope}");
        for key in ["Type", "Message", "Handle", "ProcessID", "Binary"] {
            assert!(object.get(key).map(|value| value.is_string()).unwrap_or(false), "{key} in {envelope}");
        }
        assert_eq!(envelope["Type"], error_type, "{envelope}");
        assert_eq!(envelope["Binary"], "");
        envelope
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

fn dechunk(mut bytes: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(bytes, b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&bytes[..line_end]).ok()?.split(';').next()?.trim(), 16).ok()?;
        bytes = &bytes[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(bytes.get(..size)?);
        bytes = bytes.get(size + 2..)?;
    }
}

/// Reads from `stream` until `needle` has arrived; returns everything read.
pub fn read_until(stream: &mut TcpStream, buffer: &mut Vec<u8>, needle: &[u8]) -> Vec<u8> {
    loop {
        if let Some(position) = find(buffer, needle) {
            let rest = buffer.split_off(position + needle.len());
            return std::mem::replace(buffer, rest);
        }
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).unwrap_or_else(|error| panic!("waiting for {:?}: {error}", String::from_utf8_lossy(needle)));
        assert!(read > 0, "connection closed while waiting for {:?}; got {:?}", String::from_utf8_lossy(needle), String::from_utf8_lossy(buffer));
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Reads exactly `count` bytes, taking the bytes already in `buffer` first.
pub fn read_exact_buffered(stream: &mut TcpStream, buffer: &mut Vec<u8>, count: usize) -> Vec<u8> {
    while buffer.len() < count {
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).unwrap_or_else(|error| panic!("waiting for {count} bytes: {error}"));
        assert!(read > 0, "connection closed after {:?}, expected {count} bytes", String::from_utf8_lossy(buffer));
        buffer.extend_from_slice(&chunk[..read]);
    }
    let rest = buffer.split_off(count);
    std::mem::replace(buffer, rest)
}

/// Returns whether the server closes the connection (EOF) within the read
/// timeout, with nothing else arriving.
pub fn assert_eof(stream: &mut TcpStream, buffer: &[u8]) {
    assert!(buffer.is_empty(), "unexpected bytes before close: {:?}", String::from_utf8_lossy(buffer));
    let mut chunk = [0u8; 1024];
    let read = stream.read(&mut chunk).expect("waiting for the server to close");
    assert_eq!(read, 0, "unexpected bytes instead of close: {:?}", String::from_utf8_lossy(&chunk[..read]));
}

#[test]
fn dechunk_reads_chunks() {
    assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(), b"abcde");
}
