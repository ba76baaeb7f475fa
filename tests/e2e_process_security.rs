//! End-to-end tests of process confinement: capability sets, the seccomp
//! filter, masked proc files, leaked fds, the pid namespace and the shim's
//! command line. Needs root; see `support` for how it skips.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

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

/// Assembles `source` (GNU as syntax) into a static executable with
/// binutils, as 32-bit x86 (`--32`, `elf_i386`) or x86_64, and returns its
/// bytes.
fn assemble(directory: &Path, name: &str, source: &str, i386: bool) -> Vec<u8> {
    let source_path = directory.join(format!("{name}.s"));
    let object = directory.join(format!("{name}.o"));
    let executable = directory.join(name);
    fs::write(&source_path, source).expect("writing the assembly source");
    let mut assembler = Command::new("as");
    if i386 {
        assembler.arg("--32");
    }
    let status = assembler.arg("-o").arg(&object).arg(&source_path).status().expect("running `as` (binutils)");
    assert!(status.success(), "as failed on {name}.s");
    let mut linker = Command::new("ld");
    if i386 {
        linker.args(["-m", "elf_i386"]);
    }
    let status = linker.arg("-o").arg(&executable).arg(&object).status().expect("running `ld` (binutils)");
    assert!(status.success(), "ld failed on {name}.o");
    fs::read(&executable).expect("reading the linked executable")
}

/// Returns an i386 program that makes system call `number` with `argument`
/// through `int 0x80` and exits with the negated result, which is the
/// errno of a failed call and 0 for a call that returned 0.
fn i386_errno_program(number: u32, argument: u32) -> String {
    format!(
        ".globl _start\n_start:\n\tmovl ${number}, %eax\n\tmovl ${argument}, %ebx\n\tint $0x80\n\
         \tnegl %eax\n\tmovl %eax, %ebx\n\tmovl $1, %eax\n\tint $0x80\n"
    )
}

/// Returns an x86_64 program that makes system call `number` with
/// `argument` through `syscall` and exits with the errno of a failed call,
/// or 0 for any result that is not an error.
fn x86_64_errno_program(number: u64, argument: u64) -> String {
    format!(
        ".globl _start\n_start:\n\tmovq ${number}, %rax\n\tmovq ${argument}, %rdi\n\tsyscall\n\
         \tcmpq $-4095, %rax\n\tjae 1f\n\txorl %eax, %eax\n1:\tnegl %eax\n\tmovl %eax, %edi\n\
         \tmovl $60, %eax\n\tsyscall\n"
    )
}

/// Streams executables into `/opt/abi` of the container as root.
fn stream_in_executables(server: &TestServer, handle: &str, programs: &[(&str, Vec<u8>)]) {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in programs {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o755);
        header.set_size(bytes.len() as u64);
        builder.append_data(&mut header, name, bytes.as_slice()).expect("adding to the archive");
    }
    let archive = builder.into_inner().expect("finishing the archive");
    let mut reader = archive.as_slice();
    server.block_on(server.client.stream_in(handle, "/opt/abi", "", &mut reader)).expect("streaming the programs in");
}

/// The 32-bit x86 and x32 ABIs follow the same allow-list as x86_64: an
/// allowed call works, and a denied one fails with EPERM instead of
/// killing the process.
#[cfg(target_arch = "x86_64")]
#[test]
fn seccomp_covers_i386_and_x32() {
    const EPERM: i64 = 1;
    const ENOSYS: i64 = 38;
    const X32_BIT: u64 = 0x4000_0000;
    let Some(server) = TestServer::start("seccomp_covers_i386_and_x32") else { return };
    let handle = server.create("abi");
    let build = tempfile::tempdir().expect("creating a build directory");
    let hello = ".globl _start\n_start:\n\tmovl $4, %eax\n\tmovl $1, %ebx\n\tmovl $message, %ecx\n\
                 \tmovl $length, %edx\n\tint $0x80\n\tmovl $1, %eax\n\tmovl $42, %ebx\n\tint $0x80\n\
                 .data\nmessage: .ascii \"hello from i386\\n\"\nlength = . - message\n";
    let clone_newuser = libc::CLONE_NEWUSER as u32;
    let programs = [
        ("hello", assemble(build.path(), "hello", hello, true)),
        // unshare is 310 and mount 21 on i386; mount with a null source
        // would fail with EFAULT if the filter let it through.
        ("unshare32", assemble(build.path(), "unshare32", &i386_errno_program(310, clone_newuser), true)),
        ("mount32", assemble(build.path(), "mount32", &i386_errno_program(21, 0), true)),
        ("getuid32", assemble(build.path(), "getuid32", &i386_errno_program(199, 0), true)),
        // x32 getpid and unshare: x86_64 numbers with the x32 bit.
        ("getpidx32", assemble(build.path(), "getpidx32", &x86_64_errno_program(X32_BIT | 39, 0), false)),
        ("unsharex32", assemble(build.path(), "unsharex32", &x86_64_errno_program(X32_BIT | 272, u64::from(clone_newuser)), false)),
    ];
    stream_in_executables(&server, &handle, &programs);

    for user in ["", "1000:1000"] {
        let output = server.run(&handle, &ProcessSpec { user: user.into(), ..command_spec("/opt/abi/hello", &[]) }, None).expect("running hello");
        assert_eq!(output.stdout_text(), "hello from i386\n", "i386 output as {user:?}");
        assert_eq!(output.status, 42, "i386 exit status as {user:?}; 159 means seccomp killed it");
    }

    let getuid = server.run_command(&handle, "/opt/abi/getuid32", &[]);
    assert_eq!(getuid.status, 0, "i386 getuid32 as root failed");
    let unshare = server.run_command(&handle, "/opt/abi/unshare32", &[]);
    assert_eq!(unshare.status, EPERM, "i386 unshare(CLONE_NEWUSER); 159 means seccomp killed it");
    let mount = server.run_command(&handle, "/opt/abi/mount32", &[]);
    assert_eq!(mount.status, EPERM, "i386 mount");

    // A kernel without the x32 ABI (CONFIG_X86_X32_ABI off) answers an
    // allowed x32 call with ENOSYS after the filter let it pass; one with
    // it returns the pid. EPERM would mean the filter denied it.
    let getpid = server.run_command(&handle, "/opt/abi/getpidx32", &[]);
    assert!([0, ENOSYS].contains(&getpid.status), "x32 getpid ended with {}", getpid.status);
    let unshare = server.run_command(&handle, "/opt/abi/unsharex32", &[]);
    assert_eq!(unshare.status, EPERM, "x32 unshare(CLONE_NEWUSER)");

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
