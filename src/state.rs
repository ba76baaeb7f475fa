//! The container state file in the depot, and the start-up fault hook.
//!
//! Each container directory contains `container.json`: a versioned record of
//! everything the server needs to rebuild the container's actor after a
//! restart. It is replaced atomically (temporary file, fsync, rename, fsync
//! of the directory) before the request that changed it gets its response, so a
//! crash leaves either the old or the new record, never a mix.
//!
//! Version history:
//!
//! - 0: the record without a `version` field, as the first releases wrote
//!   it (no process records, no id mappings). It is read and upgraded in
//!   place on the next write.
//! - 1: adds `version`, `id_mappings`, `processes` and `network`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::actors::container::ContainerState;
use crate::api::{ContainerSpec, Properties};
use crate::runtime::IdMappings;

/// Name of the state file inside the container's directory.
pub const STATE_FILE: &str = "container.json";

/// The format version this server writes. Records of a higher version are
/// rejected, because fields they add would be dropped on the next write.
pub const STATE_VERSION: u32 = 1;

/// Errors of reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("failed to read {path}")]
    Read { path: PathBuf, #[source] source: std::io::Error },
    #[error("failed to write {path}")]
    Write { path: PathBuf, #[source] source: std::io::Error },
    #[error("{path} is not a valid state file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} has format version {version}, newer than the version {supported} this server reads")]
    NewerVersion { path: PathBuf, version: u64, supported: u32 },
    #[error("{path} records the handle {recorded:?}, but its directory is named {directory:?}")]
    HandleMismatch { path: PathBuf, recorded: String, directory: String },
}

/// One process of a container, as the state file records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRecord {
    pub id: String,
    /// Whether the process has a TTY, so resizes reach it after a restart.
    #[serde(default)]
    pub tty: bool,
    /// The exit status once the server has received it. The shim's exit
    /// file in the process directory records it too, also when no server
    /// was running.
    #[serde(default)]
    pub exit_status: Option<i32>,
}

/// The state file of one container.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerRecord {
    /// Format version; absent in version 0.
    #[serde(default)]
    pub version: u32,
    pub handle: String,
    pub state: ContainerState,
    /// Grace time in nanoseconds; 0 means none.
    pub grace_time: i64,
    pub properties: Properties,
    pub created_at_unix_ns: u128,
    /// The creation spec, with the limits as last changed.
    pub spec: ContainerSpec,
    /// The user namespace mapping of an unprivileged container.
    #[serde(default)]
    pub id_mappings: Option<IdMappings>,
    #[serde(default)]
    pub processes: Vec<ProcessRecord>,
    /// Network state (subnet, address, mapped ports, net-out rules), owned
    /// by the networking code and stored here opaquely. `None` for a
    /// container without network state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<serde_json::Value>,
    /// Info's events, one `Out of memory` per out-of-memory kill.
    #[serde(default)]
    pub events: Vec<String>,
    /// The kernel's out-of-memory kill count already recorded in `events`,
    /// so a restored watch reports only later kills.
    #[serde(default)]
    pub oom_kills: u64,
    /// Fields of a later minor change that this server does not know,
    /// kept so that a write does not drop them.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl ContainerRecord {
    /// Serialises the record as pretty JSON with a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a state record serialises");
        bytes.push(b'\n');
        bytes
    }
}

/// Writes the record to `container_dir/container.json` atomically.
pub fn write_record(container_dir: &Path, record: &ContainerRecord) -> Result<(), StateError> {
    let path = container_dir.join(STATE_FILE);
    write_atomically(&path, &record.to_bytes()).map_err(|source| StateError::Write { path, source })
}

/// Reads and checks `container_dir/container.json`: it must parse, be of a
/// version this server reads, and name the handle its directory is named
/// after.
pub fn read_record(container_dir: &Path) -> Result<ContainerRecord, StateError> {
    let path = container_dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|source| StateError::Read { path: path.clone(), source })?;
    parse_record(&path, &bytes, container_dir.file_name().and_then(|name| name.to_str()).unwrap_or(""))
}

/// Parses state file bytes read from `path` for the container directory
/// named `directory`.
pub fn parse_record(path: &Path, bytes: &[u8], directory: &str) -> Result<ContainerRecord, StateError> {
    let invalid = |reason: String| StateError::Invalid { path: path.to_path_buf(), reason };
    // The version is checked before the fields, so a newer file is reported
    // as newer and not as malformed.
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|error| invalid(error.to_string()))?;
    let version = match value.get("version") {
        None => 0,
        Some(version) => version.as_u64().ok_or_else(|| invalid(format!("version {version} is not a number")))?,
    };
    if version > u64::from(STATE_VERSION) {
        return Err(StateError::NewerVersion { path: path.to_path_buf(), version, supported: STATE_VERSION });
    }
    let mut record: ContainerRecord = serde_json::from_value(value).map_err(|error| invalid(error.to_string()))?;
    if record.handle != directory {
        return Err(StateError::HandleMismatch { path: path.to_path_buf(), recorded: record.handle, directory: directory.to_string() });
    }
    record.version = STATE_VERSION;
    Ok(record)
}

/// Writes `bytes` to `path` so that a crash of the server leaves either the
/// old or the new file: a temporary file in the same directory, renamed
/// over the old one.
///
/// There is no fsync. What the depot records is needed after a server
/// crash, and the page cache still contains it then. After a host crash every
/// garden-init is gone, so the next server destroys every container it
/// finds, and a file torn by the crash is reported and removed as any
/// other unreadable state. An fsync here cost 6 to 36 ms per write on the
/// project machine, on every create and run.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().and_then(|name| name.to_str()).unwrap_or("state");
    let temporary = directory.join(format!(".{file_name}.tmp"));
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
    }
    std::fs::rename(&temporary, path)
}

/// Name of the file in the depot that holds the first stream id the next
/// server run may use.
pub const STREAM_IDS_FILE: &str = "stream-ids";

/// Stream ids one server run may use. The next run starts after them, so
/// ids only repeat after a run that opened more than 2^40 streams.
const STREAM_ID_BLOCK: u64 = 1 << 40;

/// Reserves this run's stream ids and returns the id before the first one.
///
/// The run starts at the larger of the floor recorded by the previous run
/// and the current time in microseconds, and records the floor for the
/// next run before any id is used. The time keeps ids increasing when the
/// file is lost; the floor keeps them increasing when the clock goes back.
pub fn reserve_stream_ids(depot: &Path, logger: &slog::Logger) -> u64 {
    let path = depot.join(STREAM_IDS_FILE);
    let floor = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().unwrap_or_else(|error| {
            slog::warn!(logger, "stream id floor is invalid; starting from the clock"; "path" => %path.display(), "error" => %error);
            0
        }),
        Err(_) => 0,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_micros() as u64)
        .unwrap_or(0);
    let start = floor.max(now);
    if let Err(error) = write_atomically(&path, format!("{}\n", start.saturating_add(STREAM_ID_BLOCK)).as_bytes()) {
        // NOTE: without the file the next run relies on the clock alone.
        slog::warn!(logger, "failed to record the stream id floor"; "path" => %path.display(), "error" => %error);
    }
    start
}

/// Environment variable naming the fault point at which the server aborts,
/// as `kill -9` would end it. Read only by debug builds, so a release
/// server never honours it.
pub const FAULT_POINT_VARIABLE: &str = "TRELLIS_FAULT_POINT";

/// Aborts the process when `name` is the fault point the environment
/// names. Crash tests use it to stop the server at an exact step of create,
/// run, stream in or destroy. Does nothing in release builds.
pub fn fault_point(name: &str) {
    if cfg!(debug_assertions) && std::env::var(FAULT_POINT_VARIABLE).is_ok_and(|point| point == name) {
        eprintln!("trellis: aborting at fault point {name}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(handle: &str) -> ContainerRecord {
        ContainerRecord {
            version: STATE_VERSION,
            handle: handle.into(),
            state: ContainerState::Active,
            grace_time: 5_000_000_000,
            properties: [("a".to_string(), "b".to_string())].into_iter().collect(),
            created_at_unix_ns: 42,
            spec: ContainerSpec { handle: handle.into(), ..ContainerSpec::default() },
            id_mappings: None,
            processes: vec![ProcessRecord { id: "p1".into(), tty: true, exit_status: Some(3) }],
            network: Some(serde_json::json!({ "subnet": "192.0.2.0/30" })),
            events: vec!["Out of memory".into()],
            oom_kills: 1,
            unknown: BTreeMap::new(),
        }
    }

    #[test]
    fn record_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let container_dir = dir.path().join("web-1");
        std::fs::create_dir(&container_dir).unwrap();
        write_record(&container_dir, &record("web-1")).unwrap();
        let read = read_record(&container_dir).unwrap();
        assert_eq!(read.handle, "web-1");
        assert_eq!(read.grace_time, 5_000_000_000);
        assert_eq!(read.properties.get("a").map(String::as_str), Some("b"));
        assert_eq!(read.processes, record("web-1").processes);
        assert_eq!(read.network, record("web-1").network);
    }

    #[test]
    fn version_zero_is_upgraded() {
        let old = br#"{"handle":"h","state":"stopped","grace_time":0,"properties":{},"created_at_unix_ns":7,"spec":{}}"#;
        let read = parse_record(Path::new("h/container.json"), old, "h").unwrap();
        assert_eq!(read.version, STATE_VERSION);
        assert_eq!(read.state, ContainerState::Stopped);
        assert!(read.processes.is_empty());
    }

    #[test]
    fn newer_version_is_rejected() {
        let mut value = serde_json::to_value(record("h")).unwrap();
        value["version"] = serde_json::json!(99);
        let error = parse_record(Path::new("h/container.json"), &serde_json::to_vec(&value).unwrap(), "h").unwrap_err();
        assert!(matches!(error, StateError::NewerVersion { version: 99, .. }), "{error}");
    }

    #[test]
    fn truncated_file_is_invalid() {
        let bytes = record("h").to_bytes();
        let error = parse_record(Path::new("h/container.json"), &bytes[..bytes.len() / 2], "h").unwrap_err();
        assert!(matches!(error, StateError::Invalid { .. }), "{error}");
    }

    #[test]
    fn handle_must_match_directory() {
        let error = parse_record(Path::new("x/container.json"), &record("h").to_bytes(), "x").unwrap_err();
        assert!(matches!(error, StateError::HandleMismatch { .. }), "{error}");
    }

    #[test]
    fn unknown_fields_survive_a_write() {
        let mut value = serde_json::to_value(record("h")).unwrap();
        value["later_field"] = serde_json::json!([1, 2]);
        let read = parse_record(Path::new("h/container.json"), &serde_json::to_vec(&value).unwrap(), "h").unwrap();
        let written: serde_json::Value = serde_json::from_slice(&read.to_bytes()).unwrap();
        assert_eq!(written["later_field"], serde_json::json!([1, 2]));
    }

    #[test]
    fn atomic_write_replaces_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }
}
