//! End-to-end test of output streaming: every byte of a large stdout and
//! stderr reaches the client, in order, before the exit status, many times
//! in a row. Needs root; see `support` for how it skips.

mod support;

use support::{command_spec, TestServer};

const STDOUT_BYTES: usize = 10 << 20;
const STDERR_BYTES: usize = 1 << 20;
const ROUNDS: usize = 100;

/// Returns the first `length` bytes that `seq first last` prints.
fn seq_prefix(first: u64, last: u64, length: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(length + 16);
    for number in first..=last {
        if bytes.len() >= length {
            break;
        }
        bytes.extend_from_slice(format!("{number}\n").as_bytes());
    }
    assert!(bytes.len() >= length, "seq {first} {last} prints fewer than {length} bytes");
    bytes.truncate(length);
    bytes
}

/// Returns the offset of the first byte where `received` and `expected`
/// differ, counting a missing or extra tail as a difference.
fn first_difference(received: &[u8], expected: &[u8]) -> Option<usize> {
    let common = received.iter().zip(expected).position(|(left, right)| left != right);
    match common {
        Some(offset) => Some(offset),
        None if received.len() != expected.len() => Some(received.len().min(expected.len())),
        None => None,
    }
}

#[test]
fn large_output_every_byte() {
    let Some(server) = TestServer::start("large_output_every_byte") else { return };
    let handle = server.create("streams");
    let expected_stdout = seq_prefix(1, 2_000_000, STDOUT_BYTES);
    let expected_stderr = seq_prefix(5_000_000, 6_000_000, STDERR_BYTES);
    // Both streams are written at the same time, with different content,
    // so bytes that cross over or arrive out of order are caught.
    let script = format!(
        "seq 5000000 6000000 | head -c {STDERR_BYTES} >&2 & seq 1 2000000 | head -c {STDOUT_BYTES}; wait; exit 5"
    );
    let spec = command_spec("sh", &["-c", &script]);
    for round in 0..ROUNDS {
        let output = server
            .run(&handle, &spec, None)
            .unwrap_or_else(|error| panic!("round {round}: run failed: {error}"));
        assert_eq!(output.status, 5, "round {round}: exit status");
        assert_eq!(
            first_difference(&output.stdout, &expected_stdout),
            None,
            "round {round}: stdout differs ({} of {STDOUT_BYTES} bytes received)",
            output.stdout.len()
        );
        assert_eq!(
            first_difference(&output.stderr, &expected_stderr),
            None,
            "round {round}: stderr differs ({} of {STDERR_BYTES} bytes received)",
            output.stderr.len()
        );
    }
}
