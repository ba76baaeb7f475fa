//! The crun block: the same work as a Garden create, run and destroy done
//! with `crun` and iproute2, in a child process with private mount and
//! network namespaces.
//!
//! The child unmounts the cgroup v2 hierarchy in its own mount namespace,
//! because crun 1.8 rejects a hybrid host whose v2 hierarchy it cannot
//! use. The cgroup v1 controllers stay, so crun places containers exactly
//! where Trellis does. Each container gets what a Trellis container gets:
//! an overlay of the same rootfs; user, mount, pid, network, IPC and UTS
//! namespaces; a cgroup; and a veth pair whose container end is created
//! directly inside its network namespace.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::host::{self, CpuCgroup, Overlay};
use crate::Plan;

/// The flag that makes the benchmark binary run this block.
pub const BLOCK_FLAG: &str = "--crun-block";

/// Measurements of the block, sent back to the parent as JSON.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub version: String,
    pub g1: Vec<f64>,
    pub g2: Vec<f64>,
    pub g3: Vec<f64>,
    pub g4: Vec<f64>,
    pub g5: Vec<f64>,
    pub g6: Vec<f64>,
    pub g7: Vec<f64>,
}

/// Returns whether crun is installed.
pub fn available() -> bool {
    Command::new("crun").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Runs the block in a child process and returns its results.
pub fn measure(plan: &Plan, rootfs: &Path) -> Result<Results, String> {
    let name = format!("trellisbench-crun-{}", std::process::id());
    let cgroup = CpuCgroup::create(&name)?;
    let temp = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir()
        .map_err(|error| error.to_string())?;
    let output = temp.path().join("results.json");
    let procs = CString::new(cgroup.procs_file().into_os_string().into_encoded_bytes()).expect("no NUL in a path");
    let mut command = Command::new(std::env::current_exe().map_err(|error| error.to_string())?);
    command
        .arg(BLOCK_FLAG)
        .arg(serde_json::to_string(plan).expect("a plan serialises"))
        .arg(rootfs)
        .arg(temp.path())
        .arg(&output)
        .arg(&name)
        .stdin(Stdio::null());
    // SAFETY: between fork and exec the child makes the unshare system
    // call and writes its cgroup's procs file with raw system calls.
    unsafe {
        command.pre_exec(move || {
            host::join_cgroup_raw(&procs)?;
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS | nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command.spawn().map_err(|error| format!("starting the crun block: {error}"))?;
    let deadline = Instant::now() + block_timeout(plan);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|error| error.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            eprintln!("bench: the crun block is still running after {:?}; killing pid {}", block_timeout(plan), child.id());
            let _ = child.kill();
            break child.wait().map_err(|error| error.to_string())?;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // crun made the same path in every other v1 hierarchy; remove those
    // too, now that every container is gone.
    remove_crun_cgroups(&name);
    drop(cgroup);
    if !status.success() {
        return Err(format!("the crun block failed with {status}"));
    }
    let text = fs::read_to_string(&output).map_err(|error| format!("reading the crun results: {error}"))?;
    serde_json::from_str(&text).map_err(|error| format!("parsing the crun results: {error}"))
}

/// Returns how long the crun block may run before it counts as hung.
fn block_timeout(plan: &Plan) -> Duration {
    if plan.mode == "full" {
        Duration::from_secs(1800)
    } else {
        Duration::from_secs(300)
    }
}

fn remove_crun_cgroups(name: &str) {
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else { return };
    for hierarchy in hierarchies.flatten() {
        let path = hierarchy.path().join(name);
        if path.exists() {
            host::remove_cgroup_tree(&path);
        }
    }
}

/// Entry point of the child process.
pub fn block_main(args: &[String]) -> Result<(), String> {
    let [plan, rootfs, work, output, name] = args else {
        return Err(format!("{BLOCK_FLAG} takes PLAN ROOTFS WORKDIR OUTPUT NAME"));
    };
    let plan: Plan = serde_json::from_str(plan).map_err(|error| error.to_string())?;
    // Mounts made here must not reach the host's namespace.
    nix::mount::mount(None::<&str>, "/", None::<&str>, nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(|error| format!("making / private: {error}"))?;
    for mount in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"] {
        if is_cgroup2(mount) {
            nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|error| format!("unmounting {mount}: {error}"))?;
        }
    }
    host::run("ip", &["link", "set", "lo", "up"])?;
    let bench = Bench::new(Path::new(rootfs), Path::new(work), name)?;
    let results = bench.measure(&plan);
    bench.cleanup();
    let results = results?;
    fs::write(output, serde_json::to_string(&results).expect("results serialise")).map_err(|error| error.to_string())
}

fn is_cgroup2(mount_point: &str) -> bool {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            fields.get(1) == Some(&mount_point) && fields.get(2) == Some(&"cgroup2")
        })
}

struct Bench {
    rootfs: PathBuf,
    work: PathBuf,
    state: PathBuf,
    cgroup_parent: String,
    counter: AtomicUsize,
}

/// One crun container with its overlay.
struct Container {
    id: String,
    overlay: Overlay,
    bundle: PathBuf,
}

impl Bench {
    fn new(rootfs: &Path, work: &Path, name: &str) -> Result<Bench, String> {
        let state = work.join("crun-state");
        fs::create_dir_all(&state).map_err(|error| error.to_string())?;
        Ok(Bench {
            rootfs: rootfs.to_path_buf(),
            work: work.to_path_buf(),
            state,
            cgroup_parent: name.to_string(),
            counter: AtomicUsize::new(0),
        })
    }

    fn crun(&self) -> Command {
        let mut command = Command::new("crun");
        command.arg("--root").arg(&self.state);
        command
    }

    /// Runs crun to completion. Its stdout goes nowhere and its stderr to a
    /// file: a container started by `create` or `run` inherits both, so a
    /// pipe would stay open as long as the container lives.
    fn crun_ok(&self, args: &[&str]) -> Result<(), String> {
        let log = self.work.join(format!("crun-{}.err", self.counter.fetch_add(1, Ordering::SeqCst)));
        let stderr = fs::File::create(&log).map_err(|error| error.to_string())?;
        let status = self
            .crun()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .status()
            .map_err(|error| format!("starting crun: {error}"))?;
        let message = fs::read_to_string(&log).unwrap_or_default();
        let _ = fs::remove_file(&log);
        if status.success() {
            return Ok(());
        }
        Err(format!("crun {} failed with {status}: {}", args.join(" "), message.trim()))
    }

    /// Prepares the overlay and bundle of a new container running `args`.
    fn prepare(&self, args: &[&str]) -> Result<Container, String> {
        let number = self.counter.fetch_add(1, Ordering::SeqCst);
        let id = format!("tb{number}");
        let dir = self.work.join(&id);
        let overlay = Overlay::mount(&self.rootfs, &dir.join("rootfs"))?;
        let bundle = dir.join("bundle");
        fs::create_dir_all(&bundle).map_err(|error| error.to_string())?;
        let config = oci_config(&overlay.merged, &id, &self.cgroup_parent, args);
        fs::write(bundle.join("config.json"), config.to_string()).map_err(|error| error.to_string())?;
        Ok(Container { id, overlay, bundle })
    }

    /// Overlay, `crun create`, veth, `crun start`: a Garden create.
    fn create(&self) -> Result<Container, String> {
        let container = self.prepare(&["/bin/sleep", "100000000"])?;
        let bundle = container.bundle.display().to_string();
        // The pid file saves a `crun state` process per create.
        let pid_file = container.bundle.join("pid");
        self.crun_ok(&["create", "--bundle", &bundle, "--pid-file", &pid_file.display().to_string(), &container.id])?;
        let pid = read_pid(&pid_file)?;
        self.add_network(&container.id, pid)?;
        self.crun_ok(&["start", &container.id])?;
        Ok(container)
    }

    /// Adds a /30 network per container, as Trellis allocates. The container
    /// end of the veth pair is created inside its network namespace.
    fn add_network(&self, id: &str, pid: u32) -> Result<(), String> {
        let number: u32 = id.trim_start_matches("tb").parse().unwrap_or(0);
        let base = 4 * (number % 16_000);
        let (a, b) = ((base >> 8) & 0xff, base & 0xff);
        let host = format!("10.253.{a}.{}", b + 1);
        let guest = format!("10.253.{a}.{}", b + 2);
        let link = format!("{id}h");
        let host_side = format!(
            "link add {link} type veth peer name eth0 netns {pid}\naddr add {host}/30 dev {link}\nlink set {link} up\n"
        );
        host::run_with_input("ip", &["-b", "-"], host_side.as_bytes())?;
        let guest_side = format!("link set lo up\naddr add {guest}/30 dev eth0\nlink set eth0 up\nroute add default via {host}\n");
        let netns = format!("--net=/proc/{pid}/ns/net");
        host::run_with_input("nsenter", &[&netns, "ip", "-b", "-"], guest_side.as_bytes())
    }

    /// `crun exec` until the first stdout byte; returns that instant.
    fn exec_first_output(&self, id: &str, args: &[&str]) -> Result<Instant, String> {
        let mut child = self
            .crun()
            .arg("exec")
            .arg(id)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| error.to_string())?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut byte = [0_u8; 1];
        let read = stdout.read(&mut byte).map_err(|error| error.to_string())?;
        let first = Instant::now();
        let mut rest = Vec::new();
        let _ = stdout.read_to_end(&mut rest);
        let output = child.wait_with_output().map_err(|error| error.to_string())?;
        if read == 0 || !output.status.success() {
            return Err(format!("crun exec {id} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim()));
        }
        Ok(first)
    }

    /// `crun delete -f` and overlay teardown: a Garden destroy.
    fn destroy(&self, container: Container) -> Result<(), String> {
        self.crun_ok(&["delete", "-f", &container.id])?;
        container.overlay.remove()?;
        fs::remove_dir_all(container.bundle.parent().unwrap()).map_err(|error| error.to_string())
    }

    /// `crun run` of `/bin/true` on a fresh overlay, then teardown.
    fn run_true(&self) -> Result<(), String> {
        let container = self.prepare(&["/bin/true"])?;
        let bundle = container.bundle.display().to_string();
        self.crun_ok(&["run", "--bundle", &bundle, &container.id])?;
        container.overlay.remove()?;
        fs::remove_dir_all(container.bundle.parent().unwrap()).map_err(|error| error.to_string())
    }

    fn measure(&self, plan: &Plan) -> Result<Results, String> {
        let mut results = Results {
            version: String::from_utf8_lossy(&self.crun().arg("--version").output().map_err(|e| e.to_string())?.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            ..Results::default()
        };
        for _ in 0..plan.warmup {
            let container = self.create()?;
            self.exec_first_output(&container.id, &["/bin/echo", "hello"])?;
            self.destroy(container)?;
        }
        for _ in 0..plan.count(&["G1"], plan.iterations) {
            let started = Instant::now();
            let container = self.create()?;
            let first = self.exec_first_output(&container.id, &["/bin/echo", "hello"])?;
            results.g1.push(millis(first - started));
            self.destroy(container)?;
        }
        for _ in 0..plan.count(&["G2", "G4"], plan.iterations) {
            let started = Instant::now();
            let container = self.create()?;
            results.g2.push(millis(started.elapsed()));
            let started = Instant::now();
            self.destroy(container)?;
            results.g4.push(millis(started.elapsed()));
        }
        let container = self.create()?;
        for _ in 0..plan.count(&["G3"], plan.iterations) {
            let started = Instant::now();
            let first = self.exec_first_output(&container.id, &["/bin/echo", "hello"])?;
            results.g3.push(millis(first - started));
        }
        self.destroy(container)?;

        for _ in 0..plan.count(&["G5"], plan.cycle_rounds) {
            let started = Instant::now();
            std::thread::scope(|scope| {
                let workers: Vec<_> = (0..2)
                    .map(|_| {
                        scope.spawn(|| {
                            for _ in 0..plan.cycles_per_client {
                                self.run_true()?;
                            }
                            Ok::<(), String>(())
                        })
                    })
                    .collect();
                workers.into_iter().try_for_each(|worker| worker.join().expect("worker panicked"))
            })?;
            results.g5.push((2 * plan.cycles_per_client) as f64 / started.elapsed().as_secs_f64());
        }

        let created = std::sync::Mutex::new(Vec::new());
        let latencies = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..plan.count(&["G6"], 5))
                .map(|_| {
                    let created = &created;
                    scope.spawn(move || {
                        let mut latencies = Vec::new();
                        for _ in 0..plan.concurrent_creates {
                            let started = Instant::now();
                            let container = self.create()?;
                            latencies.push(millis(started.elapsed()));
                            created.lock().unwrap().push(container);
                        }
                        Ok::<Vec<f64>, String>(latencies)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for worker in workers {
                all.extend(worker.join().expect("worker panicked")?);
            }
            Ok::<Vec<f64>, String>(all)
        });
        for container in created.into_inner().unwrap() {
            self.destroy(container)?;
        }
        results.g6 = latencies?;

        let cgroup = Path::new(host::CPUACCT).join(&self.cgroup_parent).join("cpuacct.usage");
        let usage = || -> Result<u64, String> {
            fs::read_to_string(&cgroup).map_err(|e| e.to_string())?.trim().parse().map_err(|e: std::num::ParseIntError| e.to_string())
        };
        for _ in 0..plan.count(&["G7"], plan.iterations) {
            let before = usage()?;
            let container = self.create()?;
            self.destroy(container)?;
            std::thread::sleep(Duration::from_millis(20));
            results.g7.push((usage()? - before) as f64 / 1e6);
        }
        Ok(results)
    }

    /// Deletes whatever a failed measurement left.
    fn cleanup(&self) {
        if let Ok(output) = self.crun().args(["list", "-q"]).output() {
            for id in String::from_utf8_lossy(&output.stdout).lines() {
                let _ = self.crun().args(["delete", "-f", id]).output();
            }
        }
        if let Ok(entries) = fs::read_dir(&self.work) {
            for entry in entries.flatten() {
                let merged = entry.path().join("rootfs/merged");
                let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Builds the OCI configuration of one container: the namespaces, mounts,
/// masks and mappings of an unprivileged Garden container.
fn oci_config(root: &Path, id: &str, cgroup_parent: &str, args: &[&str]) -> serde_json::Value {
    let capabilities = [
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
        "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    // Container root maps to an unprivileged host range, as in an
    // unprivileged Garden container.
    let mapping = serde_json::json!([{ "containerID": 0, "hostID": 1_000_000, "size": 65536 }]);
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": capabilities, "effective": capabilities, "permitted": capabilities,
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": false
        },
        "root": { "path": root, "readonly": false },
        "hostname": id,
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "uidMappings": mapping,
            "gidMappings": mapping,
            "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }, { "type": "user" }
            ],
            "cgroupsPath": format!("/{cgroup_parent}/{id}"),
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Reads the pid that `crun create --pid-file` wrote.
fn read_pid(path: &Path) -> Result<u32, String> {
    let text = fs::read_to_string(path).map_err(|error| format!("failed to read crun's pid file {}: {error}", path.display()))?;
    text.trim().parse().map_err(|error| format!("invalid pid {text:?} in {}: {error}", path.display()))
}
