//! The child side of a process shim: joins the container and executes the
//! process. Runs in a child forked from the single-threaded shim, so it may
//! allocate and run ordinary Rust code before `execve`.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{signal, SigHandler, SigSet, Signal};
use nix::unistd::{Gid, Uid};

use super::security::{self, CapSets};
use super::users::{self, ExecUser};
use crate::api::{ProcessSpec, ResourceLimits};
use crate::runtime::stdio::StartFailure;

/// A failure before `execve`, sent to the shim over the error pipe.
pub struct ChildError {
    pub failure: StartFailure,
    pub message: String,
}

impl ChildError {
    fn other(message: String) -> Self {
        ChildError { failure: StartFailure::Other, message }
    }

    /// Encodes the error as the error pipe carries it: a kind byte, then
    /// the message.
    pub fn encode(&self) -> Vec<u8> {
        let kind = match self.failure {
            StartFailure::ExecutableNotFound => 1,
            StartFailure::InvalidRequest => 2,
            StartFailure::Other => 0,
        };
        let mut bytes = vec![kind];
        bytes.extend_from_slice(self.message.as_bytes());
        bytes
    }

    /// Decodes what the error pipe carried; `None` for an empty pipe, which
    /// means `execve` succeeded.
    pub fn decode(bytes: &[u8]) -> Option<ChildError> {
        let (kind, message) = bytes.split_first()?;
        let failure = match kind {
            1 => StartFailure::ExecutableNotFound,
            2 => StartFailure::InvalidRequest,
            _ => StartFailure::Other,
        };
        Some(ChildError { failure, message: String::from_utf8_lossy(message).into_owned() })
    }
}

/// The namespaces of a container, opened from its init's `/proc` entry.
pub struct Namespaces {
    /// `None` for privileged containers.
    pub user: Option<OwnedFd>,
    pub mnt: OwnedFd,
    pub uts: OwnedFd,
    pub ipc: OwnedFd,
    pub net: OwnedFd,
}

/// The process's ends of its stdio.
pub enum ChildStdio {
    Pipes { stdin: OwnedFd, stdout: OwnedFd, stderr: OwnedFd },
    Tty { slave: OwnedFd },
}

/// The container state the child needs besides the spec.
pub struct ChildSetup<'a> {
    pub spec: &'a ProcessSpec,
    pub container_env: &'a [String],
    pub cgroup_dirs: &'a [PathBuf],
    pub namespaces: &'a Namespaces,
    pub stdio: &'a ChildStdio,
    /// Selects the capability sets (see [`security`]).
    pub privileged: bool,
    /// Set no_new_privs before execve.
    pub no_new_privileges: bool,
    /// The seccomp filter of unprivileged containers, built before the
    /// fork; `None` for privileged ones.
    pub filter: Option<&'a seccompiler::BpfProgram>,
}

/// Sets the process up and executes it; returns only on failure.
pub fn run_child(setup: &ChildSetup<'_>) -> ChildError {
    match prepare_and_exec(setup) {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

enum Never {}

/// `oom_score_adj` of every process started in a container (the range is
/// -1000 to 1000).
const CONTAINER_OOM_SCORE_ADJ: &str = "500";

/// Moves the calling process into the cgroup `dir`. On cgroup v1 it
/// writes "0" to `tasks`, which moves only the calling thread, so the
/// kernel skips the lock that every `cgroup.procs` write takes for writing.
/// After a quiet moment that lock waits for an RCU grace period: six
/// hierarchies took 7 ms here, against 0.5 ms through `tasks`. The child
/// is single threaded, forked from a single-threaded shim, so its one
/// thread is the whole process. cgroup v2 has no `tasks` file.
fn join_cgroup(dir: &Path) -> std::io::Result<()> {
    let open = |name: &str| fs::OpenOptions::new().write(true).open(dir.join(name));
    let mut file = match open("tasks") {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => open("cgroup.procs")?,
        Err(error) => return Err(error),
    };
    file.write_all(b"0")
}

fn prepare_and_exec(setup: &ChildSetup<'_>) -> Result<Never, ChildError> {
    // The shim ignores SIGPIPE (Rust's runtime does); an ignored signal
    // would survive execve, so restore the default.
    // SAFETY: restoring the default disposition installs no handler.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let _ = SigSet::all().thread_unblock();

    // Join the cgroups while still in the host's namespaces. "0" names the
    // writing process, whose pid in this (container) pid namespace would
    // mean nothing to the host's cgroup files.
    for dir in setup.cgroup_dirs {
        join_cgroup(dir).map_err(|error| ChildError::other(format!("failed to join cgroup {}: {error}", dir.display())))?;
    }

    // Container processes are the kernel's first choice when the
    // container runs out of memory, before garden-init. Memory that belongs
    // to no process, such as files in /dev/shm, would otherwise make the
    // OOM killer pick garden-init, whose re-executed server binary maps
    // more pages than a typical process, and the container would die.
    // Lowering garden-init's score instead would need CAP_SYS_RESOURCE.
    fs::write("/proc/self/oom_score_adj", CONTAINER_OOM_SCORE_ADJ)
        .map_err(|error| ChildError::other(format!("failed to set the OOM score adjustment: {error}")))?;

    // Rlimits are set before joining the user namespace: raising a hard
    // limit above the server's needs CAP_SYS_RESOURCE in the host's one.
    set_rlimits(&setup.spec.rlimits)?;
    join_namespaces(setup.namespaces)?;

    let passwd = fs::read_to_string("/etc/passwd").ok();
    let group = fs::read_to_string("/etc/group").ok();
    let user = users::resolve_user(&setup.spec.user, passwd.as_deref(), group.as_deref())
        .map_err(|error| ChildError { failure: StartFailure::InvalidRequest, message: error.to_string() })?;
    let env = users::build_env(setup.container_env, &setup.spec.env, &setup.spec.user, &user);

    let dir = if setup.spec.dir.is_empty() { user.home.clone() } else { setup.spec.dir.clone() };
    let dir = Path::new("/").join(dir);
    create_working_dir(&dir, &user)?;
    nix::unistd::chdir(&dir).map_err(|error| ChildError::other(format!("failed to enter working directory {}: {error}", dir.display())))?;

    connect_stdio(setup.stdio)?;

    // The bounding set can only shrink while this process has CAP_SETPCAP,
    // that is before it leaves root. A capability the server itself lacks
    // cannot be handed out, hence the intersection.
    let caps = security::container_caps(setup.privileged, user.uid) & security::read_bounding();
    security::restrict_bounding(caps).map_err(security_error)?;
    // Keeping the permitted set across the uid change lets a non-root user
    // install the seccomp filter below, which needs CAP_SYS_ADMIN without
    // no_new_privs. The permitted set is cleared again before execve.
    security::keep_caps(true).map_err(security_error)?;
    drop_privileges(&user)?;
    let held = security::read_caps().map_err(security_error)?;
    if user.uid != 0 && setup.filter.is_some() {
        let effective = held.permitted & 1 << CAP_SYS_ADMIN;
        security::write_caps(CapSets { effective, ..held }).map_err(security_error)?;
    }

    let program = find_executable(&setup.spec.path, &env)?;
    let mut argv = vec![cstring(&setup.spec.path)?];
    for arg in &setup.spec.args {
        argv.push(cstring(arg)?);
    }
    let envp: Vec<CString> = env.iter().map(|entry| cstring(entry)).collect::<Result<_, _>>()?;

    if setup.no_new_privileges {
        security::set_no_new_privs().map_err(|error| ChildError::other(format!("failed to set no_new_privs: {error}")))?;
    }
    if let Some(filter) = setup.filter {
        security::install_filter(filter).map_err(security_error)?;
    }
    // In unprivileged containers only allow-listed system calls follow.
    // At execve root's permitted and effective sets become the union of
    // the inheritable and bounding sets, and a non-root user ends with none.
    let final_caps = if user.uid == 0 {
        CapSets { inheritable: caps, permitted: held.permitted, effective: held.permitted }
    } else {
        CapSets { inheritable: caps, permitted: 0, effective: 0 }
    };
    security::write_caps(final_caps).map_err(security_error)?;
    security::keep_caps(false).map_err(security_error)?;
    // Every fd above stderr is closed at execve, the error pipe included, so
    // the shim reads end of file exactly when execve succeeds.
    // SAFETY: only sets the close-on-exec flag on this process's fds.
    unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
    let error = nix::unistd::execve(&program, &argv, &envp).unwrap_err();
    Err(match error {
        nix::errno::Errno::ENOENT => ChildError {
            failure: StartFailure::ExecutableNotFound,
            message: format!("exec: {:?}: stat {}: no such file or directory", setup.spec.path, setup.spec.path),
        },
        error => ChildError::other(format!("failed to execute {:?}: {error}", setup.spec.path)),
    })
}

/// Capability number of CAP_SYS_ADMIN.
const CAP_SYS_ADMIN: u32 = 21;

fn security_error(error: security::SecurityError) -> ChildError {
    ChildError::other(crate::linux::error_chain(&error))
}

fn cstring(text: &str) -> Result<CString, ChildError> {
    CString::new(text).map_err(|_| ChildError { failure: StartFailure::InvalidRequest, message: format!("{text:?} contains a NUL byte") })
}

fn set_rlimits(limits: &ResourceLimits) -> Result<(), ChildError> {
    let table = [
        (limits.address_space, Resource::RLIMIT_AS, "as"),
        (limits.core, Resource::RLIMIT_CORE, "core"),
        (limits.cpu, Resource::RLIMIT_CPU, "cpu"),
        (limits.data, Resource::RLIMIT_DATA, "data"),
        (limits.fsize, Resource::RLIMIT_FSIZE, "fsize"),
        (limits.locks, Resource::RLIMIT_LOCKS, "locks"),
        (limits.memlock, Resource::RLIMIT_MEMLOCK, "memlock"),
        (limits.msgqueue, Resource::RLIMIT_MSGQUEUE, "msgqueue"),
        (limits.nice, Resource::RLIMIT_NICE, "nice"),
        (limits.nofile, Resource::RLIMIT_NOFILE, "nofile"),
        (limits.nproc, Resource::RLIMIT_NPROC, "nproc"),
        (limits.rss, Resource::RLIMIT_RSS, "rss"),
        (limits.rtprio, Resource::RLIMIT_RTPRIO, "rtprio"),
        (limits.sigpending, Resource::RLIMIT_SIGPENDING, "sigpending"),
        (limits.stack, Resource::RLIMIT_STACK, "stack"),
    ];
    for (value, resource, name) in table {
        if let Some(value) = value {
            setrlimit(resource, value, value).map_err(|error| ChildError::other(format!("failed to set rlimit {name} to {value}: {error}")))?;
        }
    }
    Ok(())
}

fn join_namespaces(namespaces: &Namespaces) -> Result<(), ChildError> {
    // The user namespace comes first: the others belong to it, and joining
    // them needs the capabilities it grants.
    let mut order: Vec<(&OwnedFd, CloneFlags, &str)> = Vec::new();
    if let Some(user) = &namespaces.user {
        order.push((user, CloneFlags::CLONE_NEWUSER, "user"));
    }
    order.push((&namespaces.mnt, CloneFlags::CLONE_NEWNS, "mount"));
    order.push((&namespaces.uts, CloneFlags::CLONE_NEWUTS, "uts"));
    order.push((&namespaces.ipc, CloneFlags::CLONE_NEWIPC, "ipc"));
    order.push((&namespaces.net, CloneFlags::CLONE_NEWNET, "network"));
    for (fd, flag, name) in order {
        setns(fd, flag).map_err(|error| ChildError::other(format!("failed to join the container's {name} namespace: {error}")))?;
    }
    if namespaces.user.is_some() {
        // The host's root is unmapped in the container's user namespace.
        // Becoming container root gives files made before the switch to the
        // process's user (the working directory) a mapped owner.
        let root_gid = Gid::from_raw(0);
        let root_uid = Uid::from_raw(0);
        nix::unistd::setgroups(&[]).map_err(|error| ChildError::other(format!("failed to clear groups: {error}")))?;
        nix::unistd::setresgid(root_gid, root_gid, root_gid).map_err(|error| ChildError::other(format!("failed to set gid 0: {error}")))?;
        nix::unistd::setresuid(root_uid, root_uid, root_uid).map_err(|error| ChildError::other(format!("failed to set uid 0: {error}")))?;
    }
    // Joining a mount namespace sets root and cwd to its root; chdir makes
    // that explicit.
    nix::unistd::chdir("/").map_err(|error| ChildError::other(format!("failed to enter /: {error}")))?;
    Ok(())
}

/// Creates a missing working directory and its missing parents, mode 0755,
/// owned by the process's user. Existing directories are left alone.
fn create_working_dir(dir: &Path, user: &ExecUser) -> Result<(), ChildError> {
    let mut missing = Vec::new();
    let mut current = Some(dir);
    while let Some(path) = current {
        if path.exists() {
            break;
        }
        missing.push(path.to_path_buf());
        current = path.parent();
    }
    for path in missing.iter().rev() {
        let created = fs::DirBuilder::new().mode(0o755).create(path);
        match created {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(ChildError::other(format!("failed to create working directory {}: {error}", path.display()))),
        }
        // The umask may have removed bits of 0755.
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o755));
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .map_err(|error| ChildError::other(format!("failed to chown working directory {}: {error}", path.display())))?;
    }
    Ok(())
}

fn dup_onto(fd: RawFd, target: RawFd) -> Result<(), ChildError> {
    // SAFETY: dup2 onto a standard descriptor of this process.
    if unsafe { libc::dup2(fd, target) } < 0 {
        return Err(ChildError::other(format!("failed to set up fd {target}: {}", io::Error::last_os_error())));
    }
    Ok(())
}

fn connect_stdio(stdio: &ChildStdio) -> Result<(), ChildError> {
    // A new session detaches the process from the shim's; with a TTY it
    // also lets the process take the terminal as its controlling one.
    nix::unistd::setsid().map_err(|error| ChildError::other(format!("failed to start a session: {error}")))?;
    match stdio {
        ChildStdio::Pipes { stdin, stdout, stderr } => {
            dup_onto(stdin.as_raw_fd(), 0)?;
            dup_onto(stdout.as_raw_fd(), 1)?;
            dup_onto(stderr.as_raw_fd(), 2)?;
        }
        ChildStdio::Tty { slave } => {
            // SAFETY: TIOCSCTTY takes an integer argument.
            if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
                return Err(ChildError::other(format!("failed to set the controlling terminal: {}", io::Error::last_os_error())));
            }
            for target in 0..3 {
                dup_onto(slave.as_raw_fd(), target)?;
            }
        }
    }
    Ok(())
}

fn drop_privileges(user: &ExecUser) -> Result<(), ChildError> {
    let groups: Vec<Gid> = user.groups.iter().map(|gid| Gid::from_raw(*gid)).collect();
    nix::unistd::setgroups(&groups).map_err(|error| ChildError::other(format!("failed to set groups {:?}: {error}", user.groups)))?;
    let gid = Gid::from_raw(user.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|error| ChildError::other(format!("failed to set gid {}: {error}", user.gid)))?;
    let uid = Uid::from_raw(user.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|error| ChildError::other(format!("failed to set uid {}: {error}", user.uid)))?;
    Ok(())
}

/// Finds the program to execute: a path is used as given, a bare name is
/// searched in the process's `PATH`, as the process's user.
fn find_executable(path: &str, env: &[String]) -> Result<CString, ChildError> {
    if path.contains('/') {
        return cstring(path);
    }
    let search = users::env_value(env, "PATH").unwrap_or("");
    for dir in search.split(':').filter(|dir| !dir.is_empty()) {
        let candidate = Path::new(dir).join(path);
        let is_file = fs::metadata(&candidate).map(|meta| meta.is_file()).unwrap_or(false);
        if is_file && nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok() {
            return cstring(&candidate.to_string_lossy());
        }
    }
    Err(ChildError {
        failure: StartFailure::ExecutableNotFound,
        message: format!("exec: {path:?}: executable file not found in $PATH"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_error_round_trips_through_pipe_bytes() {
        let error = ChildError { failure: StartFailure::ExecutableNotFound, message: "exec: \"x\": not found".into() };
        let decoded = ChildError::decode(&error.encode()).expect("non-empty report");
        assert_eq!(decoded.failure, StartFailure::ExecutableNotFound);
        assert_eq!(decoded.message, error.message);
        let invalid = ChildError::decode(&[2]).expect("kind only");
        assert_eq!((invalid.failure, invalid.message.as_str()), (StartFailure::InvalidRequest, ""));
        assert!(ChildError::decode(&[]).is_none());
    }
}
