//! Garden's JSON types, with the exact keys the Go peers put on the wire.
//!
//! Request types accept every key as optional and `null` for any of them;
//! decode them with [`crate::api::decode`], which also matches keys
//! case-insensitively as Go's `encoding/json` does. Response types serialise
//! with Go's capitalised keys where the Go structs have no JSON tags.
//! Pointer-like Go fields are `Option`s that serialise whenever they are
//! `Some`, including `Some(0)`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// A Garden duration: signed nanoseconds.
pub type Nanoseconds = i64;

/// Properties of a container: string keys to string values, sorted as Go
/// sorts map keys.
pub type Properties = BTreeMap<String, String>;

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

fn is_zero_u32(value: &u32) -> bool {
    *value == 0
}

fn is_zero_u16(value: &u16) -> bool {
    *value == 0
}

fn is_zero_u8(value: &u8) -> bool {
    *value == 0
}

fn is_zero_i64(value: &i64) -> bool {
    *value == 0
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Deserialises `null` as the type's default, as Go does for every field.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Request body of `POST /containers`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerSpec {
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub handle: String,
    #[serde(skip_serializing_if = "is_zero_i64", deserialize_with = "null_as_default")]
    pub grace_time: Nanoseconds,
    /// The deprecated root filesystem field, the only one in the 2015 API.
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub rootfs: String,
    #[serde(deserialize_with = "null_as_default")]
    pub image: ImageRef,
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub bind_mounts: Vec<BindMount>,
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub network: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "null_as_default")]
    pub properties: Properties,
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "is_false", deserialize_with = "null_as_default")]
    pub privileged: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub limits: Limits,
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub netout_rules: Vec<NetOutRule>,
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub netin: Vec<NetIn>,
}

/// A root filesystem URI and its registry credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageRef {
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub uri: String,
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub username: String,
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub password: String,
}

/// Bind mount mode: 0 is read-only, 1 read-write.
pub const BIND_MOUNT_MODE_RO: u8 = 0;
pub const BIND_MOUNT_MODE_RW: u8 = 1;

/// A bind mount of a host path into the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BindMount {
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub src_path: String,
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub dst_path: String,
    #[serde(skip_serializing_if = "is_zero_u8", deserialize_with = "null_as_default")]
    pub mode: u8,
    #[serde(skip_serializing_if = "is_zero_u8", deserialize_with = "null_as_default")]
    pub origin: u8,
}

/// Every resource limit of a container. The Go client always sends all five
/// sub-objects, even when empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    #[serde(deserialize_with = "null_as_default")]
    pub bandwidth_limits: BandwidthLimits,
    #[serde(deserialize_with = "null_as_default")]
    pub cpu_limits: CpuLimits,
    #[serde(deserialize_with = "null_as_default")]
    pub disk_limits: DiskLimits,
    #[serde(deserialize_with = "null_as_default")]
    pub memory_limits: MemoryLimits,
    #[serde(deserialize_with = "null_as_default")]
    pub pid_limits: PidLimits,
}

/// Bandwidth limits, in bytes per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BandwidthLimits {
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub rate: u64,
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub burst: u64,
}

/// CPU limits: `weight` (modern) or `limit_in_shares` (2015), both read as
/// cgroup v1 shares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuLimits {
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub weight: u64,
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub limit_in_shares: u64,
}

/// Disk limit scope 0: the image plus what the container writes.
pub const DISK_SCOPE_TOTAL: u8 = 0;
/// Disk limit scope 1: only what the container writes.
pub const DISK_SCOPE_EXCLUSIVE: u8 = 1;

/// Disk limits in bytes and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskLimits {
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub inode_soft: u64,
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub inode_hard: u64,
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub byte_soft: u64,
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub byte_hard: u64,
    #[serde(skip_serializing_if = "is_zero_u8", deserialize_with = "null_as_default")]
    pub scope: u8,
}

/// Memory limit in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryLimits {
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub limit_in_bytes: u64,
}

/// Maximum number of pids; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PidLimits {
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub max: u64,
}

/// A port mapping requested at create time or through `net/in`.
/// Both keys are always sent inside a ContainerSpec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetIn {
    #[serde(deserialize_with = "null_as_default")]
    pub host_port: u32,
    #[serde(deserialize_with = "null_as_default")]
    pub container_port: u32,
}

/// Request body of `POST /containers/:handle/net/in`. `handle` repeats the
/// path and is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetInRequest {
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub handle: String,
    #[serde(skip_serializing_if = "is_zero_u32", deserialize_with = "null_as_default")]
    pub host_port: u32,
    #[serde(skip_serializing_if = "is_zero_u32", deserialize_with = "null_as_default")]
    pub container_port: u32,
}

/// Response body of `POST /containers/:handle/net/in`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetInResponse {
    #[serde(skip_serializing_if = "is_zero_u32", deserialize_with = "null_as_default")]
    pub host_port: u32,
    #[serde(skip_serializing_if = "is_zero_u32", deserialize_with = "null_as_default")]
    pub container_port: u32,
}

/// NetOut protocols.
pub const PROTOCOL_ALL: u8 = 0;
pub const PROTOCOL_TCP: u8 = 1;
pub const PROTOCOL_UDP: u8 = 2;
pub const PROTOCOL_ICMP: u8 = 3;
pub const PROTOCOL_ICMPV6: u8 = 4;

/// An outbound allow rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetOutRule {
    #[serde(skip_serializing_if = "is_zero_u8", deserialize_with = "null_as_default")]
    pub protocol: u8,
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub networks: Vec<IpRange>,
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub ports: Vec<PortRange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmps: Option<IcmpControl>,
    #[serde(skip_serializing_if = "is_false", deserialize_with = "null_as_default")]
    pub log: bool,
}

/// An inclusive range of IP addresses. The texts are checked when the rule
/// is decoded: an address that does not parse is a decode error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IpRange {
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_optional_ip"
    )]
    pub start: Option<std::net::IpAddr>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_optional_ip"
    )]
    pub end: Option<std::net::IpAddr>,
}

fn deserialize_optional_ip<'de, D>(deserializer: D) -> Result<Option<std::net::IpAddr>, D::Error>
where
    D: Deserializer<'de>,
{
    let text = Option::<String>::deserialize(deserializer)?.unwrap_or_default();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("invalid IP address: {text}")))
}

/// An inclusive range of ports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PortRange {
    #[serde(skip_serializing_if = "is_zero_u16", deserialize_with = "null_as_default")]
    pub start: u16,
    #[serde(skip_serializing_if = "is_zero_u16", deserialize_with = "null_as_default")]
    pub end: u16,
}

/// ICMP type and optional code of an ICMP NetOut rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IcmpControl {
    #[serde(rename = "type", skip_serializing_if = "is_zero_u8", deserialize_with = "null_as_default")]
    pub icmp_type: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

/// Request body of Run (`POST /containers/:handle/processes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessSpec {
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub id: String,
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub path: String,
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub args: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub dir: String,
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub user: String,
    #[serde(deserialize_with = "null_as_default")]
    pub rlimits: ResourceLimits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<ProcessLimits>,
    /// When present, even as `{}`, the process runs with a TTY.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySpec>,
    #[serde(deserialize_with = "null_as_default")]
    pub image: ImageRef,
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_default")]
    pub bind_mounts: Vec<BindMount>,
}

/// Per-process rlimits. Every key is sent whenever it is set, including 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceLimits {
    #[serde(rename = "as", skip_serializing_if = "Option::is_none")]
    pub address_space: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsize: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memlock: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msgqueue: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nice: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nofile: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nproc: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtprio: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigpending: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<u64>,
}

/// cgroup limits for one process (a process with its own limits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessLimits {
    #[serde(deserialize_with = "null_as_default")]
    pub cpu_limits: CpuLimits,
    #[serde(deserialize_with = "null_as_default")]
    pub memory_limits: MemoryLimits,
}

/// TTY settings of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TtySpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_size: Option<WindowSize>,
}

/// A terminal window size; 0 means that field's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WindowSize {
    #[serde(skip_serializing_if = "is_zero_u16", deserialize_with = "null_as_default")]
    pub columns: u16,
    #[serde(skip_serializing_if = "is_zero_u16", deserialize_with = "null_as_default")]
    pub rows: u16,
}

/// One message on a hijacked process connection (C1), in either direction.
/// Absent and zero are different: `source` without `data` closes stdin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessPayload {
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub process_id: String,
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "null_as_default")]
    pub stream_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
}

/// Signal values of a process payload.
pub const SIGNAL_TERMINATE: i64 = 0;
pub const SIGNAL_KILL: i64 = 1;

/// Request body of Stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StopRequest {
    #[serde(deserialize_with = "null_as_default")]
    pub kill: bool,
}

/// Request and response body of the single-property routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PropertyValue {
    #[serde(deserialize_with = "null_as_default")]
    pub value: String,
}

/// Response of `GET /capacity`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capacity {
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub memory_in_bytes: u64,
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub disk_in_bytes: u64,
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub schedulable_disk_in_bytes: u64,
    #[serde(skip_serializing_if = "is_zero_u64", deserialize_with = "null_as_default")]
    pub max_containers: u64,
}

/// Response of `POST /containers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateResponse {
    #[serde(rename = "Handle", alias = "handle", default)]
    pub handle: String,
}

/// Response of `GET /containers`. Never `null`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    #[serde(rename = "Handles", alias = "handles", default, deserialize_with = "null_as_default")]
    pub handles: Vec<String>,
}

/// A port mapping as Info reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "HostPort", default)]
    pub host_port: u32,
    #[serde(rename = "ContainerPort", default)]
    pub container_port: u32,
}

/// Response of Info. All ten keys are always present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    #[serde(rename = "State", default)]
    pub state: String,
    #[serde(rename = "Events", default)]
    pub events: Option<Vec<String>>,
    #[serde(rename = "HostIP", default)]
    pub host_ip: String,
    #[serde(rename = "ContainerIP", default)]
    pub container_ip: String,
    #[serde(rename = "ContainerIPv6", default)]
    pub container_ipv6: String,
    #[serde(rename = "ExternalIP", default)]
    pub external_ip: String,
    #[serde(rename = "ContainerPath", default)]
    pub container_path: String,
    #[serde(rename = "ProcessIDs", default)]
    pub process_ids: Option<Vec<String>>,
    #[serde(rename = "Properties", default)]
    pub properties: Option<Properties>,
    #[serde(rename = "MappedPorts", default)]
    pub mapped_ports: Option<Vec<PortMapping>>,
}

/// One entry of a `bulk_info` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfoEntry {
    #[serde(rename = "Info", default)]
    pub info: ContainerInfo,
    #[serde(rename = "Err", default)]
    pub err: Option<ErrorEnvelope>,
}

/// The error body of every failed request, and the `Err` of bulk entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    #[serde(rename = "Type", default, deserialize_with = "null_as_default")]
    pub error_type: String,
    #[serde(rename = "Message", default, deserialize_with = "null_as_default")]
    pub message: String,
    #[serde(rename = "Handle", default, deserialize_with = "null_as_default")]
    pub handle: String,
    #[serde(rename = "ProcessID", default, deserialize_with = "null_as_default")]
    pub process_id: String,
    #[serde(rename = "Binary", default, deserialize_with = "null_as_default")]
    pub binary: String,
}

/// Error type names of the envelope.
pub const ERROR_CONTAINER_NOT_FOUND: &str = "ContainerNotFoundError";
pub const ERROR_PROCESS_NOT_FOUND: &str = "ProcessNotFoundError";
pub const ERROR_EXECUTABLE_NOT_FOUND: &str = "ExecutableNotFoundError";
pub const ERROR_SERVICE_UNAVAILABLE: &str = "ServiceUnavailableError";
pub const ERROR_UNRECOVERABLE: &str = "UnrecoverableError";

/// Response of Metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(rename = "MemoryStat", default)]
    pub memory_stat: MemoryStat,
    #[serde(rename = "CPUStat", default)]
    pub cpu_stat: CpuStat,
    #[serde(rename = "DiskStat", default)]
    pub disk_stat: DiskStat,
    #[serde(rename = "NetworkStat", default)]
    pub network_stat: Option<NetworkStat>,
    #[serde(rename = "PidStat", default)]
    pub pid_stat: PidStat,
    #[serde(rename = "Age", default)]
    pub age: Nanoseconds,
    #[serde(rename = "CPUEntitlement", default)]
    pub cpu_entitlement: u64,
}

/// One entry of a `bulk_metrics` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerMetricsEntry {
    #[serde(rename = "Metrics", default)]
    pub metrics: Metrics,
    #[serde(rename = "Err", default)]
    pub err: Option<ErrorEnvelope>,
}

/// Memory statistics, in the modern key order. Every key is snake_case except
/// `TotalUsageTowardLimit`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryStat {
    pub active_anon: u64,
    pub active_file: u64,
    pub cache: u64,
    pub hierarchical_memory_limit: u64,
    pub inactive_anon: u64,
    pub inactive_file: u64,
    pub mapped_file: u64,
    pub pgfault: u64,
    pub pgmajfault: u64,
    pub pgpgin: u64,
    pub pgpgout: u64,
    pub rss: u64,
    pub total_active_anon: u64,
    pub total_active_file: u64,
    pub total_cache: u64,
    pub total_inactive_anon: u64,
    pub total_inactive_file: u64,
    pub total_mapped_file: u64,
    pub total_pgfault: u64,
    pub total_pgmajfault: u64,
    pub total_pgpgin: u64,
    pub total_pgpgout: u64,
    pub total_rss: u64,
    pub total_unevictable: u64,
    pub unevictable: u64,
    pub swap: u64,
    pub hierarchical_memsw_limit: u64,
    pub total_swap: u64,
    #[serde(rename = "TotalUsageTowardLimit")]
    pub total_usage_toward_limit: u64,
    pub anon: u64,
    pub file: u64,
    pub swapcached: u64,
}

/// CPU time in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuStat {
    #[serde(rename = "Usage", default)]
    pub usage: u64,
    #[serde(rename = "User", default)]
    pub user: u64,
    #[serde(rename = "System", default)]
    pub system: u64,
}

/// Disk usage in bytes and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStat {
    #[serde(rename = "TotalBytesUsed", default)]
    pub total_bytes_used: u64,
    #[serde(rename = "TotalInodesUsed", default)]
    pub total_inodes_used: u64,
    #[serde(rename = "ExclusiveBytesUsed", default)]
    pub exclusive_bytes_used: u64,
    #[serde(rename = "ExclusiveInodesUsed", default)]
    pub exclusive_inodes_used: u64,
}

/// Bytes received and sent by the container's interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStat {
    #[serde(rename = "RxBytes", default)]
    pub rx_bytes: u64,
    #[serde(rename = "TxBytes", default)]
    pub tx_bytes: u64,
}

/// Pids in use and the pid limit (0 when unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidStat {
    #[serde(rename = "Current", default)]
    pub current: u64,
    #[serde(rename = "Max", default)]
    pub max: u64,
}
