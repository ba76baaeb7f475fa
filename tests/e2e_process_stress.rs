//! Stress tests of process output against a real server: short processes
//! that exit straight after writing, many processes at once, and a slow
//! reader of a large output. Needs root; see `support` for how it skips.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use support::{command_spec, run_to_completion, TestServer};
use trellis::api::{ProcessSpec, TtySpec};
use trellis::client::ProcessIo;

const QUICK_RUNS: usize = 100;

/// What `seq -s " " 10000` prints.
fn seq_line() -> String {
    let numbers: Vec<String> = (1..=10000).map(|number| number.to_string()).collect();
    format!("{}\n", numbers.join(" "))
}

#[test]
fn quick_exit_output_complete_without_tty() {
    let Some(server) = TestServer::start("quick_exit_output_complete_without_tty") else { return };
    let handle = server.create("quick");
    let expected = seq_line();
    let spec = command_spec("seq", &["-s", " ", "10000"]);
    for round in 0..QUICK_RUNS {
        let output = server.run(&handle, &spec, None).unwrap_or_else(|error| panic!("round {round}: {error}"));
        assert_eq!(output.status, 0, "round {round}: exit status");
        assert_eq!(output.stdout.len(), expected.len(), "round {round}: stdout length");
        assert_eq!(output.stdout_text(), expected, "round {round}: stdout");
    }
}

#[test]
fn quick_exit_output_complete_with_tty() {
    let Some(server) = TestServer::start("quick_exit_output_complete_with_tty") else { return };
    let handle = server.create("quicktty");
    // onlcr turns the final newline into CR LF.
    let expected = seq_line().replace('\n', "\r\n");
    let spec = ProcessSpec { tty: Some(TtySpec::default()), ..command_spec("seq", &["-s", " ", "10000"]) };
    for round in 0..QUICK_RUNS {
        let output = server.run(&handle, &spec, None).unwrap_or_else(|error| panic!("round {round}: {error}"));
        assert_eq!(output.status, 0, "round {round}: exit status");
        assert_eq!(output.stdout.len(), expected.len(), "round {round}: stdout length");
        assert_eq!(output.stdout_text(), expected, "round {round}: stdout");
        assert!(output.stderr.is_empty(), "round {round}: a tty process wrote to stderr");
    }
}

/// Returns the first `length` bytes that `seq first 10000000` prints.
fn seq_bytes(first: u64, length: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(length + 16);
    let mut number = first;
    while bytes.len() < length {
        bytes.extend_from_slice(format!("{number}\n").as_bytes());
        number += 1;
    }
    bytes.truncate(length);
    bytes
}

#[test]
fn fifty_concurrent_processes_intact() {
    const PROCESSES: usize = 50;
    const BYTES: usize = 1 << 20;
    let Some(server) = TestServer::start("fifty_concurrent_processes_intact") else { return };
    let handle = server.create("fifty");
    let runs = (0..PROCESSES).map(|index| {
        let first = (index as u64 + 1) * 1_000_000;
        let script = format!("seq {first} 100000000 | head -c {BYTES}; exit {}", index % 7);
        let spec = command_spec("sh", &["-c", &script]);
        let client = &server.client;
        let handle = handle.clone();
        async move { (index, first, run_to_completion(client, &handle, &spec, None).await) }
    });
    let results = server.block_on(futures_util::future::join_all(runs));
    for (index, first, result) in results {
        let output = result.unwrap_or_else(|error| panic!("process {index}: {error}"));
        assert_eq!(output.status, (index % 7) as i64, "process {index}: exit status");
        assert_eq!(output.stdout.len(), BYTES, "process {index}: stdout length");
        assert!(output.stdout == seq_bytes(first, BYTES), "process {index}: stdout content differs");
        assert!(output.stderr.is_empty(), "process {index}: stderr {:?}", output.stderr_text());
    }
}

/// An output writer that takes at most `CHUNK` bytes per millisecond,
/// checks that every byte is zero and counts them.
struct SlowZeroReader {
    count: Arc<AtomicU64>,
    nonzero: Arc<AtomicBool>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl SlowZeroReader {
    const CHUNK: usize = 64 * 1024;
}

impl tokio::io::AsyncWrite for SlowZeroReader {
    fn poll_write(mut self: Pin<&mut Self>, context: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(context).is_pending() {
                return Poll::Pending;
            }
        }
        let taken = bytes.len().min(Self::CHUNK);
        if bytes[..taken].iter().any(|byte| *byte != 0) {
            self.nonzero.store(true, Ordering::SeqCst);
        }
        self.count.fetch_add(taken as u64, Ordering::SeqCst);
        self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(1))));
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Returns a process's resident set size in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading the server's status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .expect("a VmRSS line")
}

#[test]
fn slow_reader_bounds_server_memory() {
    const TOTAL: u64 = 200 << 20;
    // The process writes 200 MiB; the server may buffer only a few queues
    // of chunks. 64 MiB is far below what buffering the output would cost.
    const MAX_GROWTH_KIB: u64 = 64 << 10;
    let Some(server) = TestServer::start("slow_reader_bounds_server_memory") else { return };
    let handle = server.create("slow");
    // A first run so that the server's allocator and runtime are warm.
    let warm = server.run_command(&handle, "head", &["-c", "1048576", "/dev/zero"]);
    assert_eq!(warm.stdout.len(), 1 << 20);

    let server_pid = server.pid();
    let before = rss_kib(server_pid);
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let peak = peak.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kib(server_pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let count = Arc::new(AtomicU64::new(0));
    let nonzero = Arc::new(AtomicBool::new(false));
    let reader = SlowZeroReader { count: count.clone(), nonzero: nonzero.clone(), pause: None };
    let spec = command_spec("head", &["-c", &TOTAL.to_string(), "/dev/zero"]);
    let io = ProcessIo { stdin: None, stdout: Some(Box::new(reader)), stderr: None };
    let status = server.block_on(async {
        let mut process = server.client.run(&handle, &spec, io).await.expect("starting head");
        process.wait().await.expect("waiting for head")
    });
    done.store(true, Ordering::SeqCst);
    sampler.join().expect("the sampler thread");

    assert_eq!(status, 0, "head exit status");
    assert_eq!(count.load(Ordering::SeqCst), TOTAL, "bytes received");
    assert!(!nonzero.load(Ordering::SeqCst), "received a byte other than zero");
    let growth = peak.load(Ordering::SeqCst).saturating_sub(before);
    eprintln!("server RSS: {before} KiB before, peak growth {growth} KiB");
    assert!(growth < MAX_GROWTH_KIB, "server RSS grew by {growth} KiB (from {before} KiB) while streaming {TOTAL} bytes");
}
