//! garden-init: pid 1 of each container.
//!
//! The server starts this executable with [`super::GARDEN_INIT_COMMAND`] and
//! [`PRIVILEGED_ARG`] or [`UNPRIVILEGED_ARG`], with a Unix socket to the
//! server as stdin. The first process unshares the container's namespaces
//! except the mount namespace, waits while the server writes its id maps
//! and places it in cgroups, and forks pid 1 of the new pid namespace. It
//! reports that pid and exits. pid 1 waits for the container's
//! [`InitConfig`], which may come much later: the server keeps one
//! garden-init waiting ahead of the next create (see
//! [`super::spare_init`]). It then unshares the mount namespace, builds the
//! container's mounts, pivots into its root, reports `ready` and reaps
//! children for ever.
//!
//! The mount namespace is made last because it copies the host's mounts,
//! and the container's root filesystem is mounted on the host only when a
//! create requests it.
//!
//! Lines on the socket: `unshared`, then the server's `go`, then `pid <n>`
//! from the first process; later the server's `config <json>`, then
//! `ready` or `error <message>` from pid 1. End of file in place of the
//! configuration (the server dropped the spare or died) makes pid 1 exit.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Uid};

/// Settings garden-init builds a container from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InitConfig {
    /// The prepared root filesystem (host path) to pivot into.
    pub root: PathBuf,
    pub hostname: String,
    /// Privileged containers get no user namespace and no masked paths.
    pub privileged: bool,
    /// The client's bind mounts, made in this order.
    #[serde(default)]
    pub bind_mounts: Vec<crate::api::BindMount>,
    /// Value written to `net.ipv4.ping_group_range`, if any.
    #[serde(default)]
    pub ping_group_range: Option<String>,
    /// Host files bound over files of the container, such as its
    /// `/etc/hosts` and `/etc/resolv.conf`.
    #[serde(default)]
    pub file_binds: Vec<FileBind>,
}

/// A host file bound over a file of the container, read-write.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FileBind {
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub destination: String,
}

/// Character devices bound from the host into every container's `/dev`.
/// Inside a user namespace `mknod` is refused, so binds of the host's nodes
/// are used for both kinds of container.
const DEVICES: [&str; 7] = ["null", "zero", "full", "random", "urandom", "tty", "fuse"];

/// Proc files covered with `/dev/null` in unprivileged containers.
const MASKED_FILES: [&str; 6] = ["kcore", "keys", "latency_stats", "sched_debug", "timer_list", "timer_stats"];
/// Directories covered with an empty read-only tmpfs in unprivileged
/// containers.
const MASKED_DIRS: [&str; 2] = ["proc/scsi", "sys/firmware"];

/// The seccomp filter of an unprivileged container, or why it could not be
/// built.
type Filter = Result<seccompiler::BpfProgram, super::security::SecurityError>;

/// Argument that starts garden-init for a privileged container: no user
/// namespace.
pub const PRIVILEGED_ARG: &str = "privileged";
/// Argument that starts garden-init for an unprivileged container.
pub const UNPRIVILEGED_ARG: &str = "unprivileged";

/// Entry point: dispatches to the user namespace holder or to container init.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let first = args.first().and_then(|arg| arg.to_str()).unwrap_or("");
    let privileged = match first {
        super::rootfs::USERNS_HOLDER_ARG => return hold_userns(),
        PRIVILEGED_ARG => true,
        UNPRIVILEGED_ARG => false,
        other => {
            eprintln!("garden-init: expected {PRIVILEGED_ARG:?} or {UNPRIVILEGED_ARG:?}, got {other:?}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: fd 0 is the socket the server passed as stdin; nothing else
    // owns it in this process.
    let socket = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    match start(privileged, socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("garden-init: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Creates a user namespace, reports `ready` on stdout, and keeps the
/// namespace alive until stdin closes.
fn hold_userns() -> ExitCode {
    if let Err(error) = unshare(CloneFlags::CLONE_NEWUSER) {
        eprintln!("garden-init: failed to unshare the user namespace: {error}");
        return ExitCode::FAILURE;
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    ExitCode::SUCCESS
}

fn send(socket: &mut UnixStream, line: &str) -> Result<(), String> {
    socket.write_all(format!("{line}\n").as_bytes()).map_err(|error| format!("failed to write to the server: {error}"))
}

/// Runs in the first process: unshares, waits for the server, forks pid 1.
fn start(privileged: bool, mut socket: UnixStream) -> Result<(), String> {
    let mut flags = CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWPID;
    if !privileged {
        // With CLONE_NEWUSER in the same call, the kernel creates the user
        // namespace first and makes it the owner of the others, and of the
        // mount namespace pid 1 makes later.
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    unshare(flags).map_err(|error| format!("failed to unshare namespaces: {error}"))?;
    send(&mut socket, "unshared")?;

    let mut reader = BufReader::new(socket.try_clone().map_err(|error| error.to_string())?);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|error| format!("failed to read from the server: {error}"))?;
    if line.trim() != "go" {
        return Err(format!("unexpected message from the server: {line:?}"));
    }

    // SAFETY: this process is single threaded (started by exec, no threads
    // spawned), so the child may run any code.
    match unsafe { fork() }.map_err(|error| format!("failed to fork pid 1: {error}"))? {
        ForkResult::Parent { child } => send(&mut socket, &format!("pid {child}")),
        // The child keeps its copy of the reader: the server sends nothing
        // after "go" until the configuration, so nothing of it is buffered
        // in the parent's copy.
        ForkResult::Child => std::process::exit(serve_as_pid1(privileged, socket, reader)),
    }
}

/// Waits for the configuration, builds the container and reaps children;
/// returns the exit code.
fn serve_as_pid1(privileged: bool, mut socket: UnixStream, mut reader: BufReader<UnixStream>) -> i32 {
    // Built while there is time: a spare waits here for its configuration.
    let filter = if privileged { None } else { Some(super::security::build_filter()) };
    let config = match read_config(&mut reader) {
        Ok(Some(config)) => config,
        // The server closed the socket: a spare it no longer needs.
        Ok(None) => return 0,
        Err(message) => {
            let _ = send(&mut socket, &format!("error {}", message.replace('\n', " ")));
            return 1;
        }
    };
    let built = if config.privileged == privileged {
        build_container(&config, filter)
    } else {
        Err(format!("the configuration is for a {} container, but this garden-init was started for the other kind", kind(config.privileged)))
    };
    match built {
        Ok(()) => {
            let _ = send(&mut socket, "ready");
            drop(socket);
            drop(reader);
            match redirect_stdio_to_null() {
                Ok(()) => reap_forever(),
                Err(message) => {
                    eprintln!("garden-init: {message}");
                    1
                }
            }
        }
        Err(message) => {
            let _ = send(&mut socket, &format!("error {}", message.replace('\n', " ")));
            1
        }
    }
}

fn kind(privileged: bool) -> &'static str {
    if privileged {
        PRIVILEGED_ARG
    } else {
        UNPRIVILEGED_ARG
    }
}

/// Reads the `config <json>` line; `None` at end of file.
fn read_config(reader: &mut BufReader<UnixStream>) -> Result<Option<InitConfig>, String> {
    let mut line = String::new();
    let read = reader.read_line(&mut line).map_err(|error| format!("failed to read the configuration: {error}"))?;
    if read == 0 {
        return Ok(None);
    }
    let Some(json) = line.trim_end().strip_prefix("config ") else {
        return Err(format!("expected the configuration from the server, got {line:?}"));
    };
    serde_json::from_str(json).map(Some).map_err(|error| format!("invalid configuration: {error}"))
}

fn mount_at(source: &str, target: &Path, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), String> {
    mount(Some(source), target, Some(fstype), flags, data).map_err(|error| format!("failed to mount {fstype} at {}: {error}", target.display()))
}

fn bind(source: &Path, target: &Path, flags: MsFlags) -> Result<(), String> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND | flags, None::<&str>)
        .map_err(|error| format!("failed to bind {} to {}: {error}", source.display(), target.display()))
}

fn create_dir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|error| format!("failed to create {}: {error}", path.display()))
}

/// Builds the container inside the new namespaces; runs as pid 1.
fn build_container(config: &InitConfig, filter: Option<Filter>) -> Result<(), String> {
    // A copy of the host's mounts as they are now, the container's root
    // filesystem included.
    unshare(CloneFlags::CLONE_NEWNS).map_err(|error| format!("failed to unshare the mount namespace: {error}"))?;
    // Opened in the container's mount namespace, which a bind source must
    // belong to, but before becoming container root: as the host's root
    // (uid 0 on the host) this process may still search the depot.
    let mut file_binds = Vec::new();
    for file_bind in &config.file_binds {
        let source = fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(&file_bind.source)
            .map_err(|error| format!("failed to open {}: {error}", file_bind.source.display()))?;
        file_binds.push((OwnedFd::from(source), file_bind.destination.clone()));
    }
    if !config.privileged {
        // Until now this process is the host's root, which the container's
        // namespace does not map; become container root.
        nix::unistd::setgroups(&[]).map_err(|error| format!("failed to clear groups: {error}"))?;
        nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)).map_err(|error| format!("failed to set gid 0: {error}"))?;
        nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).map_err(|error| format!("failed to set uid 0: {error}"))?;
    }

    // Private propagation, so no mount made here reaches the host.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(|error| format!("failed to make / private: {error}"))?;
    let root = &config.root;
    // pivot_root needs the new root to be a mount point; a raw:// root may
    // be a plain directory.
    bind(root, root, MsFlags::MS_REC)?;

    mount_proc_and_sys(root)?;
    if let Some(range) = &config.ping_group_range {
        // The sysctl belongs to the container's network namespace, which
        // this process is in, and its proc mount shows that namespace.
        let path = root.join("proc/sys/net/ipv4/ping_group_range");
        fs::write(&path, range).map_err(|error| format!("failed to write {range:?} to {}: {error}", path.display()))?;
    }
    mount_dev(root, config.privileged)?;

    let tmp = root.join("tmp");
    if !tmp.exists() {
        create_dir(&tmp)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).map_err(|error| format!("failed to chmod /tmp: {error}"))?;
    }
    bind_client_mounts(root, &config.bind_mounts)?;
    bind_files(root, &file_binds)?;
    if !config.privileged {
        mask_paths(root)?;
        bind_cgroups(root)?;
    }

    nix::unistd::sethostname(&config.hostname).map_err(|error| format!("failed to set hostname: {error}"))?;
    pivot_into(root)?;
    set_loopback_up();

    nix::sys::prctl::set_name(c"garden-init").map_err(|error| format!("failed to set the task name: {error}"))?;
    if let Some(filter) = filter {
        confine_init(filter)?;
    }
    Ok(())
}

/// Gives pid 1 of an unprivileged container the seccomp filter of its
/// processes and the unprivileged capability mask in all four sets.
fn confine_init(filter: Filter) -> Result<(), String> {
    use super::security;
    let describe = |error: security::SecurityError| super::error_chain(&error);
    // Installing a filter without no_new_privs needs CAP_SYS_ADMIN, which
    // the capability change below removes, so the filter comes first. It
    // allows capset and prctl.
    let filter = filter.map_err(describe)?;
    security::install_filter(&filter).map_err(describe)?;
    let caps = security::UNPRIVILEGED_CAPS & security::read_bounding();
    security::restrict_bounding(caps).map_err(describe)?;
    security::write_caps(security::CapSets { inheritable: caps, permitted: caps, effective: caps }).map_err(describe)
}

fn mount_proc_and_sys(root: &Path) -> Result<(), String> {
    let proc_dir = root.join("proc");
    create_dir(&proc_dir)?;
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_at("proc", &proc_dir, "proc", locked, None)?;

    let sys_dir = root.join("sys");
    create_dir(&sys_dir)?;
    // sysfs shows the network devices of the mounting process's network
    // namespace, which is the container's own here.
    mount_at("sysfs", &sys_dir, "sysfs", locked | MsFlags::MS_RDONLY, None)

}

fn mount_dev(root: &Path, privileged: bool) -> Result<(), String> {
    let dev = root.join("dev");
    create_dir(&dev)?;
    mount_at("tmpfs", &dev, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_STRICTATIME, Some("mode=755"))?;

    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if (name == "fuse" && !privileged) || !host.exists() {
            continue;
        }
        let target = dev.join(name);
        fs::File::create(&target).map_err(|error| format!("failed to create {}: {error}", target.display()))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o666)).map_err(|error| format!("failed to chmod {}: {error}", target.display()))?;
        bind(&host, &target, MsFlags::empty())?;
    }

    let pts = dev.join("pts");
    create_dir(&pts)?;
    mount_at(
        "devpts",
        &pts,
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let shm = dev.join("shm");
    create_dir(&shm)?;
    // No size option: the kernel default (half of RAM) applies and pages are
    // charged to the container's memory cgroup.
    mount_at("tmpfs", &shm, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, Some("mode=1777"))?;
    let mqueue = dev.join("mqueue");
    create_dir(&mqueue)?;
    mount_at("mqueue", &mqueue, "mqueue", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV, None)?;

    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link)).map_err(|error| format!("failed to link /dev/{link}: {error}"))?;
    }
    Ok(())
}

fn mask_paths(root: &Path) -> Result<(), String> {
    let null = root.join("dev/null");
    for name in MASKED_FILES {
        let target = root.join("proc").join(name);
        if target.exists() {
            bind(&null, &target, MsFlags::empty())?;
        }
    }
    for dir in MASKED_DIRS {
        let target = root.join(dir);
        if target.is_dir() {
            mount_at("tmpfs", &target, "tmpfs", MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None)?;
        }
    }
    Ok(())
}

/// Binds the client's mounts in the order given: read-only unless the mode
/// is 1, with the destination created below the root if missing.
///
/// Host paths still resolve here because the pivot comes later. So each
/// destination is resolved with `openat2` below the root, and the mount is
/// made on the opened directory through `/proc/self/fd`. A symlink in the
/// image therefore cannot put the mount point or a created directory on the
/// host.
/// Binds each opened host file over its destination, creating an empty
/// destination file where the image has none and container root may
/// create one.
fn bind_files(root: &Path, file_binds: &[(OwnedFd, String)]) -> Result<(), String> {
    if file_binds.is_empty() {
        return Ok(());
    }
    let root_dir = fs::File::open(root).map_err(|error| format!("failed to open {}: {error}", root.display()))?;
    let root_fd = super::files::Root::from_fd(root_dir.into());
    for (source, destination) in file_binds {
        let path = super::files::normalize(destination.as_bytes());
        let failed = |error: std::io::Error| format!("failed to create {destination} in the container: {error}");
        let (parent_path, name) = super::files::split_last(&path);
        let target = match root_fd.open_path(&path, libc::O_PATH | libc::O_NOFOLLOW) {
            Ok(target) => target,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let created = root_fd.ensure_dir(parent_path).and_then(|parent| {
                    super::files::openat(parent.as_fd(), name, libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW, 0o644)
                });
                match created {
                    Ok(file) => drop(file),
                    // NOTE: a root filesystem that container root may not
                    // write to, such as a raw:// host directory owned by the
                    // host's root, keeps its own name files (or none).
                    Err(error) if matches!(error.raw_os_error(), Some(libc::EACCES | libc::EPERM | libc::EROFS)) => continue,
                    Err(error) => return Err(failed(error)),
                }
                root_fd.open_path(&path, libc::O_PATH | libc::O_NOFOLLOW).map_err(failed)?
            }
            Err(error) => return Err(failed(error)),
        };
        let source_path = PathBuf::from(format!("/proc/self/fd/{}", source.as_raw_fd()));
        let target_path = PathBuf::from(format!("/proc/self/fd/{}", target.as_raw_fd()));
        bind(&source_path, &target_path, MsFlags::empty()).map_err(|error| format!("{error} (destination {destination})"))?;
    }
    Ok(())
}

fn bind_client_mounts(root: &Path, mounts: &[crate::api::BindMount]) -> Result<(), String> {
    if mounts.is_empty() {
        return Ok(());
    }
    let root_dir = fs::File::open(root).map_err(|error| format!("failed to open {}: {error}", root.display()))?;
    let root_fd = super::files::Root::from_fd(root_dir.into());
    for bind_mount in mounts {
        let source = Path::new(&bind_mount.src_path);
        let source_is_dir = fs::metadata(source).map_err(|error| format!("bind mount source {}: {error}", source.display()))?.is_dir();
        let destination = super::files::normalize(bind_mount.dst_path.as_bytes());
        let destination_text = String::from_utf8_lossy(&destination).into_owned();
        let failed = |error: std::io::Error| format!("failed to create bind mount destination {destination_text}: {error}");
        let (parent_path, name) = super::files::split_last(&destination);
        let target = if name.is_empty() {
            root_fd.open_path(b"/", libc::O_PATH | libc::O_DIRECTORY).map_err(failed)?
        } else {
            let parent = root_fd.ensure_dir(parent_path).map_err(failed)?;
            if source_is_dir {
                root_fd.ensure_dir(&destination).map_err(failed)?
            } else {
                // A file is bound onto a file; an existing one is kept.
                let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW;
                drop(super::files::openat(parent.as_fd(), name, flags, 0o644).map_err(failed)?);
                root_fd.open_path(&destination, libc::O_PATH | libc::O_NOFOLLOW).map_err(failed)?
            }
        };
        let target_path = PathBuf::from(format!("/proc/self/fd/{}", target.as_raw_fd()));
        bind(source, &target_path, MsFlags::empty()).map_err(|error| format!("{error} (destination {destination_text})"))?;

        if bind_mount.mode == 0 {
            // Opened again, so the fd names the new mount rather than the
            // directory under it.
            let mounted = root_fd.open_path(&destination, libc::O_PATH).map_err(failed)?;
            let mounted_path = PathBuf::from(format!("/proc/self/fd/{}", mounted.as_raw_fd()));
            // Inside a user namespace a remount must keep the source's
            // nodev, nosuid, noexec and atime flags, which the kernel locks.
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked_flags(source)?;
            mount(None::<&str>, &mounted_path, None::<&str>, flags, None::<&str>)
                .map_err(|error| format!("failed to make bind mount {destination_text} read-only: {error}"))?;
        }
    }
    Ok(())
}

/// Returns the mount flags of the filesystem holding `path` that a bind
/// remount must repeat.
fn locked_flags(path: &Path) -> Result<MsFlags, String> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let stats = statvfs(path).map_err(|error| format!("failed to stat the filesystem of {}: {error}", path.display()))?;
    let table = [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ];
    let flags = stats.flags();
    Ok(table.iter().filter(|(fs_flag, _)| flags.contains(*fs_flag)).fold(MsFlags::empty(), |all, (_, ms_flag)| all | *ms_flag))
}

/// Binds this process's cgroup of each v1 hierarchy read-only at
/// `/sys/fs/cgroup/<hierarchy>`, on a read-only tmpfs. A user namespace
/// without its own cgroup namespace may not mount cgroupfs, hence binds.
/// Nothing is mounted on a cgroup v2 host.
fn bind_cgroups(root: &Path) -> Result<(), String> {
    let read = |path: &str| fs::read_to_string(path).map_err(|error| format!("failed to read {path}: {error}"));
    let hierarchies = super::cgroup::all_v1(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?);
    if hierarchies.is_empty() {
        return Ok(());
    }
    let base = root.join("sys/fs/cgroup");
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_at("tmpfs", &base, "tmpfs", locked, Some("mode=755"))?;
    for hierarchy in &hierarchies {
        let Some(name) = hierarchy.mount.file_name() else { continue };
        let target = base.join(name);
        create_dir(&target)?;
        bind(&hierarchy.mount.join(&hierarchy.own_path), &target, MsFlags::empty())?;
        // The host mounts are relatime and a user namespace may not change
        // locked atime flags, so MS_RELATIME is kept in the remount.
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_RELATIME | locked;
        mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
            .map_err(|error| format!("failed to make {} read-only: {error}", target.display()))?;
    }
    mount(None::<&str>, &base, None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked, Some("mode=755"))
        .map_err(|error| format!("failed to make {} read-only: {error}", base.display()))
}

/// Makes `root` the root of this mount namespace and drops the host's tree.
fn pivot_into(root: &Path) -> Result<(), String> {
    nix::unistd::chdir(root).map_err(|error| format!("failed to enter {}: {error}", root.display()))?;
    // pivot_root(".", ".") stacks the old root on top of the new one, so the
    // image needs no directory for it. Detaching "." then removes it.
    nix::unistd::pivot_root(".", ".").map_err(|error| format!("failed to pivot_root into {}: {error}", root.display()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|error| format!("failed to detach the old root: {error}"))?;
    nix::unistd::chdir("/").map_err(|error| format!("failed to enter /: {error}"))
}

/// Brings the loopback interface up (SIOCSIFFLAGS); failure is not fatal
/// because networking proper is configured by the server later.
fn set_loopback_up() {
    // SAFETY: plain socket and ioctl calls on a zeroed ifreq that names lo.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *slot = *byte as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request) == 0 {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &request);
        }
        libc::close(fd);
    }
}

/// Points stdin, stdout and stderr at the container's /dev/null and closes
/// every other fd, the server's socket included.
fn redirect_stdio_to_null() -> Result<(), String> {
    let null = fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(|error| format!("failed to open /dev/null: {error}"))?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors of this process.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(format!("failed to redirect fd {fd}: {}", std::io::Error::last_os_error()));
        }
    }
    drop(null);
    // SAFETY: closes every descriptor above stderr; nothing else is in use.
    unsafe { libc::close_range(3, libc::c_uint::MAX, 0) };
    Ok(())
}

/// Reaps every child, orphans included, until killed. Pid 1 ignores
/// signals without a handler, so only SIGKILL from outside ends it.
fn reap_forever() -> i32 {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    // SIGCHLD is blocked and taken with sigwait, so none is lost between a
    // reaping pass and the wait.
    let _ = mask.thread_block();
    loop {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        let _ = mask.wait();
    }
}
