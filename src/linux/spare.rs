//! Spare process shims, started ahead of the Runs that use them.
//!
//! Starting a shim means a fork and exec of the server's own executable,
//! dynamic loading, and a second fork that detaches the shim from the
//! server (see [`super::shim`]). That took about 1.5 ms of every Run
//! (release build on a 2-core machine, measured with `perf record` on the
//! fork, exec and exit tracepoints). The [`ShimLauncher`] keeps one shim started that way
//! and waiting for its configuration, hands it to the next Run, and starts
//! the next spare in the background once that Run's shim has reported.
//!
//! A spare never outlives the server's interest in it:
//!
//! - It waits in a blocking read on its socket, so when the server's end
//!   closes (the launcher dropped or shut down, or the server killed with
//!   SIGKILL) it reads end of file and exits.
//! - [`ShimLauncher::shutdown`] closes that socket and waits for the spare
//!   to exit, so a stopped server leaves no shim behind.
//! - It has no process directory, joins no container and no cgroup of a
//!   container, so it is neither listed nor restored as a container process.
//! - It reports the device and inode of its executable. A spare started from
//!   a binary that has since been replaced (an upgrade) is not used: the
//!   launcher ends it and starts a shim from the current binary instead.
//!   The server's own `/proc/self/exe` keeps naming the binary it runs
//!   even after the file was replaced, so its spares stay in use until it
//!   restarts, as the shims it started before did.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::shim::ReadyReport;
use super::syscalls;

/// How long a new shim may take to report that it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long ending a spare waits for it to exit, before and after SIGKILL.
const EXIT_TIMEOUT_MS: i32 = 5_000;

/// Errors of starting a shim.
#[derive(Debug, thiserror::Error)]
pub enum SpareError {
    #[error("failed to start the shim {executable}")]
    Spawn { executable: PathBuf, #[source] source: io::Error },
    #[error("the first shim process of {executable} exited with {status}")]
    FirstExit { executable: PathBuf, status: std::process::ExitStatus },
    #[error("the shim of {executable} sent no ready report")]
    Ready { executable: PathBuf, #[source] source: io::Error },
}

/// A shim connected to the server that waits for its configuration.
pub struct StartedShim {
    /// The server's end of the shim's socket, which the configuration is
    /// written to.
    pub socket: UnixStream,
    /// Whether the shim was a spare, started before the Run asked.
    pub was_spare: bool,
}

/// A started shim the launcher keeps for the next Run.
struct Spare {
    socket: UnixStream,
    /// Readable once the shim has exited.
    pidfd: OwnedFd,
    pid: u32,
    /// Device and inode of the executable the shim runs.
    executable_id: (u64, u64),
}

impl Spare {
    fn is_alive(&self) -> bool {
        !syscalls::wait_readable(self.pidfd.as_fd(), 0).unwrap_or(true)
    }
}

struct Slot {
    spare: Option<Spare>,
    /// Set by shutdown. A spare started afterwards is ended at once.
    closed: bool,
}

struct Shared {
    executable: PathBuf,
    logger: slog::Logger,
    slot: Mutex<Slot>,
}

/// Keeps one spare shim ready and hands it to the next Run.
pub struct ShimLauncher {
    shared: Arc<Shared>,
    /// Wakes the thread that starts spares. Shutdown drops it, which ends
    /// the thread.
    refill: Mutex<Option<mpsc::Sender<()>>>,
    /// The thread that starts spares, joined by shutdown.
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ShimLauncher {
    /// Creates a launcher for shims of `executable` and starts the first
    /// spare in the background.
    pub fn new(executable: PathBuf, logger: slog::Logger) -> ShimLauncher {
        let shared = Arc::new(Shared { executable, logger, slot: Mutex::new(Slot { spare: None, closed: false }) });
        let (sender, receiver) = mpsc::channel::<()>();
        let worker = shared.clone();
        let spawned = std::thread::Builder::new().name("spare-shim".into()).spawn(move || {
            while receiver.recv().is_ok() {
                worker.fill();
            }
        });
        let (refill, worker) = match spawned {
            Ok(handle) => {
                let _ = sender.send(());
                (Some(sender), Some(handle))
            }
            Err(error) => {
                // Runs still work, but each starts its own shim.
                slog::warn!(shared.logger, "failed to start the spare shim thread, so every Run starts its own shim"; "error" => %error);
                (None, None)
            }
        };
        ShimLauncher { shared, refill: Mutex::new(refill), worker: Mutex::new(worker) }
    }

    /// Returns a shim waiting for its configuration: the spare when there
    /// is one that runs the current executable, else a shim started now.
    pub fn take(&self) -> Result<StartedShim, SpareError> {
        let spare = lock(&self.shared.slot).spare.take();
        if let Some(spare) = spare {
            let current = executable_id(&self.shared.executable);
            if !spare.is_alive() {
                slog::warn!(self.shared.logger, "the spare shim exited before use, so a new one is started"; "pid" => spare.pid);
            } else if current.as_ref().ok() != Some(&spare.executable_id) {
                // Dropping the spare closes its socket, and it exits.
                slog::info!(self.shared.logger, "the executable was replaced after the spare shim started, so a new one is started";
                    "pid" => spare.pid, "executable" => %self.shared.executable.display());
            } else {
                return Ok(StartedShim { socket: spare.socket, was_spare: true });
            }
        }
        self.start_now()
    }

    /// Starts a shim for the caller, bypassing the spare.
    pub fn start_now(&self) -> Result<StartedShim, SpareError> {
        start_shim(&self.shared.executable).map(|started| StartedShim { socket: started.socket, was_spare: false })
    }

    /// Starts the next spare in the background unless one is ready.
    pub fn refill(&self) {
        if let Some(sender) = lock(&self.refill).as_ref() {
            let _ = sender.send(());
        }
    }

    /// Ends the spare and waits until it has exited. Later refills start
    /// nothing. Called when the server stops.
    pub fn shutdown(&self) {
        let spare = {
            let mut slot = lock(&self.shared.slot);
            slot.closed = true;
            slot.spare.take()
        };
        if let Some(spare) = spare {
            self.shared.end(spare);
        }
        // The thread ends a spare it is starting now once it finds `closed`
        // set, and only then returns.
        lock(&self.refill).take();
        if let Some(worker) = lock(&self.worker).take() {
            let _ = worker.join();
        }
    }

    /// Returns the pid of the spare shim, if one is ready.
    pub fn spare_pid(&self) -> Option<u32> {
        lock(&self.shared.slot).spare.as_ref().map(|spare| spare.pid)
    }
}

impl Drop for ShimLauncher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    /// Starts a spare if none is ready.
    fn fill(&self) {
        {
            let slot = lock(&self.slot);
            if slot.closed || slot.spare.as_ref().is_some_and(Spare::is_alive) {
                return;
            }
        }
        let spare = match start_shim(&self.executable) {
            Ok(spare) => spare,
            Err(error) => {
                slog::warn!(self.logger, "starting a spare shim failed"; "error" => %crate::linux::error_chain(&error));
                return;
            }
        };
        let mut slot = lock(&self.slot);
        if !slot.closed {
            slot.spare = Some(spare);
            return;
        }
        drop(slot);
        self.end(spare);
    }

    /// Closes the spare's socket and waits until it has exited, killing it
    /// if it does not exit by itself.
    fn end(&self, spare: Spare) {
        let Spare { socket, pidfd, pid, .. } = spare;
        drop(socket);
        if syscalls::wait_readable(pidfd.as_fd(), EXIT_TIMEOUT_MS).unwrap_or(false) {
            return;
        }
        slog::warn!(self.logger, "the spare shim did not exit when its socket closed, so it is killed"; "pid" => pid);
        let _ = syscalls::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
        let _ = syscalls::wait_readable(pidfd.as_fd(), EXIT_TIMEOUT_MS);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Returns the device and inode `executable` names now.
fn executable_id(executable: &Path) -> io::Result<(u64, u64)> {
    let metadata = fs::metadata(executable)?;
    Ok((metadata.dev(), metadata.ino()))
}

/// How often a start that finds the executable busy is tried again.
const SPAWN_ATTEMPTS: u32 = 5;

/// Pause before a start is tried again.
const SPAWN_RETRY_DELAY: Duration = Duration::from_millis(20);

/// Starts the first shim process with `shim_end` as its stdin, trying again
/// while the executable is busy.
fn spawn_first(executable: &Path, shim_end: OwnedFd) -> io::Result<std::process::Child> {
    let mut attempt = 0;
    loop {
        // The shim's early errors have nowhere useful to go. Once
        // configured, it writes them to the log file of its process.
        let spawned = Command::new(executable)
            .arg(super::SHIM_COMMAND)
            .stdin(Stdio::from(shim_end.try_clone()?))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            // ETXTBSY: another process still has the file open for
            // writing, as while an upgrade copies it or while a process
            // forked from a writer has not yet reached its exec.
            Err(error) if error.raw_os_error() == Some(libc::ETXTBSY) && attempt < SPAWN_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(SPAWN_RETRY_DELAY);
            }
            spawned => return spawned,
        }
    }
}

/// Starts a shim and waits for its ready report.
fn start_shim(executable: &Path) -> Result<Spare, SpareError> {
    let spawn_error = |source| SpareError::Spawn { executable: executable.to_path_buf(), source };
    let (mut server_end, shim_end) = UnixStream::pair().map_err(spawn_error)?;
    let mut first = spawn_first(executable, OwnedFd::from(shim_end)).map_err(spawn_error)?;

    // The first process forks the shim and exits at once, so the shim is
    // not the server's child and survives a server restart.
    let status = first.wait().map_err(spawn_error)?;
    if !status.success() {
        return Err(SpareError::FirstExit { executable: executable.to_path_buf(), status });
    }

    let ready_error = |source| SpareError::Ready { executable: executable.to_path_buf(), source };
    server_end.set_read_timeout(Some(READY_TIMEOUT)).map_err(ready_error)?;
    let report = ReadyReport::read(&mut server_end).map_err(ready_error)?;
    server_end.set_read_timeout(None).map_err(ready_error)?;
    let pidfd = syscalls::pidfd_open(report.pid as i32).map_err(ready_error)?;
    Ok(Spare { socket: server_end, pidfd, pid: report.pid, executable_id: (report.executable_dev, report.executable_ino) })
}
