//! The Linux runtime: namespaces, garden-init, the process shim, root
//! filesystems and mounts, cgroups and users.
//!
//! Files, one per concern:
//!
//! - [`container`]: create, run, stop, destroy of one container.
//! - [`init`]: garden-init, pid 1 of each container.
//! - [`shim`] and [`exec`]: the process shim and the child it forks.
//! - [`spare`]: a shim started ahead of the Run that uses it.
//! - [`spare_init`]: starting garden-init, and a spare one started ahead of
//!   the create that uses it.
//! - [`files`]: the tar helper of stream in and stream out.
//! - [`rootfs`]: image choice, idmapped lower layer, overlay.
//! - [`security`]: capability sets and the seccomp filter.
//! - `x86_compat`: i386 and x32 system call numbers for the filter.
//! - [`cgroup`]: per-container cgroups on v1 and v2, and OOM notifications.
//! - [`disk`]: disk limits on a size-limited filesystem, and layer usage.
//! - [`metrics`]: metrics from cgroup counters, layers and interfaces.
//! - [`users`]: user resolution and process environment.
//! - [`network`]: links, firewall and NAT, name files and bandwidth.
//! - [`syscalls`]: system calls nix does not wrap.

pub mod cgroup;
pub mod container;
pub mod disk;
pub mod exec;
pub mod files;
pub mod init;
pub mod metrics;
pub mod network;
pub mod rootfs;
pub mod security;
pub mod shim;
pub mod spare;
pub mod spare_init;
pub mod syscalls;
pub mod trash;
pub mod users;
#[cfg(target_arch = "x86_64")]
pub mod x86_compat;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::api::Capacity;
use crate::runtime::{ContainerConfig, ContainerRuntime, RestoredContainer, Runtime, RuntimeError};

pub use container::LinuxContainer;
pub(crate) use container::error_chain;

/// First argument that starts this executable as a container's init.
pub const GARDEN_INIT_COMMAND: &str = "__garden-init";
/// First argument that starts this executable as a process shim.
pub const SHIM_COMMAND: &str = "__shim";
/// First argument that starts this executable as the tar helper of stream
/// in and stream out.
pub const FILES_COMMAND: &str = "__files";

/// Settings of the Linux runtime, taken from the server configuration.
#[derive(Debug, Clone)]
pub struct LinuxConfig {
    /// Directory holding one state directory per container.
    pub depot: PathBuf,
    /// Root filesystem used when a create names no image.
    pub default_rootfs: PathBuf,
    /// Short tag carried by every host object this server creates (cgroup
    /// parent, mount points), so that several servers can share a host.
    pub tag: String,
    /// The `trellis` executable started as garden-init and as process shim:
    /// `/proc/self/exe` in the server, the built binary in tests.
    pub executable: PathBuf,
    /// Operator hardening of unprivileged containers: no_new_privs on their
    /// processes and `net.ipv4.ping_group_range` = `1 65535`.
    pub no_new_privileges: bool,
    /// Hard CPU quota per share in microseconds per 100 ms period; 0 is
    /// uncapped.
    pub cpu_quota_per_share: u64,
    /// CPU entitlement per share in percent; 0 derives it from the host.
    pub cpu_entitlement_per_share: f64,
    /// Container networking; `None` leaves containers with loopback only.
    pub network: Option<network::NetworkSettings>,
}

/// Errors of setting up the runtime itself.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("failed to read {path}")]
    ReadHostFile { path: PathBuf, #[source] source: std::io::Error },
    #[error("cgroup discovery failed")]
    Cgroups(#[from] cgroup::CgroupError),
    #[error("tag {tag:?} must be 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    InvalidTag { tag: String },
    #[error("network set-up failed")]
    Network(#[from] network::NetworkError),
}

/// The Linux implementation of [`Runtime`].
pub struct LinuxRuntime {
    config: LinuxConfig,
    logger: slog::Logger,
    /// The hierarchies containers get a cgroup in, found at start-up.
    hierarchies: Vec<cgroup::Hierarchy>,
    cgroup_version: cgroup::CgroupVersion,
    userns: rootfs::UsernsCache,
    network: Option<Arc<network::HostNetwork>>,
    /// Hands out process shims, one of them started in advance.
    shims: Arc<spare::ShimLauncher>,
    /// Keeps a garden-init waiting for the next unprivileged create.
    inits: spare_init::InitLauncher,
    /// Deletes destroyed containers' state directories.
    trash: Arc<trash::Trash>,
    /// Networks of containers left in place unserved; kept so that their
    /// links and rules stay while this server runs.
    kept_networks: std::sync::Mutex<Vec<network::ContainerNetwork>>,
}

impl LinuxRuntime {
    /// Builds the runtime and discovers the host's cgroup hierarchies: v1
    /// when the v1 controllers are mounted, else v2.
    pub fn new(config: LinuxConfig, logger: slog::Logger) -> Result<LinuxRuntime, LinuxError> {
        let tag_ok = !config.tag.is_empty()
            && config.tag.len() <= 64
            && config.tag.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"_.-".contains(&byte))
            && config.tag != "."
            && config.tag != "..";
        if !tag_ok {
            return Err(LinuxError::InvalidTag { tag: config.tag.clone() });
        }
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|source| LinuxError::ReadHostFile { path: PathBuf::from(path), source })
        };
        let mountinfo = read("/proc/self/mountinfo")?;
        let self_cgroup = read("/proc/self/cgroup")?;
        let (hierarchies, cgroup_version) = match cgroup::discover_v1(&mountinfo, &self_cgroup, &cgroup::V1_CONTROLLERS) {
            Ok(found) => (found, cgroup::CgroupVersion::V1),
            Err(v1_error) => match cgroup::discover_v2(&mountinfo, &self_cgroup) {
                Ok(found) => (vec![found], cgroup::CgroupVersion::V2),
                Err(_) => return Err(v1_error.into()),
            },
        };
        let network = match &config.network {
            Some(settings) => {
                let network_logger = logger.new(slog::o!("component" => "network"));
                Some(Arc::new(network::HostNetwork::start(settings.clone(), &config.tag, network_logger)?))
            }
            None => None,
        };
        slog::info!(logger, "linux runtime ready"; "cgroup_version" => ?cgroup_version, "hierarchies" => hierarchies.len());
        let shims = Arc::new(spare::ShimLauncher::new(config.executable.clone(), logger.new(slog::o!("component" => "shims"))));
        let layout = spare_init::CgroupLayout { version: cgroup_version, hierarchies: hierarchies.clone(), tag: config.tag.clone() };
        let inits = spare_init::InitLauncher::new(config.executable.clone(), layout, logger.new(slog::o!("component" => "spare-init")));
        let trash = Arc::new(trash::Trash::new(logger.new(slog::o!("component" => "trash"))));
        trash.remove_leftovers(&config.depot);
        Ok(LinuxRuntime {
            config,
            logger,
            hierarchies,
            cgroup_version,
            userns: rootfs::UsernsCache::default(),
            network,
            shims,
            inits,
            trash,
            kept_networks: std::sync::Mutex::new(Vec::new()),
        })
    }
}

impl Runtime for LinuxRuntime {
    fn ping(&self) -> Result<(), RuntimeError> {
        let depot = &self.config.depot;
        let usable = std::fs::metadata(depot).map(|meta| meta.is_dir()).unwrap_or(false)
            && nix::unistd::access(depot, nix::unistd::AccessFlags::W_OK).is_ok();
        if !usable {
            return Err(RuntimeError::Unavailable { message: format!("depot {} is not a writable directory", depot.display()) });
        }
        Ok(())
    }

    fn capacity(&self) -> Result<Capacity, RuntimeError> {
        let memory_bytes = host_memory_bytes()?;
        let stats = nix::sys::statvfs::statvfs(&self.config.depot)
            .map_err(|error| RuntimeError::failed(format!("failed to stat the filesystem of {}: {error}", self.config.depot.display())))?;
        let fragment = stats.fragment_size() as u64;
        let disk = stats.blocks() as u64 * fragment;
        let available = stats.blocks_available() as u64 * fragment;
        Ok(Capacity {
            memory_in_bytes: memory_bytes,
            disk_in_bytes: disk,
            schedulable_disk_in_bytes: if available > 0 { available } else { disk },
            max_containers: 0,
        })
    }

    /// Checks that every bind mount source exists; a `stat` per mount.
    fn check_spec(&self, spec: &crate::api::ContainerSpec) -> Result<(), RuntimeError> {
        for mount in &spec.bind_mounts {
            if let Err(error) = std::fs::metadata(&mount.src_path) {
                let reason = match error.kind() {
                    std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
                    _ => error.to_string(),
                };
                // SPEC: guardian's text for a missing source is not known;
                // this one follows the `stat` error its runtime reports.
                let path = &mount.src_path;
                return Err(RuntimeError::invalid(format!("bind mount source {path}: stat {path}: {reason}")));
            }
        }
        Ok(())
    }

    fn create(&self, config: &ContainerConfig) -> Result<Arc<dyn ContainerRuntime>, RuntimeError> {
        let container = container::create(self, config)?;
        Ok(Arc::new(container))
    }

    fn restore(&self, config: &ContainerConfig) -> Result<RestoredContainer, RuntimeError> {
        container::restore(self, config)
    }

    fn remove_unrestorable(&self, handle: &str, container_dir: &std::path::Path) -> Result<(), RuntimeError> {
        container::remove_unrestorable(self, handle, container_dir)
    }

    fn remove_orphans(&self, owned: &std::collections::BTreeSet<String>) -> Vec<String> {
        container::remove_orphans(self, owned)
    }

    fn keep_in_place(&self, handle: &str, container_dir: &std::path::Path, network: &crate::runtime::KeptNetwork) {
        container::keep_in_place(self, handle, container_dir, network);
    }

    /// Ends the spare shim and the spare garden-init, and finishes
    /// deleting destroyed containers' directories.
    fn shutdown(&self) {
        self.shims.shutdown();
        self.inits.shutdown();
        self.trash.shutdown();
    }
}

/// Returns the host's total memory (`MemTotal` of `/proc/meminfo`).
pub fn host_memory_bytes() -> Result<u64, RuntimeError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|error| RuntimeError::failed(format!("failed to read /proc/meminfo: {error}")))?;
    let memory_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| RuntimeError::failed("no MemTotal line in /proc/meminfo"))?;
    Ok(memory_kib * 1024)
}

/// Entry point of garden-init, pid 1 of each container.
pub fn garden_init_main(args: Vec<OsString>) -> ExitCode {
    init::main(args)
}

/// Entry point of a process shim.
pub fn shim_main(args: Vec<OsString>) -> ExitCode {
    shim::main(args)
}

/// Entry point of the tar helper of stream in and stream out.
pub fn files_main(args: Vec<OsString>) -> ExitCode {
    files::main(args)
}
