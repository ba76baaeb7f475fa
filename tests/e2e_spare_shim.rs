//! The spare process shim: a shim the server starts before a Run needs it.
//! It stays outside every container, exits when the server stops or is
//! killed, and is not used once the executable it runs was replaced. The
//! server tests need root; see `support` for how they skip. The launcher
//! tests need no root: a shim waiting for its configuration touches no
//! container.

mod support;

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::TestServer;
use trellis::linux::spare::ShimLauncher;
use trellis::linux::syscalls;

/// Shims of the server whose network namespace is `netns_inode` that wait
/// for a configuration: they have not entered a process directory.
fn spare_shims(netns_inode: u64, depot: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("listing /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        if !String::from_utf8_lossy(&cmdline).contains(trellis::linux::SHIM_COMMAND) {
            continue;
        }
        let in_server_netns = fs::metadata(entry.path().join("ns/net")).is_ok_and(|ns| ns.ino() == netns_inode);
        let serving = fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(depot));
        if in_server_netns && !serving {
            found.push(pid);
        }
    }
    found
}

/// Waits until the server has exactly one spare shim, the same one in two
/// looks 100 ms apart, and returns a pidfd for it with its pid. A single
/// look may catch the short-lived first process of a shim being started,
/// or a shim that has just ended its process and not yet exited.
fn wait_for_one_spare(server: &TestServer) -> (u32, OwnedFd) {
    let netns = fs::metadata(format!("/proc/{}/ns/net", server.pid())).expect("the server's namespace").ino();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut previous = None;
    loop {
        let spares = spare_shims(netns, &server.depot);
        match spares[..] {
            [pid] if previous == Some(pid) => {
                let pidfd = syscalls::pidfd_open(pid as i32).expect("opening a pidfd for the spare");
                return (pid, pidfd);
            }
            [pid] => previous = Some(pid),
            _ => previous = None,
        }
        assert!(Instant::now() < deadline, "expected one spare shim, found {spares:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Returns whether the process behind `pidfd` exits within `timeout`.
fn exits_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    syscalls::wait_readable(pidfd.as_fd(), timeout.as_millis() as i32).expect("polling a pidfd")
}

#[test]
fn spare_shim_stays_outside_containers() {
    let Some(server) = TestServer::start("spare_shim_stays_outside_containers") else { return };
    let handle = server.create("outside");
    let output = server.run_command(&handle, "/bin/echo", &["ran"]);
    assert_eq!(output.stdout_text(), "ran\n");
    let (pid, _pidfd) = wait_for_one_spare(&server);

    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("the spare's cgroups");
    assert!(!cgroups.contains(&server.tag), "the spare shim is in a container's cgroup:\n{cgroups}");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("the spare's status");
    let parent = status.lines().find_map(|line| line.strip_prefix("PPid:")).map(str::trim).unwrap_or("");
    assert_ne!(parent, server.pid().to_string(), "the spare shim is the server's child");
    // Inside the container only its own processes are visible.
    let listing = server.run_command(&handle, "/bin/sh", &["-c", "ls /proc | grep -c '^[0-9]'"]);
    let visible: u32 = listing.stdout_text().trim().parse().expect("a count of processes");
    // garden-init, sh and ls (grep may have run as well).
    assert!(visible <= 4, "the container sees {visible} processes");
}

#[test]
fn spare_shim_exits_when_server_is_killed() {
    let Some(mut server) = TestServer::start("spare_shim_exits_when_server_is_killed") else { return };
    let (pid, pidfd) = wait_for_one_spare(&server);
    assert!(!exits_within(&pidfd, Duration::ZERO), "the spare shim {pid} exited before the server did");
    server.kill_server();
    assert!(exits_within(&pidfd, Duration::from_secs(10)), "the spare shim {pid} outlived the killed server");
}

#[test]
fn server_stop_leaves_no_shim() {
    let Some(mut server) = TestServer::start("server_stop_leaves_no_shim") else { return };
    let handle = server.create("stop");
    server.run_command(&handle, "/bin/true", &[]);
    let (pid, pidfd) = wait_for_one_spare(&server);
    server.stop();
    // The server ends its spare before it exits, so no wait is needed.
    assert!(exits_within(&pidfd, Duration::ZERO), "the spare shim {pid} is still running after the server stopped");
}

/// A copy of the `trellis` executable in a directory of its own.
struct ExecutableCopy {
    _directory: tempfile::TempDir,
    path: PathBuf,
}

impl ExecutableCopy {
    fn new() -> ExecutableCopy {
        let directory = tempfile::Builder::new().prefix("trellis-spare-").tempdir().expect("a temporary directory");
        let path = directory.path().join("trellis");
        fs::copy(env!("CARGO_BIN_EXE_trellis"), &path).expect("copying the executable");
        ExecutableCopy { _directory: directory, path }
    }

    /// Replaces the file with a new copy, as a package upgrade does: a new
    /// inode renamed over the old name.
    fn replace(&self) {
        let next = self.path.with_extension("new");
        fs::copy(env!("CARGO_BIN_EXE_trellis"), &next).expect("copying the executable");
        fs::rename(&next, &self.path).expect("renaming the new executable into place");
    }
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// Waits until the launcher has a spare and returns a pidfd for it.
fn launcher_spare(launcher: &ShimLauncher) -> (u32, OwnedFd) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = launcher.spare_pid() {
            return (pid, syscalls::pidfd_open(pid as i32).expect("opening a pidfd for the spare"));
        }
        assert!(Instant::now() < deadline, "the launcher started no spare");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn launcher_hands_out_its_spare_and_starts_another() {
    let executable = ExecutableCopy::new();
    let launcher = ShimLauncher::new(executable.path.clone(), logger());
    let (first, first_pidfd) = launcher_spare(&launcher);
    let shim = launcher.take().expect("taking a shim");
    assert!(shim.was_spare, "the ready spare was not used");
    assert_eq!(launcher.spare_pid(), None, "the spare was handed out");
    launcher.refill();
    let (second, _second_pidfd) = launcher_spare(&launcher);
    assert_ne!(first, second);
    // Closing the socket of a shim that got no configuration ends it.
    drop(shim);
    assert!(exits_within(&first_pidfd, Duration::from_secs(10)), "the shim {first} outlived its socket");
}

#[test]
fn spare_of_a_replaced_executable_is_not_used() {
    let executable = ExecutableCopy::new();
    let launcher = ShimLauncher::new(executable.path.clone(), logger());
    let (old, old_pidfd) = launcher_spare(&launcher);
    executable.replace();
    let shim = launcher.take().expect("taking a shim");
    assert!(!shim.was_spare, "the spare of the replaced executable was used");
    assert!(exits_within(&old_pidfd, Duration::from_secs(10)), "the unused spare {old} kept running");
}

#[test]
fn launcher_shutdown_ends_the_spare() {
    let executable = ExecutableCopy::new();
    let launcher = ShimLauncher::new(executable.path.clone(), logger());
    let (pid, pidfd) = launcher_spare(&launcher);
    launcher.shutdown();
    assert!(exits_within(&pidfd, Duration::ZERO), "the spare {pid} is running after shutdown");
    launcher.refill();
    assert_eq!(launcher.spare_pid(), None, "a spare was started after shutdown");
    assert!(launcher.take().is_ok(), "a shim still starts on demand after shutdown");
}
