//! End-to-end tests of stream in and stream out against a real server:
//! ownership, modes, links, naming, errors, stopped containers, aborted
//! streams, client disconnects and the grace timer. Needs root; see
//! `support` for how it skips.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use support::{ServerOptions, TestServer};
use tokio::io::AsyncReadExt;
use trellis::client::ClientError;

/// One entry of a test archive.
enum Entry<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

const MTIME: u64 = 1_000_000_000;

/// Builds a ustar archive of `entries`, owned by uid 4242 so that a kept
/// owner would show.
fn archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_ustar();
        header.set_uid(4242);
        header.set_gid(4242);
        header.set_mtime(MTIME);
        match entry {
            Entry::Dir(name, mode) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder.append_data(&mut header, name, &[][..]).unwrap();
            }
            Entry::File(name, mode, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, name, *data).unwrap();
            }
            Entry::Symlink(name, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, name, target).unwrap();
            }
            Entry::HardLink(name, target) => {
                header.set_entry_type(tar::EntryType::Link);
                header.set_mode(0o644);
                header.set_size(0);
                builder.append_link(&mut header, name, target).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

/// Returns each entry's name, type byte and contents.
fn entries_of(bytes: &[u8]) -> Vec<(String, u8, Vec<u8>)> {
    let mut archive = tar::Archive::new(bytes);
    let mut found = Vec::new();
    for entry in archive.entries().expect("reading the archive") {
        let mut entry = entry.expect("reading an entry");
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let kind = entry.header().entry_type().as_byte();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        found.push((name, kind, data));
    }
    found
}

fn stream_in(server: &TestServer, handle: &str, destination: &str, user: &str, tar: &[u8]) -> Result<(), ClientError> {
    let mut reader = tar;
    server.block_on(server.client.stream_in(handle, destination, user, &mut reader))
}

/// Streams out and reads the whole body; a body that ends early is an
/// `Err` with the read error's text.
fn stream_out(server: &TestServer, handle: &str, source: &str, user: &str) -> Result<Result<Vec<u8>, String>, ClientError> {
    server.block_on(async {
        let mut body = server.client.stream_out(handle, source, user).await?;
        let mut bytes = Vec::new();
        Ok(body.read_to_end(&mut bytes).await.map(|_| bytes).map_err(|error| error.to_string()))
    })
}

/// Runs a shell command as root in the container and returns its stdout.
fn sh(server: &TestServer, handle: &str, script: &str) -> String {
    let output = server.run_command(handle, "sh", &["-c", script]);
    assert_eq!(output.status, 0, "{script:?} failed: {}", output.stderr_text());
    output.stdout_text()
}

fn assert_usable(server: &TestServer, handle: &str) {
    assert_eq!(sh(server, handle, "echo usable"), "usable\n");
}

#[test]
fn stream_in_keeps_entries_as_user() {
    let Some(server) = TestServer::start("stream_in_keeps_entries_as_user") else { return };
    let handle = server.create("files-in");
    let large: Vec<u8> = (0..(3 << 20)).map(|index: u32| (index % 251) as u8).collect();
    let tar = archive(&[
        Entry::Dir("app/", 0o750),
        Entry::File("app/run.sh", 0o755, b"#!/bin/sh\necho run\n"),
        Entry::File("app/secret", 0o600, b"s3cret"),
        Entry::File("app/large.bin", 0o644, &large),
        Entry::Symlink("app/link", "run.sh"),
        Entry::HardLink("app/hard", "app/run.sh"),
    ]);
    stream_in(&server, &handle, "/home/vcap/new/deep", "vcap", &tar).expect("stream in");

    let base = "/home/vcap/new/deep";
    let stat = sh(&server, &handle, &format!("cd {base} && stat -c '%n %u:%g %a %Y %h' . .. app app/run.sh app/secret app/hard"));
    let lines: Vec<&str> = stat.lines().collect();
    assert!(lines[0].starts_with(". 1000:1000 755 "), "destination: {}", lines[0]);
    assert!(lines[1].starts_with(".. 1000:1000 755 "), "created parent: {}", lines[1]);
    assert_eq!(lines[2], format!("app 1000:1000 750 {MTIME} 2"));
    assert_eq!(lines[3], format!("app/run.sh 1000:1000 755 {MTIME} 2"));
    assert_eq!(lines[4], format!("app/secret 1000:1000 600 {MTIME} 1"));
    assert_eq!(lines[5], format!("app/hard 1000:1000 755 {MTIME} 2"));
    assert_eq!(sh(&server, &handle, &format!("readlink {base}/app/link")), "run.sh\n");
    assert_eq!(sh(&server, &handle, &format!("su vcap -c {base}/app/link")), "run\n");
    let sum = sh(&server, &handle, &format!("md5sum < {base}/app/large.bin"));
    let local = {
        let mut child = std::process::Command::new("md5sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&large).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    assert_eq!(sum.split_whitespace().next(), local.split_whitespace().next(), "large file contents");
}

#[test]
fn stream_in_relative_root_and_errors() {
    let Some(server) = TestServer::start("stream_in_relative_root_and_errors") else { return };
    let handle = server.create("files-in-errors");
    let tar = archive(&[Entry::File("hello.txt", 0o644, b"hello\n")]);

    // A relative destination starts at the user's home; `/` works.
    stream_in(&server, &handle, "rel/dir", "alice", &tar).expect("relative stream in");
    assert_eq!(sh(&server, &handle, "stat -c '%u %n' /home/alice/rel/dir/hello.txt"), "1001 /home/alice/rel/dir/hello.txt\n");
    stream_in(&server, &handle, "/", "", &tar).expect("stream in to /");
    assert_eq!(sh(&server, &handle, "cat /hello.txt"), "hello\n");

    // A `./` entry into a directory the user can write but does not own
    // leaves that directory's mode alone.
    let dotted = archive(&[Entry::Dir("./", 0o700), Entry::File("./dotted", 0o644, b"x")]);
    stream_in(&server, &handle, "/tmp", "alice", &dotted).expect("./ entry into /tmp as alice");
    assert_eq!(sh(&server, &handle, "stat -c '%a %u' /tmp /tmp/dotted"), "1777 0\n644 1001\n");

    let unknown = stream_in(&server, &handle, "/tmp", "nosuchuser", &tar).expect_err("unknown user");
    assert!(unknown.to_string().contains("error streaming in"), "{unknown}");
    let denied = stream_in(&server, &handle, "/home/alice/from-bob", "bob", &tar).expect_err("bob into alice's home");
    assert!(denied.to_string().contains("Permission denied"), "{denied}");
    let denied = stream_in(&server, &handle, "/home/alice", "bob", &tar).expect_err("bob writing a file in alice's home");
    assert!(denied.to_string().contains("Permission denied"), "{denied}");

    let truncated = stream_in(&server, &handle, "/tmp/truncated", "", &tar[..10]).expect_err("archive cut after 10 bytes");
    assert!(truncated.to_string().contains("error streaming in"), "{truncated}");
    let mut corrupt = tar.clone();
    corrupt[148] ^= 0x01; // the header checksum
    let corrupt = stream_in(&server, &handle, "/tmp/corrupt", "", &corrupt).expect_err("bad checksum");
    assert!(corrupt.to_string().contains("error streaming in"), "{corrupt}");
    let cut_in_data = stream_in(&server, &handle, "/tmp/cut", "", &tar[..600]).expect_err("archive cut inside the data");
    assert!(cut_in_data.to_string().contains("error streaming in"), "{cut_in_data}");

    let missing = stream_in(&server, "no-such-container", "/tmp", "", &tar).expect_err("unknown handle");
    assert!(matches!(missing, ClientError::ContainerNotFound { .. }), "{missing:?}");
    assert_usable(&server, &handle);
}

#[test]
fn stream_out_names_like_garden() {
    let Some(server) = TestServer::start("stream_out_names_like_garden") else { return };
    let handle = server.create("files-out");
    sh(
        &server,
        &handle,
        "su alice -c 'mkdir -p /home/alice/some-outer-dir/some-inner-dir && echo data > /home/alice/some-outer-dir/some-inner-dir/some-file \
         && ln -s some-file /home/alice/some-outer-dir/some-inner-dir/some-link'",
    );
    let names = |source: &str, user: &str| -> Vec<(String, u8)> {
        let body = stream_out(&server, &handle, source, user).expect("stream out").expect("whole body");
        entries_of(&body).into_iter().map(|(name, kind, _)| (name, kind)).collect()
    };
    let directory = b'5';
    let regular = b'0';
    let symlink = b'2';
    assert_eq!(
        names("/home/alice/some-outer-dir/some-inner-dir", "alice"),
        vec![
            ("some-inner-dir/".to_string(), directory),
            ("some-inner-dir/some-file".to_string(), regular),
            ("some-inner-dir/some-link".to_string(), symlink),
        ]
    );
    assert_eq!(
        names("some-outer-dir/some-inner-dir/", "alice"),
        vec![("./".to_string(), directory), ("./some-file".to_string(), regular), ("./some-link".to_string(), symlink)]
    );
    let file = stream_out(&server, &handle, "/home/alice/some-outer-dir/some-inner-dir/some-file", "").unwrap().unwrap();
    assert_eq!(entries_of(&file), vec![("some-file".to_string(), regular, b"data\n".to_vec())]);

    let missing = stream_out(&server, &handle, "/home/alice/nope", "alice").expect_err("missing source");
    assert!(matches!(&missing, ClientError::Server { status: 500, .. }), "{missing:?}");
    assert!(missing.to_string().contains("No such file or directory"), "{missing}");
    sh(&server, &handle, "echo hidden > /root/secret && chmod 600 /root/secret");
    let denied = stream_out(&server, &handle, "/root/secret", "alice").expect_err("unreadable source");
    assert!(denied.to_string().contains("Permission denied"), "{denied}");
    let unknown = stream_out(&server, &handle, "/tmp", "nosuchuser").expect_err("unknown user");
    assert!(unknown.to_string().contains("unable to find user nosuchuser"), "{unknown}");
}

#[test]
fn stream_out_aborts_after_error() {
    let Some(server) = TestServer::start("stream_out_aborts_after_error") else { return };
    let handle = server.create("files-abort");
    // The readable file comes first and is larger than every buffer on the
    // way, so bytes reach the client before the unreadable directory fails.
    sh(
        &server,
        &handle,
        "mkdir -p /srv/mixed/b-locked && head -c 4194304 /dev/zero > /srv/mixed/a-file && chmod 700 /srv/mixed/b-locked && chmod 755 /srv/mixed",
    );
    let body = stream_out(&server, &handle, "/srv/mixed", "alice").expect("the head is sent before the failure");
    let error = body.expect_err("the body must end with an error, not a clean end of stream");
    assert!(!error.is_empty());
    assert_usable(&server, &handle);
}

#[test]
fn streams_work_on_stopped_container() {
    let Some(server) = TestServer::start("streams_work_on_stopped_container") else { return };
    let handle = server.create("files-stopped");
    server.block_on(server.client.stop(&handle, false)).expect("stop");
    stream_in(&server, &handle, "/tmp/in", "", &archive(&[Entry::File("f", 0o644, b"after stop")])).expect("stream in when stopped");
    let body = stream_out(&server, &handle, "/tmp/in/f", "").expect("stream out when stopped").expect("whole body");
    assert_eq!(entries_of(&body), vec![("f".to_string(), b'0', b"after stop".to_vec())]);
}

/// Returns the tar helpers working for `handle`.
fn helpers_of(handle: &str) -> Vec<(u32, String)> {
    support::processes_naming(&["__files"]).into_iter().filter(|(_, command)| command.contains(handle)).collect()
}

#[test]
fn stream_out_stops_when_client_leaves() {
    let Some(server) = TestServer::start("stream_out_stops_when_client_leaves") else { return };
    let handle = server.create("files-leave");
    sh(&server, &handle, "head -c 268435456 /dev/zero > /tmp/big");
    server.block_on(async {
        let mut body = server.client.stream_out(&handle, "/tmp/big", "").await.expect("stream out");
        let mut buffer = vec![0u8; 65536];
        body.read_exact(&mut buffer).await.expect("first bytes");
        assert_eq!(helpers_of(&handle).len(), 1, "one helper while streaming");
        drop(body);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !helpers_of(&handle).is_empty() {
        assert!(Instant::now() < deadline, "helper still running after the client left: {:?}", helpers_of(&handle));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_usable(&server, &handle);
}

#[test]
fn grace_timer_pauses_while_streaming() {
    let options = ServerOptions { default_grace_time: "2s".into(), ..ServerOptions::default() };
    let Some(server) = TestServer::start_with("grace_timer_pauses_while_streaming", options) else { return };
    let handle = server.create("files-grace");
    let exists = || server.block_on(server.client.list(&Default::default())).unwrap().contains(&handle);

    // A stream in whose body trickles in for twice the grace time.
    let tar = archive(&[Entry::File("slow", 0o644, &[7u8; 4096])]);
    server.block_on(async {
        let (mut writer, mut reader) = tokio::io::duplex(1024);
        let feed = async move {
            use tokio::io::AsyncWriteExt;
            for chunk in tar.chunks(512) {
                writer.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        };
        let (result, ()) = tokio::join!(server.client.stream_in(&handle, "/tmp", "", &mut reader), feed);
        result.expect("slow stream in");
    });
    assert!(exists(), "container reaped during a stream in");

    // A stream out read slowly for twice the grace time.
    sh(&server, &handle, "head -c 8388608 /dev/zero > /tmp/big");
    server.block_on(async {
        let mut body = server.client.stream_out(&handle, "/tmp/big", "").await.expect("stream out");
        let mut buffer = vec![0u8; 65536];
        for _ in 0..10 {
            body.read_exact(&mut buffer).await.expect("slow read");
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let mut rest = Vec::new();
        body.read_to_end(&mut rest).await.expect("rest of the body");
    });
    assert!(exists(), "container reaped during a stream out");

    let deadline = Instant::now() + Duration::from_secs(15);
    while exists() {
        assert!(Instant::now() < deadline, "container not reaped after the streams ended");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A tar archive of one file of `size` bytes, generated as it is read.
struct GeneratedTar {
    header: Vec<u8>,
    size: u64,
    position: u64,
}

impl GeneratedTar {
    fn new(name: &str, size: u64) -> GeneratedTar {
        let mut header = tar::Header::new_gnu();
        header.set_path(name).unwrap();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(MTIME);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        GeneratedTar { header: header.as_bytes().to_vec(), size, position: 0 }
    }

    fn total(&self) -> u64 {
        512 + self.size.div_ceil(512) * 512 + 1024
    }

    fn byte_at(&self, offset: u64) -> u8 {
        if offset < 512 {
            self.header[offset as usize]
        } else if offset - 512 < self.size {
            ((offset - 512) % 253) as u8
        } else {
            0
        }
    }
}

impl tokio::io::AsyncRead for GeneratedTar {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _context: &mut std::task::Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let count = (buffer.remaining() as u64).min(self.total() - self.position).min(256 * 1024) as usize;
        let chunk: Vec<u8> = (0..count as u64).map(|index| self.byte_at(self.position + index)).collect();
        buffer.put_slice(&chunk);
        self.position += count as u64;
        std::task::Poll::Ready(Ok(()))
    }
}

/// Returns a process's resident set size in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Samples a process's RSS until `stop` is set; returns the maximum.
fn sample_rss(pid: u32, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

#[test]
fn one_gib_streams_with_flat_memory() {
    let Some(server) = TestServer::start("one_gib_streams_with_flat_memory") else { return };
    let handle = server.create("files-gib");
    const SIZE: u64 = 1 << 30;
    // Allowed growth of the server's RSS over its idle size: far below the
    // archive, far above the few channel chunks in flight.
    const MAX_GROWTH_KIB: u64 = 96 * 1024;
    let baseline = rss_kib(server.pid());

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_rss(server.pid(), stop.clone());
    let mut generated = GeneratedTar::new("huge.bin", SIZE);
    server.block_on(server.client.stream_in(&handle, "/tmp/gib", "", &mut generated)).expect("stream in of 1 GiB");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak_in = sampler.join().unwrap();
    assert_eq!(sh(&server, &handle, "stat -c %s /tmp/gib/huge.bin"), format!("{SIZE}\n"));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_rss(server.pid(), stop.clone());
    let (received, bad_offset) = server.block_on(async {
        let mut body = server.client.stream_out(&handle, "/tmp/gib/huge.bin", "").await.expect("stream out");
        let mut buffer = vec![0u8; 1 << 20];
        let mut received = 0u64;
        let mut bad_offset = None;
        loop {
            let count = body.read(&mut buffer).await.expect("reading the archive");
            if count == 0 {
                break;
            }
            // The data region must be the generated pattern.
            for (index, byte) in buffer[..count].iter().enumerate() {
                let offset = received + index as u64;
                if (512..512 + SIZE).contains(&offset) && *byte != ((offset - 512) % 253) as u8 && bad_offset.is_none() {
                    bad_offset = Some(offset);
                }
            }
            received += count as u64;
        }
        (received, bad_offset)
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak_out = sampler.join().unwrap();
    assert_eq!(received, 512 + SIZE + 1024, "archive size");
    assert_eq!(bad_offset, None, "first byte that differs from the pattern");
    assert!(peak_in < baseline + MAX_GROWTH_KIB, "RSS during stream in: {peak_in} KiB, baseline {baseline} KiB");
    assert!(peak_out < baseline + MAX_GROWTH_KIB, "RSS during stream out: {peak_out} KiB, baseline {baseline} KiB");
    sh(&server, &handle, "rm -rf /tmp/gib");
}

/// Sends `request` on a new connection to the server's socket and returns
/// the status code and the body, de-chunked when chunked.
fn raw_exchange(server: &TestServer, request: &[u8]) -> (u16, Vec<u8>) {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(request).unwrap();
    let mut received = Vec::new();
    stream.read_to_end(&mut received).unwrap();
    let head_end = received.windows(4).position(|window| window == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let mut body = received[head_end..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut decoded = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|window| window == b"\r\n").expect("a chunk size line");
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
        body = decoded;
    }
    (status, body)
}

/// Returns the stream-in request the Go client sends: chunked, with its
/// headers, in chunks of `chunk` bytes.
fn go_stream_in_request(handle: &str, destination: &str, tar: &[u8], chunk: usize) -> Vec<u8> {
    let destination: String = form_urlencoded::byte_serialize(destination.as_bytes()).collect();
    let mut request = format!(
        "PUT /containers/{handle}/files?destination={destination}&user= HTTP/1.1\r\nHost: api\r\nUser-Agent: Go-http-client/1.1\r\n\
         Transfer-Encoding: chunked\r\nContent-Type: application/x-tar\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for piece in tar.chunks(chunk) {
        request.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        request.extend_from_slice(piece);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

fn go_stream_out_request(handle: &str, source: &str) -> Vec<u8> {
    let source: String = form_urlencoded::byte_serialize(source.as_bytes()).collect();
    format!(
        "GET /containers/{handle}/files?source={source}&user= HTTP/1.1\r\nHost: api\r\nUser-Agent: Go-http-client/1.1\r\n\
         Accept-Encoding: gzip\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// Checklist items 58 to 61 with the Go client's exact bytes.
#[test]
fn checklist_stream_in_and_out_raw() {
    let Some(server) = TestServer::start("checklist_stream_in_and_out_raw") else { return };
    let handle = server.create("checklist");
    let tar = archive(&[Entry::File("a.txt", 0o644, b"checklist\n")]);

    // 58: a chunked stream in returns 200 `{}`; a stream out shows the file.
    let (status, body) = raw_exchange(&server, &go_stream_in_request(&handle, "/tmp/in", &tar, 0x800));
    assert_eq!((status, String::from_utf8_lossy(&body).into_owned()), (200, "{}\n".to_string()));
    // 59: one entry named after the file.
    let (status, body) = raw_exchange(&server, &go_stream_out_request(&handle, "/tmp/in/a.txt"));
    assert_eq!(status, 200);
    assert_eq!(entries_of(&body), vec![("a.txt".to_string(), b'0', b"checklist\n".to_vec())]);
    // 60: a trailing slash gives entries rooted at `./`.
    let (status, body) = raw_exchange(&server, &go_stream_out_request(&handle, "/tmp/in/"));
    assert_eq!(status, 200);
    let names: Vec<String> = entries_of(&body).into_iter().map(|(name, _, _)| name).collect();
    assert_eq!(names, vec!["./".to_string(), "./a.txt".to_string()]);
    // 61: an unknown handle is a 404 ContainerNotFoundError both ways.
    for request in [go_stream_in_request("no-such-handle", "/tmp", &tar, 0x800), go_stream_out_request("no-such-handle", "/tmp")] {
        let (status, body) = raw_exchange(&server, &request);
        assert_eq!(status, 404);
        let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(envelope["Type"], "ContainerNotFoundError");
        assert_eq!(envelope["Handle"], "no-such-handle");
    }
}

/// Checklist item 62: a 10 MiB file goes in and comes out byte for byte.
#[test]
fn checklist_ten_mib_round_trip() {
    let Some(server) = TestServer::start("checklist_ten_mib_round_trip") else { return };
    let handle = server.create("round-trip");
    let data: Vec<u8> = (0..10u32 << 20).map(|index| (index.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let tar = archive(&[Entry::File("ten.bin", 0o640, &data)]);
    stream_in(&server, &handle, "/tmp/round", "", &tar).expect("stream in");
    let body = stream_out(&server, &handle, "/tmp/round/ten.bin", "").expect("stream out").expect("whole body");
    let entries = entries_of(&body);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, "ten.bin");
    assert!(entries[0].2 == data, "contents differ after the round trip");
}

/// Returns a PAX extended header entry carrying `records`.
fn pax_header(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in records {
        // The length counts the whole record, its own digits included.
        let rest = key.len() + value.len() + 3;
        let mut length = rest + 1;
        while length.to_string().len() + rest != length {
            length += 1;
        }
        data.extend_from_slice(format!("{length} {key}=").as_bytes());
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    let mut header = tar::Header::new_ustar();
    header.set_path("PaxHeader").unwrap();
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend_from_slice(&data);
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    bytes
}

#[test]
fn stream_in_keeps_extended_attributes() {
    let Some(server) = TestServer::start("stream_in_keeps_extended_attributes") else { return };
    let handle = server.create("files-xattr");
    let mut tar = pax_header(&[("SCHILY.xattr.user.trellis", b"kept")]);
    tar.extend_from_slice(&archive(&[Entry::File("tagged", 0o644, b"x")]));
    stream_in(&server, &handle, "/tmp/xattr", "vcap", &tar).expect("stream in with an xattr");

    // The server runs in the host's mount namespace, so the container's
    // merged root filesystem is visible from the test.
    let path = server.depot.join(&handle).join("rootfs/tmp/xattr/tagged");
    let path = std::ffi::CString::new(path.display().to_string()).unwrap();
    let mut value = [0u8; 64];
    // SAFETY: valid C strings and a buffer with its length.
    let length = unsafe { libc::getxattr(path.as_ptr(), c"user.trellis".as_ptr(), value.as_mut_ptr().cast(), value.len()) };
    assert!(length >= 0, "getxattr failed: {}", std::io::Error::last_os_error());
    assert_eq!(&value[..length as usize], b"kept");
}

#[test]
fn destroy_during_stream_in() {
    let Some(server) = TestServer::start("destroy_during_stream_in") else { return };
    let handle = server.create("files-destroy");

    // The header of a 64 MiB file and its first MiB; the rest never comes
    // before the destroy.
    let mut header = tar::Header::new_gnu();
    header.set_path("big").unwrap();
    header.set_size(64 << 20);
    header.set_mode(0o644);
    header.set_cksum();

    server.block_on(async {
        use tokio::io::AsyncWriteExt;

        let (mut feed, mut body) = tokio::io::duplex(64 * 1024);
        let client = server.client.clone();
        let streaming_handle = handle.clone();
        let upload = tokio::spawn(async move { client.stream_in(&streaming_handle, "/tmp", "", &mut body).await });
        feed.write_all(header.as_bytes()).await.expect("feed the header");
        feed.write_all(&vec![7u8; 1 << 20]).await.expect("feed the first MiB");

        let deadline = Instant::now() + Duration::from_secs(10);
        while helpers_of(&handle).is_empty() {
            assert!(Instant::now() < deadline, "no tar helper started for the stream in");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        server.client.destroy(&handle).await.expect("destroy while streaming in");
        drop(feed);
        let outcome = tokio::time::timeout(Duration::from_secs(30), upload)
            .await
            .expect("the stream in got an answer after the destroy")
            .expect("the upload task ran to completion");
        assert!(outcome.is_err(), "a stream in cut short by a destroy reported success");

        let info = server.client.info(&handle).await;
        assert!(
            matches!(info, Err(ClientError::ContainerNotFound { .. })),
            "the container is still there after destroy: {info:?}"
        );
    });
    assert!(helpers_of(&handle).is_empty(), "tar helper left running: {:?}", helpers_of(&handle));
}
