//! Starting garden-init, and a spare one started ahead of the create that
//! uses it.
//!
//! Before a container's mounts can be made, garden-init must be started (a
//! fork and exec of the server's 14 MB executable), must unshare five or
//! six namespaces, get its id maps, be placed in cgroups and fork pid 1.
//! That took 3 to 4 ms of each create here (release build, 2-core machine,
//! timestamps at each step). None of it depends on the create's request,
//! because every unprivileged container has the same id mappings and its
//! new namespaces start empty. So the [`InitLauncher`] keeps one
//! unprivileged garden-init whose pid 1 waits for its configuration in
//! cgroups of its own, and the next create adopts it:
//!
//! - On cgroup v1 the spare's cgroups are renamed to the container's, which
//!   moves pid 1 with them; only the limits are left to write. cgroup v2
//!   cannot rename a cgroup, so there pid 1 waits in the server's cgroup
//!   and is moved into the container's when it is adopted.
//! - The next spare is started once the create that took the last one has
//!   finished, so the two do not compete for the CPUs.
//!
//! A spare never outlives the server's interest in it. Its pid 1 waits in
//! a read on its socket and exits at end of file, which it reads when the
//! server drops the spare or dies. Shutdown kills it and removes its
//! cgroups. Start-up removes the cgroups of a spare whose server was
//! killed, with the other orphans: their names (`spare@` and a random
//! number) are never a handle's. A spare is used only while the
//! launcher's executable path still names the file the spare runs; in the
//! server that path is `/proc/self/exe`, which keeps naming the running
//! binary even after an upgrade replaced the file.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::cgroup::{CgroupVersion, ContainerCgroup, Hierarchy};
use super::init::{InitConfig, PRIVILEGED_ARG, UNPRIVILEGED_ARG};
use super::{rootfs, syscalls};
use crate::api::Limits;
use crate::runtime::{IdMappings, RuntimeError};

/// How long garden-init may take for each step of its start-up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long dropping a spare waits for its pid 1 to die.
const KILL_TIMEOUT_MS: i32 = 10_000;
/// How long a create waits for a spare that is being started, which is
/// further along than a garden-init the create would start itself.
const STARTING_WAIT: Duration = Duration::from_millis(100);
/// Start of the cgroup name of a spare. `@` is not allowed in handles, so
/// no container's cgroup can have such a name.
pub const SPARE_CGROUP_PREFIX: &str = "spare@";

/// The host pid and pidfd of a container's garden-init (its pid 1).
#[derive(Debug)]
pub struct InitProcess {
    pub pid: i32,
    /// Signals through the pidfd cannot reach a recycled pid.
    pub pidfd: OwnedFd,
}

impl InitProcess {
    fn is_alive(&self) -> bool {
        !syscalls::wait_readable(self.pidfd.as_fd(), 0).unwrap_or(true)
    }

    /// Kills the process and waits until it has died.
    fn kill(&self) -> Result<(), String> {
        match syscalls::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => {}
            Err(error) => return Err(format!("failed to kill garden-init {}: {error}", self.pid)),
        }
        match syscalls::wait_readable(self.pidfd.as_fd(), KILL_TIMEOUT_MS) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("garden-init {} did not exit within {} s", self.pid, KILL_TIMEOUT_MS / 1000)),
            Err(error) => Err(format!("failed to wait for garden-init {}: {error}", self.pid)),
        }
    }
}

/// The server's end of garden-init's socket, once pid 1 waits for its
/// configuration.
pub struct InitChannel {
    socket: UnixStream,
    reader: BufReader<UnixStream>,
    /// garden-init's standard error, read for the detail of a failure.
    stderr: fs::File,
}

/// A started garden-init whose pid 1 waits for its configuration.
pub struct WaitingInit {
    pub process: InitProcess,
    pub channel: InitChannel,
}

impl InitChannel {
    fn read_line(&mut self) -> Result<String, RuntimeError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(self.failure("garden-init exited before the container was ready")),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(error) => Err(self.failure(&format!("failed to read from garden-init: {error}"))),
        }
    }

    /// Builds an error from `message` and what garden-init wrote to its
    /// standard error so far.
    fn failure(&mut self, message: &str) -> RuntimeError {
        let mut detail = String::new();
        // The pipe does not block: only what is already written is read.
        let _ = self.stderr.read_to_string(&mut detail);
        let detail = detail.trim();
        if detail.is_empty() {
            RuntimeError::failed(message)
        } else {
            RuntimeError::failed(format!("{message} ({})", detail.replace('\n', "; ")))
        }
    }

    fn send(&mut self, line: &str) -> Result<(), RuntimeError> {
        let written = (&self.socket).write_all(format!("{line}\n").as_bytes());
        written.map_err(|error| self.failure(&format!("failed to write to garden-init: {error}")))
    }

    /// Sends the container's configuration and waits until pid 1 has built
    /// the container.
    pub fn configure(mut self, config: &InitConfig) -> Result<(), RuntimeError> {
        let json = serde_json::to_string(config).map_err(|error| RuntimeError::failed(error.to_string()))?;
        self.send(&format!("config {json}"))?;
        let line = self.read_line()?;
        if line == "ready" {
            Ok(())
        } else if let Some(message) = line.strip_prefix("error ") {
            Err(RuntimeError::failed(format!("garden-init failed: {message}")))
        } else {
            Err(RuntimeError::failed(format!("unexpected message from garden-init: {line:?}")))
        }
    }
}

/// Starts garden-init from `executable` and walks it through its start-up
/// until pid 1 waits for the configuration. `place` runs while the first
/// process waits with its namespaces made and its id maps written: what it
/// joins, pid 1 is forked into.
pub fn start(
    executable: &Path,
    privileged: bool,
    mappings: Option<&IdMappings>,
    place: &mut dyn FnMut(u32) -> Result<(), RuntimeError>,
) -> Result<WaitingInit, RuntimeError> {
    let io_failed = |what: &str, error: io::Error| RuntimeError::failed(format!("failed to {what}: {error}"));
    let (server_end, init_end) = UnixStream::pair().map_err(|error| io_failed("create a socket pair", error))?;
    let (stderr_read, stderr_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(|error| io_failed("create a pipe", error.into()))?;
    // Only the server's end may be non-blocking; garden-init's blocks.
    nix::fcntl::fcntl(&stderr_write, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()))
        .map_err(|error| io_failed("configure a pipe", error.into()))?;
    let mut first = Command::new(executable)
        .arg(super::GARDEN_INIT_COMMAND)
        .arg(if privileged { PRIVILEGED_ARG } else { UNPRIVILEGED_ARG })
        .stdin(Stdio::from(OwnedFd::from(init_end)))
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr_write))
        .spawn()
        .map_err(|error| RuntimeError::failed(format!("failed to start garden-init {}: {error}", executable.display())))?;
    let reader = server_end.try_clone().map(BufReader::new).map_err(|error| io_failed("duplicate a socket", error));
    let mut channel = match reader {
        Ok(reader) => InitChannel { socket: server_end, reader, stderr: fs::File::from(stderr_read) },
        Err(error) => {
            let _ = first.kill();
            let _ = first.wait();
            return Err(error);
        }
    };
    let mut pid1 = None;
    let result = walk_start_up(&mut channel, first.id(), privileged, mappings, place, &mut pid1);
    // The first process exits right after reporting pid 1, or on error.
    if result.is_err() {
        let _ = first.kill();
    }
    let _ = first.wait();
    match (result, pid1) {
        (Ok(()), Some(process)) => Ok(WaitingInit { process, channel }),
        (Ok(()), None) => Err(RuntimeError::failed("garden-init reported no pid")),
        (Err(error), process) => {
            if let Some(process) = process {
                let _ = process.kill();
            }
            Err(error)
        }
    }
}

fn walk_start_up(
    channel: &mut InitChannel,
    first_pid: u32,
    privileged: bool,
    mappings: Option<&IdMappings>,
    place: &mut dyn FnMut(u32) -> Result<(), RuntimeError>,
    pid1: &mut Option<InitProcess>,
) -> Result<(), RuntimeError> {
    channel.socket.set_read_timeout(Some(START_TIMEOUT)).map_err(|error| RuntimeError::failed(error.to_string()))?;
    let line = channel.read_line()?;
    if line != "unshared" {
        return Err(RuntimeError::failed(format!("unexpected message from garden-init: {line:?}")));
    }
    if let (Some(mappings), false) = (mappings, privileged) {
        rootfs::write_id_maps(Path::new(&format!("/proc/{first_pid}")), mappings)?;
    }
    place(first_pid)?;
    channel.send("go")?;
    let line = channel.read_line()?;
    let Some(value) = line.strip_prefix("pid ") else {
        return match line.strip_prefix("error ") {
            Some(message) => Err(RuntimeError::failed(format!("garden-init failed: {message}"))),
            None => Err(RuntimeError::failed(format!("unexpected message from garden-init: {line:?}"))),
        };
    };
    let pid: i32 = value.parse().map_err(|_| RuntimeError::failed(format!("invalid pid from garden-init: {value:?}")))?;
    // Opened while the first process, pid 1's parent, has not been reaped,
    // so the pid cannot have been reused yet.
    let pidfd = syscalls::pidfd_open(pid).map_err(|error| RuntimeError::failed(format!("failed to open a pidfd for garden-init: {error}")))?;
    *pid1 = Some(InitProcess { pid, pidfd });
    Ok(())
}

/// A spare garden-init and what it was started with.
struct Spare {
    init: WaitingInit,
    /// Its own cgroups (cgroup v1 only).
    cgroup: Option<ContainerCgroup>,
    mappings: IdMappings,
    /// Device and inode of the executable it runs.
    executable_id: (u64, u64),
}

/// The layout that names and places spare cgroups, the same as containers'.
#[derive(Clone)]
pub struct CgroupLayout {
    pub version: CgroupVersion,
    pub hierarchies: Vec<Hierarchy>,
    pub tag: String,
}

impl CgroupLayout {
    fn plan(&self, name: &str) -> ContainerCgroup {
        ContainerCgroup::plan(self.version, &self.hierarchies, &self.tag, name)
    }
}

struct Slot {
    spare: Option<Spare>,
    /// The mappings of the last create; a spare is started only once a
    /// create has shown them.
    mappings: Option<IdMappings>,
    /// Cgroup names of the spare being started and the spare waiting.
    names: Vec<String>,
    /// Whether a spare is being started.
    starting: bool,
    /// Set by shutdown: nothing is started afterwards.
    closed: bool,
}

struct Shared {
    executable: PathBuf,
    layout: CgroupLayout,
    logger: slog::Logger,
    slot: Mutex<Slot>,
    /// Signalled when a spare start has finished.
    started: Condvar,
}

/// A garden-init handed to a create, its pid 1 waiting for the
/// configuration.
pub struct AdoptedInit {
    pub init: WaitingInit,
    /// Whether pid 1 is already in the container's cgroups, which then
    /// exist (renamed from the spare's).
    pub in_cgroups: bool,
}

/// Keeps one unprivileged garden-init waiting for the next create.
pub struct InitLauncher {
    shared: Arc<Shared>,
    /// Wakes the thread that starts spares; shutdown drops it.
    refill: Mutex<Option<mpsc::Sender<()>>>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl InitLauncher {
    /// Creates a launcher. The first spare is started after the first
    /// unprivileged create, which shows the id mappings.
    pub fn new(executable: PathBuf, layout: CgroupLayout, logger: slog::Logger) -> InitLauncher {
        let slot = Slot { spare: None, mappings: None, names: Vec::new(), starting: false, closed: false };
        let shared = Arc::new(Shared { executable, layout, logger, slot: Mutex::new(slot), started: Condvar::new() });
        let (sender, receiver) = mpsc::channel::<()>();
        let worker = shared.clone();
        let spawned = std::thread::Builder::new().name("spare-init".into()).spawn(move || {
            while receiver.recv().is_ok() {
                worker.fill();
            }
        });
        let (refill, worker) = match spawned {
            Ok(handle) => (Some(sender), Some(handle)),
            Err(error) => {
                slog::warn!(shared.logger, "failed to start the spare garden-init thread, so every create starts its own"; "error" => %error);
                (None, None)
            }
        };
        InitLauncher { shared, refill: Mutex::new(refill), worker: Mutex::new(worker) }
    }

    /// Hands out the spare when it was started with `mappings` from the
    /// current executable and is still alive. On cgroup v1 its cgroups
    /// become `target`. Returns `None` when there is no usable spare; the
    /// caller then starts its own garden-init.
    pub fn take(&self, mappings: &IdMappings, target: &ContainerCgroup) -> Option<AdoptedInit> {
        let spare = {
            let mut slot = lock(&self.shared.slot);
            if slot.mappings.as_ref() != Some(mappings) {
                slot.mappings = Some(mappings.clone());
            }
            if slot.spare.is_none() && slot.starting {
                slot = self.shared.started.wait_timeout_while(slot, STARTING_WAIT, |slot| slot.starting).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
            }
            let spare = slot.spare.take();
            if let Some(spare) = &spare {
                slot.names.retain(|name| Some(name) != spare_name(spare).as_ref());
            }
            spare
        }?;
        let current = executable_id(&self.shared.executable).ok();
        if spare.mappings != *mappings || !spare.init.process.is_alive() || current != Some(spare.executable_id) {
            slog::info!(self.shared.logger, "the spare garden-init no longer fits, so it is ended and the create starts its own"; "pid" => spare.init.process.pid);
            self.shared.end(spare);
            return None;
        }
        let Some(cgroup) = &spare.cgroup else {
            return Some(AdoptedInit { init: spare.init, in_cgroups: false });
        };
        match cgroup.rename_to(target) {
            Ok(()) => Some(AdoptedInit { init: spare.init, in_cgroups: true }),
            Err(error) => {
                // A cgroup of the handle left behind by an earlier failure
                // is one cause; the create then takes the usual path.
                slog::warn!(self.shared.logger, "the spare garden-init's cgroups could not be renamed, so it is ended";
                    "error" => %crate::linux::error_chain(&error));
                self.shared.end(spare);
                None
            }
        }
    }

    /// Starts the next spare in the background unless one is waiting.
    pub fn refill(&self) {
        if let Some(sender) = lock(&self.refill).as_ref() {
            let _ = sender.send(());
        }
    }

    /// Cgroup names of spares, which start-up must not take for orphans.
    pub fn cgroup_names(&self) -> Vec<String> {
        lock(&self.shared.slot).names.clone()
    }

    /// Ends the spare and stops starting new ones. Called when the server
    /// stops.
    pub fn shutdown(&self) {
        let spare = {
            let mut slot = lock(&self.shared.slot);
            slot.closed = true;
            slot.spare.take()
        };
        if let Some(spare) = spare {
            self.shared.end(spare);
        }
        lock(&self.refill).take();
        if let Some(worker) = lock(&self.worker).take() {
            let _ = worker.join();
        }
    }
}

impl Drop for InitLauncher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spare_name(spare: &Spare) -> Option<String> {
    spare.cgroup.as_ref()?.dirs.first()?.file_name().map(|name| name.to_string_lossy().into_owned())
}

impl Shared {
    /// Starts a spare unless one waits, the launcher is closed, or no
    /// create has shown the mappings yet.
    fn fill(&self) {
        let (mappings, name) = {
            let mut slot = lock(&self.slot);
            let Some(mappings) = slot.mappings.clone() else { return };
            if slot.closed || slot.spare.is_some() {
                return;
            }
            let name = format!("{SPARE_CGROUP_PREFIX}{:08x}", uuid::Uuid::new_v4().as_u128() as u32);
            slot.names.push(name.clone());
            slot.starting = true;
            (mappings, name)
        };
        let spare = self.start_spare(&name, mappings);
        let mut slot = lock(&self.slot);
        slot.starting = false;
        self.started.notify_all();
        match spare {
            Ok(spare) if !slot.closed && slot.mappings.as_ref() == Some(&spare.mappings) => slot.spare = Some(spare),
            Ok(spare) => {
                slot.names.retain(|kept| *kept != name);
                drop(slot);
                self.end(spare);
            }
            Err(error) => {
                slot.names.retain(|kept| *kept != name);
                slog::warn!(self.logger, "starting a spare garden-init failed"; "error" => %error);
            }
        }
    }

    fn start_spare(&self, name: &str, mappings: IdMappings) -> Result<Spare, RuntimeError> {
        let cgroup = match self.layout.version {
            CgroupVersion::V1 => Some(self.layout.plan(name)),
            CgroupVersion::V2 => None,
        };
        if let Some(cgroup) = &cgroup {
            // Spares are unprivileged: the device rules of one are set now.
            if let Err(error) = cgroup.create(false, &Limits::default()) {
                let _ = cgroup.remove();
                return Err(RuntimeError::failed(crate::linux::error_chain(&error)));
            }
        }
        let mut place = |pid: u32| match &cgroup {
            Some(cgroup) => cgroup.attach(pid).map_err(|error| RuntimeError::failed(crate::linux::error_chain(&error))),
            None => Ok(()),
        };
        let started = start(&self.executable, false, Some(&mappings), &mut place);
        let started = started.and_then(|init| match executable_id(Path::new(&format!("/proc/{}/exe", init.process.pid))) {
            Ok(id) => Ok((init, id)),
            Err(error) => {
                let _ = init.process.kill();
                Err(RuntimeError::failed(format!("failed to identify the executable of garden-init {}: {error}", init.process.pid)))
            }
        });
        match started {
            Ok((init, executable_id)) => Ok(Spare { init, cgroup, mappings, executable_id }),
            Err(error) => {
                if let Some(cgroup) = &cgroup {
                    let _ = cgroup.remove();
                }
                Err(error)
            }
        }
    }

    /// Kills a spare's pid 1 and removes its cgroups.
    fn end(&self, spare: Spare) {
        let Spare { init, cgroup, .. } = spare;
        let WaitingInit { process, channel } = init;
        drop(channel);
        if let Err(message) = process.kill() {
            slog::warn!(self.logger, "ending a spare garden-init failed"; "error" => message);
        }
        if let Some(cgroup) = cgroup {
            if let Err(error) = cgroup.remove() {
                slog::warn!(self.logger, "removing a spare garden-init's cgroups failed"; "error" => %crate::linux::error_chain(&error));
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Returns the device and inode of the file `path` names.
fn executable_id(path: &Path) -> io::Result<(u64, u64)> {
    let metadata = fs::metadata(path)?;
    Ok((metadata.dev(), metadata.ino()))
}
