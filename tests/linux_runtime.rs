//! Root integration tests of the Linux runtime, called directly (no HTTP).
//!
//! Each test builds containers from the busybox rootfs (made once per test
//! process with scripts/build-busybox-rootfs), with a tag and handles unique
//! to the test process, and destroys them through drop guards. Without root
//! every test prints why it skips and returns.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use trellis::api::{ContainerSpec, ImageRef, ProcessSpec};
use trellis::linux::{LinuxConfig, LinuxRuntime};
use trellis::runtime::stdio::ShimFrame;
use trellis::runtime::{ContainerConfig, ContainerRuntime, IdMap, IdMappings, Runtime, RuntimeError, StdioConnection};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED: the Linux runtime tests need root");
    false
}

fn tag() -> String {
    format!("trellis-t{}", std::process::id())
}

/// Returns the busybox rootfs, which the script builds on the first run
/// into cargo's temporary directory for integration tests.
fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("busybox-rootfs");
        if dir.join("bin/busybox").is_file() {
            return dir;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-busybox-rootfs");
        let status = std::process::Command::new(script).arg(&dir).status().expect("run build-busybox-rootfs");
        assert!(status.success(), "build-busybox-rootfs failed");
        dir
    })
}

fn mappings() -> IdMappings {
    let map = vec![IdMap { container_id: 0, host_id: 4294967294, size: 1 }, IdMap { container_id: 1, host_id: 1, size: 4294967293 }];
    IdMappings { uid_map: map.clone(), gid_map: map }
}

/// A runtime over a temporary depot.
struct Fixture {
    runtime: LinuxRuntime,
    depot: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let depot = tempfile::tempdir().expect("depot");
    let config = LinuxConfig {
        depot: depot.path().to_path_buf(),
        default_rootfs: rootfs().to_path_buf(),
        tag: tag(),
        executable: PathBuf::from(env!("CARGO_BIN_EXE_trellis")),
        no_new_privileges: false,
        cpu_quota_per_share: 0,
        cpu_entitlement_per_share: 0.0,
        network: None,
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    Fixture { runtime: LinuxRuntime::new(config, logger).expect("runtime"), depot }
}

/// Destroys its container when dropped, so a failed assertion leaves
/// nothing behind.
struct Container {
    handle: String,
    dir: PathBuf,
    inner: Arc<dyn ContainerRuntime>,
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(error) = self.inner.destroy() {
            eprintln!("cleanup: destroy of {} failed: {error}", self.handle);
        }
    }
}

impl Fixture {
    fn config(&self, spec: ContainerSpec, privileged: bool) -> ContainerConfig {
        let handle = format!("{}-{}", tag(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let dir = self.depot.path().join(&handle);
        std::fs::create_dir_all(&dir).unwrap();
        ContainerConfig {
            handle,
            spec: ContainerSpec { privileged, ..spec },
            container_dir: dir,
            id_mappings: if privileged { None } else { Some(mappings()) },
            network: None,
        }
    }

    fn create_with(&self, spec: ContainerSpec, privileged: bool) -> Container {
        let config = self.config(spec, privileged);
        let inner = self.runtime.create(&config).unwrap_or_else(|error| panic!("create failed: {error}"));
        Container { handle: config.handle, dir: config.container_dir, inner }
    }

    fn create(&self) -> Container {
        self.create_with(ContainerSpec::default(), false)
    }
}

/// What a process produced.
#[derive(Debug)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: i32,
}

impl Output {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn process(path: &str, args: &[&str]) -> ProcessSpec {
    ProcessSpec { path: path.to_string(), args: args.iter().map(|arg| arg.to_string()).collect(), ..ProcessSpec::default() }
}

fn connection(stdio: StdioConnection) -> UnixStream {
    match stdio {
        StdioConnection::Unix(stream) | StdioConnection::UnixAcknowledged(stream) => stream,
        StdioConnection::Memory(_) | StdioConnection::Replay(_) => {
            panic!("the Linux runtime returned no shim connection for a new process")
        }
    }
}

/// Reads frames until `Exited`; output frames after it fail the test.
fn collect(mut stream: UnixStream) -> Output {
    let mut buffer = BytesMut::new();
    let mut output = Output { stdout: Vec::new(), stderr: Vec::new(), status: -1 };
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some(frame) = ShimFrame::decode(&mut buffer).expect("valid frame") {
            match frame {
                ShimFrame::Stdout(data) => output.stdout.extend_from_slice(&data),
                ShimFrame::Stderr(data) => output.stderr.extend_from_slice(&data),
                ShimFrame::Exited { status } => {
                    output.status = status;
                    return output;
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        let count = stream.read(&mut chunk).expect("read from shim");
        assert!(count > 0, "shim closed the connection before Exited; so far {output:?}");
        buffer.extend_from_slice(&chunk[..count]);
    }
}

fn run(container: &Container, spec: ProcessSpec) -> Output {
    let id = format!("p{}", COUNTER.fetch_add(1, Ordering::Relaxed));
    let started = container.inner.run(&id, &spec).unwrap_or_else(|error| panic!("run {spec:?} failed: {error}"));
    assert!(started.pid > 0);
    collect(connection(started.stdio))
}

fn sh(container: &Container, script: &str) -> Output {
    run(container, process("sh", &["-c", script]))
}

#[test]
fn echo_prints_and_exits_zero() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let output = run(&container, process("echo", &["hello"]));
    assert_eq!(output.stdout(), "hello\n");
    assert!(output.stderr.is_empty());
    assert_eq!(output.status, 0);
    assert_eq!(sh(&container, "exit 42").status, 42);
}

#[test]
fn init_namespaces_and_hostname() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let status = sh(&container, "head -n 1 /proc/1/status");
    assert!(status.stdout().contains("garden-init"), "{status:?}");

    let uid_map = run(&container, process("cat", &["/proc/self/uid_map"])).stdout();
    let numbers: Vec<&str> = uid_map.split_whitespace().collect();
    assert_eq!(numbers, ["0", "4294967294", "1", "1", "1", "4294967293"]);
    let gid_map = run(&container, process("cat", &["/proc/self/gid_map"])).stdout();
    assert_eq!(gid_map.split_whitespace().collect::<Vec<_>>(), numbers);

    let hostname = run(&container, process("hostname", &[])).stdout();
    assert_eq!(hostname.trim(), container.handle);
}

#[test]
fn image_root_files_belong_to_container_root() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let listing = run(&container, process("ls", &["-ln", "/bin/busybox"])).stdout();
    let fields: Vec<&str> = listing.split_whitespace().collect();
    assert_eq!((fields[2], fields[3]), ("0", "0"), "{listing}");
    let alice = run(&container, process("stat", &["-c", "%u:%g", "/home/alice"])).stdout();
    assert_eq!(alice.trim(), "1001:1001");

    // Root can write the image's directories, and the image stays as it was.
    assert_eq!(sh(&container, "rm /bin/kill && touch /root/file").status, 0);
    assert!(rootfs().join("bin/kill").symlink_metadata().is_ok());
    let second = fixture.create();
    assert_eq!(run(&second, process("ls", &["/bin/kill"])).status, 0);
}

#[test]
fn mounts_match_garden() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let mounts = run(&container, process("cat", &["/proc/mounts"])).stdout();
    assert!(mounts.lines().any(|line| line.starts_with("sysfs /sys sysfs ro")), "{mounts}");
    assert!(mounts.lines().any(|line| line.starts_with("tmpfs /dev/shm tmpfs rw,nosuid,nodev,noexec,relatime")), "{mounts}");
    let devpts = mounts.lines().find(|line| line.starts_with("devpts /dev/pts devpts")).expect("devpts line");
    assert!(devpts.contains("rw,nosuid,noexec,relatime,gid=5,mode=620,ptmxmode=666"), "{devpts}");
    assert!(mounts.lines().any(|line| line.starts_with("mqueue /dev/mqueue mqueue")), "{mounts}");
    assert!(mounts.lines().any(|line| line.starts_with("proc /proc proc")), "{mounts}");

    // One read-only bind per v1 hierarchy, showing the container's cgroup.
    let cgroup_lines: Vec<&str> = mounts.lines().filter(|line| line.contains("/sys/fs/cgroup/")).collect();
    assert!(cgroup_lines.len() >= 6, "{mounts}");
    assert!(cgroup_lines.iter().all(|line| line.split_whitespace().nth(3).unwrap().starts_with("ro,")), "{cgroup_lines:?}");
    let procs = run(&container, process("cat", &["/sys/fs/cgroup/memory/cgroup.procs"])).stdout();
    assert!(!procs.trim().is_empty(), "the container's memory cgroup lists no process");
    assert_ne!(sh(&container, "echo 1 > /sys/fs/cgroup/memory/memory.limit_in_bytes").status, 0);

    let null = run(&container, process("stat", &["-c", "%F %t,%T", "/dev/null"])).stdout();
    assert_eq!(null.trim(), "character special file 1,3");
    assert_eq!(sh(&container, "echo data > /dev/null && head -c 4 /dev/zero | wc -c").stdout().trim(), "4");
    let tmp = run(&container, process("stat", &["-c", "%A", "/tmp"])).stdout();
    assert_eq!(tmp.trim(), "drwxrwxrwt");

    // Masked paths: /dev/null over proc files the host has, an empty
    // directory over /sys/firmware.
    for name in ["kcore", "keys", "timer_list"] {
        if Path::new("/proc").join(name).exists() {
            let device = run(&container, process("stat", &["-c", "%t,%T", &format!("/proc/{name}")])).stdout();
            assert_eq!(device.trim(), "1,3", "/proc/{name}");
        }
    }
    assert_eq!(run(&container, process("ls", &["-A", "/sys/firmware"])).stdout(), "");
    let links = sh(&container, "readlink /dev/ptmx; readlink /dev/fd; readlink /dev/stdin").stdout();
    assert_eq!(links, "pts/ptmx\n/proc/self/fd\n/proc/self/fd/0\n");
}

#[test]
fn ps_shows_only_init_and_client_processes() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let sleeper = container.inner.run("sleeper", &process("sleep", &["1000"])).expect("run sleep");
    let listing = run(&container, process("ps", &["-a"])).stdout();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 4, "{listing}");
    assert!(lines[1].contains("garden-init"), "{listing}");
    assert!(lines[2].contains("sleep"), "{listing}");
    assert!(lines[3].contains("ps"), "{listing}");

    container.inner.stop(true).expect("stop");
    assert_eq!(collect(connection(sleeper.stdio)).status, 137);
}

#[test]
fn users_resolve_from_container_files() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let as_user = |user: &str| ProcessSpec { user: user.to_string(), ..process("id", &[]) };

    assert!(run(&container, as_user("alice")).stdout().starts_with("uid=1001(alice) gid=1001(alice)"));
    assert!(run(&container, as_user("1001:1002")).stdout().starts_with("uid=1001(alice) gid=1002(bob)"));
    assert_eq!(run(&container, as_user("1000000000:1000000000")).stdout().trim(), "uid=1000000000 gid=1000000000");
    assert!(run(&container, as_user("")).stdout().starts_with("uid=0(root) gid=0(root)"));

    let error = container.inner.run("unknown", &as_user("mallory")).expect_err("unknown user");
    assert_eq!(error, RuntimeError::InvalidRequest { message: "unable to find user mallory: no matching entries in passwd file".into() });

    let home = run(&container, ProcessSpec { user: "alice".into(), ..process("pwd", &[]) }).stdout();
    assert_eq!(home.trim(), "/home/alice");
}

#[test]
fn environment_follows_garden_order() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let spec = ContainerSpec { env: vec!["CONTAINER_ENV=1".into(), "TEST=hi".into()], ..ContainerSpec::default() };
    let container = fixture.create_with(spec, false);
    let process_spec = ProcessSpec { env: vec!["TEST=hello".into(), "FRUIT=banana".into()], ..process("env", &[]) };
    let env = run(&container, process_spec).stdout();
    assert_eq!(
        env,
        "CONTAINER_ENV=1\nTEST=hello\nFRUIT=banana\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nUSER=root\nHOME=/root\n"
    );
    let alice = run(&container, ProcessSpec { user: "alice".into(), ..process("env", &[]) }).stdout();
    assert!(alice.contains("PATH=/usr/local/bin:/usr/bin:/bin\nUSER=alice\nHOME=/home/alice\n"), "{alice}");
}

#[test]
fn missing_executable_fails_run() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    match container.inner.run("bare", &process("does-not-exist", &[])) {
        Err(RuntimeError::ExecutableNotFound { message }) => assert!(message.contains("executable file not found in $PATH"), "{message}"),
        other => panic!("expected ExecutableNotFound, got {other:?}"),
    }
    match container.inner.run("path", &process("/bin/does-not-exist", &[])) {
        Err(RuntimeError::ExecutableNotFound { message }) => assert!(message.contains("no such file or directory"), "{message}"),
        other => panic!("expected ExecutableNotFound, got {other:?}"),
    }
    // Programs only in /sbin are not on a non-root user's PATH.
    let as_alice = ProcessSpec { user: "alice".into(), ..process("ifconfig", &[]) };
    assert!(matches!(container.inner.run("sbin", &as_alice), Err(RuntimeError::ExecutableNotFound { .. })));
}

#[test]
fn missing_working_dir_is_created_for_user() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let spec = ProcessSpec { user: "alice".into(), dir: "/opt/work/deep".into(), ..process("sh", &["-c", "pwd; stat -c '%u:%g %a' . .."]) };
    let output = run(&container, spec);
    assert_eq!(output.stdout(), "/opt/work/deep\n1001:1001 755\n1001:1001 755\n", "{output:?}");
}

#[test]
fn rlimits_and_fds_are_as_requested() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let mut spec = process("sh", &["-c", "ulimit -u; ulimit -n"]);
    spec.rlimits.nproc = Some(4567);
    spec.rlimits.nofile = Some(4242);
    assert_eq!(run(&container, spec).stdout(), "4567\n4242\n");
    assert_eq!(run(&container, process("ls", &["/proc/self/fd"])).stdout(), "0\n1\n2\n3\n");
}

#[test]
fn large_output_arrives_intact_before_exit() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let line = "abcdefghijklmnopqrstuvwxyz0123456789\n";
    let expected_out: Vec<u8> = line.bytes().cycle().take(10 << 20).collect();
    let expected_err: Vec<u8> = "ERR\n".bytes().cycle().take(1 << 20).collect();
    let script = "yes abcdefghijklmnopqrstuvwxyz0123456789 | head -c 10485760; yes ERR | head -c 1048576 >&2";
    for iteration in 0..5 {
        let output = sh(&container, script);
        assert_eq!(output.status, 0, "iteration {iteration}");
        assert_eq!(output.stdout.len(), expected_out.len(), "stdout length, iteration {iteration}");
        assert!(output.stdout == expected_out, "stdout content differs, iteration {iteration}");
        assert!(output.stderr == expected_err, "stderr differs, iteration {iteration}");
    }
    for iteration in 0..50 {
        let output = run(&container, process("seq", &["-s", " ", "10000"]));
        assert_eq!(output.stdout.len(), 48894, "iteration {iteration}");
    }
}

#[test]
fn stdin_signals_and_tty() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let started = container.inner.run("cat", &process("cat", &[])).expect("run cat");
    let mut stream = connection(started.stdio);
    let mut frames = BytesMut::new();
    trellis::runtime::stdio::ServerFrame::Stdin(bytes::Bytes::from_static(b"through stdin\n")).encode(&mut frames);
    trellis::runtime::stdio::ServerFrame::CloseStdin.encode(&mut frames);
    std::io::Write::write_all(&mut stream, &frames).unwrap();
    let output = collect(stream);
    assert_eq!((output.stdout(), output.status), ("through stdin\n".to_string(), 0));

    let started = container.inner.run("sleep", &process("sleep", &["1000"])).expect("run sleep");
    let mut stream = connection(started.stdio);
    let mut frames = BytesMut::new();
    trellis::runtime::stdio::ServerFrame::Signal { signal: 15 }.encode(&mut frames);
    std::io::Write::write_all(&mut stream, &frames).unwrap();
    assert_eq!(collect(stream).status, 143);

    let tty = trellis::api::TtySpec { window_size: Some(trellis::api::WindowSize { columns: 123, rows: 456 }) };
    let spec = ProcessSpec { tty: Some(tty), ..process("sh", &["-c", "stty -a | head -n 1; echo 'new\nline'"]) };
    let output = run(&container, spec);
    assert!(output.stdout().contains("rows 456; columns 123;"), "{output:?}");
    assert!(output.stdout().contains("new\r\nline"), "{output:?}");
}

#[test]
fn stop_terminates_then_kills() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let sleeper = container.inner.run("term", &process("sleep", &["1000"])).expect("run sleep");
    container.inner.stop(false).expect("stop");
    assert_eq!(collect(connection(sleeper.stdio)).status, 143);

    let stubborn = container.inner.run("kill", &process("sh", &["-c", "trap '' TERM; sleep 1000"])).expect("run");
    container.inner.stop(true).expect("stop kill");
    assert_eq!(collect(connection(stubborn.stdio)).status, 137);

    // garden-init survives Stop, so the container still runs processes.
    assert_eq!(run(&container, process("true", &[])).status, 0);
}

#[test]
fn stop_waits_for_trapping_and_ignoring_processes() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let trapping = container.inner.run("trap", &process("sh", &["-c", "trap 'exit 42' TERM; touch /tmp/trap; while true; do sleep 1; done"])).expect("run");
    let ignoring = container.inner.run("ignore", &process("sh", &["-c", "trap '' TERM; touch /tmp/ignore; while true; do sleep 1; done"])).expect("run");
    // A TERM that arrives before the shells set their traps would end them
    // with 143, so wait until both have.
    for _ in 0..250 {
        if sh(&container, "test -e /tmp/trap && test -e /tmp/ignore").status == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Stop blocks until the ignoring shell is killed after its grace period.
    container.inner.stop(false).expect("stop");
    assert_eq!(collect(connection(trapping.stdio)).status, 42);
    assert_eq!(collect(connection(ignoring.stdio)).status, 137);
    let left = run(&container, process("ps", &["-a"])).stdout();
    assert_eq!(left.lines().count(), 3, "{left}");
}

#[test]
fn exit_status_is_recorded_on_disk() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    assert_eq!(sh(&container, "exit 7").status, 7);
    let processes = container.dir.join("processes");
    let mut statuses = Vec::new();
    for entry in std::fs::read_dir(&processes).unwrap().flatten() {
        // The shim writes the file just before it exits, which can be just
        // after the Exited frame arrived.
        for _ in 0..100 {
            if let Ok(status) = std::fs::read_to_string(entry.path().join("exit-status")) {
                statuses.push(status);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    assert_eq!(statuses, ["7\n"]);
}

#[test]
fn unread_output_blocks_process_until_read() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let spec = process("sh", &["-c", "head -c 20000000 /dev/zero; touch /tmp/written"]);
    let started = container.inner.run("writer", &spec).expect("run");
    // No one reads for a while: the shim buffers at most about 1 MiB plus
    // the pipe, so the writer cannot have finished its 20 MB.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_ne!(run(&container, process("ls", &["/tmp/written"])).status, 0, "process finished while its output was unread");
    let output = collect(connection(started.stdio));
    assert_eq!((output.stdout.len(), output.status), (20_000_000, 0));
    assert_eq!(run(&container, process("ls", &["/tmp/written"])).status, 0);
}

#[test]
fn closed_connection_leaves_process_running() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let spec = process("sh", &["-c", "head -c 5000000 /dev/zero; echo finished > /tmp/finished"]);
    let started = container.inner.run("orphan", &spec).expect("run");
    drop(started.stdio);
    let mut finished = String::new();
    for _ in 0..250 {
        finished = run(&container, process("sh", &["-c", "cat /tmp/finished 2>/dev/null"])).stdout();
        if !finished.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(finished, "finished\n");
}

#[test]
fn simple_limits_reach_cgroup_files() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let mut spec = ContainerSpec::default();
    spec.limits.memory_limits.limit_in_bytes = 64 << 20;
    spec.limits.pid_limits.max = 50;
    spec.limits.cpu_limits.limit_in_shares = 512;
    let container = fixture.create_with(spec, false);
    let description = container.inner.describe();
    let mut seen = Vec::new();
    for dir in description["cgroups"].as_array().unwrap() {
        let dir = PathBuf::from(dir.as_str().unwrap());
        for (file, expected) in [("memory.limit_in_bytes", "67108864"), ("pids.max", "50"), ("cpu.shares", "512")] {
            if let Ok(value) = std::fs::read_to_string(dir.join(file)) {
                assert_eq!(value.trim(), expected, "{file}");
                seen.push(file);
            }
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    // The init process sits in the container's cgroups.
    let init_pid = description["init_pid"].as_i64().unwrap();
    let self_cgroup = std::fs::read_to_string(format!("/proc/{init_pid}/cgroup")).unwrap();
    assert!(self_cgroup.contains(&format!("/{}/{}", tag(), container.handle)), "{self_cgroup}");
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let dir = dir.to_string_lossy().into_owned();
    mounts.lines().filter(|line| line.contains(&dir)).map(str::to_string).collect()
}

fn cgroups_named(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let mut stack = vec![hierarchy.path()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().map(|kind| kind.is_dir()).unwrap_or(false) {
                    if entry.file_name().to_string_lossy() == name {
                        found.push(entry.path());
                    }
                    stack.push(entry.path());
                }
            }
        }
    }
    found
}

#[test]
fn destroy_leaves_nothing() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create();
    let sleeper = container.inner.run("sleeper", &process("sleep", &["1000"])).expect("run");
    let description = container.inner.describe();
    let init_pid = description["init_pid"].as_i64().unwrap();
    assert!(init_pid > 0);
    let cgroups: Vec<PathBuf> = description["cgroups"].as_array().unwrap().iter().map(|dir| PathBuf::from(dir.as_str().unwrap())).collect();
    assert!(cgroups.iter().all(|dir| dir.is_dir()));
    assert!(!mounts_under(&container.dir).is_empty());

    container.inner.destroy().expect("destroy");
    assert_eq!(collect(connection(sleeper.stdio)).status, 137);
    assert!(cgroups.iter().all(|dir| !dir.exists()), "{cgroups:?}");
    assert!(mounts_under(&container.dir).is_empty());
    assert!(!container.dir.exists());
    let init_gone = match std::fs::read_to_string(format!("/proc/{init_pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.contains(") Z "),
    };
    assert!(init_gone, "garden-init {init_pid} still runs");
    container.inner.destroy().expect("second destroy");
}

#[test]
fn failed_create_leaves_nothing() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let missing = ContainerSpec { image: ImageRef { uri: "/nonexistent/trellis-image".into(), ..ImageRef::default() }, ..ContainerSpec::default() };
    let config = fixture.config(missing, false);
    match fixture.runtime.create(&config) {
        Err(RuntimeError::InvalidRequest { message }) => assert!(message.contains("/nonexistent/trellis-image"), "{message}"),
        Err(other) => panic!("expected InvalidRequest, got {other:?}"),
        Ok(_) => panic!("create with a missing rootfs succeeded"),
    }
    let scheme = ContainerSpec { image: ImageRef { uri: "docker:///busybox".into(), ..ImageRef::default() }, ..ContainerSpec::default() };
    assert!(matches!(fixture.runtime.create(&fixture.config(scheme, false)), Err(RuntimeError::InvalidRequest { .. })));

    // An image whose /dev is a file makes garden-init fail after the
    // overlay, the cgroups and the init process exist.
    let image = tempfile::tempdir().unwrap();
    std::fs::write(image.path().join("dev"), "not a directory").unwrap();
    let spec = ContainerSpec { rootfs: image.path().to_string_lossy().into_owned(), ..ContainerSpec::default() };
    let config = fixture.config(spec, false);
    let error = fixture.runtime.create(&config).err().expect("create with a broken image failed");
    assert!(error.to_string().contains("garden-init failed"), "{error}");
    assert!(mounts_under(&config.container_dir).is_empty());
    assert!(cgroups_named(&config.handle).is_empty(), "{:?}", cgroups_named(&config.handle));
    let left: Vec<_> = std::fs::read_dir(&config.container_dir).unwrap().flatten().map(|entry| entry.file_name()).collect();
    assert!(left.is_empty(), "state directory still holds {left:?}");
}

#[test]
fn privileged_container_runs_as_host_root() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    let container = fixture.create_with(ContainerSpec::default(), true);
    assert_eq!(run(&container, process("cat", &["/proc/self/uid_map"])).stdout().split_whitespace().collect::<Vec<_>>(), ["0", "0", "4294967295"]);
    let listing = run(&container, process("ls", &["-l", "/bin/busybox"])).stdout();
    assert!(listing.contains(" root "), "{listing}");
    let mounts = run(&container, process("cat", &["/proc/mounts"])).stdout();
    assert!(!mounts.contains("cgroup"), "{mounts}");
    assert!(mounts.lines().any(|line| line.starts_with("proc /proc proc rw")), "{mounts}");
}

#[test]
fn ping_and_capacity_report_host() {
    if !is_root() {
        return;
    }
    let fixture = fixture();
    fixture.runtime.ping().expect("ping");
    let capacity = fixture.runtime.capacity().expect("capacity");
    assert!(capacity.memory_in_bytes > 0);
    assert!(capacity.disk_in_bytes > 0);
    assert!(capacity.schedulable_disk_in_bytes > 0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo.lines().next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(capacity.memory_in_bytes, kib * 1024);
}
