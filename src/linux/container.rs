//! One container's kernel objects: create with rollback, run, stop,
//! destroy and describe; [`restore`] finds them again after a restart.

mod restore;

use std::fs;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::cgroup::{effective_shares, v2_weight, CgroupError, CgroupVersion, ContainerCgroup, OomListener};
use super::disk::{self, DiskError, DiskImage, Usage};
use super::metrics::{self, build_metrics, HostShape};
use super::files::{self, Direction, FilesConfig};
use super::init::{FileBind, InitConfig};
use super::network::{self, ContainerNetwork, HostNetwork, NetworkError};
use super::rootfs::{self, ContainerRootfs, RootfsError};
use super::shim::{self, ShimConfig};
use super::spare_init::{self, InitChannel, InitProcess, WaitingInit};
use super::{syscalls, users, LinuxRuntime};
use crate::api::{CpuLimits, Limits, Metrics, ProcessSpec};
use crate::runtime::stdio::{ShimFrame, StartFailure, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION};
use crate::runtime::{ContainerConfig, ContainerRuntime, OomWatch, RuntimeError, StartedProcess, StdioConnection};

/// How long create waits for garden-init and run for a shim's first frame.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace period of a Stop without kill before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long destroy waits for garden-init to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Subdirectory of the state directory holding one directory per process.
const PROCESSES_DIR: &str = "processes";
/// File in a process's directory holding its exit status, which the shim
/// writes before it exits.
const EXIT_STATUS_FILE: &str = "exit-status";
/// `net.ipv4.ping_group_range` of containers under no-new-privileges: ping
/// sockets for every gid that needs no setuid ping then.
const PING_GROUP_RANGE: &str = "1 65535";

impl From<RootfsError> for RuntimeError {
    fn from(error: RootfsError) -> Self {
        let message = error_chain(&error);
        if error.is_invalid_request() {
            RuntimeError::InvalidRequest { message }
        } else {
            RuntimeError::Failed { message }
        }
    }
}

impl From<DiskError> for RuntimeError {
    fn from(error: DiskError) -> Self {
        let message = error_chain(&error);
        if error.is_invalid_request() {
            RuntimeError::InvalidRequest { message }
        } else {
            RuntimeError::Failed { message }
        }
    }
}

impl From<NetworkError> for RuntimeError {
    fn from(error: NetworkError) -> Self {
        if error.is_invalid_request() {
            RuntimeError::InvalidRequest { message: error.to_string() }
        } else {
            RuntimeError::Failed { message: error.to_string() }
        }
    }
}

impl From<CgroupError> for RuntimeError {
    fn from(error: CgroupError) -> Self {
        RuntimeError::Failed { message: error_chain(&error) }
    }
}

pub(in crate::linux) use restore::{keep_in_place, remove_orphans, remove_unrestorable, restore};

/// Joins an error and its sources into one message.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// A Linux container.
pub struct LinuxContainer {
    handle: String,
    container_dir: PathBuf,
    privileged: bool,
    /// The operator's no-new-privileges option, for unprivileged containers.
    no_new_privileges: bool,
    executable: PathBuf,
    /// Starts the shims of Runs.
    shims: std::sync::Arc<super::spare::ShimLauncher>,
    /// Deletes the state directory after destroy.
    trash: std::sync::Arc<super::trash::Trash>,
    logger: slog::Logger,
    /// The container's environment from its spec.
    env: Vec<String>,
    cgroup: ContainerCgroup,
    /// Set once the root filesystem is prepared.
    rootfs: Option<ContainerRootfs>,
    /// Set once garden-init runs; taken by destroy.
    init: Mutex<Option<InitProcess>>,
    /// Numbers the processes' state directories, so that file names never
    /// come from client-chosen process ids.
    next_process: AtomicU64,
    /// Held by stop and destroy, so a destroy does not interleave with a
    /// stop's kill loop.
    lifecycle: Mutex<()>,
    /// The limits in force: from the spec, then from `update_limits`.
    limits: Mutex<Limits>,
    /// The image directory under the overlay; `None` for `raw://` roots.
    image: Option<PathBuf>,
    /// The image's usage, measured once because the image is read-only.
    image_usage: OnceLock<Usage>,
    /// The size-limited filesystem of a container with a disk limit.
    disk: Option<DiskImage>,
    /// The operator's CPU entitlement per share in percent; 0 derives it
    /// from the host.
    cpu_entitlement_per_share: f64,
    /// The server's networking, when the container gets a network.
    host_network: Option<std::sync::Arc<HostNetwork>>,
    /// Set once the container's links and rules exist.
    network: Option<ContainerNetwork>,
}

/// Files of the container's name resolution, in its state directory.
const NAME_FILES: [(&str, &str); 2] = [("hosts", "/etc/hosts"), ("resolv.conf", "/etc/resolv.conf")];

/// Returns the cgroup name of a handle. Handles are validated by the
/// server, but `.`, `..` and `/` are replaced anyway so a name can never
/// point outside the parent.
fn cgroup_name(handle: &str) -> String {
    let name: String = handle.chars().map(|c| if c == '/' || c.is_control() { '_' } else { c }).collect();
    match name.as_str() {
        "" | "." | ".." => format!("_{name}"),
        _ => name,
    }
}

/// Creates a container; on failure everything made so far is removed and
/// the original error returned.
pub(super) fn create(runtime: &LinuxRuntime, config: &ContainerConfig) -> Result<LinuxContainer, RuntimeError> {
    let logger = runtime.logger.new(slog::o!("handle" => config.handle.clone()));
    let privileged = config.spec.privileged || config.id_mappings.is_none();
    let source = rootfs::resolve_source(&config.spec, &runtime.config.default_rootfs)?;
    let container_dir = fs::canonicalize(&config.container_dir)
        .map_err(|error| RuntimeError::failed(format!("state directory {} is not usable: {error}", config.container_dir.display())))?;

    let cgroup = ContainerCgroup::plan(runtime.cgroup_version, &runtime.hierarchies, &runtime.config.tag, &cgroup_name(&config.handle))
        .with_cpu_quota_per_share(runtime.config.cpu_quota_per_share);
    let mut container = LinuxContainer {
        handle: config.handle.clone(),
        container_dir,
        privileged,
        no_new_privileges: runtime.config.no_new_privileges && !privileged,
        executable: runtime.config.executable.clone(),
        shims: runtime.shims.clone(),
        trash: runtime.trash.clone(),
        logger,
        env: config.spec.env.clone(),
        cgroup,
        rootfs: None,
        init: Mutex::new(None),
        next_process: AtomicU64::new(0),
        lifecycle: Mutex::new(()),
        limits: Mutex::new(config.spec.limits.clone()),
        image: match &source {
            rootfs::RootfsSource::Directory(path) => Some(path.clone()),
            rootfs::RootfsSource::Raw(_) => None,
        },
        image_usage: OnceLock::new(),
        disk: None,
        cpu_entitlement_per_share: runtime.config.cpu_entitlement_per_share,
        host_network: config.network.and(runtime.network.clone()),
        network: None,
    };
    let built = build(runtime, config, &mut container, &source).and_then(|()| restore::write_runtime_record(&container));
    // Started now that this create no longer needs the CPUs.
    runtime.inits.refill();
    match built {
        Ok(()) => {
            slog::debug!(container.logger, "container created"; "init_pid" => container.init_pid());
            Ok(container)
        }
        Err(error) => {
            // Read before teardown removes the cgroup.
            let error = explain_memory_failure(&container.cgroup, config.spec.limits.memory_limits.limit_in_bytes, error);
            // Teardown treats anything missing as removed, so it undoes
            // exactly the steps that were taken.
            if let Err(cleanup) = container.teardown(false) {
                slog::warn!(container.logger, "rollback of failed create left objects behind"; "error" => %cleanup);
            }
            Err(error)
        }
    }
}

fn build(runtime: &LinuxRuntime, config: &ContainerConfig, container: &mut LinuxContainer, source: &rootfs::RootfsSource) -> Result<(), RuntimeError> {
    let mappings = config.id_mappings.as_ref().filter(|_| !container.privileged);
    let channel = start_init(runtime, container, mappings, &config.spec.limits)?;
    crate::state::fault_point("create.after-cgroup");

    // The network is connected on a thread of its own while the root
    // filesystem is prepared and garden-init builds the mounts: it only
    // needs the network namespace, which exists already.
    let network_request = match (&container.host_network, config.network) {
        (Some(host_network), Some(allocation)) => Some((host_network.clone(), allocation)),
        _ => None,
    };
    let netns = match &network_request {
        Some(_) => Some(network::open_netns(container.init_pid())?),
        None => None,
    };
    let handle = config.handle.as_str();
    let (configured, attached) = std::thread::scope(|scope| {
        let worker = network_request.zip(netns).map(|((host_network, allocation), netns)| scope.spawn(move || host_network.attach(handle, allocation, netns)));
        let configured = prepare_and_configure(runtime, config, container, source, mappings, channel);
        let attached = worker.map(|worker| {
            worker.join().unwrap_or_else(|_| Err(NetworkError::Netlink { operation: "connecting the network".into(), reason: "the thread panicked".into() }))
        });
        (configured, attached)
    });
    // Recorded before any error returns, so a rollback detaches it.
    let network = match attached.transpose() {
        Ok(network) => network,
        Err(error) => {
            configured?;
            return Err(error.into());
        }
    };
    container.network = network;
    configured?;
    if let Some(network) = &container.network {
        let bandwidth = config.spec.limits.bandwidth_limits;
        if bandwidth.rate > 0 {
            network.set_bandwidth(&bandwidth)?;
        }
    }
    Ok(())
}

/// Gets the container a garden-init whose pid 1 waits in the container's
/// cgroups for its configuration: the spare when one fits, else one started
/// now. Records pid 1 in the container at once, so that a rollback kills it.
fn start_init(
    runtime: &LinuxRuntime,
    container: &LinuxContainer,
    mappings: Option<&crate::runtime::IdMappings>,
    limits: &Limits,
) -> Result<InitChannel, RuntimeError> {
    let record = |process: InitProcess| *container.init.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(process);
    if let Some(adopted) = mappings.and_then(|mappings| runtime.inits.take(mappings, &container.cgroup)) {
        let WaitingInit { process, channel } = adopted.init;
        let pid = process.pid as u32;
        record(process);
        if adopted.in_cgroups {
            // The spare's cgroups, renamed, with its device rules.
            container.cgroup.apply_limits(limits).map_err(|error| match error {
                CgroupError::MemoryBelowUsage { requested, usage } => RuntimeError::invalid(format!(
                    "memory limit of {requested} bytes is too small to start the container: its init process already uses {usage} bytes; request more"
                )),
                other => RuntimeError::from(other),
            })?;
        } else {
            container.cgroup.create(false, limits)?;
            container.cgroup.attach(pid)?;
        }
        return Ok(channel);
    }
    container.cgroup.create(container.privileged, limits)?;
    // Joined by the first process, so pid 1 is forked inside the cgroups.
    let mut place = |pid: u32| container.cgroup.attach(pid).map_err(RuntimeError::from);
    let WaitingInit { process, channel } = spare_init::start(&container.executable, container.privileged, mappings, &mut place)?;
    record(process);
    Ok(channel)
}

/// Replaces a create's error with one that names the memory limit when
/// the kernel killed garden-init for exceeding it.
fn explain_memory_failure(cgroup: &ContainerCgroup, limit: u64, error: RuntimeError) -> RuntimeError {
    if limit == 0 || matches!(error, RuntimeError::InvalidRequest { .. }) {
        return error;
    }
    let memory_dir = match cgroup.version {
        CgroupVersion::V2 => cgroup.dirs.first(),
        CgroupVersion::V1 => cgroup.dirs.iter().find(|dir| dir.components().any(|part| part.as_os_str() == "memory")),
    };
    let killed = memory_dir.and_then(|dir| super::cgroup::read_oom_kills(cgroup.version, dir).ok().flatten()).unwrap_or(0) > 0;
    if !killed {
        return error;
    }
    RuntimeError::invalid(format!("memory limit of {limit} bytes is too small to start the container: garden-init was killed for exceeding it; request more ({error})"))
}

/// Makes the root filesystem and the name files, then has garden-init
/// build the container on them.
fn prepare_and_configure(
    runtime: &LinuxRuntime,
    config: &ContainerConfig,
    container: &mut LinuxContainer,
    source: &rootfs::RootfsSource,
    mappings: Option<&crate::runtime::IdMappings>,
    channel: InitChannel,
) -> Result<(), RuntimeError> {
    let userns = match mappings {
        Some(mappings) => Some((runtime.userns.get(&runtime.config.executable, mappings)?, mappings)),
        None => None,
    };
    let writable = create_disk(container, &config.spec.limits.disk_limits)?;
    let prepared = rootfs::prepare(&container.container_dir, source, userns.as_ref().map(|(fd, mappings)| (fd, *mappings)), writable.as_deref());
    // Recorded before checking the result: a failed prepare may have left
    // directories that teardown removes.
    container.rootfs = Some(ContainerRootfs { root: PathBuf::new(), overlay: Some(container.container_dir.join("rootfs")), upper: None });
    let prepared = prepared?;
    container.rootfs = Some(prepared.clone());
    crate::state::fault_point("create.after-rootfs");

    fs::create_dir_all(container.container_dir.join(PROCESSES_DIR))
        .map_err(|error| RuntimeError::failed(format!("failed to create the processes directory: {error}")))?;
    let hostname = users::hostname_for(&config.handle);
    let file_binds = match (&container.host_network, &config.network) {
        (Some(host_network), Some(allocation)) => {
            let root_uid = if container.privileged { Some(0) } else { mappings.and_then(|mappings| mappings.host_root_uid()) };
            write_name_files(&container.container_dir, host_network, allocation, &hostname, root_uid)?
        }
        _ => Vec::new(),
    };
    let init_config = InitConfig {
        root: prepared.root.clone(),
        hostname,
        privileged: container.privileged,
        bind_mounts: config.spec.bind_mounts.clone(),
        ping_group_range: container.no_new_privileges.then(|| PING_GROUP_RANGE.to_string()),
        file_binds,
    };
    channel.configure(&init_config)
}

/// Writes the container's `/etc/hosts` and `/etc/resolv.conf` into its
/// state directory, owned by container root so that it may rewrite them,
/// and returns the binds garden-init makes of them.
fn write_name_files(
    container_dir: &Path,
    host_network: &HostNetwork,
    allocation: &crate::pools::subnet::NetworkAllocation,
    hostname: &str,
    root_uid: Option<u32>,
) -> Result<Vec<FileBind>, RuntimeError> {
    let mut binds = Vec::new();
    for (name, destination) in NAME_FILES {
        let contents = if name == "hosts" { host_network.hosts_file(allocation, hostname) } else { host_network.resolv_conf(allocation) };
        let path = container_dir.join(name);
        fs::write(&path, contents).map_err(|error| RuntimeError::failed(format!("failed to write {}: {error}", path.display())))?;
        if let Some(uid) = root_uid {
            std::os::unix::fs::chown(&path, Some(uid), Some(uid))
                .map_err(|error| RuntimeError::failed(format!("failed to chown {} to {uid}: {error}", path.display())))?;
        }
        binds.push(FileBind { source: path, destination: destination.to_string() });
    }
    Ok(binds)
}

/// Creates the size-limited filesystem of a container with a hard disk
/// limit and returns where its writable layer goes; `None` without one.
fn create_disk(container: &mut LinuxContainer, limits: &crate::api::DiskLimits) -> Result<Option<PathBuf>, RuntimeError> {
    if limits.byte_hard == 0 && limits.inode_hard == 0 {
        return Ok(None);
    }
    if container.image.is_none() {
        return Err(DiskError::RawRootfs.into());
    }
    let size = disk::plan(limits, container.image_usage()?, container.free_bytes()?)?;
    let Some(size) = size else { return Ok(None) };
    let image = DiskImage::at(&container.container_dir);
    // Recorded first, so a rollback removes a half-made filesystem.
    container.disk = Some(image.clone());
    image.create(size)?;
    slog::debug!(container.logger, "disk limit filesystem created"; "bytes" => size.bytes, "inodes" => size.inodes);
    Ok(Some(image.mount))
}

impl LinuxContainer {
    /// Returns what the image uses, measuring it the first time.
    fn image_usage(&self) -> Result<Usage, RuntimeError> {
        if let Some(usage) = self.image_usage.get() {
            return Ok(*usage);
        }
        let usage = match &self.image {
            Some(image) => disk::measure(image).map_err(|error| RuntimeError::failed(format!("failed to measure the image {}: {error}", image.display())))?,
            None => Usage::default(),
        };
        Ok(*self.image_usage.get_or_init(|| usage))
    }

    /// Returns the bytes free on the filesystem of the state directory,
    /// the size given to a filesystem limited in inodes only.
    fn free_bytes(&self) -> Result<u64, RuntimeError> {
        let stats = nix::sys::statvfs::statvfs(&self.container_dir)
            .map_err(|error| RuntimeError::failed(format!("failed to stat the filesystem of {}: {error}", self.container_dir.display())))?;
        Ok(stats.blocks_available() as u64 * stats.fragment_size() as u64)
    }

    /// Returns what the container's writable layer uses.
    fn writable_usage(&self) -> Result<Usage, RuntimeError> {
        let Some(upper) = self.rootfs.as_ref().and_then(|rootfs| rootfs.upper.as_ref()) else { return Ok(Usage::default()) };
        disk::measure(upper).map_err(|error| RuntimeError::failed(format!("failed to measure the writable layer {}: {error}", upper.display())))
    }

    /// Applies a changed disk limit: the filesystem grows online, and
    /// anything else is rejected before a change is made.
    fn update_disk(&self, current: &crate::api::DiskLimits, requested: &crate::api::DiskLimits) -> Result<(), RuntimeError> {
        let free = self.free_bytes()?;
        let Some(size) = disk::plan(requested, self.image_usage()?, free)? else { return Ok(()) };
        let Some(image) = &self.disk else { return Err(DiskError::NotLimited.into()) };
        if requested.inode_hard != current.inode_hard || requested.scope != current.scope {
            return Err(RuntimeError::invalid(
                "the inode limit and the scope of a disk limit cannot change while the container runs; only byte_hard can",
            ));
        }
        let current_size = disk::plan(current, self.image_usage()?, free)?.map_or(0, |size| size.bytes);
        image.resize(current_size, size.bytes, self.writable_usage()?.bytes)?;
        slog::info!(self.logger, "disk limit filesystem resized"; "bytes" => size.bytes);
        Ok(())
    }

    fn init_pid(&self) -> i32 {
        self.init.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref().map_or(0, |init| init.pid)
    }

    /// Kills everything and removes every host object; anything already
    /// gone counts as done. With `remove_dir` the state directory goes too.
    fn teardown(&self, remove_dir: bool) -> Result<(), RuntimeError> {
        let mut errors = Vec::new();
        let init = self.init.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(init) = &init {
            // Killing pid 1 makes the kernel kill the whole pid namespace.
            match syscalls::pidfd_send_signal(init.pidfd.as_fd(), libc::SIGKILL) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(libc::ESRCH) => {}
                Err(error) => errors.push(format!("failed to kill garden-init {}: {error}", init.pid)),
            }
        }
        // The firewall rules go while the kernel kills the container. Its
        // veth pair goes with its network namespace once garden-init is
        // dead.
        if let Some(network) = &self.network {
            if let Err(error) = network.detach() {
                errors.push(error.to_string());
            }
        }
        if let Some(init) = init {
            match syscalls::wait_readable(init.pidfd.as_fd(), KILL_TIMEOUT.as_millis() as i32) {
                Ok(true) => {}
                Ok(false) => errors.push(format!("garden-init {} did not exit within {} s", init.pid, KILL_TIMEOUT.as_secs())),
                Err(error) => errors.push(format!("failed to wait for garden-init {}: {error}", init.pid)),
            }
        }
        crate::state::fault_point("teardown.after-init-killed");
        // Processes that joined the cgroup but not yet the pid namespace.
        if let Err(error) = self.kill_cgroup(true) {
            errors.push(error_chain(&error));
        }
        if let Err(error) = self.cgroup.remove() {
            errors.push(error_chain(&error));
        }
        // A directory to discard needs only its mounts gone; the trash
        // deletes the rest. A disk-limited container's directory is still
        // deleted here: its loop device is freed only when the image's last
        // reference goes, a moment after garden-init is reaped, and
        // deleting in place lets that happen before destroy returns.
        let discard = remove_dir && errors.is_empty() && self.disk.is_none();
        if self.rootfs.is_some() {
            let removed = if discard { rootfs::unmount(&self.container_dir) } else { rootfs::remove(&self.container_dir) };
            if let Err(error) = removed {
                errors.push(error_chain(&error));
            }
        }
        // After the overlay, which keeps the filesystem busy while mounted.
        if let Some(disk) = &self.disk {
            if let Err(error) = disk.remove() {
                errors.push(error_chain(&error));
            }
        }
        if discard && errors.is_empty() {
            match self.trash.discard(&self.container_dir) {
                Ok(true) => return Ok(()),
                // The server is stopping.
                Ok(false) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(error) => slog::warn!(self.logger, "discarding the state directory failed; deleting it in place"; "error" => %error),
            }
            if let Err(error) = rootfs::remove(&self.container_dir) {
                errors.push(error_chain(&error));
            }
        }
        // `init.log` is the garden-init log of earlier releases.
        let leftovers = [PROCESSES_DIR, "init.log", restore::RUNTIME_FILE, NAME_FILES[0].0, NAME_FILES[1].0];
        for name in leftovers {
            let path = self.container_dir.join(name);
            let removed = if path.is_dir() { super::trash::remove_dir_retrying(&path) } else { fs::remove_file(&path) };
            match removed {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => errors.push(format!("failed to remove {}: {error}", path.display())),
            }
        }
        if remove_dir {
            match super::trash::remove_dir_retrying(&self.container_dir) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => errors.push(format!("failed to remove {}: {error}", self.container_dir.display())),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::failed(errors.join("; ")))
        }
    }

    /// Kills every process in the container's cgroup (garden-init only with
    /// `include_init`), with the cgroup frozen so none can fork meanwhile.
    /// Returns whether any process was found.
    fn kill_cgroup(&self, include_init: bool) -> Result<bool, CgroupError> {
        let init_pid = self.init_pid();
        let victims: Vec<i32> = self.cgroup.pids()?.into_iter().filter(|pid| include_init || *pid != init_pid).collect();
        if victims.is_empty() {
            return Ok(false);
        }
        // cgroup.kill takes every task, garden-init included, so only
        // destroy may use it.
        if include_init && self.cgroup.kill_all()? {
            return Ok(true);
        }
        self.cgroup.freeze()?;
        for pid in self.cgroup.pids()? {
            if include_init || pid != init_pid {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        // Frozen tasks die from SIGKILL once thawed.
        self.cgroup.thaw()?;
        Ok(true)
    }

    /// Builds the tar helper's settings; fails once the container has no
    /// init process, whose namespaces the helper joins.
    fn files_config(&self, direction: Direction, path: &str, user: &str) -> Result<FilesConfig, RuntimeError> {
        let init_pid = self.init_pid();
        if init_pid == 0 {
            return Err(RuntimeError::failed("container has no init process (destroyed)"));
        }
        Ok(FilesConfig {
            init_pid,
            privileged: self.privileged,
            cgroup_dirs: self.cgroup.dirs.clone(),
            direction,
            path: path.to_string(),
            user: user.to_string(),
        })
    }

    fn process_dir(&self) -> Result<PathBuf, RuntimeError> {
        let number = self.next_process.fetch_add(1, Ordering::Relaxed);
        let dir = self.container_dir.join(PROCESSES_DIR).join(number.to_string());
        fs::create_dir_all(&dir).map_err(|error| RuntimeError::failed(format!("failed to create {}: {error}", dir.display())))?;
        Ok(dir)
    }
}

/// Writes `config` to a waiting shim within [`START_TIMEOUT`] and returns
/// the socket with the result.
fn send_config(mut socket: UnixStream, config: &ShimConfig) -> (UnixStream, io::Result<()>) {
    let written = socket
        .set_write_timeout(Some(START_TIMEOUT))
        .and_then(|()| shim::write_config(&mut socket, config))
        .and_then(|()| socket.set_write_timeout(None));
    (socket, written)
}

/// Reads exactly one shim frame from a blocking stream, so no byte of a
/// later frame is consumed before the stream is handed to the server.
fn read_one_frame(stream: &mut UnixStream) -> io::Result<ShimFrame> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header)?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if length > crate::runtime::stdio::MAX_FRAME_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "oversized frame from shim"));
    }
    let mut frame = vec![0u8; 5 + length];
    frame[..5].copy_from_slice(&header);
    stream.read_exact(&mut frame[5..])?;
    let mut buffer = bytes::BytesMut::from(&frame[..]);
    ShimFrame::decode(&mut buffer)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "incomplete frame from shim"))
}

/// Reads the first frames of a shim connection: a version 2 shim sends
/// `Hello` before its first real frame, and a version 1 shim sends that
/// frame at once. Returns the protocol version and the first real frame.
/// A shim of a newer version than this server speaks is an error.
fn read_handshake(stream: &mut UnixStream) -> io::Result<(u32, ShimFrame)> {
    match read_one_frame(stream)? {
        ShimFrame::Hello { version } if version > PROTOCOL_VERSION => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the shim speaks protocol version {version}, newer than version {PROTOCOL_VERSION} of this server; upgrade the server"),
        )),
        ShimFrame::Hello { version } if version < 2 => {
            Err(io::Error::new(io::ErrorKind::InvalidData, format!("invalid hello from the shim: protocol version {version} has no hello")))
        }
        ShimFrame::Hello { version } => Ok((version, read_one_frame(stream)?)),
        frame => Ok((OLDEST_PROTOCOL_VERSION, frame)),
    }
}

/// Wraps a shim connection of protocol `version` for the server.
fn shim_connection(version: u32, stream: UnixStream) -> StdioConnection {
    if version >= 2 {
        StdioConnection::UnixAcknowledged(stream)
    } else {
        StdioConnection::Unix(stream)
    }
}

impl ContainerRuntime for LinuxContainer {
    fn run(&self, process_id: &str, spec: &ProcessSpec) -> Result<StartedProcess, RuntimeError> {
        let init_pid = self.init_pid();
        if init_pid == 0 {
            return Err(RuntimeError::failed("container has no init process (destroyed)"));
        }
        if spec.image.uri.is_empty() && !spec.bind_mounts.is_empty() {
            return Err(RuntimeError::invalid("Running a process with bind mounts and no image provided is not allowed"));
        }
        if !spec.image.uri.is_empty() {
            // TODO: processes with their own image and bind mounts.
            return Err(RuntimeError::invalid("processes with their own image are not supported yet"));
        }
        let process_dir = self.process_dir()?;
        fs::write(process_dir.join("id"), process_id).map_err(|error| RuntimeError::failed(format!("failed to record process id: {error}")))?;
        let log_path = process_dir.join("shim.log");
        let config = ShimConfig {
            init_pid,
            privileged: self.privileged,
            no_new_privileges: self.no_new_privileges,
            cgroup_dirs: self.cgroup.dirs.clone(),
            container_env: self.env.clone(),
            exit_status_path: process_dir.join(EXIT_STATUS_FILE),
            log_path: Some(log_path.clone()),
            spec: spec.clone(),
        };
        let start_failed = |error: super::spare::SpareError| RuntimeError::failed(error_chain(&error));
        // Usually the spare shim, already started and waiting.
        let shim = self.shims.take().map_err(start_failed)?;
        // The configuration goes through the socket, never argv: it holds
        // the environment, which may carry secrets.
        let (mut server_end, written) = match send_config(shim.socket, &config) {
            // A spare that died since its last check is replaced once.
            (_, Err(_)) if shim.was_spare => send_config(self.shims.start_now().map_err(start_failed)?.socket, &config),
            sent => sent,
        };
        written.map_err(|error| {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            RuntimeError::failed(format!("failed to send the configuration to the shim: {error} {}", log.trim()))
        })?;

        server_end.set_read_timeout(Some(START_TIMEOUT)).map_err(|error| RuntimeError::failed(error.to_string()))?;
        let handshake = read_handshake(&mut server_end);
        // The next Run's shim starts now that this one has done its work,
        // rather than competing with it for the CPU.
        self.shims.refill();
        let (version, frame) = handshake.map_err(|error| {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            RuntimeError::failed(format!("failed to read the shim's start report: {error} {}", log.trim()))
        })?;
        server_end.set_read_timeout(None).map_err(|error| RuntimeError::failed(error.to_string()))?;
        match frame {
            ShimFrame::Started { pid } => {
                slog::debug!(self.logger, "process started"; "process_id" => process_id, "pid" => pid);
                Ok(StartedProcess { pid, stdio: shim_connection(version, server_end) })
            }
            ShimFrame::StartFailed { failure, message } => Err(match failure {
                StartFailure::ExecutableNotFound => RuntimeError::ExecutableNotFound { message },
                StartFailure::InvalidRequest => RuntimeError::InvalidRequest { message },
                StartFailure::Other => RuntimeError::Failed { message },
            }),
            other => Err(RuntimeError::failed(format!("unexpected first frame from the shim: {other:?}"))),
        }
    }

    fn stop(&self, kill: bool) -> Result<(), RuntimeError> {
        let _guard = self.lifecycle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let init_pid = self.init_pid();
        let started = Instant::now();
        if !kill {
            loop {
                let alive: Vec<i32> = self.cgroup.pids()?.into_iter().filter(|pid| *pid != init_pid).collect();
                if alive.is_empty() {
                    return Ok(());
                }
                if started.elapsed() >= STOP_GRACE {
                    break;
                }
                // Pid by pid, so children that did not get the signal from
                // their parent get it too; repeated each second for
                // processes forked since.
                for pid in alive {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
                }
                let wait_until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < wait_until {
                    if self.cgroup.pids()?.iter().all(|pid| *pid == init_pid) {
                        return Ok(());
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let deadline = Instant::now() + KILL_TIMEOUT;
        while self.kill_cgroup(false)? {
            if Instant::now() > deadline {
                return Err(RuntimeError::failed(format!("processes of container {} survived SIGKILL", self.handle)));
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn destroy(&self) -> Result<(), RuntimeError> {
        let _guard = self.lifecycle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.teardown(true)
    }

    fn stream_in(&self, destination: &str, user: &str, tar: &mut dyn Read) -> Result<(), RuntimeError> {
        let config = self.files_config(Direction::In, destination, user)?;
        slog::debug!(self.logger, "stream in started"; "destination" => destination, "user" => user);
        files::stream_in(&self.executable, &config, tar)
    }

    fn stream_out(&self, source: &str, user: &str) -> Result<Box<dyn Read + Send>, RuntimeError> {
        let config = self.files_config(Direction::Out, source, user)?;
        slog::debug!(self.logger, "stream out started"; "source" => source, "user" => user);
        files::stream_out(&self.executable, &config)
    }

    fn forget_process(&self, process_id: &str) -> Result<(), RuntimeError> {
        let processes = self.container_dir.join(PROCESSES_DIR);
        let entries = match fs::read_dir(&processes) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(RuntimeError::failed(format!("failed to list {}: {error}", processes.display()))),
        };
        // Directories are numbered, because ids may contain any character;
        // each records its id in a file.
        for entry in entries.flatten() {
            let recorded = fs::read_to_string(entry.path().join("id")).unwrap_or_default();
            if recorded == process_id {
                return super::trash::remove_dir_retrying(&entry.path())
                    .map_err(|error| RuntimeError::failed(format!("failed to remove {}: {error}", entry.path().display())));
            }
        }
        Ok(())
    }

    fn reattach_processes(&self) -> Vec<(String, Result<StartedProcess, RuntimeError>)> {
        restore::reattach_processes(self)
    }

    fn update_limits(&self, current: &Limits, requested: &Limits) -> Result<(), RuntimeError> {
        let mut limits = self.limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if requested.disk_limits != current.disk_limits {
            self.update_disk(&current.disk_limits, &requested.disk_limits)?;
        }
        self.cgroup.update_limits(current, requested)?;
        if current.bandwidth_limits != requested.bandwidth_limits {
            if let Some(network) = &self.network {
                network.set_bandwidth(&requested.bandwidth_limits)?;
            }
        }
        *limits = requested.clone();
        Ok(())
    }

    fn reported_limits(&self, set: &Limits) -> Limits {
        // Clients compare CPU limits exactly and read them as shares, never
        // `weight`: v1 reports the shares S, v2 the cpu.weight it wrote.
        let shares = effective_shares(&set.cpu_limits);
        let reported = match (self.cgroup.version, shares) {
            (_, 0) | (CgroupVersion::V1, _) => shares,
            (CgroupVersion::V2, _) => v2_weight(shares),
        };
        Limits { cpu_limits: CpuLimits { weight: 0, limit_in_shares: reported }, ..set.clone() }
    }

    fn metrics(&self, age: std::time::Duration) -> Result<Metrics, RuntimeError> {
        let limits = self.limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let stats = self.cgroup.stats();
        let mut host = HostShape::read();
        host.entitlement_percent = (self.cpu_entitlement_per_share > 0.0).then_some(self.cpu_entitlement_per_share);
        let mut metrics = build_metrics(&stats, effective_shares(&limits.cpu_limits), limits.pid_limits.max, &host, age);
        metrics.disk_stat = metrics::disk_stat(self.image_usage()?, self.writable_usage()?);
        // /proc/<pid>/net/dev lists the interfaces of that process's
        // network namespace, so garden-init's shows the container's.
        let init_pid = self.init_pid();
        if init_pid > 0 {
            if let Ok(text) = fs::read_to_string(format!("/proc/{init_pid}/net/dev")) {
                metrics.network_stat = Some(metrics::network_stat(&text));
            }
        }
        Ok(metrics)
    }

    fn watch_oom(&self) -> Result<Option<Box<dyn OomWatch>>, RuntimeError> {
        let listener = OomListener::open(self.cgroup.version, &self.cgroup.dirs)?;
        Ok(listener.map(|listener| Box::new(listener) as Box<dyn OomWatch>))
    }

    fn net_in(&self, host_port: u16, container_port: u16) -> Result<(), RuntimeError> {
        let network = self.network.as_ref().ok_or_else(|| RuntimeError::invalid("the container has no network"))?;
        network.net_in(host_port, container_port)?;
        slog::info!(self.logger, "net-in mapped"; "host_port" => host_port, "container_port" => container_port);
        Ok(())
    }

    fn net_out(&self, rules: &[crate::api::NetOutRule]) -> Result<(), RuntimeError> {
        let network = self.network.as_ref().ok_or_else(|| RuntimeError::invalid("the container has no network"))?;
        network.net_out(rules)?;
        slog::info!(self.logger, "net-out rules added"; "rules" => rules.len());
        Ok(())
    }

    fn external_ip(&self) -> Option<std::net::Ipv4Addr> {
        self.network.as_ref().map(|_| self.host_network.as_ref().map(|host| host.external_ip()))?
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "network": self.network.as_ref().map(ContainerNetwork::describe),
            "handle": self.handle,
            "init_pid": self.init_pid(),
            "privileged": self.privileged,
            "container_dir": self.container_dir,
            "cgroup_version": self.cgroup.version,
            "cgroups": self.cgroup.dirs,
            "rootfs": self.rootfs.as_ref().map(|rootfs| &rootfs.root),
            "overlay": self.rootfs.as_ref().and_then(|rootfs| rootfs.overlay.as_ref()),
            "disk": self.disk,
        })
    }
}
