//! The process shim: one per container process, outside the container.
//!
//! The server starts this executable with [`super::SHIM_COMMAND`], with its
//! end of a socket pair as stdin. The shim forks once more and lets the
//! first process exit at once, so the server reaps it straight away and the
//! shim survives a server restart. The shim builds what needs no
//! configuration, sends a [`ReadyReport`], and waits: usually as the spare
//! of [`super::spare`], until a Run needs it. The server then writes a
//! [`ShimConfig`] to the socket (see [`write_config`]); a shim whose socket
//! closes before that exits. The configuration contains the process's
//! environment, so it never goes on the command line, which every host user
//! can read in `/proc/<pid>/cmdline`. The shim forks the process into the
//! container (see [`super::exec`]), reports `Started` or `StartFailed`, and
//! serves the process's stdio with the frames of [`crate::runtime::stdio`]
//! until the process exits.
//!
//! The shim outlives the server. When the server's connection closes, the
//! shim keeps the process running and keeps reading its output into a
//! buffer, dropping the oldest output beyond [`DETACHED_OUTPUT_LIMIT`]. It
//! accepts a new server connection on the Unix socket [`SOCKET_NAME`] in the
//! process's directory. A reconnected server first receives `Started`
//! again, then the buffered output, then live output and `Exited`. A
//! process that ends while no server is connected leaves its buffered
//! output in [`OUTPUT_FILE`] and then its status in the exit status file,
//! and the shim exits.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::collections::VecDeque;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::{Bytes, BytesMut};
use nix::sched::{setns, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::exec::{self, ChildError, ChildSetup, ChildStdio, Namespaces};
use super::syscalls;
use crate::api::ProcessSpec;
use crate::runtime::stdio::{encoded_output_stream, output_header, ServerFrame, ShimFrame, FRAME_HEADER_LEN, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION};

/// Settings a shim starts one process from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ShimConfig {
    /// Host pid of the container's garden-init, whose namespaces are joined.
    pub init_pid: i32,
    /// Privileged containers have no user namespace to join.
    pub privileged: bool,
    /// Set no_new_privs before execve (the operator's option).
    #[serde(default)]
    pub no_new_privileges: bool,
    /// The container's cgroup in each hierarchy.
    pub cgroup_dirs: Vec<PathBuf>,
    /// The container's environment, which comes before the process's own.
    pub container_env: Vec<String>,
    /// File the exit status is written to before the shim exits.
    pub exit_status_path: PathBuf,
    /// File the shim writes its own errors to from here on.
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    pub spec: ProcessSpec,
}

/// Opens a pseudo-terminal on the container's own devpts instance and
/// returns its master and slave, both close-on-exec.
///
/// A terminal from the host's devpts would work for reading and writing,
/// but the process could not find it under the container's `/dev/pts`, so
/// `ttyname` (and `tty`, `script`, `sudo`) would fail. The slave is opened
/// from the master with TIOCGPTPEER, so no path inside the container is
/// resolved by this host process. It is given to container root, because
/// the shim's own uid may be unmapped inside the container.
fn open_container_pty(init_pid: i32, winsize: &libc::winsize) -> io::Result<(OwnedFd, OwnedFd)> {
    use std::os::unix::fs::OpenOptionsExt;

    let ptmx = format!("/proc/{init_pid}/root/dev/pts/ptmx");
    let master: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&ptmx)
        .map_err(|error| io::Error::new(error.kind(), format!("failed to open {ptmx}: {error}")))?
        .into();

    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int; TIOCSWINSZ reads a winsize.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, winsize) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags and returns a new descriptor.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a new descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };

    let root_uid = container_root_uid(init_pid)?;
    nix::unistd::fchown(&slave, Some(nix::unistd::Uid::from_raw(root_uid)), None).map_err(io::Error::from)?;
    Ok((master, slave))
}

/// Returns the host uid of the container's root from its init's uid_map.
fn container_root_uid(init_pid: i32) -> io::Result<u32> {
    let path = format!("/proc/{init_pid}/uid_map");
    let map = fs::read_to_string(&path)?;
    map.lines()
        .filter_map(|line| {
            let fields: Vec<u32> = line.split_whitespace().filter_map(|field| field.parse().ok()).collect();
            (fields.len() == 3 && fields[0] == 0).then_some(fields[1])
        })
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path} maps no container root")))
}

/// Output buffered for the server beyond which the shim stops reading the
/// process's output, so a slow reader slows the process down as a pipe would.
const OUTPUT_HIGH_WATER: usize = 1 << 20;
/// Stdin buffered for the process beyond which the shim stops reading
/// frames from the server.
const STDIN_HIGH_WATER: usize = 1 << 20;
/// Size of one read from the process's output.
const READ_CHUNK: usize = 64 * 1024;

/// Most bytes read from the process's output at once: one frame.
const OUTPUT_CHUNK: usize = 256 * 1024;

/// Largest allocation glibc serves from the heap rather than a fresh
/// mapping, and the free space at the heap's top it keeps. Output frames
/// are up to [`OUTPUT_CHUNK`], and up to [`DETACHED_OUTPUT_LIMIT`] of them
/// are kept. With glibc's defaults each frame was a new mapping whose
/// pages all faulted in: a tenth of the shim's CPU time in perf.
const HEAP_KEEP_BYTES: libc::c_int = 4 << 20;

/// Makes glibc serve output frames from the heap and keep its pages.
fn keep_heap_pages() {
    // SAFETY: mallopt changes process-wide settings of the allocator; the
    // shim is single threaded.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_KEEP_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_KEEP_BYTES);
    }
}

/// Size asked for the output pipes, so that a fast writer fills larger
/// chunks per read (the default is 64 KiB).
const OUTPUT_PIPE_SIZE: libc::c_int = 1 << 20;
/// Bytes of output frames kept while no server is connected. The oldest
/// frames are dropped beyond it, so an absent server does not block the
/// process.
pub const DETACHED_OUTPUT_LIMIT: usize = 1 << 20;
/// Name of the socket a restarted server reconnects on, in the process's
/// directory.
pub const SOCKET_NAME: &str = "sock";
/// Name of the file holding the frames of output that no server received
/// before the process ended, in the process's directory.
pub const OUTPUT_FILE: &str = "output";
/// Environment variable that makes a shim of a debug build speak an older
/// protocol version, as a shim of the previous release does. Tests use it
/// to check that a server still serves such shims; release builds ignore
/// it.
pub const PROTOCOL_VARIABLE: &str = "TRELLIS_SHIM_PROTOCOL";

/// Returns the protocol version this shim speaks: [`PROTOCOL_VERSION`],
/// or the version [`PROTOCOL_VARIABLE`] sets in a debug build.
fn protocol_version() -> u32 {
    let requested = std::env::var(PROTOCOL_VARIABLE).ok().and_then(|value| value.parse().ok());
    match requested {
        Some(version) if cfg!(debug_assertions) => version,
        _ => PROTOCOL_VERSION,
    }
}

/// Entry point of the shim.
pub fn main(_args: Vec<OsString>) -> ExitCode {
    keep_heap_pages();
    // SAFETY: fd 0 is the server's socket, passed as stdin and owned by no
    // one else in this process.
    let mut socket = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    // SAFETY: the shim is single threaded, so the child may run any code.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => return ExitCode::SUCCESS,
        Ok(ForkResult::Child) => {}
        Err(error) => {
            eprintln!("shim: failed to fork: {error}");
            return ExitCode::FAILURE;
        }
    }
    // Its own session keeps the shim alive when the server's session or
    // process group is signalled.
    let _ = nix::unistd::setsid();
    // The filter is the same for every unprivileged process, so a spare
    // builds it while it waits. A failure is reported when it is needed.
    let filter = super::security::build_filter().ok();
    if ReadyReport::own().and_then(|report| report.write(&mut socket)).is_err() {
        return ExitCode::FAILURE;
    }
    let config = match read_config(&mut socket) {
        Ok(config) => config,
        // The server closed the socket of a spare it no longer needs.
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shim: failed to read the configuration from the server: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(log_path) = &config.log_path {
        set_log_path(log_path.clone());
    }
    match serve(&config, socket, filter) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log_error(format_args!("{error}"));
            ExitCode::FAILURE
        }
    }
}

/// The log file of the configured shim's process, in the process's
/// directory, where the server reads it when a start fails.
static LOG_PATH: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Sends the shim's later errors, panics included, to the log file at
/// `path`. The first error creates the file, because each file created
/// before the process starts delays the Run. On the project machine's ext4
/// without a journal that took 0.05 to 0.2 ms per file, growing with the
/// inodes deleted shortly before (perf showed `recently_deleted`).
fn set_log_path(path: PathBuf) {
    *LOG_PATH.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(path);
    std::panic::set_hook(Box::new(|info| log_error(format_args!("{info}"))));
}

/// Appends one error line to the log file, or writes it to stderr before
/// the shim is configured or when the file cannot be written.
fn log_error(message: std::fmt::Arguments<'_>) {
    let path = LOG_PATH.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    if path.is_some_and(|path| append_error(&path, message).is_ok()) {
        return;
    }
    eprintln!("shim: {message}");
}

/// Appends `message` as one line to the file at `path`, creating it.
fn append_error(path: &Path, message: std::fmt::Arguments<'_>) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(file, "shim: {message}")
}

/// The report a started shim sends before it waits for its
/// configuration: its pid, and the device and inode of its executable so
/// the server can tell a shim of a replaced binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyReport {
    pub pid: u32,
    pub executable_dev: u64,
    pub executable_ino: u64,
}

impl ReadyReport {
    /// Length of the report on the socket.
    const LENGTH: usize = 20;

    fn own() -> io::Result<ReadyReport> {
        use std::os::unix::fs::MetadataExt;
        let executable = fs::metadata("/proc/self/exe")?;
        Ok(ReadyReport { pid: std::process::id(), executable_dev: executable.dev(), executable_ino: executable.ino() })
    }

    /// Writes the report as three big-endian numbers.
    pub fn write(&self, socket: &mut impl Write) -> io::Result<()> {
        let mut bytes = [0u8; Self::LENGTH];
        bytes[..4].copy_from_slice(&self.pid.to_be_bytes());
        bytes[4..12].copy_from_slice(&self.executable_dev.to_be_bytes());
        bytes[12..].copy_from_slice(&self.executable_ino.to_be_bytes());
        socket.write_all(&bytes)
    }

    /// Reads what [`ReadyReport::write`] wrote.
    pub fn read(socket: &mut impl Read) -> io::Result<ReadyReport> {
        let mut bytes = [0u8; Self::LENGTH];
        socket.read_exact(&mut bytes)?;
        let number = |range: std::ops::Range<usize>| {
            let mut field = [0u8; 8];
            field[8 - range.len()..].copy_from_slice(&bytes[range]);
            u64::from_be_bytes(field)
        };
        Ok(ReadyReport { pid: number(0..4) as u32, executable_dev: number(4..12), executable_ino: number(12..20) })
    }
}

/// Largest configuration the shim accepts. The environment is the only
/// part without a natural bound.
pub const MAX_CONFIG_BYTES: usize = 64 << 20;

/// Writes `config` to the shim's socket: its length as a big-endian u32,
/// then its JSON.
pub fn write_config(socket: &mut impl Write, config: &ShimConfig) -> io::Result<()> {
    let json = serde_json::to_vec(config).map_err(io::Error::other)?;
    if json.len() > MAX_CONFIG_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("process configuration of {} bytes exceeds {MAX_CONFIG_BYTES}", json.len())));
    }
    socket.write_all(&(json.len() as u32).to_be_bytes())?;
    socket.write_all(&json)
}

/// Reads the configuration [`write_config`] wrote.
pub fn read_config(socket: &mut impl Read) -> io::Result<ShimConfig> {
    let mut length = [0u8; 4];
    socket.read_exact(&mut length)?;
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_CONFIG_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("configuration length {length} exceeds {MAX_CONFIG_BYTES}")));
    }
    let mut json = vec![0u8; length];
    socket.read_exact(&mut json)?;
    serde_json::from_slice(&json).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
}

fn open_ns(init_pid: i32, name: &str) -> io::Result<OwnedFd> {
    let path = format!("/proc/{init_pid}/ns/{name}");
    fs::File::open(&path).map(OwnedFd::from).map_err(|error| io::Error::new(error.kind(), format!("failed to open {path}: {error}")))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

fn send_now(socket: &mut UnixStream, frame: &ShimFrame) -> io::Result<()> {
    let mut buffer = BytesMut::new();
    frame.encode(&mut buffer);
    socket.write_all(&buffer)
}

/// Starts the process and serves its stdio until it exits. `filter` is
/// the seccomp filter built in advance, if building it worked.
fn serve(config: &ShimConfig, mut socket: UnixStream, filter: Option<seccompiler::BpfProgram>) -> io::Result<()> {
    let start = start_process(config, filter);
    let (child, parent_stdio) = match start {
        Ok(Ok(started)) => started,
        Ok(Err(child_error)) => {
            return send_now(&mut socket, &ShimFrame::StartFailed { failure: child_error.failure, message: child_error.message });
        }
        Err(error) => {
            let failure = crate::runtime::stdio::StartFailure::Other;
            let message = format!("failed to start the process: {error}");
            return send_now(&mut socket, &ShimFrame::StartFailed { failure, message });
        }
    };
    let pidfd = syscalls::pidfd_open(child.as_raw())?;
    let process_dir = config.exit_status_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let listener = match listen(&process_dir) {
        Ok(listener) => Some(listener),
        Err(error) => {
            // The process still runs and reports to this server; only a
            // reconnect after a restart is lost.
            log_error(format_args!("failed to listen on {}/{SOCKET_NAME}: {error}", process_dir.display()));
            None
        }
    };
    let mut io_loop = IoLoop::new(socket, listener, child, pidfd, parent_stdio, protocol_version())?;
    if io_loop.acknowledged() {
        io_loop.push(ShimFrame::Hello { version: io_loop.protocol_version });
    }
    io_loop.push(ShimFrame::Started { pid: child.as_raw() as u32 });
    // In the process directory, later writes name their files relative to
    // it. When destroy renames the container's directory away, they follow
    // it instead of landing in a new container that took the same handle.
    let in_process_dir = io_loop.listener.is_some();
    let exit_status_path = match config.exit_status_path.file_name() {
        Some(name) if in_process_dir => PathBuf::from(name),
        _ => config.exit_status_path.clone(),
    };
    if in_process_dir {
        let mut log_path = LOG_PATH.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let relative = log_path.as_deref().filter(|path| path.parent() == Some(process_dir.as_path())).and_then(Path::file_name).map(PathBuf::from);
        if relative.is_some() {
            *log_path = relative;
        }
    }
    let status = io_loop.run()?;
    io_loop.finish(status, &exit_status_path);
    if in_process_dir {
        let _ = fs::remove_file(SOCKET_NAME);
    }
    Ok(())
}

/// Binds the reconnect socket in `process_dir`. The shim changes into the
/// directory first and binds a relative name, because a depot path with a
/// long handle may not fit the 108 bytes of a socket address.
fn listen(process_dir: &Path) -> io::Result<UnixListener> {
    // Connecting needs write permission on the socket file, and the output
    // file contains the process's output, so both are for root only. The
    // process was forked already and keeps its own umask.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    std::env::set_current_dir(process_dir)?;
    let _ = fs::remove_file(SOCKET_NAME);
    let listener = UnixListener::bind(SOCKET_NAME)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The shim's ends of the process's stdio.
enum ParentStdio {
    Pipes { stdin: OwnedFd, stdout: OwnedFd, stderr: OwnedFd },
    Tty { master: OwnedFd },
}

/// Forks the process into the container. The outer error is the shim's own
/// failure; the inner one is what the child reported before `execve`.
fn start_process(config: &ShimConfig, filter: Option<seccompiler::BpfProgram>) -> io::Result<Result<(Pid, ParentStdio), ChildError>> {
    let namespaces = Namespaces {
        user: if config.privileged { None } else { Some(open_ns(config.init_pid, "user")?) },
        mnt: open_ns(config.init_pid, "mnt")?,
        uts: open_ns(config.init_pid, "uts")?,
        ipc: open_ns(config.init_pid, "ipc")?,
        net: open_ns(config.init_pid, "net")?,
    };
    let pid_ns = open_ns(config.init_pid, "pid")?;

    let (child_stdio, parent_stdio) = match &config.spec.tty {
        Some(tty) => {
            let size = tty.window_size.unwrap_or_default();
            let winsize = libc::winsize {
                ws_row: if size.rows == 0 { 24 } else { size.rows },
                ws_col: if size.columns == 0 { 80 } else { size.columns },
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let (master, slave) = open_container_pty(config.init_pid, &winsize)?;
            (ChildStdio::Tty { slave }, ParentStdio::Tty { master })
        }
        None => {
            let (stdin_read, stdin_write) = pipe()?;
            let (stdout_read, stdout_write) = pipe()?;
            let (stderr_read, stderr_write) = pipe()?;
            for output in [&stdout_read, &stderr_read] {
                // Best effort: a host may cap pipes lower
                // (/proc/sys/fs/pipe-max-size), and the default still works.
                // SAFETY: fcntl on a pipe this process owns.
                unsafe { libc::fcntl(output.as_raw_fd(), libc::F_SETPIPE_SZ, OUTPUT_PIPE_SIZE) };
            }
            (
                ChildStdio::Pipes { stdin: stdin_read, stdout: stdout_write, stderr: stderr_write },
                ParentStdio::Pipes { stdin: stdin_write, stdout: stdout_read, stderr: stderr_read },
            )
        }
    };
    let (error_read, error_write) = pipe()?;
    let filter = match (config.privileged, filter) {
        (true, _) => None,
        (false, Some(filter)) => Some(filter),
        (false, None) => Some(super::security::build_filter().map_err(|error| io::Error::other(crate::linux::error_chain(&error)))?),
    };

    // setns on a pid namespace only places this process's later children
    // in it, which is why the shim itself joins before forking.
    setns(&pid_ns, CloneFlags::CLONE_NEWPID).map_err(io::Error::from)?;
    // SAFETY: the shim is single threaded, so the child may run any code.
    match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Child => {
            // The log's path names a host directory, which the child must
            // not create files under once it is in the container's mount
            // namespace. Its errors go through the error pipe.
            *LOG_PATH.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
            drop(error_read);
            drop(parent_stdio);
            let setup = ChildSetup {
                spec: &config.spec,
                container_env: &config.container_env,
                cgroup_dirs: &config.cgroup_dirs,
                namespaces: &namespaces,
                stdio: &child_stdio,
                privileged: config.privileged,
                no_new_privileges: config.no_new_privileges,
                filter: filter.as_ref(),
            };
            let error = exec::run_child(&setup);
            let mut pipe = fs::File::from(error_write);
            let _ = pipe.write_all(&error.encode());
            // SAFETY: _exit ends the child without running the shim's exit
            // handlers or flushing its buffers twice.
            unsafe { libc::_exit(127) };
        }
        ForkResult::Parent { child } => {
            drop(error_write);
            drop(child_stdio);
            let mut report = Vec::new();
            fs::File::from(error_read).read_to_end(&mut report)?;
            match ChildError::decode(&report) {
                None => Ok(Ok((child, parent_stdio))),
                Some(error) => {
                    let _ = waitpid(child, None);
                    Ok(Err(error))
                }
            }
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: the caller owns fd for the duration of the call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Writes the exit status to `path` through a temporary file and a rename,
/// so a reader sees the whole number or nothing. Errors are ignored: the
/// container may have been destroyed, state directory included.
fn write_exit_status(path: &Path, status: i32) {
    let temporary = path.with_extension("tmp");
    if fs::write(&temporary, format!("{status}\n")).is_ok() {
        let _ = fs::rename(&temporary, path);
    }
}

/// The output stream a read end carries.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// The poll loop that moves bytes between the server and the process.
struct IoLoop {
    socket: UnixStream,
    /// False while no server is connected. Output is then still read into
    /// `to_server`, within [`DETACHED_OUTPUT_LIMIT`], so the process does
    /// not block on a full pipe.
    socket_open: bool,
    /// The socket a restarted server connects to; `None` when binding
    /// failed.
    listener: Option<UnixListener>,
    from_server: BytesMut,
    /// Encoded frames for the server, whole, oldest first.
    to_server: VecDeque<Bytes>,
    /// Bytes of `to_server`.
    to_server_bytes: usize,
    /// Bytes of the first frame of `to_server` already written.
    front_written: usize,
    /// Output bytes dropped while no server was connected.
    dropped_bytes: u64,
    /// The protocol version spoken with every server; from version 2 on the
    /// server acknowledges output.
    protocol_version: u32,
    /// Output frames written to the current server and not yet
    /// acknowledged, oldest first, with the end of each frame's payload in
    /// its stream's count of the connection. Empty before version 2.
    unacknowledged: VecDeque<(Bytes, usize, u64)>,
    /// Bytes of `unacknowledged`.
    unacknowledged_bytes: usize,
    /// Payload bytes of stdout and stderr written on this connection.
    sent: [u64; 2],
    /// Output read ends; an entry becomes `None` at end of file.
    outputs: Vec<(Option<OwnedFd>, Stream)>,
    stdin: Option<OwnedFd>,
    stdin_buffer: BytesMut,
    stdin_close_requested: bool,
    /// The pty master for resizes; also in `outputs` and `stdin`.
    tty_master: Option<RawFd>,
    child: Pid,
    pidfd: OwnedFd,
}

impl IoLoop {
    fn new(socket: UnixStream, listener: Option<UnixListener>, child: Pid, pidfd: OwnedFd, stdio: ParentStdio, protocol_version: u32) -> io::Result<IoLoop> {
        socket.set_nonblocking(true)?;
        let (outputs, stdin, tty_master) = match stdio {
            ParentStdio::Pipes { stdin, stdout, stderr } => {
                for fd in [&stdin, &stdout, &stderr] {
                    set_nonblocking(fd.as_raw_fd())?;
                }
                (vec![(Some(stdout), Stream::Stdout), (Some(stderr), Stream::Stderr)], Some(stdin), None)
            }
            ParentStdio::Tty { master } => {
                set_nonblocking(master.as_raw_fd())?;
                let raw = master.as_raw_fd();
                let writer = master.try_clone()?;
                (vec![(Some(master), Stream::Stdout)], Some(writer), Some(raw))
            }
        };
        Ok(IoLoop {
            socket,
            socket_open: true,
            listener,
            from_server: BytesMut::new(),
            to_server: VecDeque::new(),
            to_server_bytes: 0,
            front_written: 0,
            dropped_bytes: 0,
            protocol_version,
            unacknowledged: VecDeque::new(),
            unacknowledged_bytes: 0,
            sent: [0; 2],
            outputs,
            stdin,
            stdin_buffer: BytesMut::new(),
            stdin_close_requested: false,
            tty_master,
            child,
            pidfd,
        })
    }

    /// Returns whether the server acknowledges output, in which case
    /// output frames are kept until it does.
    fn acknowledged(&self) -> bool {
        self.protocol_version >= 2
    }

    fn push(&mut self, frame: ShimFrame) {
        let mut encoded = BytesMut::new();
        frame.encode(&mut encoded);
        self.push_encoded(encoded.freeze());
    }

    /// Queues a frame that is already encoded.
    fn push_encoded(&mut self, encoded: Bytes) {
        self.to_server_bytes += encoded.len();
        self.to_server.push_back(encoded);
        if !self.socket_open {
            self.trim_detached();
        }
    }

    /// Drops the oldest frames beyond [`DETACHED_OUTPUT_LIMIT`]. Only
    /// called while no server is connected, when no frame is half written.
    fn trim_detached(&mut self) {
        while self.to_server_bytes > DETACHED_OUTPUT_LIMIT {
            let Some(frame) = self.to_server.pop_front() else { break };
            self.to_server_bytes -= frame.len();
            self.dropped_bytes += frame.len() as u64;
        }
    }

    /// Takes a new server connection: `Started` goes first, ahead of the
    /// output kept meanwhile.
    fn accept_server(&mut self) {
        let Some(listener) = &self.listener else { return };
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock || error.kind() == io::ErrorKind::Interrupted => return,
            Err(error) => {
                log_error(format_args!("accepting a server connection failed: {error}"));
                return;
            }
        };
        if let Err(error) = stream.set_nonblocking(true) {
            log_error(format_args!("failed to set up a server connection: {error}"));
            return;
        }
        if self.dropped_bytes > 0 {
            log_error(format_args!("{} bytes of output were dropped while no server was connected", self.dropped_bytes));
            self.dropped_bytes = 0;
        }
        self.socket = stream;
        self.socket_open = true;
        self.from_server.clear();
        self.sent = [0; 2];
        let mut started = BytesMut::new();
        ShimFrame::Started { pid: self.child.as_raw() as u32 }.encode(&mut started);
        self.to_server_bytes += started.len();
        self.to_server.push_front(started.freeze());
        if self.acknowledged() {
            let mut hello = BytesMut::new();
            ShimFrame::Hello { version: self.protocol_version }.encode(&mut hello);
            self.to_server_bytes += hello.len();
            self.to_server.push_front(hello.freeze());
        }
    }

    /// Runs until the process exits and returns its Garden exit status.
    fn run(&mut self) -> io::Result<i32> {
        loop {
            let mut poll_fds = Vec::new();
            let pidfd_index = poll_fds.len();
            poll_fds.push(libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 });

            let mut socket_events = 0;
            if self.socket_open && self.stdin_buffer.len() < STDIN_HIGH_WATER {
                socket_events |= libc::POLLIN;
            }
            if self.socket_open && !self.to_server.is_empty() {
                socket_events |= libc::POLLOUT;
            }
            // A closed server end is not polled at all, so the loop cannot
            // spin on its hang-up; the listener waits for the next server.
            let socket_fd = if socket_events != 0 { self.socket.as_raw_fd() } else { -1 };
            let socket_index = poll_fds.len();
            poll_fds.push(libc::pollfd { fd: socket_fd, events: socket_events, revents: 0 });
            let listener_fd = match &self.listener {
                Some(listener) if !self.socket_open => listener.as_raw_fd(),
                _ => -1,
            };
            let listener_index = poll_fds.len();
            poll_fds.push(libc::pollfd { fd: listener_fd, events: libc::POLLIN, revents: 0 });

            let read_output = !self.socket_open || self.to_server_bytes < OUTPUT_HIGH_WATER;
            let output_index = poll_fds.len();
            for (fd, _) in &self.outputs {
                let raw = match fd {
                    Some(fd) if read_output => fd.as_raw_fd(),
                    _ => -1,
                };
                poll_fds.push(libc::pollfd { fd: raw, events: libc::POLLIN, revents: 0 });
            }
            let stdin_index = poll_fds.len();
            let stdin_fd = match &self.stdin {
                Some(fd) if !self.stdin_buffer.is_empty() => fd.as_raw_fd(),
                _ => -1,
            };
            poll_fds.push(libc::pollfd { fd: stdin_fd, events: libc::POLLOUT, revents: 0 });

            // SAFETY: poll_fds is a valid array of the given length.
            let ready = unsafe { libc::poll(poll_fds.as_mut_ptr(), poll_fds.len() as libc::nfds_t, -1) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(error);
            }

            if poll_fds[socket_index].revents != 0 {
                self.service_socket(poll_fds[socket_index].revents);
            }
            if poll_fds[listener_index].revents != 0 && !self.socket_open {
                self.accept_server();
            }
            for index in 0..self.outputs.len() {
                if poll_fds[output_index + index].revents != 0 {
                    self.read_output(index, usize::MAX);
                }
            }
            if poll_fds[stdin_index].revents != 0 {
                self.write_stdin();
            }
            if poll_fds[pidfd_index].revents != 0 {
                return Ok(self.reap());
            }
        }
    }

    fn service_socket(&mut self, revents: libc::c_short) {
        if revents & libc::POLLOUT != 0 {
            self.flush_socket();
        }
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            // Read straight into the frame buffer: the server's frames are
            // mostly acknowledgements of a few bytes.
            self.from_server.reserve(READ_CHUNK);
            let spare = self.from_server.spare_capacity_mut();
            // SAFETY: reads into the buffer's spare capacity, of the given
            // length; only the bytes read are marked as initialised.
            let count = unsafe { libc::read(self.socket.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
            match count {
                0 => self.server_gone(),
                count if count > 0 => {
                    // SAFETY: the read initialised `count` bytes after the
                    // current length.
                    unsafe { self.from_server.set_len(self.from_server.len() + count as usize) };
                    self.handle_server_frames();
                }
                _ => {
                    let error = io::Error::last_os_error();
                    if !matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                        self.server_gone();
                    }
                }
            }
        }
    }

    fn flush_socket(&mut self) {
        while self.socket_open {
            let Some(front) = self.to_server.front() else { return };
            match self.socket.write(&front[self.front_written..]) {
                Ok(count) => {
                    self.front_written += count;
                    if self.front_written == front.len() {
                        self.to_server_bytes -= front.len();
                        let written = self.to_server.pop_front().expect("the front frame exists");
                        self.front_written = 0;
                        self.keep_until_acknowledged(written);
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.server_gone(),
            }
        }
    }

    /// Keeps a written output frame until the server acknowledges it,
    /// dropping the oldest kept frames beyond [`DETACHED_OUTPUT_LIMIT`]:
    /// those are with the server, and only a server crash loses them.
    fn keep_until_acknowledged(&mut self, frame: Bytes) {
        if !self.acknowledged() {
            return;
        }
        let Some((stream, payload)) = encoded_output_stream(&frame) else { return };
        self.sent[stream] += payload as u64;
        self.unacknowledged_bytes += frame.len();
        self.unacknowledged.push_back((frame, stream, self.sent[stream]));
        while self.unacknowledged_bytes > DETACHED_OUTPUT_LIMIT {
            let Some((dropped, _, _)) = self.unacknowledged.pop_front() else { break };
            self.unacknowledged_bytes -= dropped.len();
        }
    }

    /// Forgets the kept frames the server is done with. A frame acknowledged
    /// only in part is kept whole.
    fn acknowledge(&mut self, done: [u64; 2]) {
        let mut released = 0;
        self.unacknowledged.retain(|(frame, stream, end)| {
            let keep = *end > done[*stream];
            if !keep {
                released += frame.len();
            }
            keep
        });
        self.unacknowledged_bytes -= released;
    }

    /// Keeps the unsent whole frames for the next server, after the
    /// unacknowledged ones, which go first because they are older. A frame
    /// the old server received in part is sent again whole from version 2
    /// on. Before version 2 it is dropped, because a new connection must
    /// start at a frame boundary.
    fn server_gone(&mut self) {
        self.socket_open = false;
        self.from_server.clear();
        if self.front_written > 0 {
            if !self.acknowledged() {
                if let Some(front) = self.to_server.pop_front() {
                    self.to_server_bytes -= front.len();
                }
            }
            self.front_written = 0;
        }
        // A `Hello` or `Started` not yet sent is made again for the next
        // server.
        while self.to_server.front().is_some_and(|frame| encoded_output_stream(frame).is_none()) {
            let frame = self.to_server.pop_front().expect("the front frame exists");
            self.to_server_bytes -= frame.len();
        }
        while let Some((frame, _, _)) = self.unacknowledged.pop_back() {
            self.to_server_bytes += frame.len();
            self.to_server.push_front(frame);
        }
        self.unacknowledged_bytes = 0;
        self.trim_detached();
    }

    fn handle_server_frames(&mut self) {
        loop {
            match ServerFrame::decode(&mut self.from_server) {
                Ok(Some(frame)) => self.apply(frame),
                Ok(None) => return,
                Err(error) => {
                    // A malformed frame means the stream is out of step and
                    // cannot be resynchronised.
                    log_error(format_args!("closing the server connection: {error}"));
                    self.server_gone();
                    return;
                }
            }
        }
    }

    fn apply(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Stdin(data) => {
                if self.stdin.is_some() {
                    self.stdin_buffer.extend_from_slice(&data);
                    self.write_stdin();
                }
            }
            ServerFrame::CloseStdin => {
                self.stdin_close_requested = true;
                if self.tty_master.is_some() {
                    // A terminal has no end of file of its own; ^D is what
                    // ends input for a reader in canonical mode.
                    self.stdin_buffer.extend_from_slice(b"\x04");
                }
                self.write_stdin();
            }
            ServerFrame::Signal { signal } => {
                if let Ok(signal) = nix::sys::signal::Signal::try_from(signal) {
                    // The process is not reaped before the pidfd reports its
                    // exit, so its pid cannot have been reused.
                    let _ = nix::sys::signal::kill(self.child, signal);
                }
            }
            ServerFrame::Ack { stdout, stderr } => self.acknowledge([stdout, stderr]),
            ServerFrame::Resize { columns, rows } => {
                if let Some(master) = self.tty_master {
                    let size = libc::winsize { ws_row: rows, ws_col: columns, ws_xpixel: 0, ws_ypixel: 0 };
                    // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
                    unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &size) };
                }
            }
        }
    }

    fn write_stdin(&mut self) {
        while let Some(fd) = &self.stdin {
            if self.stdin_buffer.is_empty() {
                break;
            }
            // SAFETY: writes from a live buffer to an owned fd.
            let written = unsafe { libc::write(fd.as_raw_fd(), self.stdin_buffer.as_ptr().cast(), self.stdin_buffer.len()) };
            if written >= 0 {
                let _ = self.stdin_buffer.split_to(written as usize);
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => return,
                Some(libc::EINTR) => continue,
                // EPIPE: the process closed its stdin; later input is dropped.
                _ => {
                    self.stdin = None;
                    self.stdin_buffer.clear();
                }
            }
        }
        if self.stdin_close_requested && self.stdin_buffer.is_empty() && self.tty_master.is_none() {
            self.stdin = None;
        }
    }

    /// Reads up to `limit` bytes from output `index` into a frame. Returns
    /// the number of bytes read, which is 0 when none were ready or at end
    /// of file.
    fn read_output(&mut self, index: usize, limit: usize) -> usize {
        let (Some(fd), stream) = (&self.outputs[index].0, self.outputs[index].1) else { return 0 };
        // The output is read straight into an encoded frame, after room
        // for its header, so it is neither zeroed first nor copied after.
        let capacity = OUTPUT_CHUNK.min(limit).min(MAX_FRAME_PAYLOAD);
        let mut frame = BytesMut::with_capacity(FRAME_HEADER_LEN + capacity);
        frame.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        let spare = &mut frame.spare_capacity_mut()[..capacity];
        // SAFETY: reads into the buffer's spare capacity, of the given length.
        let count = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        if count > 0 {
            // SAFETY: the read initialised `count` bytes after the header.
            unsafe { frame.set_len(FRAME_HEADER_LEN + count as usize) };
            frame[..FRAME_HEADER_LEN].copy_from_slice(&output_header(matches!(stream, Stream::Stderr), count as usize));
            // A frame keeps its whole allocation while queued or kept for
            // acknowledgement, so a short read gets a buffer of its size.
            let frame = if (count as usize) < capacity / 2 { Bytes::copy_from_slice(&frame) } else { frame.freeze() };
            self.push_encoded(frame);
            return count as usize;
        }
        if count < 0 && matches!(io::Error::last_os_error().raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
            return 0;
        }
        // End of file, or EIO from a pty master whose slave side closed.
        self.outputs[index].0 = None;
        0
    }

    /// Reaps the exited process and collects what it left in its pipes.
    fn reap(&mut self) -> i32 {
        let status = match waitpid(self.child, None) {
            Ok(WaitStatus::Exited(_, code)) => code,
            Ok(WaitStatus::Signaled(_, signal, _)) => 128 + signal as i32,
            _ => 255,
        };
        for index in 0..self.outputs.len() {
            self.drain_output(index);
        }
        status
    }

    /// Reads what output `index` contains now, without waiting for
    /// descendants that keep the pipe open and write more.
    fn drain_output(&mut self, index: usize) {
        let Some(fd) = &self.outputs[index].0 else { return };
        let raw = fd.as_raw_fd();
        if self.tty_master.is_some() {
            // The tty layer may still be moving the last output to the
            // master, so wait briefly for more before giving up; EIO comes
            // as soon as every slave fd is closed.
            loop {
                if self.read_output(index, usize::MAX) == 0 {
                    let Some(fd) = &self.outputs[index].0 else { return };
                    match syscalls::wait_readable(fd.as_fd(), 100) {
                        Ok(true) => continue,
                        _ => return,
                    }
                }
            }
        }
        let mut available: libc::c_int = 0;
        // SAFETY: FIONREAD stores the readable byte count in an int.
        if unsafe { libc::ioctl(raw, libc::FIONREAD, &mut available) } < 0 {
            return;
        }
        let mut left = available as usize;
        while left > 0 {
            let count = self.read_output(index, left);
            if count == 0 {
                return;
            }
            left = left.saturating_sub(count);
        }
    }

    /// Records the exit status, then sends it after all output and waits
    /// until the server has it all. Without a server, the unsent output
    /// goes to [`OUTPUT_FILE`] first, so a server that finds the exit
    /// status file also finds the output.
    fn finish(mut self, status: i32, exit_status_path: &Path) {
        if !self.socket_open {
            let output_path = exit_status_path.with_file_name(OUTPUT_FILE);
            let frames: Vec<u8> = self.to_server.iter().flat_map(|frame| frame.iter().copied()).collect();
            if !frames.is_empty() {
                if let Err(error) = crate::state::write_atomically(&output_path, &frames) {
                    log_error(format_args!("failed to write {}: {error}", output_path.display()));
                }
            }
            write_exit_status(exit_status_path, status);
            // A server that connected meanwhile waits in the backlog until
            // the listener closes, and then reads the files.
            self.listener = None;
            return;
        }
        self.listener = None;
        write_exit_status(exit_status_path, status);
        self.push(ShimFrame::Exited { status });
        if self.socket.set_nonblocking(false).is_ok() {
            let front_written = self.front_written;
            for (index, frame) in self.to_server.iter().enumerate() {
                let start = if index == 0 { front_written } else { 0 };
                // NOTE: output still unsent when the server goes away here
                // is lost; the exit status file keeps the status.
                if self.socket.write_all(&frame[start..]).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_log_is_created_by_first_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.log");
        assert!(!path.exists());
        append_error(&path, format_args!("first {}", 1)).unwrap();
        append_error(&path, format_args!("second")).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "shim: first 1\nshim: second\n");
    }

    #[test]
    fn ready_report_round_trips() {
        let report = ReadyReport { pid: 4_000_000, executable_dev: 0x0803, executable_ino: u64::MAX - 7 };
        let mut bytes = Vec::new();
        report.write(&mut bytes).expect("writes to a vector");
        assert_eq!(bytes.len(), ReadyReport::LENGTH);
        assert_eq!(ReadyReport::read(&mut bytes.as_slice()).expect("reads back"), report);
        assert!(ReadyReport::read(&mut &bytes[..19]).is_err(), "a short report is an error");
    }

    #[test]
    fn own_report_names_this_executable() {
        use std::os::unix::fs::MetadataExt;
        let report = ReadyReport::own().expect("reads /proc/self/exe");
        let executable = fs::metadata(std::env::current_exe().expect("current executable")).expect("stat");
        assert_eq!((report.pid, report.executable_dev, report.executable_ino), (std::process::id(), executable.dev(), executable.ino()));
    }

    /// Returns an I/O loop of `version` connected to the returned server
    /// end, with pipes for stdio, for bookkeeping tests that need no
    /// process.
    fn io_loop(version: u32) -> (IoLoop, UnixStream) {
        let (shim_end, server_end) = UnixStream::pair().unwrap();
        let pidfd = syscalls::pidfd_open(std::process::id() as i32).unwrap();
        let (stdin, _) = pipe().unwrap();
        let (stdout, _) = pipe().unwrap();
        let (stderr, _) = pipe().unwrap();
        let stdio = ParentStdio::Pipes { stdin, stdout, stderr };
        let io_loop = IoLoop::new(shim_end, None, Pid::this(), pidfd, stdio, version).unwrap();
        (io_loop, server_end)
    }

    /// Decodes every frame the server end has received so far.
    fn received(server_end: &mut UnixStream) -> Vec<ShimFrame> {
        server_end.set_nonblocking(true).unwrap();
        let mut buffer = BytesMut::new();
        let mut chunk = [0u8; 4096];
        while let Ok(count) = server_end.read(&mut chunk) {
            if count == 0 {
                break;
            }
            buffer.extend_from_slice(&chunk[..count]);
        }
        std::iter::from_fn(|| ShimFrame::decode(&mut buffer).unwrap()).collect()
    }

    fn stdout(text: &'static str) -> ShimFrame {
        ShimFrame::Stdout(Bytes::from_static(text.as_bytes()))
    }

    fn stderr(text: &'static str) -> ShimFrame {
        ShimFrame::Stderr(Bytes::from_static(text.as_bytes()))
    }

    /// Returns the frames queued for the next server, decoded.
    fn queued(io_loop: &IoLoop) -> Vec<ShimFrame> {
        let mut buffer: BytesMut = io_loop.to_server.iter().flat_map(|frame| frame.iter().copied()).collect();
        std::iter::from_fn(|| ShimFrame::decode(&mut buffer).unwrap()).collect()
    }

    #[test]
    fn unacknowledged_output_is_resent_in_order() {
        let (mut io_loop, mut server_end) = io_loop(2);
        for frame in [stdout("one"), stderr("two"), stdout("three"), stderr("four")] {
            io_loop.push(frame);
        }
        io_loop.flush_socket();
        assert_eq!(received(&mut server_end), vec![stdout("one"), stderr("two"), stdout("three"), stderr("four")]);
        assert_eq!(io_loop.unacknowledged.len(), 4);

        // The server is done with "one" and "two", and with the first
        // byte of "four" only.
        io_loop.acknowledge([3, 4]);
        assert_eq!(io_loop.unacknowledged.len(), 2);
        io_loop.push(stdout("five"));
        io_loop.server_gone();
        assert_eq!(queued(&io_loop), vec![stdout("three"), stderr("four"), stdout("five")]);
        let mut encoded = BytesMut::new();
        for frame in queued(&io_loop) {
            frame.encode(&mut encoded);
        }
        assert_eq!(io_loop.to_server_bytes, encoded.len());
    }

    #[test]
    fn reconnect_sends_hello_then_resends() {
        let (mut io_loop, mut server_end) = io_loop(2);
        io_loop.push(stdout("abc"));
        io_loop.flush_socket();
        received(&mut server_end);
        io_loop.server_gone();

        let directory = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(directory.path().join(SOCKET_NAME)).unwrap();
        io_loop.listener = Some(listener);
        let mut new_server_end = UnixStream::connect(directory.path().join(SOCKET_NAME)).unwrap();
        io_loop.accept_server();
        io_loop.flush_socket();
        let pid = std::process::id();
        assert_eq!(
            received(&mut new_server_end),
            vec![ShimFrame::Hello { version: 2 }, ShimFrame::Started { pid }, stdout("abc")]
        );

        // The new connection counts from zero again.
        io_loop.acknowledge([3, 0]);
        assert!(io_loop.unacknowledged.is_empty(), "three bytes of the new connection cover the frame");
    }

    #[test]
    fn version_one_keeps_nothing_after_sending() {
        let (mut io_loop, mut server_end) = io_loop(1);
        io_loop.push(stdout("gone"));
        io_loop.flush_socket();
        assert_eq!(received(&mut server_end), vec![stdout("gone")]);
        assert!(io_loop.unacknowledged.is_empty());
        io_loop.server_gone();
        assert!(queued(&io_loop).is_empty());
    }

    #[test]
    fn kept_output_is_bounded() {
        let (mut io_loop, mut server_end) = io_loop(2);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let reader = std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = server_end.read_to_end(&mut sink);
            sink.len()
        });
        for _ in 0..40 {
            io_loop.push(ShimFrame::Stdout(chunk.clone()));
            io_loop.socket.set_nonblocking(false).unwrap();
            io_loop.flush_socket();
        }
        assert!(io_loop.unacknowledged_bytes <= DETACHED_OUTPUT_LIMIT, "{} bytes kept", io_loop.unacknowledged_bytes);
        assert!(io_loop.unacknowledged_bytes > DETACHED_OUTPUT_LIMIT - 2 * chunk.len());
        io_loop.server_gone();
        assert!(io_loop.to_server_bytes <= DETACHED_OUTPUT_LIMIT);
        drop(io_loop);
        assert!(reader.join().unwrap() >= 40 * chunk.len());
    }
}
