//! The container runtime boundary.
//!
//! The actors decide what happens and in which order; a [`Runtime`] does the
//! kernel work. Two implementations exist: the Linux runtime of
//! `crate::linux`, and the in-memory runtime of [`memory`], which tests script
//! and which the golden wire transcripts are replayed against.
//!
//! Every method blocks and may take a while (mounts, cgroups, process
//! start-up), so actors call them through `tokio::task::spawn_blocking`,
//! never on an actor thread.

pub mod memory;
pub mod stdio;

use std::collections::BTreeSet;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::api::{Capacity, ContainerSpec, Limits, Metrics, NetOutRule, ProcessSpec};

/// Everything a runtime needs to create one container. The server has
/// already validated the spec and reserved the handle.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub handle: String,
    /// The spec as the client sent it, with a zero grace time already
    /// replaced by the server default.
    pub spec: ContainerSpec,
    /// The container's state directory in the depot, which the server has
    /// created and the runtime may fill. Destroy removes it.
    pub container_dir: PathBuf,
    /// The user namespace mapping of an unprivileged container, from the
    /// UidPool; `None` for a privileged container, which gets no user
    /// namespace.
    pub id_mappings: Option<IdMappings>,
    /// The container's subnet and addresses, from the SubnetPool; `None`
    /// gives a container without networking (loopback only).
    pub network: Option<crate::pools::subnet::NetworkAllocation>,
}

/// One line of a `uid_map` or `gid_map`: `size` ids starting at
/// `container_id` inside map to ids starting at `host_id` outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdMap {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

/// The uid and gid maps of a user namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdMappings {
    pub uid_map: Vec<IdMap>,
    pub gid_map: Vec<IdMap>,
}

impl IdMappings {
    /// Returns the host id that container root maps to.
    pub fn host_root_uid(&self) -> Option<u32> {
        self.uid_map.iter().find(|map| map.container_id == 0).map(|map| map.host_id)
    }
}

/// A runtime failure, classified by the error the client receives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// Run named an executable that does not exist; sent to the client as
    /// an `ExecutableNotFoundError`.
    #[error("{message}")]
    ExecutableNotFound { message: String },
    /// The request cannot be served as given (unknown user, missing rootfs,
    /// unsupported image scheme). Logged at info: not a fault of the server.
    #[error("{message}")]
    InvalidRequest { message: String },
    /// The server cannot serve requests for now; sent as a
    /// `ServiceUnavailableError`.
    #[error("{message}")]
    Unavailable { message: String },
    /// Any other failure of the runtime or the host.
    #[error("{message}")]
    Failed { message: String },
}

impl RuntimeError {
    pub fn failed(message: impl Into<String>) -> Self {
        RuntimeError::Failed { message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        RuntimeError::InvalidRequest { message: message.into() }
    }
}

/// The server's end of a process's stdio connection, which speaks the
/// frames of [`stdio`].
#[derive(Debug)]
pub enum StdioConnection {
    /// A connected Unix socket to a process shim of protocol version 1,
    /// which expects no acknowledgements.
    Unix(UnixStream),
    /// A connected Unix socket to a process shim of protocol version 2 or
    /// later, which keeps output until the server acknowledges it (see
    /// [`stdio`]).
    UnixAcknowledged(UnixStream),
    /// An in-process pipe to a scripted process of the in-memory runtime.
    Memory(tokio::io::DuplexStream),
    /// The recorded frames of a process that ended while no server was
    /// connected to its shim: its buffered output, then `Exited`.
    Replay(Vec<u8>),
}

/// A started process: its host pid (0 where there is none) and its stdio.
/// The runtime has already read the shim's `Started` frame, so the
/// connection carries output frames and then `Exited`.
#[derive(Debug)]
pub struct StartedProcess {
    pub pid: u32,
    pub stdio: StdioConnection,
}

/// A container the runtime found again after a server restart.
pub struct RestoredContainer {
    pub container: Arc<dyn ContainerRuntime>,
    /// False when the container's init process is gone (after a host
    /// reboot, or killed): the server then destroys the container.
    pub init_alive: bool,
}

/// Creates containers and reports on the host.
pub trait Runtime: Send + Sync + 'static {
    /// Checks that the runtime can serve requests.
    fn ping(&self) -> Result<(), RuntimeError>;

    /// Reports the host's memory and disk. The server fills in
    /// `max_containers` itself.
    fn capacity(&self) -> Result<Capacity, RuntimeError>;

    /// Checks what the runtime can check about a spec without side effects
    /// (such as bind mount sources), before create takes any step. Must be
    /// cheap: the registry calls it on its actor thread.
    fn check_spec(&self, _spec: &ContainerSpec) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Creates a container and starts its init process. On failure every
    /// step taken is undone before the error is returned.
    fn create(&self, config: &ContainerConfig) -> Result<Arc<dyn ContainerRuntime>, RuntimeError>;

    /// Finds the kernel objects of a container a previous server created,
    /// from what [`Runtime::create`] recorded in its state directory. Fails
    /// when those records are missing or do not match the host.
    fn restore(&self, config: &ContainerConfig) -> Result<RestoredContainer, RuntimeError> {
        Err(RuntimeError::failed(format!("this runtime cannot restore container {}", config.handle)))
    }

    /// Removes every host object of a container that cannot be restored
    /// (no readable state), its state directory included.
    fn remove_unrestorable(&self, _handle: &str, container_dir: &Path) -> Result<(), RuntimeError> {
        match std::fs::remove_dir_all(container_dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(RuntimeError::failed(format!("failed to remove {}: {error}", container_dir.display()))),
        }
    }

    /// Keeps the host objects of a container that is left in place without
    /// being served (its state is of a newer format): its links must not be
    /// taken for orphans. `network` is its allocation, when known.
    fn keep_in_place(&self, _handle: &str, _container_dir: &Path, _network: &KeptNetwork) {}

    /// Removes host objects carrying the server's tag that belong to none
    /// of `owned` (container handles). Returns a description of each
    /// object removed or that could not be removed, for the log.
    fn remove_orphans(&self, _owned: &BTreeSet<String>) -> Vec<String> {
        Vec::new()
    }

    /// Ends the runtime's own helper processes (not containers or their
    /// processes, which outlive the server) when the server stops.
    fn shutdown(&self) {}
}

/// The network of a container left in place, as its state file records
/// it: its allocation, host port mappings and net-out rules.
#[derive(Debug, Clone, Default)]
pub struct KeptNetwork {
    pub allocation: Option<crate::pools::subnet::NetworkAllocation>,
    /// `(host port, container port)` pairs.
    pub mapped_ports: Vec<(u16, u16)>,
    pub net_out: Vec<crate::api::NetOutRule>,
}

/// One container's kernel objects.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Starts a process. Fails without starting anything when the spec cannot
    /// be run (missing executable, unknown user). `process_id` is already
    /// unique in the container; file names derived from it must not use it
    /// verbatim, because it may contain `/` or `..`.
    fn run(&self, process_id: &str, spec: &ProcessSpec) -> Result<StartedProcess, RuntimeError>;

    /// Stops every process but init: SIGTERM, then SIGKILL after 10 seconds
    /// for what is left, or SIGKILL at once when `kill` is set. Returns once
    /// no process is left.
    fn stop(&self, kill: bool) -> Result<(), RuntimeError>;

    /// Kills every process and removes every host object of the container,
    /// its state directory included. Objects already gone count as removed,
    /// so a failed destroy can be retried.
    fn destroy(&self) -> Result<(), RuntimeError>;

    /// Extracts the tar archive read from `tar` into `destination` inside the
    /// container, as `user` (empty means root); a relative destination
    /// starts at the user's home. Returns once extraction has finished. The
    /// archive is consumed as it is read, never buffered whole. Reading may
    /// stop early when extraction fails.
    fn stream_in(&self, destination: &str, user: &str, tar: &mut dyn std::io::Read) -> Result<(), RuntimeError>;

    /// Starts a tar archive of `source` inside the container, with the
    /// permissions of `user`, named as Garden names it (contents rooted at `./` when the
    /// source ends in `/`). Fails before returning when the source is
    /// missing or unreadable. A read error from the returned reader means
    /// the archive could not be finished; dropping the reader stops the
    /// work.
    fn stream_out(&self, source: &str, user: &str) -> Result<Box<dyn std::io::Read + Send>, RuntimeError>;

    /// Applies changed limits to the running container. `current` is what
    /// was in force and `requested` what should be; the server has already
    /// merged the request (a zero field keeps the current value). Limits
    /// without a simple kernel effect are only stored by the server.
    fn update_limits(&self, current: &Limits, requested: &Limits) -> Result<(), RuntimeError>;

    /// Returns the limits as this runtime reports them to clients, given
    /// the limits that were set. The Linux runtime reports CPU as the
    /// shares the kernel got, never `weight`; a runtime that enforces
    /// nothing may report `set` unchanged.
    fn reported_limits(&self, set: &Limits) -> Limits;

    /// Returns the container's usage. `age` is the time since create, which
    /// the server tracks; the runtime reports it as `Age` and derives the
    /// CPU entitlement from it.
    fn metrics(&self, age: std::time::Duration) -> Result<Metrics, RuntimeError>;

    /// Maps `host_port` on the host's external IP to `container_port` of
    /// the container (TCP). The server has already reserved the host port.
    /// The default only accepts the mapping.
    fn net_in(&self, _host_port: u16, _container_port: u16) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Adds outbound allow rules, all or none: one invalid rule fails the
    /// call with nothing applied. The default only accepts the rules.
    fn net_out(&self, _rules: &[NetOutRule]) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Returns the host's external IP that net-in mappings listen on, if
    /// the runtime gave the container a network.
    fn external_ip(&self) -> Option<std::net::Ipv4Addr> {
        None
    }

    /// Returns a snapshot of the container's host objects for the
    /// introspection endpoint (init pid, cgroup paths and the like).
    fn describe(&self) -> serde_json::Value;

    /// Opens a watch on the kernel's out-of-memory kills in the container,
    /// or returns `None` when the runtime has nothing to watch (the default).
    fn watch_oom(&self) -> Result<Option<Box<dyn OomWatch>>, RuntimeError> {
        Ok(None)
    }

    /// Removes what the runtime keeps on disk for a finished process. The
    /// default keeps nothing to remove.
    fn forget_process(&self, _process_id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Reconnects to the processes of a restored container, by process
    /// id: a live connection to a running process's shim, or the replay of
    /// a process that ended while no server was connected. A process whose
    /// shim cannot be reached yields its error.
    fn reattach_processes(&self) -> Vec<(String, Result<StartedProcess, RuntimeError>)> {
        Vec::new()
    }
}

/// The result of one [`OomWatch::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomWait {
    /// The kernel's count of out-of-memory kills in the container since its
    /// cgroup was made, read after a notification. The count has risen
    /// since the previous `Kills` or since the watch was opened.
    Kills(u64),
    /// The stop descriptor became readable.
    Stopped,
    /// The container's cgroup is gone, so no more kills can come.
    Gone,
}

/// A blocking watch on one container's out-of-memory kills, driven by
/// kernel notifications rather than a polling loop.
pub trait OomWatch: Send + 'static {
    /// Returns the kill count at the time the watch was opened.
    fn initial_kills(&self) -> u64;

    /// Blocks until the kill count rises, the cgroup goes away, or `stop`
    /// becomes readable.
    fn wait(&mut self, stop: BorrowedFd<'_>) -> Result<OomWait, RuntimeError>;
}
