//! A small HTTP/1.1 client: one request per connection, as the Go Garden
//! client does, over TCP or a Unix socket.
//!
//! It writes request heads itself and parses response heads with httparse,
//! because the four process routes keep using the socket as a raw byte
//! stream after the response head, which general HTTP clients do not allow.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::error::{ClientError, ClientResult};

/// Largest response head the client accepts, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest number of header lines in a response head.
const MAX_HEADERS: usize = 64;
/// Largest chunk-size or trailer line of a chunked body, in bytes.
const MAX_CHUNK_LINE_BYTES: usize = 4096;
/// Bytes requested from the socket per read.
const READ_BYTES: usize = 64 * 1024;

/// Address of a Garden server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP `host:port`.
    Tcp(String),
    /// The path of a Unix domain socket.
    Unix(PathBuf),
}

impl FromStr for Target {
    type Err = ClientError;

    /// Parses `unix:PATH`, `unix://PATH`, a path containing `/` (a Unix
    /// socket), or `host:port` (TCP).
    fn from_str(text: &str) -> Result<Target, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidArgument {
            what: "target",
            reason: format!("{text:?}: {reason}"),
        };
        if let Some(path) = text.strip_prefix("unix://").or_else(|| text.strip_prefix("unix:")) {
            if path.is_empty() {
                return Err(invalid("the Unix socket path is empty"));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if text.contains('/') {
            return Ok(Target::Unix(PathBuf::from(text)));
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(invalid("expected host:port or the path of a Unix socket"));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(invalid("expected host:port with a port from 0 to 65535"));
        }
        Ok(Target::Tcp(text.to_string()))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(address) => write!(formatter, "{address}"),
            Target::Unix(path) => write!(formatter, "unix:{}", path.display()),
        }
    }
}

/// A byte stream to the server.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open connection to the server.
pub type Connection = Box<dyn Io>;

/// Opens a new connection to `target`, failing after `timeout`.
pub async fn connect(target: &Target, timeout: Duration) -> ClientResult<Connection> {
    let attempt = async {
        match target {
            Target::Tcp(address) => {
                let stream = TcpStream::connect(address).await?;
                // Process messages are small and latency matters more than
                // packet count.
                stream.set_nodelay(true)?;
                Ok::<Connection, io::Error>(Box::new(stream))
            }
            Target::Unix(path) => Ok(Box::new(UnixStream::connect(path).await?) as Connection),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(ClientError::Connect {
            target: target.to_string(),
            source,
        }),
        Err(_) => Err(ClientError::ConnectTimeout {
            target: target.to_string(),
            timeout_ms: timeout.as_millis(),
        }),
    }
}

/// Framing of a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no framing header.
    None,
    /// A body of this many bytes.
    Length(usize),
    /// A body in chunked transfer coding, of unknown length.
    Chunked,
}

/// The head of one request.
#[derive(Debug, Clone)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The path with its query string, already escaped.
    pub target: &'a str,
    pub content_type: Option<&'a str>,
    pub framing: RequestFraming,
    /// Whether to send `Connection: close`. The plain routes do; the four
    /// process routes must not, because the connection stays open as a
    /// raw stream.
    pub close: bool,
}

impl RequestHead<'_> {
    /// Serialises the head, ending with the blank line.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: api\r\nUser-Agent: trellis-client/{}\r\n",
            self.method,
            self.target,
            env!("CARGO_PKG_VERSION")
        );
        match self.framing {
            RequestFraming::None => {}
            RequestFraming::Length(length) => head.push_str(&format!("Content-Length: {length}\r\n")),
            RequestFraming::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
        }
        if let Some(content_type) = self.content_type {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        if self.close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        head.into_bytes()
    }
}

/// The status line and headers of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The minor HTTP version: 1 for HTTP/1.1.
    pub version: u8,
    pub status: u16,
    pub reason: String,
    /// Header names and values in the order received.
    pub headers: Vec<(String, String)>,
}

/// Framing of a response body, which decides where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    Length(u64),
    Chunked,
    /// The body ends when the server closes the connection.
    Close,
}

impl ResponseHead {
    /// Returns the first value of header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Returns whether the status is in 200..=299.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Returns how the body is framed, by RFC 9112 section 6.3: chunked
    /// transfer coding wins over `Content-Length`.
    pub fn framing(&self) -> Result<ResponseFraming, String> {
        if let Some(coding) = self.header("transfer-encoding") {
            let last = coding.rsplit(',').next().unwrap_or("").trim();
            if last.eq_ignore_ascii_case("chunked") {
                return Ok(ResponseFraming::Chunked);
            }
            return Ok(ResponseFraming::Close);
        }
        if let Some(length) = self.header("content-length") {
            return length
                .trim()
                .parse()
                .map(ResponseFraming::Length)
                .map_err(|_| format!("invalid Content-Length {length:?}"));
        }
        Ok(ResponseFraming::Close)
    }

    /// Returns whether the head announces that the server closes the
    /// connection after this response.
    pub fn closes_connection(&self) -> bool {
        let close_token = self
            .header("connection")
            .is_some_and(|value| value.split(',').any(|token| token.trim().eq_ignore_ascii_case("close")));
        close_token || self.version == 0
    }
}

/// Reads a response head from `reader`. Bytes after the head stay in
/// `buffer`, which may already hold bytes read earlier.
pub async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut BytesMut,
    route: &str,
) -> ClientResult<ResponseHead> {
    loop {
        if let Some(head) = parse_head(buffer, route)? {
            return Ok(head);
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(protocol(route, format!("response head longer than {MAX_HEAD_BYTES} bytes")));
        }
        let read = fill(reader, buffer).await.map_err(|source| io_error(route, source))?;
        if read == 0 {
            return Err(protocol(route, "connection closed before the end of the response head"));
        }
    }
}

/// Parses a complete head at the start of `buffer` and removes it.
fn parse_head(buffer: &mut BytesMut, route: &str) -> ClientResult<Option<ResponseHead>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let length = match response.parse(buffer) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(protocol(route, format!("invalid response head: {error}"))),
    };
    let head = ResponseHead {
        version: response.version.unwrap_or(1),
        status: response.code.unwrap_or(0),
        reason: response.reason.unwrap_or("").to_string(),
        headers: response
            .headers
            .iter()
            .map(|header| {
                let value = String::from_utf8_lossy(header.value).into_owned();
                (header.name.to_string(), value)
            })
            .collect(),
    };
    buffer.advance(length);
    Ok(Some(head))
}

/// Reads more bytes from `reader` into `buffer`; returns 0 at end of stream.
pub async fn fill<R: AsyncRead + Unpin>(reader: &mut R, buffer: &mut BytesMut) -> io::Result<usize> {
    buffer.reserve(READ_BYTES);
    reader.read_buf(buffer).await
}

pub(crate) fn protocol(route: &str, reason: impl Into<String>) -> ClientError {
    ClientError::Protocol {
        route: route.to_string(),
        reason: reason.into(),
    }
}

pub(crate) fn io_error(route: &str, source: io::Error) -> ClientError {
    ClientError::Io {
        route: route.to_string(),
        source,
    }
}

/// Position of a chunked body reader in the chunk framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, reading trailer lines up to the blank line.
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Length(u64),
    Chunked(ChunkState),
    Close,
    Done,
}

/// Reads a response body with its framing removed.
pub struct BodyReader<R> {
    reader: R,
    buffer: BytesMut,
    state: BodyState,
}

impl<R: AsyncRead + Unpin> BodyReader<R> {
    /// Starts reading a body framed as `framing`. `buffer` contains the
    /// bytes already read after the head.
    pub fn new(reader: R, buffer: BytesMut, framing: ResponseFraming) -> Self {
        let state = match framing {
            ResponseFraming::Length(0) => BodyState::Done,
            ResponseFraming::Length(length) => BodyState::Length(length),
            ResponseFraming::Chunked => BodyState::Chunked(ChunkState::Size),
            ResponseFraming::Close => BodyState::Close,
        };
        BodyReader { reader, buffer, state }
    }

    /// Returns the next piece of the body, or `None` at its end. A body that
    /// ends early fails with `UnexpectedEof`.
    pub async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match self.state {
                BodyState::Done => return Ok(None),
                BodyState::Length(remaining) => {
                    let piece = self.take_some(remaining).await?;
                    let left = remaining - piece.len() as u64;
                    self.state = if left == 0 { BodyState::Done } else { BodyState::Length(left) };
                    return Ok(Some(piece));
                }
                BodyState::Close => {
                    if self.buffer.is_empty() && fill(&mut self.reader, &mut self.buffer).await? == 0 {
                        self.state = BodyState::Done;
                        return Ok(None);
                    }
                    return Ok(Some(self.buffer.split().freeze()));
                }
                BodyState::Chunked(ChunkState::Data(remaining)) => {
                    let piece = self.take_some(remaining).await?;
                    let left = remaining - piece.len() as u64;
                    let next = if left == 0 { ChunkState::DataEnd } else { ChunkState::Data(left) };
                    self.state = BodyState::Chunked(next);
                    return Ok(Some(piece));
                }
                BodyState::Chunked(chunk_state) => self.read_chunk_line(chunk_state).await?,
            }
        }
    }

    /// Handles one line of chunked framing: a size, a data CRLF or a trailer.
    async fn read_chunk_line(&mut self, chunk_state: ChunkState) -> io::Result<()> {
        let line = self.read_line().await?;
        self.state = match chunk_state {
            ChunkState::Size => {
                let digits = line.split(|byte| *byte == b';').next().unwrap_or(&[]);
                let text = std::str::from_utf8(digits).unwrap_or("").trim();
                let size = u64::from_str_radix(text, 16)
                    .map_err(|_| invalid_data(format!("invalid chunk size line {:?}", String::from_utf8_lossy(&line))))?;
                if size == 0 {
                    BodyState::Chunked(ChunkState::Trailers)
                } else {
                    BodyState::Chunked(ChunkState::Data(size))
                }
            }
            ChunkState::DataEnd if line.is_empty() => BodyState::Chunked(ChunkState::Size),
            ChunkState::DataEnd => return Err(invalid_data("missing CRLF after chunk data")),
            ChunkState::Trailers if line.is_empty() => BodyState::Done,
            ChunkState::Trailers => BodyState::Chunked(ChunkState::Trailers),
            ChunkState::Data(_) => unreachable!("chunk data is not read as a line"),
        };
        Ok(())
    }

    /// Removes and returns one CRLF-terminated line, without the CRLF.
    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\r\n") {
                let line = self.buffer.split_to(end).to_vec();
                self.buffer.advance(2);
                return Ok(line);
            }
            if self.buffer.len() > MAX_CHUNK_LINE_BYTES {
                return Err(invalid_data("chunk framing line too long"));
            }
            if fill(&mut self.reader, &mut self.buffer).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Returns up to `limit` bytes, reading the socket when the buffer is empty.
    async fn take_some(&mut self, limit: u64) -> io::Result<Bytes> {
        if self.buffer.is_empty() && fill(&mut self.reader, &mut self.buffer).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let length = self.buffer.len().min(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(self.buffer.split_to(length).freeze())
    }

    /// Reads the whole body; fails when it is longer than `limit` bytes.
    pub async fn read_to_end(&mut self, limit: usize) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(piece) = self.next_chunk().await? {
            if body.len() + piece.len() > limit {
                return Err(invalid_data(format!("response body longer than {limit} bytes")));
            }
            body.extend_from_slice(&piece);
        }
        Ok(body)
    }

    /// Returns the underlying reader and the bytes buffered but not yet
    /// consumed.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.reader, self.buffer)
    }
}

fn invalid_data(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Writes `reader` to `writer` as a chunked body, including the last chunk.
pub async fn write_chunked<R, W>(reader: &mut R, writer: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buffer = vec![0u8; READ_BYTES];
    let mut total = 0u64;
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        let mut frame = Vec::with_capacity(read + 12);
        frame.extend_from_slice(format!("{read:x}\r\n").as_bytes());
        frame.extend_from_slice(&buffer[..read]);
        frame.extend_from_slice(b"\r\n");
        writer.write_all(&frame).await?;
        total += read as u64;
    }
    writer.write_all(b"0\r\n\r\n").await?;
    writer.flush().await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_parses_tcp_and_unix() {
        assert_eq!("127.0.0.1:7777".parse::<Target>().unwrap(), Target::Tcp("127.0.0.1:7777".into()));
        assert_eq!("[::1]:7777".parse::<Target>().unwrap(), Target::Tcp("[::1]:7777".into()));
        assert_eq!("/tmp/garden.sock".parse::<Target>().unwrap(), Target::Unix("/tmp/garden.sock".into()));
        assert_eq!("unix:g.sock".parse::<Target>().unwrap(), Target::Unix("g.sock".into()));
        assert_eq!("unix:///run/g.sock".parse::<Target>().unwrap(), Target::Unix("/run/g.sock".into()));
    }

    #[test]
    fn target_rejects_malformed() {
        for text in ["localhost", "host:notaport", ":7777", "unix:", "host:70000"] {
            assert!(text.parse::<Target>().is_err(), "{text} was accepted");
        }
    }

    #[test]
    fn request_head_plain_and_hijacked() {
        let plain = RequestHead {
            method: "PUT",
            target: "/containers/a/stop",
            content_type: Some("application/json"),
            framing: RequestFraming::Length(15),
            close: true,
        };
        let text = String::from_utf8(plain.to_bytes()).unwrap();
        assert!(text.starts_with("PUT /containers/a/stop HTTP/1.1\r\nHost: api\r\n"));
        assert!(text.contains("\r\nContent-Length: 15\r\n"));
        assert!(text.contains("\r\nContent-Type: application/json\r\n"));
        assert!(text.ends_with("Connection: close\r\n\r\n"));

        let hijacked = RequestHead { close: false, ..plain };
        assert!(!String::from_utf8(hijacked.to_bytes()).unwrap().contains("Connection"));
    }

    async fn head_of(bytes: &[u8]) -> (ClientResult<ResponseHead>, BytesMut) {
        let mut reader = bytes;
        let mut buffer = BytesMut::new();
        let head = read_head(&mut reader, &mut buffer, "test").await;
        (head, buffer)
    }

    #[tokio::test]
    async fn head_keeps_bytes_after_it() {
        let (head, rest) = head_of(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{\"process_id\":\"p\"}\n",
        )
        .await;
        let head = head.unwrap();
        assert_eq!(head.status, 201);
        assert_eq!(head.reason, "Created");
        assert_eq!(head.header("transfer-ENCODING"), Some("chunked"));
        assert_eq!(head.framing(), Ok(ResponseFraming::Chunked));
        assert!(!head.closes_connection());
        assert_eq!(&rest[..], b"{\"process_id\":\"p\"}\n");
    }

    #[tokio::test]
    async fn head_detects_close() {
        let (head, _) = head_of(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").await;
        assert!(head.unwrap().closes_connection());
        let (head, _) = head_of(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        assert!(head.unwrap().closes_connection());
    }

    #[tokio::test]
    async fn head_truncated_or_invalid_fails() {
        let (head, _) = head_of(b"HTTP/1.1 200 OK\r\nDate: x\r\n").await;
        assert!(matches!(head, Err(ClientError::Protocol { .. })));
        let (head, _) = head_of(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        assert!(matches!(head, Err(ClientError::Protocol { .. })));
    }

    async fn body_of(framing: ResponseFraming, bytes: &'static [u8]) -> io::Result<Vec<u8>> {
        // Feed the bytes one at a time so every framing state gets split input.
        let (mut client, mut server) = tokio::io::duplex(1);
        let feeder = tokio::spawn(async move {
            for byte in bytes {
                if server.write_all(&[*byte]).await.is_err() {
                    break;
                }
            }
        });
        let mut reader = BodyReader::new(&mut client, BytesMut::new(), framing);
        let body = reader.read_to_end(1 << 20).await;
        drop(reader);
        drop(client);
        feeder.await.unwrap();
        body
    }

    #[tokio::test]
    async fn body_chunked_with_extension_and_trailer() {
        let body = body_of(ResponseFraming::Chunked, b"5;name=x\r\nhello\r\n1\r\n!\r\n0\r\nTrailer: y\r\n\r\nEXTRA")
            .await
            .unwrap();
        assert_eq!(body, b"hello!");
    }

    #[tokio::test]
    async fn body_chunked_truncated_fails() {
        let error = body_of(ResponseFraming::Chunked, b"a\r\nhello").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        let error = body_of(ResponseFraming::Chunked, b"zz\r\n").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn body_length_and_close() {
        assert_eq!(body_of(ResponseFraming::Length(3), b"{}\nEXTRA").await.unwrap(), b"{}\n");
        assert_eq!(body_of(ResponseFraming::Close, b"until close").await.unwrap(), b"until close");
        let error = body_of(ResponseFraming::Length(10), b"short").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn chunked_writer_round_trips() {
        let data: Vec<u8> = (0..200_000u32).map(|n| (n % 251) as u8).collect();
        let mut framed = Vec::new();
        write_chunked(&mut &data[..], &mut framed).await.unwrap();
        assert!(framed.ends_with(b"0\r\n\r\n"));
        let mut reader = BodyReader::new(&framed[..], BytesMut::new(), ResponseFraming::Chunked);
        assert_eq!(reader.read_to_end(1 << 20).await.unwrap(), data);
    }
}
