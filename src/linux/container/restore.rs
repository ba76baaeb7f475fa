//! Finding a container's kernel objects again after a server restart, and
//! removing what no container owns.
//!
//! Create records in `runtime.json` what the state file does not contain:
//! the pid of garden-init with its start time. The start time distinguishes
//! a live init from a process that reused its pid after a host reboot.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use super::{cgroup_name, read_handshake, shim_connection, InitProcess, LinuxContainer, EXIT_STATUS_FILE, PROCESSES_DIR};
use crate::linux::cgroup::ContainerCgroup;
use crate::linux::disk::DiskImage;
use crate::linux::rootfs::{self, ContainerRootfs};
use crate::linux::shim::{OUTPUT_FILE, SOCKET_NAME};
use crate::linux::{syscalls, LinuxRuntime};
use crate::runtime::stdio::{ShimFrame, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION};
use crate::runtime::{ContainerConfig, RestoredContainer, RuntimeError, StartedProcess, StdioConnection};

/// Name of the runtime's own record in the container directory.
pub(super) const RUNTIME_FILE: &str = "runtime.json";

/// How long a reconnect waits for a shim's `Started` frame.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reconnect that found no listening shim waits for its exit
/// status file, which a shim that is just finishing writes last.
const EXIT_FILE_WAIT: Duration = Duration::from_secs(2);

/// The record create writes about a container's host objects.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct RuntimeRecord {
    init_pid: i32,
    /// Start time of garden-init in clock ticks after boot (field 22 of
    /// `/proc/<pid>/stat`).
    init_start_time: u64,
    privileged: bool,
    root: PathBuf,
    overlay: Option<PathBuf>,
    /// Name of the host end of the container's veth pair; absent in
    /// records of releases that derived it from the container's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_veth: Option<String>,
}

/// Writes the runtime record of a container whose create has succeeded.
pub(super) fn write_runtime_record(container: &LinuxContainer) -> Result<(), RuntimeError> {
    let init_pid = container.init_pid();
    let init_start_time = process_start_time(init_pid)
        .map_err(|error| RuntimeError::failed(format!("failed to read the start time of garden-init {init_pid}: {error}")))?;
    let rootfs = container.rootfs.as_ref();
    let record = RuntimeRecord {
        init_pid,
        init_start_time,
        privileged: container.privileged,
        root: rootfs.map(|rootfs| rootfs.root.clone()).unwrap_or_default(),
        overlay: rootfs.and_then(|rootfs| rootfs.overlay.clone()),
        host_veth: container.network.as_ref().map(|network| network.names().host_veth.clone()),
    };
    let path = container.container_dir.join(RUNTIME_FILE);
    let bytes = serde_json::to_vec_pretty(&record).map_err(|error| RuntimeError::failed(error.to_string()))?;
    crate::state::write_atomically(&path, &bytes)
        .map_err(|error| RuntimeError::failed(format!("failed to write {}: {error}", path.display())))
}

fn read_runtime_record(container_dir: &Path) -> Result<RuntimeRecord, RuntimeError> {
    let path = container_dir.join(RUNTIME_FILE);
    let bytes = fs::read(&path).map_err(|error| RuntimeError::failed(format!("failed to read {}: {error}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|error| RuntimeError::failed(format!("{} is not valid: {error}", path.display())))
}

/// Returns field 22 of `/proc/<pid>/stat`, the start time in clock ticks
/// after boot. The fields are counted after the last `)`, because the
/// command name may contain spaces and parentheses.
fn process_start_time(pid: i32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    // After the name come field 3 (state) onwards, so field 22 is the 20th.
    after_name
        .split_whitespace()
        .nth(19)
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/stat has no start time")))
}

/// Opens garden-init again when the recorded process still runs.
fn open_init(record: &RuntimeRecord) -> Option<InitProcess> {
    let pidfd = syscalls::pidfd_open(record.init_pid).ok()?;
    // The start time is compared after the pidfd is open and the pidfd
    // checked after that, so a pid reused in between cannot pass.
    let matches = process_start_time(record.init_pid).ok()? == record.init_start_time;
    let exited = syscalls::wait_readable(pidfd.as_fd(), 0).unwrap_or(true);
    (matches && !exited).then_some(InitProcess { pid: record.init_pid, pidfd })
}

/// Builds the container value for existing host objects, without creating
/// anything.
fn skeleton(runtime: &LinuxRuntime, handle: &str, container_dir: PathBuf, privileged: bool, rootfs: Option<ContainerRootfs>) -> LinuxContainer {
    let container_dir_for_disk = container_dir.clone();
    LinuxContainer {
        handle: handle.to_string(),
        container_dir,
        privileged,
        no_new_privileges: runtime.config.no_new_privileges && !privileged,
        executable: runtime.config.executable.clone(),
        shims: runtime.shims.clone(),
        trash: runtime.trash.clone(),
        logger: runtime.logger.new(slog::o!("handle" => handle.to_string())),
        env: Vec::new(),
        cgroup: ContainerCgroup::plan(runtime.cgroup_version, &runtime.hierarchies, &runtime.config.tag, &cgroup_name(handle))
            .with_cpu_quota_per_share(runtime.config.cpu_quota_per_share),
        rootfs,
        init: Mutex::new(None),
        next_process: AtomicU64::new(0),
        lifecycle: Mutex::new(()),
        limits: Mutex::new(Default::default()),
        image: None,
        image_usage: OnceLock::new(),
        // A disk limit's filesystem is found by its image file, so a
        // teardown also removes one that create left half made.
        disk: Some(DiskImage::at(&container_dir_for_disk)).filter(DiskImage::exists),
        cpu_entitlement_per_share: runtime.config.cpu_entitlement_per_share,
        host_network: None,
        network: None,
    }
}

/// Rebuilds a container from its state directory.
pub(in crate::linux) fn restore(runtime: &LinuxRuntime, config: &ContainerConfig) -> Result<RestoredContainer, RuntimeError> {
    let container_dir = fs::canonicalize(&config.container_dir)
        .map_err(|error| RuntimeError::failed(format!("state directory {} is not usable: {error}", config.container_dir.display())))?;
    let record = match read_runtime_record(&container_dir) {
        Ok(record) => record,
        Err(_) if !container_dir.join(RUNTIME_FILE).exists() => discover_runtime_record(runtime, config, &container_dir)?,
        Err(error) => return Err(error),
    };
    // The writable layer sits on the disk limit's filesystem when there is
    // one, else in the state directory, as create placed it.
    let disk = DiskImage::at(&container_dir);
    let layers = if disk.exists() { disk.mount.clone() } else { container_dir.clone() };
    let upper = record.overlay.as_ref().map(|_| layers.join(rootfs::UPPER_DIR));
    let rootfs = ContainerRootfs { root: record.root.clone(), overlay: record.overlay.clone(), upper };
    let mut container = skeleton(runtime, &config.handle, container_dir, record.privileged, Some(rootfs));
    container.image = match rootfs::resolve_source(&config.spec, &runtime.config.default_rootfs)? {
        rootfs::RootfsSource::Directory(path) => Some(path),
        rootfs::RootfsSource::Raw(_) => None,
    };
    container.env = config.spec.env.clone();
    *container.limits.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()) = config.spec.limits.clone();
    let next_process = process_dirs(&container.container_dir).iter().map(|(number, _)| number + 1).max().unwrap_or(0);
    container.next_process = AtomicU64::new(next_process);
    let init = open_init(&record);
    let init_alive = init.is_some();
    *container.init.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()) = init;
    if let (true, Some(host_network), Some(allocation)) = (init_alive, &runtime.network, config.network) {
        // The links survived the restart; the fresh firewall table needs
        // the container's rules again, and the caller replays its net-in
        // and net-out rules.
        let network = host_network.reattach(&config.handle, allocation, record.init_pid, record.host_veth.as_deref())?;
        let bandwidth = &config.spec.limits.bandwidth_limits;
        if bandwidth.rate > 0 {
            network.set_bandwidth(bandwidth)?;
        }
        container.host_network = Some(host_network.clone());
        container.network = Some(network);
    }
    Ok(RestoredContainer { container: std::sync::Arc::new(container), init_alive })
}

/// Rebuilds the runtime record of a container created by a release that
/// wrote none: garden-init is the process of that name in the container's
/// cgroup, and the root follows from the spec as create makes it. The
/// record is written, so later restarts read it.
fn discover_runtime_record(runtime: &LinuxRuntime, config: &ContainerConfig, container_dir: &Path) -> Result<RuntimeRecord, RuntimeError> {
    let cgroup = ContainerCgroup::plan(runtime.cgroup_version, &runtime.hierarchies, &runtime.config.tag, &cgroup_name(&config.handle));
    let init_pid = cgroup
        .pids()?
        .into_iter()
        .find(|pid| fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|name| name.trim() == "garden-init"))
        .ok_or_else(|| RuntimeError::failed(format!("{} is missing and no garden-init runs in the container's cgroup", RUNTIME_FILE)))?;
    let init_start_time = process_start_time(init_pid)
        .map_err(|error| RuntimeError::failed(format!("failed to read the start time of garden-init {init_pid}: {error}")))?;
    let (root, overlay) = match rootfs::resolve_source(&config.spec, &runtime.config.default_rootfs)? {
        rootfs::RootfsSource::Raw(path) => (path, None),
        rootfs::RootfsSource::Directory(_) => (container_dir.join("rootfs"), Some(container_dir.join("rootfs"))),
    };
    // A privileged container has no user namespace of its own.
    let user_namespace = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/user")).ok();
    let privileged = user_namespace(&init_pid.to_string()) == user_namespace("self");
    let record = RuntimeRecord { init_pid, init_start_time, privileged, root, overlay, host_veth: None };
    let path = container_dir.join(RUNTIME_FILE);
    let bytes = serde_json::to_vec_pretty(&record).map_err(|error| RuntimeError::failed(error.to_string()))?;
    crate::state::write_atomically(&path, &bytes)
        .map_err(|error| RuntimeError::failed(format!("failed to write {}: {error}", path.display())))?;
    slog::info!(runtime.logger, "runtime record rebuilt for a container of an earlier release"; "handle" => &config.handle, "init_pid" => init_pid);
    Ok(record)
}

/// Removes every host object of a container directory that cannot be
/// restored. garden-init is killed only when the runtime record proves it
/// is the process create started; the cgroup kill catches the rest.
pub(in crate::linux) fn remove_unrestorable(runtime: &LinuxRuntime, handle: &str, container_dir: &Path) -> Result<(), RuntimeError> {
    let record = read_runtime_record(container_dir).ok();
    let privileged = record.as_ref().is_some_and(|record| record.privileged);
    let rootfs = ContainerRootfs { root: PathBuf::new(), overlay: None, upper: None };
    let container = skeleton(runtime, handle, container_dir.to_path_buf(), privileged, Some(rootfs));
    *container.init.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = record.as_ref().and_then(open_init);
    container.teardown(true)
}

/// Keeps the network of a container left in place unserved, whose
/// garden-init still runs: its links are not orphans, and its rules, net-in
/// mappings and net-out rules go into the fresh table, so that it keeps
/// working as it did.
pub(in crate::linux) fn keep_in_place(runtime: &LinuxRuntime, handle: &str, container_dir: &Path, kept: &crate::runtime::KeptNetwork) {
    let (Some(host_network), Some(allocation)) = (&runtime.network, kept.allocation) else { return };
    let Ok(record) = read_runtime_record(container_dir) else { return };
    if open_init(&record).is_none() {
        return;
    }
    let network = match host_network.reattach(handle, allocation, record.init_pid, record.host_veth.as_deref()) {
        Ok(network) => network,
        Err(error) => {
            slog::warn!(runtime.logger, "the network of a container left in place could not be kept"; "handle" => handle, "error" => %error);
            return;
        }
    };
    for (host_port, container_port) in &kept.mapped_ports {
        if let Err(error) = network.net_in(*host_port, *container_port) {
            slog::warn!(runtime.logger, "a net-in mapping of a container left in place was not restored"; "handle" => handle, "host_port" => host_port, "error" => %error);
        }
    }
    if let Err(error) = network.net_out(&kept.net_out) {
        slog::warn!(runtime.logger, "the net-out rules of a container left in place were not restored"; "handle" => handle, "error" => %error);
    }
    runtime.kept_networks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(network);
}

/// Removes the cgroups below the server's tag that belong to no handle in
/// `owned`, killing the processes in them.
pub(in crate::linux) fn remove_orphans(runtime: &LinuxRuntime, owned: &BTreeSet<String>) -> Vec<String> {
    let mut owned_names: BTreeSet<String> = owned.iter().map(|handle| cgroup_name(handle)).collect();
    owned_names.extend(runtime.inits.cgroup_names());
    let parents = ContainerCgroup::plan(runtime.cgroup_version, &runtime.hierarchies, &runtime.config.tag, "_").parents;
    let mut orphans = BTreeSet::new();
    for parent in &parents {
        let Ok(entries) = fs::read_dir(parent) else { continue };
        for entry in entries.flatten() {
            let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_dir && !owned_names.contains(&name) {
                orphans.insert(name);
            }
        }
    }
    let mut report = Vec::new();
    for name in orphans {
        // The depot has no directory for an orphan (those were removed
        // before), so teardown only kills and removes the cgroups.
        let container = skeleton(runtime, &name, runtime.config.depot.join(&name), false, None);
        match container.teardown(false) {
            Ok(()) => report.push(format!("removed orphan cgroup {name} in {} hierarchies", container.cgroup.dirs.len())),
            Err(error) => report.push(format!("failed to remove orphan cgroup {name}: {error}")),
        }
    }
    if let Some(network) = &runtime.network {
        match network.remove_unclaimed_links() {
            Ok(links) => report.extend(links.into_iter().map(|link| format!("removed orphan link {link}"))),
            Err(error) => report.push(format!("failed to remove orphan links: {error}")),
        }
    }
    report
}

/// Returns the numbered process directories of a container.
fn process_dirs(container_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(container_dir.join(PROCESSES_DIR)) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let number = entry.file_name().to_str()?.parse().ok()?;
            Some((number, entry.path()))
        })
        .collect()
}

/// Reconnects to every process of a restored container.
pub(super) fn reattach_processes(container: &LinuxContainer) -> Vec<(String, Result<StartedProcess, RuntimeError>)> {
    let mut dirs = process_dirs(&container.container_dir);
    dirs.sort();
    let mut reattached = Vec::new();
    for (_, dir) in dirs {
        let Ok(process_id) = fs::read_to_string(dir.join("id")) else {
            // Run died between making the directory and recording the id,
            // before any shim started: nothing refers to it.
            let _ = fs::remove_dir_all(&dir);
            continue;
        };
        let result = reattach(&dir);
        if let Ok(StartedProcess { stdio: connection @ (StdioConnection::Unix(_) | StdioConnection::UnixAcknowledged(_)), pid }) = &result {
            let version = if matches!(connection, StdioConnection::Unix(_)) { OLDEST_PROTOCOL_VERSION } else { PROTOCOL_VERSION };
            slog::info!(container.logger, "process shim reconnected"; "process_id" => &process_id, "pid" => pid, "protocol_version" => version);
        }
        reattached.push((process_id, result));
    }
    reattached
}

fn reattach(dir: &Path) -> Result<StartedProcess, RuntimeError> {
    if let Some(frames) = exited_replay(dir) {
        return Ok(StartedProcess { pid: 0, stdio: StdioConnection::Replay(frames) });
    }
    let connected = connect(dir).and_then(|mut stream| {
        stream.set_read_timeout(Some(RECONNECT_TIMEOUT))?;
        let handshake = read_handshake(&mut stream)?;
        stream.set_read_timeout(None)?;
        Ok((handshake, stream))
    });
    let failure = match connected {
        Ok(((version, ShimFrame::Started { pid }), stream)) => return Ok(StartedProcess { pid, stdio: shim_connection(version, stream) }),
        Ok(((_, other), _)) => format!("unexpected first frame {other:?}"),
        // The shim runs and may keep running for long, so its exit file
        // is not waited for.
        Err(error) if error.kind() == io::ErrorKind::Unsupported => {
            return Err(RuntimeError::failed(format!("cannot reattach the process of {}: {error}", dir.display())))
        }
        Err(error) => error.to_string(),
    };
    // A shim that is finishing closes its socket only after it wrote the
    // exit status file.
    let deadline = std::time::Instant::now() + EXIT_FILE_WAIT;
    while std::time::Instant::now() < deadline {
        if let Some(frames) = exited_replay(dir) {
            return Ok(StartedProcess { pid: 0, stdio: StdioConnection::Replay(frames) });
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(RuntimeError::failed(format!("the shim of {} is unreachable ({failure}) and left no exit status", dir.display())))
}

/// Returns the frames to replay for a process whose shim recorded its exit:
/// the output no server received, then `Exited`.
fn exited_replay(dir: &Path) -> Option<Vec<u8>> {
    let text = fs::read_to_string(dir.join(EXIT_STATUS_FILE)).ok()?;
    let status: i32 = text.trim().parse().ok()?;
    let mut frames = fs::read(dir.join(OUTPUT_FILE)).unwrap_or_default();
    let mut exited = bytes::BytesMut::new();
    ShimFrame::Exited { status }.encode(&mut exited);
    frames.extend_from_slice(&exited);
    Some(frames)
}

/// Connects to a shim's socket. A path too long for a socket address is
/// reached through the process directory's descriptor.
fn connect(dir: &Path) -> io::Result<UnixStream> {
    let path = dir.join(SOCKET_NAME);
    if path.as_os_str().len() < 100 {
        return UnixStream::connect(&path);
    }
    let directory = fs::File::open(dir)?;
    UnixStream::connect(format!("/proc/self/fd/{}/{SOCKET_NAME}", directory.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_read() {
        let pid = std::process::id() as i32;
        let first = process_start_time(pid).unwrap();
        assert!(first > 0);
        assert_eq!(process_start_time(pid).unwrap(), first);
    }

    #[test]
    fn exited_replay_appends_status() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(exited_replay(dir.path()), None);
        let mut output = bytes::BytesMut::new();
        ShimFrame::Stdout(bytes::Bytes::from_static(b"late")).encode(&mut output);
        fs::write(dir.path().join(OUTPUT_FILE), &output).unwrap();
        fs::write(dir.path().join(EXIT_STATUS_FILE), "7\n").unwrap();
        let mut frames = bytes::BytesMut::from(&exited_replay(dir.path()).unwrap()[..]);
        assert_eq!(ShimFrame::decode(&mut frames).unwrap(), Some(ShimFrame::Stdout(bytes::Bytes::from_static(b"late"))));
        assert_eq!(ShimFrame::decode(&mut frames).unwrap(), Some(ShimFrame::Exited { status: 7 }));
    }

    /// Serves one connection on `dir/sock` that sends `frames`, as a shim
    /// would, and keeps it open until the peer closes it.
    fn fake_shim(dir: &Path, frames: Vec<ShimFrame>) -> thread::JoinHandle<()> {
        let listener = std::os::unix::net::UnixListener::bind(dir.join(SOCKET_NAME)).unwrap();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut encoded = bytes::BytesMut::new();
            for frame in frames {
                frame.encode(&mut encoded);
            }
            std::io::Write::write_all(&mut stream, &encoded).unwrap();
            let _ = std::io::Read::read(&mut stream, &mut [0u8; 1]);
        })
    }

    #[test]
    fn reattach_tells_shim_versions_apart() {
        let dir = tempfile::tempdir().unwrap();
        let shim = fake_shim(dir.path(), vec![ShimFrame::Started { pid: 41 }]);
        let started = reattach(dir.path()).unwrap();
        assert_eq!(started.pid, 41);
        assert!(matches!(started.stdio, StdioConnection::Unix(_)), "a shim without hello speaks version 1");
        drop(started);
        shim.join().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let shim = fake_shim(dir.path(), vec![ShimFrame::Hello { version: PROTOCOL_VERSION }, ShimFrame::Started { pid: 42 }]);
        let started = reattach(dir.path()).unwrap();
        assert_eq!(started.pid, 42);
        assert!(matches!(started.stdio, StdioConnection::UnixAcknowledged(_)), "a version 2 shim gets acknowledgements");
        drop(started);
        shim.join().unwrap();
    }

    #[test]
    fn reattach_rejects_newer_shim() {
        let dir = tempfile::tempdir().unwrap();
        let newer = PROTOCOL_VERSION + 1;
        let shim = fake_shim(dir.path(), vec![ShimFrame::Hello { version: newer }, ShimFrame::Started { pid: 43 }]);
        let error = reattach(dir.path()).unwrap_err();
        let message = error.to_string();
        assert!(message.contains(&format!("protocol version {newer}")), "{message}");
        assert!(message.contains("upgrade the server"), "{message}");
        shim.join().unwrap();
    }
}
