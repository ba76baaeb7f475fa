//! Framing of the stdio connection between the server and a process shim.
//!
//! Each container process has one shim, which owns the process's stdio and
//! exit status and serves them on a Unix socket. Both directions carry
//! frames of a one-byte kind, a four-byte big-endian payload length and the
//! payload. The shim sends `Started` or `StartFailed` first, then output
//! frames, then `Exited` once everything the process wrote before it exited
//! has been sent. The in-memory test runtime speaks the same frames over an
//! in-process pipe, so the server's process handling is the same for both.
//!
//! Protocol versions, which the shim announces with `Hello` as the first
//! frame of every connection:
//!
//! - 1: no `Hello` (the first frame is `Started`) and no acknowledgements.
//!   Output the shim has written to a server that dies before delivering
//!   it is lost.
//! - 2: `Hello { version: 2 }`, then `Started`. The server acknowledges
//!   output with `Ack`, and the shim keeps each output frame until it is
//!   acknowledged, within its detached output bound, and sends the
//!   unacknowledged frames again, oldest first, to the next server that
//!   connects.
//!
//! `Ack` counts, per stream, the payload bytes of the output frames of the
//! current connection that the server is done with. The server is done
//! with output once it has written it to an attached client's connection,
//! or once its own bound on output kept for clients that are not attached
//! has dropped it. The counts start at zero on each connection, so a
//! reconnected server needs no state from its predecessor.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest payload a frame may carry. Writers split larger data.
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;

/// Size of the kind byte and the length field.
const HEADER_LEN: usize = 5;

const KIND_STARTED: u8 = 0x01;
const KIND_START_FAILED: u8 = 0x02;
const KIND_STDOUT: u8 = 0x03;
const KIND_STDERR: u8 = 0x04;
const KIND_EXITED: u8 = 0x05;
const KIND_HELLO: u8 = 0x06;
const KIND_STDIN: u8 = 0x10;
const KIND_CLOSE_STDIN: u8 = 0x11;
const KIND_SIGNAL: u8 = 0x12;
const KIND_RESIZE: u8 = 0x13;
const KIND_ACK: u8 = 0x14;

/// The protocol version of the shim and the server of this release.
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest protocol version this server still serves: shims of the
/// previous release, which send no `Hello` and expect no `Ack`.
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;

/// Why a process could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFailure {
    /// The executable does not exist or is not on `PATH`.
    ExecutableNotFound,
    /// The request was invalid for this container (unknown user, bad working
    /// directory and the like).
    InvalidRequest,
    /// Anything else.
    Other,
}

/// A frame sent by the shim to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShimFrame {
    /// The process runs with this host pid.
    Started { pid: u32 },
    /// The process could not be started; the shim exits after this frame.
    StartFailed { failure: StartFailure, message: String },
    Stdout(Bytes),
    Stderr(Bytes),
    /// The exit status as Garden reports it: the exit code, or 128 plus the
    /// number of the signal that ended the process.
    Exited { status: i32 },
    /// The protocol version the shim speaks; the first frame of each
    /// connection from version 2 on.
    Hello { version: u32 },
}

/// A frame sent by the server to the shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    Stdin(Bytes),
    /// End of input: the process reads EOF on stdin.
    CloseStdin,
    /// A raw signal number for the process (SIGTERM is 15, SIGKILL 9).
    Signal { signal: i32 },
    Resize { columns: u16, rows: u16 },
    /// Payload bytes of stdout and stderr frames received on this
    /// connection that the server is done with, each counted from the start
    /// of the connection. Version 2 and later only.
    Ack { stdout: u64, stderr: u64 },
}

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("stdio frame of unknown kind {kind:#04x}")]
    UnknownKind { kind: u8 },
    #[error("stdio frame of kind {kind:#04x} has a payload of {length} bytes, more than the maximum {MAX_FRAME_PAYLOAD}")]
    TooLarge { kind: u8, length: usize },
    #[error("stdio frame of kind {kind:#04x} has a malformed payload of {length} bytes")]
    Malformed { kind: u8, length: usize },
}

/// Length of a frame's header: its kind and its payload's length.
pub const FRAME_HEADER_LEN: usize = HEADER_LEN;

/// Returns the header of a stdout or stderr frame with a payload of
/// `length` bytes, for a writer that reads the payload into place after
/// it instead of encoding a [`ShimFrame`].
pub fn output_header(stderr: bool, length: usize) -> [u8; HEADER_LEN] {
    debug_assert!(length <= MAX_FRAME_PAYLOAD);
    let kind = if stderr { KIND_STDERR } else { KIND_STDOUT };
    let [a, b, c, d] = (length as u32).to_be_bytes();
    [kind, a, b, c, d]
}

fn put_header(buffer: &mut BytesMut, kind: u8, length: usize) {
    debug_assert!(length <= MAX_FRAME_PAYLOAD);
    buffer.reserve(HEADER_LEN + length);
    buffer.put_u8(kind);
    buffer.put_u32(length as u32);
}

impl ShimFrame {
    /// Appends the encoded frame to `buffer`. Output payloads must not exceed
    /// [`MAX_FRAME_PAYLOAD`].
    pub fn encode(&self, buffer: &mut BytesMut) {
        match self {
            ShimFrame::Started { pid } => {
                put_header(buffer, KIND_STARTED, 4);
                buffer.put_u32(*pid);
            }
            ShimFrame::StartFailed { failure, message } => {
                let message = &message.as_bytes()[..message.len().min(MAX_FRAME_PAYLOAD - 1)];
                put_header(buffer, KIND_START_FAILED, 1 + message.len());
                buffer.put_u8(match failure {
                    StartFailure::ExecutableNotFound => 1,
                    StartFailure::InvalidRequest => 2,
                    StartFailure::Other => 0,
                });
                buffer.put_slice(message);
            }
            ShimFrame::Stdout(data) => {
                put_header(buffer, KIND_STDOUT, data.len());
                buffer.put_slice(data);
            }
            ShimFrame::Stderr(data) => {
                put_header(buffer, KIND_STDERR, data.len());
                buffer.put_slice(data);
            }
            ShimFrame::Exited { status } => {
                put_header(buffer, KIND_EXITED, 4);
                buffer.put_i32(*status);
            }
            ShimFrame::Hello { version } => {
                put_header(buffer, KIND_HELLO, 4);
                buffer.put_u32(*version);
            }
        }
    }

    /// Removes and returns the first complete frame of `buffer`, or `None`
    /// when more bytes are needed.
    pub fn decode(buffer: &mut BytesMut) -> Result<Option<ShimFrame>, FrameError> {
        let Some((kind, mut payload)) = split_frame(buffer)? else {
            return Ok(None);
        };
        let length = payload.len();
        let frame = match kind {
            KIND_STARTED if length == 4 => ShimFrame::Started { pid: payload.get_u32() },
            KIND_START_FAILED if length >= 1 => {
                let failure = match payload.get_u8() {
                    1 => StartFailure::ExecutableNotFound,
                    2 => StartFailure::InvalidRequest,
                    _ => StartFailure::Other,
                };
                let message = String::from_utf8_lossy(&payload).into_owned();
                ShimFrame::StartFailed { failure, message }
            }
            KIND_STDOUT => ShimFrame::Stdout(payload),
            KIND_STDERR => ShimFrame::Stderr(payload),
            KIND_EXITED if length == 4 => ShimFrame::Exited { status: payload.get_i32() },
            KIND_HELLO if length == 4 => ShimFrame::Hello { version: payload.get_u32() },
            KIND_STARTED | KIND_START_FAILED | KIND_EXITED | KIND_HELLO => return Err(FrameError::Malformed { kind, length }),
            _ => return Err(FrameError::UnknownKind { kind }),
        };
        Ok(Some(frame))
    }
}

impl ServerFrame {
    /// Appends the encoded frame to `buffer`. Stdin payloads must not exceed
    /// [`MAX_FRAME_PAYLOAD`]; split larger data into several frames.
    pub fn encode(&self, buffer: &mut BytesMut) {
        match self {
            ServerFrame::Stdin(data) => {
                put_header(buffer, KIND_STDIN, data.len());
                buffer.put_slice(data);
            }
            ServerFrame::CloseStdin => put_header(buffer, KIND_CLOSE_STDIN, 0),
            ServerFrame::Signal { signal } => {
                put_header(buffer, KIND_SIGNAL, 4);
                buffer.put_i32(*signal);
            }
            ServerFrame::Resize { columns, rows } => {
                put_header(buffer, KIND_RESIZE, 4);
                buffer.put_u16(*columns);
                buffer.put_u16(*rows);
            }
            ServerFrame::Ack { stdout, stderr } => {
                put_header(buffer, KIND_ACK, 16);
                buffer.put_u64(*stdout);
                buffer.put_u64(*stderr);
            }
        }
    }

    /// Removes and returns the first complete frame of `buffer`, or `None`
    /// when more bytes are needed.
    pub fn decode(buffer: &mut BytesMut) -> Result<Option<ServerFrame>, FrameError> {
        let Some((kind, mut payload)) = split_frame(buffer)? else {
            return Ok(None);
        };
        let length = payload.len();
        let frame = match kind {
            KIND_STDIN => ServerFrame::Stdin(payload),
            KIND_CLOSE_STDIN if length == 0 => ServerFrame::CloseStdin,
            KIND_SIGNAL if length == 4 => ServerFrame::Signal { signal: payload.get_i32() },
            KIND_RESIZE if length == 4 => ServerFrame::Resize { columns: payload.get_u16(), rows: payload.get_u16() },
            KIND_ACK if length == 16 => ServerFrame::Ack { stdout: payload.get_u64(), stderr: payload.get_u64() },
            KIND_CLOSE_STDIN | KIND_SIGNAL | KIND_RESIZE | KIND_ACK => return Err(FrameError::Malformed { kind, length }),
            _ => return Err(FrameError::UnknownKind { kind }),
        };
        Ok(Some(frame))
    }
}

/// Returns the stream of an encoded output frame (0 for stdout, 1 for
/// stderr, the order of the counts in `Ack`) and its payload length, or
/// `None` for any other frame.
pub fn encoded_output_stream(frame: &[u8]) -> Option<(usize, usize)> {
    let stream = match frame.first()? {
        &KIND_STDOUT => 0,
        &KIND_STDERR => 1,
        _ => return None,
    };
    Some((stream, frame.len().saturating_sub(HEADER_LEN)))
}

/// Splits one frame off the front of `buffer` as its kind and payload.
fn split_frame(buffer: &mut BytesMut) -> Result<Option<(u8, Bytes)>, FrameError> {
    if buffer.len() < HEADER_LEN {
        return Ok(None);
    }
    let kind = buffer[0];
    let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if length > MAX_FRAME_PAYLOAD {
        return Err(FrameError::TooLarge { kind, length });
    }
    if buffer.len() < HEADER_LEN + length {
        return Ok(None);
    }
    buffer.advance(HEADER_LEN);
    Ok(Some((kind, buffer.split_to(length).freeze())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_header_matches_encoding() {
        for (stderr, frame) in [(false, ShimFrame::Stdout(Bytes::from_static(b"abc"))), (true, ShimFrame::Stderr(Bytes::from_static(b"abc")))] {
            let mut encoded = BytesMut::new();
            frame.encode(&mut encoded);
            assert_eq!(&encoded[..FRAME_HEADER_LEN], &output_header(stderr, 3));
        }
    }

    #[test]
    fn shim_frames_round_trip() {
        let frames = vec![
            ShimFrame::Started { pid: 4242 },
            ShimFrame::StartFailed { failure: StartFailure::ExecutableNotFound, message: "no such file".into() },
            ShimFrame::StartFailed { failure: StartFailure::InvalidRequest, message: String::new() },
            ShimFrame::Stdout(Bytes::from_static(b"out")),
            ShimFrame::Stderr(Bytes::new()),
            ShimFrame::Exited { status: 137 },
            ShimFrame::Hello { version: PROTOCOL_VERSION },
        ];
        let mut buffer = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut buffer);
        }
        for expected in &frames {
            assert_eq!(ShimFrame::decode(&mut buffer).unwrap().as_ref(), Some(expected));
        }
        assert!(buffer.is_empty());
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = vec![
            ServerFrame::Stdin(Bytes::from_static(b"input")),
            ServerFrame::CloseStdin,
            ServerFrame::Signal { signal: 15 },
            ServerFrame::Resize { columns: 132, rows: 43 },
            ServerFrame::Ack { stdout: 1 << 40, stderr: 7 },
        ];
        let mut buffer = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut buffer);
        }
        for expected in &frames {
            assert_eq!(ServerFrame::decode(&mut buffer).unwrap().as_ref(), Some(expected));
        }
    }

    #[test]
    fn partial_frame_waits_for_more_bytes() {
        let mut encoded = BytesMut::new();
        ShimFrame::Stdout(Bytes::from_static(b"hello")).encode(&mut encoded);
        let mut buffer = BytesMut::new();
        for byte in encoded.iter().take(encoded.len() - 1) {
            buffer.put_u8(*byte);
            assert_eq!(ShimFrame::decode(&mut buffer).unwrap(), None);
        }
        buffer.put_u8(*encoded.last().unwrap());
        assert_eq!(ShimFrame::decode(&mut buffer).unwrap(), Some(ShimFrame::Stdout(Bytes::from_static(b"hello"))));
    }

    #[test]
    fn oversized_and_unknown_frames_are_errors() {
        let mut buffer = BytesMut::from(&[KIND_STDOUT, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(ShimFrame::decode(&mut buffer), Err(FrameError::TooLarge { .. })));
        let mut buffer = BytesMut::from(&[0x7f, 0, 0, 0, 0][..]);
        assert_eq!(ShimFrame::decode(&mut buffer), Err(FrameError::UnknownKind { kind: 0x7f }));
        let mut buffer = BytesMut::from(&[KIND_SIGNAL, 0, 0, 0, 1, 9][..]);
        assert!(matches!(ServerFrame::decode(&mut buffer), Err(FrameError::Malformed { .. })));
    }

    #[test]
    fn hello_and_ack_have_fixed_layout() {
        let mut buffer = BytesMut::new();
        ShimFrame::Hello { version: 2 }.encode(&mut buffer);
        assert_eq!(&buffer[..], &[0x06, 0, 0, 0, 4, 0, 0, 0, 2]);
        let mut buffer = BytesMut::new();
        ServerFrame::Ack { stdout: 0x0102, stderr: 3 }.encode(&mut buffer);
        assert_eq!(&buffer[..], &[0x14, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn short_hello_and_ack_are_malformed() {
        let mut buffer = BytesMut::from(&[KIND_HELLO, 0, 0, 0, 2, 0, 2][..]);
        assert_eq!(ShimFrame::decode(&mut buffer), Err(FrameError::Malformed { kind: KIND_HELLO, length: 2 }));
        let mut buffer = BytesMut::from(&[KIND_ACK, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1][..]);
        assert_eq!(ServerFrame::decode(&mut buffer), Err(FrameError::Malformed { kind: KIND_ACK, length: 8 }));
    }

    #[test]
    fn output_stream_of_encoded_frames() {
        let mut stderr = BytesMut::new();
        ShimFrame::Stderr(Bytes::from_static(b"abc")).encode(&mut stderr);
        assert_eq!(encoded_output_stream(&stderr), Some((1, 3)));
        let mut stdout = BytesMut::new();
        ShimFrame::Stdout(Bytes::new()).encode(&mut stdout);
        assert_eq!(encoded_output_stream(&stdout), Some((0, 0)));
        let mut started = BytesMut::new();
        ShimFrame::Started { pid: 1 }.encode(&mut started);
        assert_eq!(encoded_output_stream(&started), None);
    }
}
