//! End-to-end tests of process confinement: capability sets, the seccomp
//! filter, masked proc files, leaked fds, the pid namespace and the shim's
//! command line. Needs root; see `support` for how it skips.

mod support;

use std::fs;

use support::{command_spec, TestServer};
use trellis::api::{ContainerSpec, ProcessSpec};

/// Returns the value of `field` in a `/proc/<pid>/status` text.
fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field).and_then(|rest| rest.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {field} line in:\n{status}"))
}

/// Returns the server's own bounding set, which limits what it can give.
fn server_bounding(server: &TestServer) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", server.pid())).expect("reading the server's status");
    u64::from_str_radix(status_field(&status, "CapBnd"), 16).expect("hexadecimal CapBnd")
}

fn create_privileged(server: &TestServer, label: &str) -> String {
    let spec = ContainerSpec { handle: server.unique_handle(label), privileged: true, ..ContainerSpec::default() };
    server.block_on(server.client.create(&spec)).expect("creating a privileged container")
}

fn status_as(server: &TestServer, handle: &str, user: &str, path: &str) -> String {
    let spec = ProcessSpec { user: user.into(), ..command_spec("cat", &[path]) };
    let output = server.run(handle, &spec, None).expect("running cat");
    assert_eq!(output.status, 0, "cat {path} as {user:?} failed: {}", output.stderr_text());
    output.stdout_text()
}

/// Checks the four capability lines and the ambient set.
fn assert_caps(status: &str, who: &str, inheritable: u64, permitted: u64, effective: u64, bounding: u64) {
    assert_eq!(status_field(status, "CapInh"), format!("{inheritable:016x}"), "{who}: CapInh");
    assert_eq!(status_field(status, "CapPrm"), format!("{permitted:016x}"), "{who}: CapPrm");
    assert_eq!(status_field(status, "CapEff"), format!("{effective:016x}"), "{who}: CapEff");
    assert_eq!(status_field(status, "CapBnd"), format!("{bounding:016x}"), "{who}: CapBnd");
    assert_eq!(status_field(status, "CapAmb"), "0000000000000000", "{who}: CapAmb");
}

#[test]
fn unprivileged_caps_and_seccomp() {
    let Some(server) = TestServer::start("unprivileged_caps_and_seccomp") else { return };
    let handle = server.create("caps");
    let mask = 0xa80425fb;

    let root = status_as(&server, &handle, "", "/proc/self/status");
    assert_caps(&root, "unprivileged root", mask, mask, mask, mask);
    assert_eq!(status_field(&root, "Seccomp"), "2", "unprivileged root: seccomp mode");

    let user = status_as(&server, &handle, "1000:1000", "/proc/self/status");
    assert_caps(&user, "unprivileged 1000:1000", mask, 0, 0, mask);
    assert_eq!(status_field(&user, "Seccomp"), "2", "unprivileged 1000:1000: seccomp mode");

    let named = status_as(&server, &handle, "alice", "/proc/self/status");
    assert_caps(&named, "unprivileged alice", mask, 0, 0, mask);

    let init = status_as(&server, &handle, "", "/proc/1/status");
    assert_eq!(status_field(&init, "Name"), "garden-init");
    assert_caps(&init, "garden-init", mask, mask, mask, mask);
    assert_eq!(status_field(&init, "Seccomp"), "2", "garden-init: seccomp mode");
}

#[test]
fn privileged_caps_without_seccomp() {
    let Some(server) = TestServer::start("privileged_caps_without_seccomp") else { return };
    let handle = create_privileged(&server, "privcaps");
    let bounding = server_bounding(&server);
    // A server whose own bounding set lacks a capability cannot hand it
    // out, so the expected masks are cut to the server's set.
    let root_mask = 0x3f_ffff_ffff & bounding;
    let user_mask = 0xa82425fb & bounding;

    let root = status_as(&server, &handle, "", "/proc/self/status");
    assert_caps(&root, "privileged root", root_mask, root_mask, root_mask, root_mask);
    assert_eq!(status_field(&root, "Seccomp"), "0", "privileged root: seccomp mode");

    let alice = status_as(&server, &handle, "alice", "/proc/self/status");
    assert_caps(&alice, "privileged alice", user_mask, 0, 0, user_mask);
    assert_eq!(status_field(&alice, "Seccomp"), "0", "privileged alice: seccomp mode");
}

#[test]
fn seccomp_blocks_namespaces() {
    let Some(server) = TestServer::start("seccomp_blocks_namespaces") else { return };
    let handle = server.create("seccomp");

    let unshare = server.run_command(&handle, "unshare", &["--user", "whoami"]);
    assert_ne!(unshare.status, 0, "unshare --user succeeded: {}", unshare.stdout_text());
    assert!(unshare.stderr_text().contains("Operation not permitted"), "unshare stderr: {}", unshare.stderr_text());

    // Forking through clone without namespace flags keeps working.
    let fork = server.run_command(&handle, "sh", &["-c", "echo $(echo nested) & wait"]);
    assert_eq!((fork.status, fork.stdout_text().as_str()), (0, "nested\n"));

    let mount = server.run_command(&handle, "mount", &["-t", "tmpfs", "tmpfs", "/tmp"]);
    assert_ne!(mount.status, 0, "mount succeeded");
    // busybox mount reports EPERM as "permission denied (are you root?)".
    assert!(mount.stderr_text().contains("permission denied"), "mount stderr: {}", mount.stderr_text());

    // The container keeps working after the refused calls.
    let after = server.run_command(&handle, "echo", &["still here"]);
    assert_eq!(after.stdout_text(), "still here\n");
}

#[test]
fn privileged_unshare_allowed() {
    let Some(server) = TestServer::start("privileged_unshare_allowed") else { return };
    let handle = create_privileged(&server, "privunshare");
    let unshare = server.run_command(&handle, "unshare", &["--uts", "hostname", "inner"]);
    assert_eq!(unshare.status, 0, "unshare in a privileged container failed: {}", unshare.stderr_text());
}

#[test]
fn process_sees_only_its_fds_and_pids() {
    let Some(server) = TestServer::start("process_sees_only_its_fds_and_pids") else { return };
    let handle = server.create("fds");

    let fds = server.run_command(&handle, "ls", &["/proc/self/fd"]);
    assert_eq!(fds.stdout_text(), "0\n1\n2\n3\n");

    let tty_spec = ProcessSpec { tty: Some(Default::default()), ..command_spec("ls", &["-1", "/proc/self/fd"]) };
    let tty_fds = server.run(&handle, &tty_spec, None).expect("running ls with a tty");
    assert_eq!(tty_fds.stdout_text(), "0\r\n1\r\n2\r\n3\r\n");

    // Only garden-init and the shell exist in the pid namespace; `echo` is
    // a shell builtin, so the glob runs in the shell itself.
    let pids = server.run_command(&handle, "sh", &["-c", "echo /proc/[0-9]*"]);
    let visible: Vec<String> = pids.stdout_text().split_whitespace().map(String::from).collect();
    assert_eq!(visible.len(), 2, "processes visible: {visible:?}");
    assert_eq!(visible[0], "/proc/1");

    let kill_server = server.run_command(&handle, "kill", &["-0", &server.pid().to_string()]);
    assert_ne!(kill_server.status, 0, "the server's host pid is visible inside the container");
}

#[test]
fn masked_proc_files_are_null() {
    let Some(server) = TestServer::start("masked_proc_files_are_null") else { return };
    let handle = server.create("masked");
    for name in ["kcore", "keys", "timer_list", "sched_debug"] {
        if !std::path::Path::new("/proc").join(name).exists() {
            continue;
        }
        let stat = server.run_command(&handle, "stat", &["-c", "%F %t,%T", &format!("/proc/{name}")]);
        assert_eq!(stat.stdout_text(), "character special file 1,3\n", "/proc/{name}");
    }
    let scsi = server.run_command(&handle, "ls", &["-A", "/sys/firmware"]);
    assert_eq!((scsi.status, scsi.stdout_text().as_str()), (0, ""), "/sys/firmware is not empty");
    let sysrq = server.run_command(&handle, "sh", &["-c", "echo h > /proc/sysrq-trigger"]);
    assert_ne!(sysrq.status, 0, "writing /proc/sysrq-trigger succeeded");
}

#[test]
fn shim_argv_holds_no_spec() {
    let Some(server) = TestServer::start("shim_argv_holds_no_spec") else { return };
    let handle = server.create("argv");
    let secret = format!("trellis-secret-{}", std::process::id());
    let spec = ProcessSpec {
        env: vec![format!("SECRET={secret}")],
        ..command_spec("sh", &["-c", "echo started; exec sleep 30"])
    };
    let client = &server.client;
    let stdout = support::SharedOutput::default();
    let io = trellis::client::ProcessIo { stdin: None, stdout: Some(Box::new(stdout.clone())), stderr: None };
    let mut process = server.block_on(client.run(&handle, &spec, io)).expect("starting sleep");
    server.block_on(support::wait_for_output(&stdout, 8, "the start line"));

    let mut shims = 0;
    for entry in fs::read_dir("/proc").expect("listing /proc").flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!text.contains(&secret), "pid {:?} shows the environment in its command line: {text}", entry.file_name());
        if text.contains("__shim") {
            shims += 1;
        }
    }
    assert!(shims >= 1, "no shim process found on the host");

    server.block_on(process.signal(trellis::client::Signal::Kill)).expect("sending kill");
    assert_eq!(server.block_on(process.wait()).expect("waiting"), 137);
}

#[test]
fn no_new_privileges_option() {
    let Some(plain) = TestServer::start("no_new_privileges_option_off") else { return };
    let handle = plain.create("nnpoff");
    let status = status_as(&plain, &handle, "", "/proc/self/status");
    assert_eq!(status_field(&status, "NoNewPrivs"), "0", "no_new_privs is set by default");
    drop(plain);

    let options = support::ServerOptions { extra_config: vec!["no-new-privileges = true".into()], ..support::ServerOptions::default() };
    let Some(server) = TestServer::start_with("no_new_privileges_option_on", options) else { return };
    let handle = server.create("nnpon");
    for user in ["", "alice"] {
        let status = status_as(&server, &handle, user, "/proc/self/status");
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "no_new_privs as {user:?}");
        assert_eq!(status_field(&status, "Seccomp"), "2", "seccomp as {user:?}");
    }
    let range = status_as(&server, &handle, "", "/proc/sys/net/ipv4/ping_group_range");
    assert_eq!(range.split_whitespace().collect::<Vec<_>>(), ["1", "65535"]);

    // Privileged containers are left alone.
    let privileged = create_privileged(&server, "nnppriv");
    let status = status_as(&server, &privileged, "", "/proc/self/status");
    assert_eq!(status_field(&status, "NoNewPrivs"), "0", "no_new_privs in a privileged container");
}
