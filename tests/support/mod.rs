//! Shared harness of the root integration tests: it starts the real
//! `trellis server` binary in a private network namespace and cleans up
//! after it.
//!
//! - [`TestServer::start`] skips out loud when the test cannot run (not
//!   root, no `ip`); with `TRELLIS_REQUIRE_ROOT_TESTS=1` a skip fails the
//!   test instead.
//! - Each server gets a network namespace `trellis-t<pid>-<n>` with only
//!   loopback up and no route out, a temporary depot, a unique tag and a
//!   Unix socket, which the tests reach from the host network namespace.
//! - Dropping the server, also while a test panics, destroys the remaining
//!   containers through the API, stops the server by pid, deletes the
//!   network namespace, removes the temporary files and checks for objects
//!   left behind under its tag and depot.
//!
//! Each test binary compiles this module on its own and uses only part of
//! it, so unused items are expected.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use trellis::api::{ContainerSpec, ProcessSpec};
use trellis::client::{Client, ClientError, ProcessIo, Target};

/// Environment variable that turns every skip into a failure (CI sets it).
pub const REQUIRE_ROOT_VARIABLE: &str = "TRELLIS_REQUIRE_ROOT_TESTS";
/// How long a server may take to respond to its first ping.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the leftover check waits for links that the kernel and the
/// server remove in the background after a destroy. Shorter than the
/// server's own check of host veths (10 s), so a veth the kernel did not
/// remove still counts as left behind.
const LINK_TEARDOWN_WAIT: Duration = Duration::from_secs(3);
/// How long a test's client call may take before the test fails. It only
/// guards against hangs; tests never assert speed.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// The external IP of every test server, on a link of its network
/// namespace (a documentation address, reachable from nowhere).
pub const EXTERNAL_IP: &str = "198.51.100.1";
/// Name of that link, and of its veth peer in the same namespace.
const EXTERNAL_LINK: &str = "ext0";
const EXTERNAL_PEER: &str = "ext1";
/// The DNS server written into containers' `/etc/resolv.conf`; nothing
/// answers there.
pub const DNS_SERVER: &str = "198.51.100.53";
/// How long cleanup waits for one API call.
const CLEANUP_CALL_TIMEOUT: Duration = Duration::from_secs(30);

static SERVER_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Returns whether this process runs as root.
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Reports that `test` cannot run here. Returns normally (the caller then
/// returns) unless `TRELLIS_REQUIRE_ROOT_TESTS=1`, where it panics.
pub fn skip(test: &str, reason: &str) {
    if std::env::var(REQUIRE_ROOT_VARIABLE).is_ok_and(|value| value == "1") {
        panic!("{test}: cannot run: {reason} ({REQUIRE_ROOT_VARIABLE}=1 turns this skip into a failure)");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// Checks what every server test needs; reports a skip and returns false
/// when something is missing.
pub fn can_run(test: &str) -> bool {
    if !is_root() {
        skip(test, "needs root to create network namespaces, cgroups and mounts");
        return false;
    }
    if !Path::new("/usr/sbin/ip").exists() && !Path::new("/sbin/ip").exists() && !Path::new("/bin/ip").exists() {
        skip(test, "needs the `ip` tool from iproute2");
        return false;
    }
    if !rootfs_script().exists() {
        skip(test, &format!("needs {} to build the busybox rootfs", rootfs_script().display()));
        return false;
    }
    true
}

fn rootfs_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-busybox-rootfs")
}

/// Directory under which each test binary builds its busybox rootfs.
fn rootfs_parent() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// Returns the busybox rootfs, building it on first use in this test
/// binary with `scripts/build-busybox-rootfs`. It is removed when the test
/// binary exits.
pub fn busybox_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        remove_stale_rootfs_builds();
        let directory = rootfs_parent().join(format!("busybox-rootfs-{}", std::process::id()));
        let output = Command::new(rootfs_script())
            .arg(&directory)
            .output()
            .expect("running scripts/build-busybox-rootfs");
        assert!(
            output.status.success(),
            "scripts/build-busybox-rootfs {} failed with {}:\n{}{}",
            directory.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // SAFETY: registers a plain function without arguments; atexit
        // runs it when the test harness calls `exit`.
        unsafe { libc::atexit(remove_rootfs_at_exit) };
        directory
    })
}

extern "C" fn remove_rootfs_at_exit() {
    let directory = rootfs_parent().join(format!("busybox-rootfs-{}", std::process::id()));
    remove_tree_if_unmounted(&directory);
    let _ = fs::remove_dir_all(directory.with_extension("tmp"));
}

/// Removes rootfs builds of test binaries that no longer run.
fn remove_stale_rootfs_builds() {
    let Ok(entries) = fs::read_dir(rootfs_parent()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("busybox-rootfs-").and_then(|rest| rest.split('.').next()) else {
            continue;
        };
        let running = pid.parse::<u32>().is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !running {
            remove_tree_if_unmounted(&entry.path());
        }
    }
}

/// Deletes `directory` unless something is mounted below it: deleting
/// through a mount point could delete files of another file system.
fn remove_tree_if_unmounted(directory: &Path) {
    let mounts = mounts_under(Path::new("/proc/self/mountinfo"), directory);
    if !mounts.is_empty() {
        eprintln!(
            "test harness: not deleting {} because these are mounted below it:\n  {}",
            directory.display(),
            mounts.join("\n  ")
        );
        return;
    }
    if let Err(error) = fs::remove_dir_all(directory) {
        if error.kind() != std::io::ErrorKind::NotFound {
            eprintln!("test harness: deleting {} failed: {error}", directory.display());
        }
    }
}

/// Returns the mount points listed in `mountinfo` that are at or below
/// `directory`.
pub fn mounts_under(mountinfo: &Path, directory: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(mountinfo) else { return Vec::new() };
    let prefix = directory.to_string_lossy().into_owned();
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|mount_point| *mount_point == prefix || mount_point.starts_with(&format!("{prefix}/")))
        .map(str::to_string)
        .collect()
}

/// Returns a server tag unique to this process and server number. Tags
/// are 1 to 8 lowercase letters or digits, because they become part of
/// interface names: `t`, the pid in 5 base-36 digits (pids are below
/// 36^5), then the server number in base 36.
fn short_tag(pid: u32, number: usize) -> String {
    let tag = format!("t{:0>5}{}", base36(pid as u64), base36(number as u64));
    assert!(tag.len() <= 8, "server number {number} is too large for a tag");
    tag
}

fn base36(mut value: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut digits = Vec::new();
    loop {
        digits.push(DIGITS[(value % 36) as usize]);
        value /= 36;
        if value == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).unwrap()
}

/// Options for one test server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The server's `default-grace-time`, as duration text (`0`: never).
    pub default_grace_time: String,
    /// The server's `max-containers`; `None` keeps the server's default.
    pub max_containers: Option<u32>,
    /// More `key = value` lines for the configuration file.
    pub extra_config: Vec<String>,
    /// Size in MiB of a tmpfs mounted on the depot, so a test can fill it;
    /// `None` keeps the depot on the temporary directory's filesystem.
    pub depot_tmpfs_mib: Option<u32>,
    /// The server's `bridge-idle-time`. Tests use 0, so that a bridge goes
    /// with its last container and the leftover check finds none.
    pub bridge_idle_time: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            default_grace_time: "0".into(),
            max_containers: None,
            extra_config: Vec::new(),
            depot_tmpfs_mib: None,
            bridge_idle_time: "0".into(),
        }
    }
}

/// A running `trellis server` in its own network namespace.
pub struct TestServer {
    /// The test's name, for messages.
    pub test: String,
    /// Unique name of this server: the network namespace and the prefix of
    /// container handles.
    pub name: String,
    /// The server's `tag`, which names every host object it creates.
    pub tag: String,
    pub depot: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The configuration file, kept so the server can be started again on
    /// the same depot.
    pub config: PathBuf,
    pub client: Client,
    runtime: tokio::runtime::Runtime,
    child: Option<Child>,
    netns_created: bool,
    /// Whether the depot is a tmpfs this harness mounted.
    depot_tmpfs: bool,
    temp: Option<tempfile::TempDir>,
    handle_counter: AtomicUsize,
}

impl TestServer {
    /// Starts a server for `test` with default options, or returns `None`
    /// after reporting a skip.
    pub fn start(test: &str) -> Option<TestServer> {
        TestServer::start_with(test, ServerOptions::default())
    }

    /// Starts a server for `test`, or returns `None` after reporting a skip.
    pub fn start_with(test: &str, options: ServerOptions) -> Option<TestServer> {
        if !can_run(test) {
            return None;
        }
        let rootfs = busybox_rootfs();

        let number = SERVER_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("trellis-t{}-{number}", std::process::id());
        let tag = short_tag(std::process::id(), number);
        let temp = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .expect("creating the server's temporary directory");
        let directory = temp.path().to_path_buf();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the test's tokio runtime");

        let socket = directory.join("garden.sock");
        let mut server = TestServer {
            test: test.to_string(),
            tag,
            name,
            depot: directory.join("depot"),
            socket: socket.clone(),
            log: directory.join("server.log"),
            config: PathBuf::new(),
            client: Client::new(Target::Unix(socket)),
            runtime,
            child: None,
            netns_created: false,
            depot_tmpfs: false,
            temp: Some(temp),
            handle_counter: AtomicUsize::new(0),
        };

        fs::create_dir_all(&server.depot).expect("creating the depot");
        if let Some(size) = options.depot_tmpfs_mib {
            nix::mount::mount(
                Some("tmpfs"),
                &server.depot,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some(format!("size={size}m,mode=0755").as_str()),
            )
            .expect("mounting a tmpfs on the depot");
            server.depot_tmpfs = true;
        }
        server.create_netns();
        server.config = server.write_config(rootfs, &options);
        server.spawn(&[]);
        server.wait_until_ready();
        Some(server)
    }

    /// Stops the server with SIGTERM, as an operator does before an
    /// upgrade; [`TestServer::start_again`] starts the next one.
    pub fn stop(&mut self) {
        let problems = self.stop_server();
        assert!(problems.is_empty(), "{}: stopping the server failed: {problems:?}", self.test);
    }

    /// Stops the server with SIGTERM and starts a new one on the same
    /// depot, configuration and network namespace.
    pub fn restart(&mut self) {
        let problems = self.stop_server();
        assert!(problems.is_empty(), "{}: stopping the server failed: {problems:?}", self.test);
        self.start_again(&[]);
    }

    /// Ends the server with SIGKILL, by the pid this harness spawned, and
    /// waits for it.
    pub fn kill_server(&mut self) {
        let mut child = self.child.take().expect("the server is running");
        child.kill().expect("sending SIGKILL to the server");
        child.wait().expect("waiting for the killed server");
    }

    /// Waits for a server that is expected to end by itself (at a fault
    /// point) and returns whether it was killed by a signal, as an abort
    /// is.
    pub fn wait_for_crash(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.child.take().expect("the server is running");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("polling the server") {
                return status.signal().is_some();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a server again on the same depot, with `env` added to its
    /// environment (such as a fault point), and waits for its first ping.
    pub fn start_again(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "{}: the previous server still runs", self.test);
        self.spawn(env);
        self.wait_until_ready();
    }

    /// Appends `lines` to the configuration file, for the next start.
    pub fn add_config(&self, lines: &[&str]) {
        let mut text = fs::read_to_string(&self.config).expect("reading the server configuration");
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        fs::write(&self.config, text).expect("writing the server configuration");
    }

    /// Creates the network namespace with loopback up and a link
    /// holding [`EXTERNAL_IP`], and no route out of the machine.
    fn create_netns(&mut self) {
        run_tool("ip", &["netns", "add", &self.name]);
        self.netns_created = true;
        run_tool("ip", &["-n", &self.name, "link", "set", "lo", "up"]);
        // A veth pair with both ends in the namespace, because not every
        // kernel has the dummy link type.
        run_tool("ip", &["-n", &self.name, "link", "add", EXTERNAL_LINK, "type", "veth", "peer", "name", EXTERNAL_PEER]);
        run_tool("ip", &["-n", &self.name, "addr", "add", &format!("{EXTERNAL_IP}/24"), "dev", EXTERNAL_LINK]);
        run_tool("ip", &["-n", &self.name, "link", "set", EXTERNAL_LINK, "up"]);
        run_tool("ip", &["-n", &self.name, "link", "set", EXTERNAL_PEER, "up"]);
    }

    /// Writes the configuration. The external IP is set, because a
    /// namespace without a route out has no external IP to discover. The
    /// DNS server is set so that containers never get the host's resolvers.
    fn write_config(&self, rootfs: &Path, options: &ServerOptions) -> PathBuf {
        let mut config = format!(
            "bind-socket = {socket:?}\ndepot = {depot:?}\ndefault-rootfs = {rootfs:?}\n\
             default-grace-time = {grace:?}\ntag = {tag:?}\nlog-level = \"debug\"\n\
             external-ip = \"{EXTERNAL_IP}\"\ndns-server = \"{DNS_SERVER}\"\n\
             bridge-idle-time = {idle:?}\n",
            socket = self.socket.display().to_string(),
            depot = self.depot.display().to_string(),
            rootfs = rootfs.display().to_string(),
            grace = options.default_grace_time,
            idle = options.bridge_idle_time,
            tag = self.tag,
        );
        if let Some(max) = options.max_containers {
            config.push_str(&format!("max-containers = {max}\n"));
        }
        for line in &options.extra_config {
            config.push_str(line);
            config.push('\n');
        }
        let path = self.depot.parent().unwrap().join("trellis.toml");
        fs::write(&path, config).expect("writing the server configuration");
        path
    }

    /// Starts the server inside the network namespace.
    ///
    /// The child enters only the network namespace, with setns between fork
    /// and exec. `ip netns exec` would also give the server a new mount
    /// namespace with a fresh sysfs on /sys, which hides the cgroup
    /// hierarchies under /sys/fs/cgroup.
    fn spawn(&mut self, env: &[(&str, &str)]) {
        let config = self.config.clone();
        // Appended to, so the log of a restarted server follows the log of
        // the one before.
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("opening the server log");
        let netns_path = format!("/run/netns/{}", self.name);
        let netns = fs::File::open(&netns_path).unwrap_or_else(|error| panic!("opening {netns_path} failed: {error}"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_trellis"));
        command
            .arg("server")
            .arg("--config")
            .arg(&config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log file handle"))
            .stderr(log);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the setns system call on a descriptor opened before the fork.
        unsafe {
            command.pre_exec(move || {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().expect("starting `trellis server` in its network namespace");
        self.child = Some(child);
    }

    /// Waits until the server replies to a ping; false when it exits or
    /// does not reply in time.
    fn try_wait_until_ready(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.as_mut().map(|child| child.try_wait()) {
                Some(Ok(None)) => {}
                _ => return false,
            }
            if self.socket.exists() && self.runtime.block_on(self.client.ping()).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("polling the server") {
                panic!(
                    "{}: the server exited with {status} before answering a ping; its log:\n{}",
                    self.test,
                    self.log_text()
                );
            }
            if self.socket.exists() {
                let client = self.client.clone();
                if self.runtime.block_on(client.ping()).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: the server did not answer a ping within {START_TIMEOUT:?}; its log:\n{}",
                self.test,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Returns the server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Runs `future` on this server's runtime. Panics when it takes longer
    /// than [`CALL_TIMEOUT`], so that a request the server never completes
    /// fails the test instead of hanging it.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        // The timer must be created inside the runtime.
        match self.runtime.block_on(async { tokio::time::timeout(CALL_TIMEOUT, future).await }) {
            Ok(output) => output,
            Err(_) => panic!("{}: a client call did not finish within {CALL_TIMEOUT:?}", self.test),
        }
    }

    /// Returns a handle that no other test or server uses.
    pub fn unique_handle(&self, label: &str) -> String {
        let number = self.handle_counter.fetch_add(1, Ordering::SeqCst);
        format!("{}-{label}-{number}", self.name)
    }

    /// Creates a container with a unique handle and the default rootfs.
    pub fn create(&self, label: &str) -> String {
        let spec = ContainerSpec {
            handle: self.unique_handle(label),
            ..ContainerSpec::default()
        };
        self.block_on(self.client.create(&spec))
            .unwrap_or_else(|error| panic!("{}: creating a container failed: {error}", self.test))
    }

    /// Creates a container with a unique handle, the default rootfs and
    /// `limits`.
    pub fn create_with_limits(&self, label: &str, limits: trellis::api::Limits) -> String {
        let spec = ContainerSpec { handle: self.unique_handle(label), limits, ..ContainerSpec::default() };
        self.block_on(self.client.create(&spec))
            .unwrap_or_else(|error| panic!("{}: creating {label} failed: {error}", self.test))
    }

    /// Sends one JSON request over the server's Unix socket and returns the
    /// status and body, for routes the client has no call for (the 2015 PUT
    /// limit routes) or bodies it would not send.
    pub fn raw_request(&self, method: &str, target: &str, body: &str) -> (u16, String) {
        use std::io::Read;
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let request = format!(
            "{method} {target} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split(' ').nth(1).unwrap().parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    /// Runs a process to completion and returns its output and status.
    pub fn run(&self, handle: &str, spec: &ProcessSpec, stdin: Option<Vec<u8>>) -> Result<ProcessOutput, ClientError> {
        self.block_on(run_to_completion(&self.client, handle, spec, stdin))
    }

    /// Runs `path` with `args` to completion; panics when a request fails.
    pub fn run_command(&self, handle: &str, path: &str, args: &[&str]) -> ProcessOutput {
        let spec = command_spec(path, args);
        self.run(handle, &spec, None)
            .unwrap_or_else(|error| panic!("{}: running {path} {args:?} failed: {error}", self.test))
    }

    /// Sends `GET path` to the server's debug listener (its default
    /// address, inside the server's network namespace) and returns the
    /// status and body.
    pub fn debug_get(&self, path: &str) -> (u16, String) {
        use std::io::Read;
        let namespace_path = format!("/run/netns/{}", self.name);
        let raw = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let namespace = fs::File::open(&namespace_path).expect("opening the server's network namespace");
                    nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("entering the server's network namespace");
                    let mut stream =
                        std::net::TcpStream::connect("127.0.0.1:17013").expect("connecting to the debug listener");
                    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
                    let mut raw = Vec::new();
                    stream.read_to_end(&mut raw).expect("reading the debug reply");
                    raw
                })
                .join()
                .expect("the debug request thread panicked")
        });
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("the debug reply has a head");
        let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("a status code");
        (status, body.to_string())
    }

    /// Returns the actor snapshot of the server's debug listener.
    pub fn introspect(&self) -> serde_json::Value {
        let (status, body) = self.debug_get("/debug/introspect");
        assert_eq!(status, 200, "{}: introspection failed: {body}", self.test);
        serde_json::from_str(&body).expect("introspection returns JSON")
    }

    /// Returns the server's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|error| format!("(cannot read {}: {error})", self.log.display()))
    }

    /// Destroys every container the server still lists.
    fn destroy_remaining(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let listed = self.runtime.block_on(async {
            tokio::time::timeout(CLEANUP_CALL_TIMEOUT, self.client.list(&Default::default())).await
        });
        let handles = match listed {
            Ok(Ok(handles)) => handles,
            Ok(Err(error)) => return vec![format!("listing containers failed: {error}")],
            Err(_) => return vec!["listing containers timed out".into()],
        };
        for handle in handles {
            let destroyed = self.runtime.block_on(async {
                tokio::time::timeout(CLEANUP_CALL_TIMEOUT, self.client.destroy(&handle)).await
            });
            match destroyed {
                Ok(Ok(())) | Ok(Err(ClientError::ContainerNotFound { .. })) => {}
                Ok(Err(error)) => problems.push(format!("destroying {handle} failed: {error}")),
                Err(_) => problems.push(format!("destroying {handle} timed out")),
            }
        }
        problems
    }

    /// Stops the server with SIGTERM, then SIGKILL if it does not exit.
    fn stop_server(&mut self) -> Vec<String> {
        let Some(mut child) = self.child.take() else { return Vec::new() };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        if let Ok(Some(_)) = child.try_wait() {
            return vec![format!("the server (pid {pid}) had already exited")];
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return Vec::new();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        vec![format!("the server (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT:?} and was killed")]
    }

    /// Lists objects left behind: cgroups named with the tag, mounts under
    /// the depot, and processes that name the tag or the depot.
    ///
    /// While the server runs, its spare garden-init waits in cgroups named
    /// `spare@...` below the tag: those belong to the server, not to a
    /// container, and are not listed. Once the server has stopped they are.
    pub fn leftovers(&self) -> Vec<String> {
        let running = self.child.is_some();
        let spare_marker = format!("/{}/spare@", self.tag);
        let mut found = Vec::new();
        for cgroup in cgroups_named(&self.tag) {
            if running && holds_only_spares(&cgroup) {
                continue;
            }
            found.push(format!("cgroup {}", cgroup.display()));
        }
        for mount in mounts_under(Path::new("/proc/self/mountinfo"), &self.depot) {
            found.push(format!("mount {mount}"));
        }
        for (pid, command) in processes_naming(&[&self.tag, &self.depot.to_string_lossy()]) {
            found.push(format!("process {pid}: {command}"));
        }
        for (pid, command) in processes_in_cgroups_named(&self.tag) {
            let in_spare = fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|cgroups| cgroups.contains(&spare_marker));
            if running && in_spare {
                continue;
            }
            found.push(format!("process {pid} in a {} cgroup: {command}", self.tag));
        }
        // Process shims work in their process's directory in the depot.
        for (pid, command) in processes_working_under(&self.depot) {
            found.push(format!("process {pid} working under the depot: {command}"));
        }
        found
    }

    /// Runs a command inside the server's network namespace and returns
    /// its standard output.
    pub fn in_netns(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        let output = Command::new("ip").args(&full).output().map_err(|error| format!("running ip {full:?} failed: {error}"))?;
        if !output.status.success() {
            return Err(format!("ip {full:?} failed with {}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Lists the server's network objects that belong to a container, in
    /// its network namespace: links named with the tag, per-container nft
    /// chains and map entries. Empty once every container is destroyed.
    pub fn network_leftovers(&self) -> Vec<String> {
        // The kernel deletes a destroyed container's veth pair with its
        // network namespace, and the server deletes a bridge without
        // containers in the background, so links get a moment to go.
        let deadline = Instant::now() + LINK_TEARDOWN_WAIT;
        let mut found = loop {
            let links = self.links_of_tag();
            if links.is_empty() || Instant::now() >= deadline {
                break links;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let table = format!("trellis_{}", self.tag);
        match self.in_netns("nft", &["list", "table", "ip", &table]) {
            Ok(text) => {
                let mut block = "";
                for line in text.lines().map(str::trim) {
                    if line.starts_with("set ") || line.starts_with("map ") || line.starts_with("chain ") {
                        block = line;
                    }
                    let per_container = ["chain b_", "chain c_", "chain o_", "chain n_", "jump b_", "jump c_", "jump n_"].iter().any(|needle| line.contains(needle));
                    // The deny set is configuration; the other sets and
                    // maps have one entry per subnet, container or port.
                    let container_entry = line.starts_with("elements = ") && !block.starts_with("set deny");
                    if per_container || container_entry {
                        found.push(format!("nft: {line}"));
                    }
                }
            }
            // A server that failed before it wrote its table leaves none.
            Err(error) if error.contains("No such file or directory") => {}
            Err(error) => found.push(error),
        }
        found
    }

    /// Lists the server's bridges and host veths, as leftover lines.
    pub fn links_of_tag(&self) -> Vec<String> {
        let mut found = Vec::new();
        let prefix: String = self.tag.chars().take(8).collect();
        match self.in_netns("ip", &["-o", "link", "show"]) {
            Ok(links) => {
                for line in links.lines() {
                    let name = line.split(':').nth(1).unwrap_or("").trim().split('@').next().unwrap_or("");
                    if name.starts_with(&format!("{prefix}b")) || name.starts_with(&format!("{prefix}h")) {
                        found.push(format!("link {name}"));
                    }
                }
            }
            Err(error) => found.push(error),
        }
        found
    }

    /// Prints what helps to understand a failure.
    fn dump_state(&self) {
        eprintln!("==== {}: state after the failure ====", self.test);
        eprintln!("-- mounts under {} (test's mount namespace):", self.depot.display());
        for mount in mounts_under(Path::new("/proc/self/mountinfo"), &self.depot) {
            eprintln!("  {mount}");
        }
        if self.pid() != 0 {
            let server_mountinfo = PathBuf::from(format!("/proc/{}/mountinfo", self.pid()));
            eprintln!("-- mounts under the depot (server's mount namespace):");
            for mount in mounts_under(&server_mountinfo, &self.depot) {
                eprintln!("  {mount}");
            }
        }
        eprintln!("-- cgroups named like {}:", self.tag);
        for cgroup in cgroups_named(&self.tag) {
            eprintln!("  {}", cgroup.display());
        }
        eprintln!("-- server log ({}):\n{}", self.log.display(), self.log_text());
        eprintln!("==== end of state ====");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            self.dump_state();
        }

        let mut problems = Vec::new();
        if self.child.is_none() && self.netns_created && !self.config.as_os_str().is_empty() {
            // The test ended while its server was down (killed or crashed):
            // a new server on the depot destroys what the old one left.
            self.spawn(&[]);
            if !self.try_wait_until_ready() {
                problems.push("the server started for cleanup did not answer a ping".to_string());
            }
        }
        let server_running = self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)));
        if server_running {
            problems.extend(self.destroy_remaining());
            problems.extend(self.network_leftovers().into_iter().map(|leftover| format!("left behind after destroy: {leftover}")));
        }
        problems.extend(self.stop_server());
        if self.netns_created {
            if let Err(error) = try_tool("ip", &["netns", "delete", &self.name]) {
                problems.push(error);
            }
        }

        if self.depot_tmpfs {
            if let Err(error) = nix::mount::umount(&self.depot) {
                problems.push(format!("unmounting the depot's tmpfs failed: {error}"));
            }
        }
        let leftovers = self.leftovers();
        problems.extend(leftovers.iter().map(|leftover| format!("left behind: {leftover}")));
        if let Some(temp) = self.temp.take() {
            let directory = temp.keep();
            remove_tree_if_unmounted(&directory);
        }

        if problems.is_empty() {
            return;
        }
        let report = format!("{}: cleanup found problems:\n  {}", self.test, problems.join("\n  "));
        // A panic while unwinding aborts the test binary, so then the
        // report only goes to stderr.
        if panicking {
            eprintln!("{report}");
        } else {
            panic!("{report}");
        }
    }
}

/// Runs a command with the host's tools; panics when it fails.
fn run_tool(program: &str, args: &[&str]) {
    if let Err(error) = try_tool(program, args) {
        panic!("{error}");
    }
}

fn try_tool(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|error| format!("running {program} {args:?} failed: {error}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{program} {args:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// Returns whether `dir` has child cgroups and all of them are a server's
/// spare cgroups (named `spare@...`).
fn holds_only_spares(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else { return false };
    let children: Vec<String> =
        entries.flatten().filter(|entry| entry.path().is_dir()).map(|entry| entry.file_name().to_string_lossy().into_owned()).collect();
    !children.is_empty() && children.iter().all(|name| name.starts_with("spare@"))
}

/// Returns cgroup directories whose name contains `pattern`.
pub fn cgroups_named(pattern: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
    while let Some((directory, depth)) = pending.pop() {
        let Ok(entries) = fs::read_dir(&directory) else { continue };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if !kind.is_dir() {
                continue;
            }
            let path = entry.path();
            if entry.file_name().to_string_lossy().contains(pattern) {
                found.push(path.clone());
            }
            if depth < 8 {
                pending.push((path, depth + 1));
            }
        }
    }
    found.sort();
    found
}

/// Returns processes whose working directory is below `directory`.
pub fn processes_working_under(directory: &Path) -> Vec<(u32, String)> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let Ok(cwd) = fs::read_link(entry.path().join("cwd")) else { continue };
        if cwd.starts_with(directory) {
            let command = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let command = String::from_utf8_lossy(&command).replace('\0', " ");
            found.push((pid, command.trim().to_string()));
        }
    }
    found
}

/// Returns processes other than this one whose command line contains one of
/// `patterns`.
pub fn processes_naming(patterns: &[&str]) -> Vec<(u32, String)> {
    let own = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == own {
            continue;
        }
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else { continue };
        let command = String::from_utf8_lossy(&raw).replace('\0', " ");
        if patterns.iter().any(|pattern| command.contains(pattern)) {
            found.push((pid, command.trim_end().to_string()));
        }
    }
    found
}

/// Returns processes whose cgroup path, in any hierarchy, contains
/// `pattern`.
pub fn processes_in_cgroups_named(pattern: &str) -> Vec<(u32, String)> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cgroups) = fs::read_to_string(entry.path().join("cgroup")) else { continue };
        if cgroups.contains(pattern) {
            let command = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&command).replace('\0', " ").trim_end().to_string()));
        }
    }
    found
}

/// Returns a process spec for `path` with `args` and nothing else.
pub fn command_spec(path: &str, args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        path: path.to_string(),
        args: args.iter().map(|arg| arg.to_string()).collect(),
        ..ProcessSpec::default()
    }
}

/// What a finished process wrote and how it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: i64,
}

impl ProcessOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs a process with stdout and stderr attached and, when given, `stdin`
/// sent and then closed; returns its output once it exited.
pub async fn run_to_completion(
    client: &Client,
    handle: &str,
    spec: &ProcessSpec,
    stdin: Option<Vec<u8>>,
) -> Result<ProcessOutput, ClientError> {
    let stdout = SharedOutput::default();
    let stderr = SharedOutput::default();
    let io = ProcessIo {
        stdin: stdin.map(|bytes| Box::new(std::io::Cursor::new(bytes)) as _),
        stdout: Some(Box::new(stdout.clone())),
        stderr: Some(Box::new(stderr.clone())),
    };
    let mut process = client.run(handle, spec, io).await?;
    let status = process.wait().await?;
    Ok(ProcessOutput {
        stdout: stdout.take(),
        stderr: stderr.take(),
        status,
    })
}

/// An output writer that collects everything written to it.
#[derive(Clone, Default)]
pub struct SharedOutput(Arc<Mutex<Vec<u8>>>);

impl SharedOutput {
    /// Returns the bytes collected so far and clears the buffer.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    /// Returns whether the bytes collected so far contain `needle`.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.0.lock().unwrap().windows(needle.len()).any(|window| window == needle)
    }

    /// Returns the number of bytes collected so far.
    pub fn count_lines(&self) -> usize {
        self.0.lock().unwrap().iter().filter(|byte| **byte == b'\n').count()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// How long [`wait_for_output`] waits before it fails the test.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until `output` contains at least `length` bytes; panics after a
/// minute, so that a lost byte fails the test instead of hanging it.
pub async fn wait_for_output(output: &SharedOutput, length: usize, what: &str) {
    let deadline = Instant::now() + OUTPUT_TIMEOUT;
    while output.len() < length {
        assert!(
            Instant::now() < deadline,
            "waited {OUTPUT_TIMEOUT:?} for {what}: have {} of {length} bytes",
            output.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl tokio::io::AsyncWrite for SharedOutput {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().write_all(bytes)?;
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
