//! The spare garden-init: once a create has shown the id mappings, the
//! server keeps one garden-init waiting in cgroups of its own, and the next
//! unprivileged create adopts it. These tests check that the adopted one
//! builds a complete container, that a spare leaves nothing behind when the
//! server stops or is killed, and that a create still succeeds when the
//! spare's cgroups cannot become the container's. They need root; see
//! `support` for how they skip.

mod support;

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::TestServer;
use trellis::api::ContainerSpec;
use trellis::linux::syscalls;

/// Pids of the processes in a spare cgroup of the server tagged `tag`.
fn spare_inits(tag: &str) -> Vec<u32> {
    let marker = format!("/{tag}/spare@");
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("listing /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cgroups) = fs::read_to_string(entry.path().join("cgroup")) else { continue };
        if cgroups.contains(&marker) {
            found.push(pid);
        }
    }
    found
}

/// Waits until the server has exactly one spare garden-init, the same one
/// in two looks 50 ms apart, and returns its pid with a pidfd.
fn wait_for_spare(server: &TestServer) -> (u32, OwnedFd) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut previous = None;
    loop {
        let spares = spare_inits(&server.tag);
        match spares[..] {
            [pid] if previous == Some(pid) => return (pid, syscalls::pidfd_open(pid as i32).expect("opening a pidfd for the spare")),
            [pid] => previous = Some(pid),
            _ => previous = None,
        }
        assert!(Instant::now() < deadline, "expected one spare garden-init, found {spares:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exits_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    syscalls::wait_readable(pidfd.as_fd(), timeout.as_millis() as i32).expect("polling a pidfd")
}

/// Directories named `spare@...` below the server's tag, in any hierarchy.
fn spare_cgroups(tag: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for parent in support::cgroups_named(tag).into_iter().filter(|dir| dir.file_name().is_some_and(|name| name == tag)) {
        let Ok(entries) = fs::read_dir(&parent) else { continue };
        found.extend(entries.flatten().map(|entry| entry.path()).filter(|path| path.is_dir() && path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("spare@"))));
    }
    found
}

fn namespace(pid: u32, kind: &str) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/{kind}")).unwrap_or_else(|error| panic!("namespace {kind} of {pid}: {error}")).ino()
}

#[test]
fn create_adopts_the_spare_init() {
    let Some(server) = TestServer::start("create_adopts_the_spare_init") else { return };
    // The first create shows the id mappings; a spare follows it.
    let first = server.create("first");
    let (pid, pidfd) = wait_for_spare(&server);

    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("the spare's command line");
    let arguments: Vec<String> = cmdline.split(|byte| *byte == 0).filter(|part| !part.is_empty()).map(|part| String::from_utf8_lossy(part).into_owned()).collect();
    assert_eq!(arguments[1..], [trellis::linux::GARDEN_INIT_COMMAND, "unprivileged"], "no host path or configuration in argv");
    let server_pid = server.pid();
    for kind in ["net", "pid_for_children", "user", "uts", "ipc"] {
        assert_ne!(namespace(pid, kind), namespace(server_pid, kind), "the spare shares the server's {kind} namespace");
    }
    // Its mount namespace is made once a create has prepared the root.
    assert_eq!(namespace(pid, "mnt"), namespace(server_pid, "mnt"), "the spare unshared its mount namespace early");

    let handle = server.create("adopter");
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("the adopted init's cgroups");
    assert!(cgroups.contains(&format!("/{}/{handle}", server.tag)), "the spare did not move into the container's cgroups:\n{cgroups}");
    assert!(!cgroups.contains("spare@"), "{cgroups}");
    assert_ne!(namespace(pid, "mnt"), namespace(server_pid, "mnt"), "the adopted init has no mount namespace of its own");

    // The container is complete: its pid 1, name, root and network.
    let script = "head -1 /proc/1/status; hostname; wc -l < /proc/self/uid_map; grep -c nameserver /etc/resolv.conf; ip -4 addr show eth0 | grep -c inet";
    let output = server.run_command(&handle, "/bin/sh", &["-c", script]);
    assert_eq!(output.status, 0, "{}", output.stderr_text());
    let text = output.stdout_text();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let hostname = &handle[handle.len().saturating_sub(49)..];
    assert_eq!(lines, ["Name:\tgarden-init", hostname, "2", "1", "1"], "pid 1, hostname, uid map lines, resolv.conf, eth0 address");
    // The pid namespace contains pid 1 and the client's processes only.
    let ps = server.run_command(&handle, "/bin/ps", &["-a"]);
    let listing = ps.stdout_text();
    assert_eq!(listing.lines().count(), 3, "header, garden-init and ps:\n{listing}");
    assert!(listing.lines().nth(1).is_some_and(|line| line.contains("garden-init")), "{listing}");

    // The next spare is a new process; destroy kills the adopted one.
    let (next, _next_pidfd) = wait_for_spare(&server);
    assert_ne!(next, pid);
    server.block_on(server.client.destroy(&handle)).expect("destroying the container");
    assert!(exits_within(&pidfd, Duration::ZERO), "the adopted init {pid} outlived its container");
    server.block_on(server.client.destroy(&first)).expect("destroying the first container");
}

#[test]
fn privileged_create_leaves_the_spare() {
    let Some(server) = TestServer::start("privileged_create_leaves_the_spare") else { return };
    server.create("first");
    let (pid, pidfd) = wait_for_spare(&server);
    let spec = ContainerSpec { handle: server.unique_handle("privileged"), privileged: true, ..ContainerSpec::default() };
    let handle = server.block_on(server.client.create(&spec)).expect("creating a privileged container");
    let output = server.run_command(&handle, "/bin/cat", &["/proc/self/uid_map"]);
    assert_eq!(output.stdout_text().split_whitespace().collect::<Vec<_>>(), ["0", "0", "4294967295"], "a privileged container has no user namespace");
    assert!(!exits_within(&pidfd, Duration::ZERO), "the spare was used for a privileged container");
    assert_eq!(spare_inits(&server.tag), [pid]);
}

#[test]
fn spare_init_ends_with_the_server() {
    let Some(mut server) = TestServer::start("spare_init_ends_with_the_server") else { return };
    let handle = server.create("stop");
    let (pid, pidfd) = wait_for_spare(&server);
    server.stop();
    // The server ends its spare and removes its cgroups before it exits.
    assert!(exits_within(&pidfd, Duration::ZERO), "the spare garden-init {pid} runs after the server stopped");
    assert_eq!(spare_cgroups(&server.tag), Vec::<PathBuf>::new());

    server.start_again(&[]);
    server.block_on(server.client.destroy(&handle)).expect("destroying the container");
    server.create("again");
    let (pid, pidfd) = wait_for_spare(&server);
    server.kill_server();
    // Its pid 1 reads end of file when the server dies.
    assert!(exits_within(&pidfd, Duration::from_secs(10)), "the spare garden-init {pid} outlived the killed server");
    // The next server removes the cgroups it left, with the other orphans.
    server.start_again(&[]);
    assert_eq!(spare_cgroups(&server.tag), Vec::<PathBuf>::new());
    let log = server.log_text();
    assert!(log.contains("removed orphan cgroup spare@"), "the start-up log names the spare's cgroups");
}

#[test]
fn spare_rename_failure_falls_back() {
    let Some(server) = TestServer::start("spare_rename_failure_falls_back") else { return };
    server.create("first");
    let (pid, pidfd) = wait_for_spare(&server);
    let spare_dirs = spare_cgroups(&server.tag);
    assert!(!spare_dirs.is_empty());
    // A cgroup of the handle left in one hierarchy, as a failed earlier
    // create can leave it, stops the rename there; the first renames are
    // undone and the create takes the usual path.
    let handle = server.unique_handle("blocked");
    let blocker = spare_dirs.last().unwrap().with_file_name(&handle);
    fs::create_dir(&blocker).expect("creating a cgroup with the handle's name");
    let spec = ContainerSpec { handle: handle.clone(), ..ContainerSpec::default() };
    server.block_on(server.client.create(&spec)).expect("creating the container");
    assert!(exits_within(&pidfd, Duration::from_secs(10)), "the spare {pid} that could not be adopted kept running");
    for dir in &spare_dirs {
        assert!(!dir.exists(), "the spare's cgroup {} was left", dir.display());
    }
    let output = server.run_command(&handle, "/bin/echo", &["works"]);
    assert_eq!(output.stdout_text(), "works\n");
    server.block_on(server.client.destroy(&handle)).expect("destroying the container");
    assert!(!blocker.exists(), "destroy left the container's cgroup {}", blocker.display());
}
