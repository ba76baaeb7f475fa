//! The Rust Garden client, on tokio. Depends on neither actix nor
//! `crate::linux`.
//!
//! Like the Go Garden client, it opens a new connection for every request,
//! over TCP or a Unix socket. Plain routes send `Connection: close` and read
//! one response; the process routes ([`Client::run`], [`Client::attach`])
//! keep their connections open as raw streams (see [`process`]). Errors
//! that the server reports in its error envelope come back as the typed
//! variants of [`ClientError`].

mod error;
pub mod http;
pub mod process;
#[cfg(test)]
mod replay_tests;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio_util::io::StreamReader;

pub use error::{ClientError, ClientResult};
pub use http::Target;
pub use process::{OutputWriter, Process, ProcessController, ProcessIo, Signal, StdinReader};

use crate::api::{
    self, BandwidthLimits, Capacity, ContainerInfo, ContainerInfoEntry, ContainerMetricsEntry, ContainerSpec,
    CpuLimits, CreateResponse, DiskLimits, ListResponse, MemoryLimits, Metrics, NetInRequest, NetInResponse,
    NetOutRule, ProcessSpec, Properties, PropertyValue, StopRequest,
};
use http::{io_error, protocol, BodyReader, Connection, RequestFraming, RequestHead};

/// The Go client's connect timeout, used as the default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest JSON response body the client reads, in bytes.
const MAX_JSON_BODY_BYTES: usize = 64 << 20;

/// Characters escaped in a path segment: those that would end or change the
/// path (`/`, `?`, `#`), `%` itself, and `+`, which the Go server decodes as
/// a space in path parameters.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'+')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Escapes a handle, process id or property key for use as one path segment.
pub fn escape_segment(segment: &str) -> String {
    utf8_percent_encode(segment, PATH_SEGMENT).to_string()
}

/// Builds a query string (without `?`) with form encoding, as the Go client
/// does: `/` becomes `%2F`, `,` becomes `%2C` and a space `+`.
fn query<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        serializer.append_pair(key, value);
    }
    serializer.finish()
}

/// A request body.
enum Body<'a> {
    None,
    Json(Vec<u8>),
    Tar(&'a mut (dyn AsyncRead + Send + Unpin)),
}

/// A Garden client for one server.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    connect_timeout: Duration,
}

impl Client {
    /// Creates a client for the server at `target`. No connection is opened
    /// until the first call.
    pub fn new(target: Target) -> Client {
        Client {
            target,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Sets how long opening a connection may take (default 2 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Client {
        self.connect_timeout = timeout;
        self
    }

    /// Returns the address of the server this client connects to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Checks that the server is up (`GET /ping`).
    pub async fn ping(&self) -> ClientResult<()> {
        self.call_empty("GET", "/ping", Body::None).await
    }

    /// Returns the server's capacity.
    pub async fn capacity(&self) -> ClientResult<Capacity> {
        self.call("GET", "/capacity", Body::None, "capacity").await
    }

    /// Creates a container and returns its handle.
    pub async fn create(&self, spec: &ContainerSpec) -> ClientResult<String> {
        let response: CreateResponse = self
            .call("POST", "/containers", Body::Json(api::encode(spec)), "create response")
            .await?;
        Ok(response.handle)
    }

    /// Lists the handles of the containers whose properties contain every
    /// key and value of `filter` (all containers for an empty filter).
    pub async fn list(&self, filter: &Properties) -> ClientResult<Vec<String>> {
        let mut path = "/containers".to_string();
        if !filter.is_empty() {
            path.push('?');
            path.push_str(&query(filter.iter().map(|(key, value)| (key.as_str(), value.as_str()))));
        }
        let response: ListResponse = self.call("GET", &path, Body::None, "container list").await?;
        Ok(response.handles)
    }

    /// Checks that a container exists, through the list route as the Go
    /// client's `Lookup` does.
    pub async fn lookup(&self, handle: &str) -> ClientResult<()> {
        if self.list(&Properties::new()).await?.iter().any(|listed| listed == handle) {
            return Ok(());
        }
        Err(ClientError::ContainerNotFound {
            handle: handle.to_string(),
        })
    }

    /// Returns a container's info.
    pub async fn info(&self, handle: &str) -> ClientResult<ContainerInfo> {
        self.call("GET", &container_path(handle, "/info"), Body::None, "container info")
            .await
    }

    /// Returns the info of several containers, each with its own error.
    pub async fn bulk_info(&self, handles: &[&str]) -> ClientResult<BTreeMap<String, ContainerInfoEntry>> {
        let path = format!("/containers/bulk_info?{}", query([("handles", handles.join(",").as_str())]));
        self.call("GET", &path, Body::None, "bulk info").await
    }

    /// Returns the metrics of several containers, each with its own error.
    pub async fn bulk_metrics(&self, handles: &[&str]) -> ClientResult<BTreeMap<String, ContainerMetricsEntry>> {
        let path = format!("/containers/bulk_metrics?{}", query([("handles", handles.join(",").as_str())]));
        self.call("GET", &path, Body::None, "bulk metrics").await
    }

    /// Destroys a container and everything in it.
    pub async fn destroy(&self, handle: &str) -> ClientResult<()> {
        self.call_empty("DELETE", &container_path(handle, ""), Body::None).await
    }

    /// Stops every process in a container: SIGTERM, then SIGKILL after the
    /// server's timeout, or SIGKILL at once when `kill` is true.
    pub async fn stop(&self, handle: &str, kill: bool) -> ClientResult<()> {
        let body = api::encode(&StopRequest { kill });
        self.call_empty("PUT", &container_path(handle, "/stop"), Body::Json(body))
            .await
    }

    /// Returns all properties of a container.
    pub async fn properties(&self, handle: &str) -> ClientResult<Properties> {
        self.call("GET", &container_path(handle, "/properties"), Body::None, "properties")
            .await
    }

    /// Returns one property of a container.
    pub async fn property(&self, handle: &str, key: &str) -> ClientResult<String> {
        let path = container_path(handle, &format!("/properties/{}", escape_segment(key)));
        let value: PropertyValue = self.call("GET", &path, Body::None, "property").await?;
        Ok(value.value)
    }

    /// Sets one property of a container.
    pub async fn set_property(&self, handle: &str, key: &str, value: &str) -> ClientResult<()> {
        let path = container_path(handle, &format!("/properties/{}", escape_segment(key)));
        let body = api::encode(&PropertyValue { value: value.to_string() });
        self.call_empty("PUT", &path, Body::Json(body)).await
    }

    /// Removes one property of a container.
    pub async fn remove_property(&self, handle: &str, key: &str) -> ClientResult<()> {
        let path = container_path(handle, &format!("/properties/{}", escape_segment(key)));
        self.call_empty("DELETE", &path, Body::None).await
    }

    /// Sets how long a container may stay idle before the server destroys
    /// it; zero means never.
    pub async fn set_grace_time(&self, handle: &str, grace_time: Duration) -> ClientResult<()> {
        let nanoseconds = i64::try_from(grace_time.as_nanos()).map_err(|_| ClientError::InvalidArgument {
            what: "grace time",
            reason: format!("{grace_time:?} does not fit in 64-bit nanoseconds"),
        })?;
        let body = api::encode(&nanoseconds);
        self.call_empty("PUT", &container_path(handle, "/grace_time"), Body::Json(body))
            .await
    }

    /// Returns a container's metrics.
    pub async fn metrics(&self, handle: &str) -> ClientResult<Metrics> {
        self.call("GET", &container_path(handle, "/metrics"), Body::None, "metrics")
            .await
    }

    /// Sets a container's memory limit (the 2015 `PUT .../limits/memory`
    /// route) and returns the limit in effect.
    pub async fn set_memory_limits(&self, handle: &str, limits: &MemoryLimits) -> ClientResult<MemoryLimits> {
        let body = Body::Json(api::encode(limits));
        self.call("PUT", &container_path(handle, "/limits/memory"), body, "memory limits").await
    }

    /// Sets a container's CPU limits and returns the limits in effect.
    pub async fn set_cpu_limits(&self, handle: &str, limits: &CpuLimits) -> ClientResult<CpuLimits> {
        let body = Body::Json(api::encode(limits));
        self.call("PUT", &container_path(handle, "/limits/cpu"), body, "CPU limits").await
    }

    /// Sets a container's disk limits and returns the limits in effect.
    pub async fn set_disk_limits(&self, handle: &str, limits: &DiskLimits) -> ClientResult<DiskLimits> {
        let body = Body::Json(api::encode(limits));
        self.call("PUT", &container_path(handle, "/limits/disk"), body, "disk limits").await
    }

    /// Sets a container's bandwidth limits and returns the limits in effect.
    pub async fn set_bandwidth_limits(&self, handle: &str, limits: &BandwidthLimits) -> ClientResult<BandwidthLimits> {
        let body = Body::Json(api::encode(limits));
        self.call("PUT", &container_path(handle, "/limits/bandwidth"), body, "bandwidth limits").await
    }

    /// Returns a container's bandwidth limits.
    pub async fn bandwidth_limits(&self, handle: &str) -> ClientResult<BandwidthLimits> {
        self.call("GET", &container_path(handle, "/limits/bandwidth"), Body::None, "bandwidth limits")
            .await
    }

    /// Returns a container's CPU limits.
    pub async fn cpu_limits(&self, handle: &str) -> ClientResult<CpuLimits> {
        self.call("GET", &container_path(handle, "/limits/cpu"), Body::None, "CPU limits")
            .await
    }

    /// Returns a container's disk limits.
    pub async fn disk_limits(&self, handle: &str) -> ClientResult<DiskLimits> {
        self.call("GET", &container_path(handle, "/limits/disk"), Body::None, "disk limits")
            .await
    }

    /// Returns a container's memory limits.
    pub async fn memory_limits(&self, handle: &str) -> ClientResult<MemoryLimits> {
        self.call("GET", &container_path(handle, "/limits/memory"), Body::None, "memory limits")
            .await
    }

    /// Maps a host port to a container port; 0 lets the server pick either.
    /// Returns the ports in use.
    pub async fn net_in(&self, handle: &str, host_port: u32, container_port: u32) -> ClientResult<NetInResponse> {
        let body = api::encode(&NetInRequest {
            handle: handle.to_string(),
            host_port,
            container_port,
        });
        self.call("POST", &container_path(handle, "/net/in"), Body::Json(body), "net-in response")
            .await
    }

    /// Allows outbound traffic that matches `rule`.
    pub async fn net_out(&self, handle: &str, rule: &NetOutRule) -> ClientResult<()> {
        self.call_empty("POST", &container_path(handle, "/net/out"), Body::Json(api::encode(rule)))
            .await
    }

    /// Allows outbound traffic that matches any of `rules`.
    pub async fn bulk_net_out(&self, handle: &str, rules: &[NetOutRule]) -> ClientResult<()> {
        let path = container_path(handle, "/net/out/bulk");
        self.call_empty("POST", &path, Body::Json(api::encode(&rules))).await
    }

    /// Extracts the tar archive read from `tar` into `destination` inside
    /// the container, as `user` (empty means root). The archive is streamed
    /// with chunked framing as it is read.
    pub async fn stream_in(
        &self,
        handle: &str,
        destination: &str,
        user: &str,
        tar: &mut (dyn AsyncRead + Send + Unpin),
    ) -> ClientResult<()> {
        let path = format!(
            "{}?{}",
            container_path(handle, "/files"),
            query([("destination", destination), ("user", user)])
        );
        let (head, body) = self.send("PUT", &path, Body::Tar(tar)).await?;
        // The success body is `{}`; like the Go client, only the status
        // matters.
        if !head.is_success() {
            let bytes = read_body(body, &format!("PUT {path}")).await?;
            return Err(ClientError::from_error_body(head.status, &bytes));
        }
        Ok(())
    }

    /// Streams `source` out of the container as a tar archive, read as
    /// `user` (empty means root). A `source` ending in `/` gives the
    /// directory's contents; otherwise the archive contains one top-level entry.
    pub async fn stream_out(&self, handle: &str, source: &str, user: &str) -> ClientResult<StreamOut> {
        let path = format!(
            "{}?{}",
            container_path(handle, "/files"),
            query([("source", source), ("user", user)])
        );
        let (head, body) = self.send("GET", &path, Body::None).await?;
        if !head.is_success() {
            let bytes = read_body(body, &format!("GET {path}")).await?;
            return Err(ClientError::from_error_body(head.status, &bytes));
        }
        Ok(StreamOut::new(body))
    }

    /// Runs a process in a container. Returns once the process has started
    /// and the requested output streams are attached.
    pub async fn run(&self, handle: &str, spec: &ProcessSpec, io: ProcessIo) -> ClientResult<Process> {
        let request = process::ControlRequest {
            method: "POST",
            path: container_path(handle, "/processes"),
            body: Some(api::encode(spec)),
            processes_path: container_path(handle, "/processes"),
        };
        Process::start(&self.target, self.connect_timeout, request, io).await
    }

    /// Attaches to a process started earlier. The new attachment receives
    /// output produced from now on, output the server buffered while no
    /// client was attached, and the exit status.
    pub async fn attach(&self, handle: &str, process_id: &str, io: ProcessIo) -> ClientResult<Process> {
        let request = process::ControlRequest {
            method: "GET",
            path: container_path(handle, &format!("/processes/{}", escape_segment(process_id))),
            body: None,
            processes_path: container_path(handle, "/processes"),
        };
        Process::start(&self.target, self.connect_timeout, request, io).await
    }

    /// Sends one plain request and returns the response head and a reader
    /// of its body.
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Body<'_>,
    ) -> ClientResult<(http::ResponseHead, BodyReader<Connection>)> {
        let route = format!("{method} {path}");
        let mut connection = http::connect(&self.target, self.connect_timeout).await?;
        let (content_type, framing) = match &body {
            Body::None => (None, RequestFraming::None),
            Body::Json(bytes) => (Some("application/json"), RequestFraming::Length(bytes.len())),
            Body::Tar(_) => (Some("application/x-tar"), RequestFraming::Chunked),
        };
        let head = RequestHead {
            method,
            target: path,
            content_type,
            framing,
            close: true,
        };
        let written = write_request(&mut connection, head.to_bytes(), body).await;

        // A server may respond before it has read the whole body, for
        // example to an unknown handle on stream-in, and then the body write
        // fails. Its response explains more than the write error does.
        let mut buffer = bytes::BytesMut::new();
        let response = match (http::read_head(&mut connection, &mut buffer, &route).await, written) {
            (Ok(response), _) => response,
            (Err(_), Err(source)) => return Err(io_error(&route, source)),
            (Err(error), Ok(())) => return Err(error),
        };
        let framing = response.framing().map_err(|reason| protocol(&route, reason))?;
        Ok((response, BodyReader::new(connection, buffer, framing)))
    }

    /// Sends a plain request and decodes its JSON success body as `T`.
    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Body<'_>,
        what: &'static str,
    ) -> ClientResult<T> {
        let (head, reader) = self.send(method, path, body).await?;
        let route = format!("{method} {path}");
        let bytes = read_body(reader, &route).await?;
        if !head.is_success() {
            return Err(ClientError::from_error_body(head.status, &bytes));
        }
        api::decode(&bytes).map_err(|source| ClientError::InvalidBody { what, source })
    }

    /// Sends a plain request whose success body is `{}` or another JSON
    /// value that carries nothing.
    async fn call_empty(&self, method: &str, path: &str, body: Body<'_>) -> ClientResult<()> {
        self.call::<serde_json::Value>(method, path, body, "response").await?;
        Ok(())
    }
}

fn container_path(handle: &str, rest: &str) -> String {
    format!("/containers/{}{rest}", escape_segment(handle))
}

async fn write_request(connection: &mut Connection, head: Vec<u8>, body: Body<'_>) -> std::io::Result<()> {
    match body {
        Body::None => connection.write_all(&head).await?,
        Body::Json(bytes) => {
            let mut request = head;
            request.extend_from_slice(&bytes);
            connection.write_all(&request).await?;
        }
        Body::Tar(reader) => {
            connection.write_all(&head).await?;
            http::write_chunked(reader, connection).await?;
        }
    }
    connection.flush().await
}

async fn read_body(mut reader: BodyReader<Connection>, route: &str) -> ClientResult<Vec<u8>> {
    reader
        .read_to_end(MAX_JSON_BODY_BYTES)
        .await
        .map_err(|source| io_error(route, source))
}

/// The body of a stream-out response: the tar archive, read as it arrives.
/// A response that ends early fails the read with `UnexpectedEof`, so a
/// truncated archive is never mistaken for a complete one.
pub struct StreamOut {
    inner: StreamReader<BoxStream<'static, std::io::Result<Bytes>>, Bytes>,
}

impl StreamOut {
    fn new(body: BodyReader<Connection>) -> StreamOut {
        let chunks = stream::unfold(Some(body), |state| async move {
            let mut body = state?;
            match body.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some(body))),
                Ok(None) => None,
                // Nothing can follow a broken body.
                Err(error) => Some((Err(error), None)),
            }
        });
        StreamOut {
            inner: StreamReader::new(Box::pin(chunks)),
        }
    }
}

impl AsyncRead for StreamOut {
    fn poll_read(self: Pin<&mut Self>, context: &mut Context<'_>, buffer: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(context, buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_escaping() {
        assert_eq!(escape_segment("web-1"), "web-1");
        assert_eq!(escape_segment("a b/c+d?e#f%"), "a%20b%2Fc%2Bd%3Fe%23f%25");
    }

    #[test]
    fn query_matches_go_encoding() {
        assert_eq!(query([("handles", "web-1,missing-9")]), "handles=web-1%2Cmissing-9");
        assert_eq!(
            query([("destination", "/home/vcap/app"), ("user", "vcap")]),
            "destination=%2Fhome%2Fvcap%2Fapp&user=vcap"
        );
        assert_eq!(query([("k", "a b")]), "k=a+b");
    }
}
