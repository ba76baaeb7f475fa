//! The Trellis block: a `trellis server` in a private network namespace and
//! a cpuacct cgroup of its own, driven through the Garden API by this
//! process over a Unix socket.

use std::ffi::CString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;
use trellis::api::{ContainerSpec, ProcessSpec};
use trellis::client::{Client, ProcessIo, Target};

use crate::host::{self, CpuCgroup, Netns};
use crate::Plan;

/// How long the server may take to respond to its first ping.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One reading of Trellis's memory, in KiB.
pub struct MemoryReading {
    /// Proportional set size (PSS) of the server alone.
    pub server: u64,
    /// Anonymous memory of the server, or `None` when the kernel does not
    /// report it. Its PSS is no measure of growth, because it falls as
    /// each new garden-init shares more of the binary's pages.
    pub server_anon: Option<u64>,
    /// PSS of the server, its shims, the spare shim and each container's
    /// garden-init: Trellis's overhead per container.
    pub total: u64,
}

/// A running server and the client that drives it.
pub struct Server {
    pub client: Client,
    pub cgroup: CpuCgroup,
    child: Option<Child>,
    pub log: PathBuf,
    // Dropped after the child is gone: the namespace, then the files.
    _netns: Netns,
    _temp: tempfile::TempDir,
}

impl Server {
    /// Starts `binary` with a fresh depot, a unique tag and `rootfs`.
    pub fn start(binary: &Path, rootfs: &Path, name: &str, runtime: &tokio::runtime::Runtime) -> Result<Server, String> {
        let temp = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .map_err(|error| format!("creating a temporary directory: {error}"))?;
        let depot = temp.path().join("depot");
        fs::create_dir(&depot).map_err(|error| format!("creating the depot: {error}"))?;
        let socket = temp.path().join("garden.sock");
        let log = temp.path().join("server.log");
        let config = temp.path().join("trellis.toml");
        // The tag names host objects, so it is short and unique to this run.
        let tag = format!("b{:x}", std::process::id() % 0x00ff_ffff);
        fs::write(
            &config,
            format!(
                "bind-socket = {socket:?}\ndepot = {depot:?}\ndefault-rootfs = {rootfs:?}\n\
                 tag = {tag:?}\nlog-level = \"error\"\nexternal-ip = {external:?}\ndns-server = {dns:?}\n",
                external = host::EXTERNAL_IP,
                dns = host::DNS_SERVER,
                socket = socket.display().to_string(),
                depot = depot.display().to_string(),
                rootfs = rootfs.display().to_string(),
            ),
        )
        .map_err(|error| format!("writing {}: {error}", config.display()))?;

        let netns = Netns::create(name)?;
        let cgroup = CpuCgroup::create(name)?;
        let netns_file = fs::File::open(netns.path()).map_err(|error| format!("opening the namespace: {error}"))?;
        let procs = CString::new(cgroup.procs_file().into_os_string().into_encoded_bytes()).expect("no NUL in a path");
        let log_file = fs::File::create(&log).map_err(|error| format!("creating {}: {error}", log.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("server")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|error| error.to_string())?)
            .stderr(log_file);
        // SAFETY: between fork and exec the child only makes the setns
        // system call on a descriptor opened before the fork and writes to
        // its cgroup's procs file with raw system calls. Joining the cgroup
        // before exec matters: the server reads its own cgroup at start-up
        // to place containers below it, so their CPU time is charged to the
        // same counter.
        unsafe {
            command.pre_exec(move || {
                nix::sched::setns(&netns_file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                host::join_cgroup_raw(&procs)
            });
        }
        let child = command.spawn().map_err(|error| format!("starting {}: {error}", binary.display()))?;
        let server = Server {
            client: Client::new(Target::Unix(socket.clone())),
            cgroup,
            child: Some(child),
            log,
            _netns: netns,
            _temp: temp,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if socket.exists() && runtime.block_on(server.client.ping()).is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!("the server did not respond to a ping within 60 s; its log:\n{}", server.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Reads the memory of the server and of every Trellis process in its
    /// cgroup tree. Trellis processes are those running the server's
    /// executable: a shim's name is `exe` until its process execs, so
    /// names do not tell.
    pub fn memory_kib(&self) -> MemoryReading {
        let own = host::pss_kib(self.pid()).unwrap_or(0);
        let executable = std::fs::read_link(format!("/proc/{}/exe", self.pid())).ok();
        let total = host::cgroup_pids(&self.cgroup.path)
            .into_iter()
            .filter(|pid| executable.is_some() && std::fs::read_link(format!("/proc/{pid}/exe")).ok() == executable)
            .filter_map(host::pss_kib)
            .sum();
        MemoryReading { server: own, server_anon: host::anon_kib(self.pid()), total }
    }

    /// Stops the server with SIGTERM, waiting for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: the server ignored SIGTERM; killing pid {pid}");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A writer that records when its first byte arrives and counts the rest.
struct Probe {
    first: Arc<Mutex<Option<Instant>>>,
    bytes: Arc<AtomicU64>,
}

impl AsyncWrite for Probe {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        if !data.is_empty() {
            let mut first = self.first.lock().unwrap();
            if first.is_none() {
                *first = Some(Instant::now());
            }
        }
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Observations of one finished run.
pub struct RunOutcome {
    pub first_output: Option<Instant>,
    pub bytes: u64,
}

fn spec(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        path: args[0].to_string(),
        args: args[1..].iter().map(|arg| arg.to_string()).collect(),
        user: "root".into(),
        ..ProcessSpec::default()
    }
}

/// Runs `args` in `handle` to completion, recording the first stdout byte.
pub async fn run(client: &Client, handle: &str, args: &[&str]) -> Result<RunOutcome, String> {
    let first = Arc::new(Mutex::new(None));
    let bytes = Arc::new(AtomicU64::new(0));
    let io = ProcessIo {
        stdout: Some(Box::new(Probe {
            first: first.clone(),
            bytes: bytes.clone(),
        })),
        ..ProcessIo::default()
    };
    let mut process = client
        .run(handle, &spec(args), io)
        .await
        .map_err(|error| format!("running {args:?} in {handle}: {error}"))?;
    let status = process.wait().await.map_err(|error| format!("waiting for {args:?}: {error}"))?;
    if status != 0 {
        return Err(format!("{args:?} in {handle} exited with {status}"));
    }
    let first_output = *first.lock().unwrap();
    Ok(RunOutcome {
        first_output,
        bytes: bytes.load(Ordering::Relaxed),
    })
}

pub async fn create(client: &Client, handle: &str) -> Result<(), String> {
    let spec = ContainerSpec {
        handle: handle.to_string(),
        ..ContainerSpec::default()
    };
    client
        .create(&spec)
        .await
        .map(|_| ())
        .map_err(|error| format!("creating {handle}: {error}"))
}

pub async fn destroy(client: &Client, handle: &str) -> Result<(), String> {
    client.destroy(handle).await.map_err(|error| format!("destroying {handle}: {error}"))
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn mib_per_second(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

/// Every Trellis measurement, in the order of design section 7.
pub struct Results {
    pub g1: Vec<f64>,
    pub g2: Vec<f64>,
    pub g3: Vec<f64>,
    pub g4: Vec<f64>,
    pub g5: Vec<f64>,
    pub g6: Vec<f64>,
    pub g7: Vec<f64>,
    pub g8: Vec<f64>,
    pub g9: Vec<f64>,
    /// Samples of G9's baseline, taken in turn with the G9 rounds.
    pub g9_tar: Vec<f64>,
    pub memory: serde_json::Value,
}

/// Runs the Trellis block.
pub fn measure(plan: &Plan, binary: &Path, rootfs: &Path) -> Result<Results, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| error.to_string())?;
    let name = format!("trellisbench-{}", std::process::id());
    let mut server = Server::start(binary, rootfs, &name, &runtime)?;
    let result = measure_with(plan, &server, &runtime, &name, rootfs);
    if result.is_err() {
        eprintln!("bench: server log:\n{}", server.log_text());
    }
    // Whatever failed, leave no container behind.
    if let Ok(handles) = runtime.block_on(server.client.list(&Default::default())) {
        for handle in handles {
            let _ = runtime.block_on(server.client.destroy(&handle));
        }
    }
    server.stop();
    result
}

fn measure_with(plan: &Plan, server: &Server, runtime: &tokio::runtime::Runtime, name: &str, rootfs: &Path) -> Result<Results, String> {
    let client = &server.client;
    let mut counter = 0_u64;
    let mut handle = |label: &str| {
        counter += 1;
        format!("{name}-{label}-{counter}")
    };

    // Warm-up: page in the binaries and the rootfs for both paths.
    for _ in 0..plan.warmup {
        let warm = handle("warm");
        runtime.block_on(async {
            create(client, &warm).await?;
            run(client, &warm, &["/bin/true"]).await?;
            destroy(client, &warm).await
        })?;
    }

    let mut results = Results {
        g1: Vec::new(),
        g2: Vec::new(),
        g3: Vec::new(),
        g4: Vec::new(),
        g5: Vec::new(),
        g6: Vec::new(),
        g7: Vec::new(),
        g8: Vec::new(),
        g9: Vec::new(),
        g9_tar: Vec::new(),
        memory: serde_json::Value::Null,
    };

    // G1: create, then run echo, until the first output byte.
    for _ in 0..plan.count(&["G1"], plan.iterations) {
        let h = handle("g1");
        let started = Instant::now();
        let outcome = runtime.block_on(async {
            create(client, &h).await?;
            run(client, &h, &["/bin/echo", "hello"]).await
        })?;
        let first = outcome.first_output.ok_or("echo printed nothing")?;
        results.g1.push(millis(first - started));
        runtime.block_on(destroy(client, &h))?;
    }

    // G2 and G4: create alone, destroy alone.
    for _ in 0..plan.count(&["G2", "G4"], plan.iterations) {
        let h = handle("g2");
        let started = Instant::now();
        runtime.block_on(create(client, &h))?;
        results.g2.push(millis(started.elapsed()));
        let started = Instant::now();
        runtime.block_on(destroy(client, &h))?;
        results.g4.push(millis(started.elapsed()));
    }

    // G3: run in an existing container until the first output byte.
    let h = handle("g3");
    runtime.block_on(create(client, &h))?;
    for _ in 0..plan.count(&["G3"], plan.iterations) {
        let started = Instant::now();
        let outcome = runtime.block_on(run(client, &h, &["/bin/echo", "hello"]))?;
        let first = outcome.first_output.ok_or("echo printed nothing")?;
        results.g3.push(millis(first - started));
    }

    // G8: stdout throughput of one process writing plan.stdout_mib MiB.
    let count = plan.stdout_mib.to_string();
    let count_arg = format!("count={count}");
    for _ in 0..plan.count(&["G8"], plan.throughput_rounds) {
        let started = Instant::now();
        let outcome = runtime.block_on(run(client, &h, &["/bin/dd", "if=/dev/zero", "bs=1048576", &count_arg]))?;
        let elapsed = started.elapsed().as_secs_f64();
        let expected = plan.stdout_mib as u64 * 1024 * 1024;
        if outcome.bytes != expected {
            return Err(format!("stdout delivered {} bytes, expected {expected}", outcome.bytes));
        }
        results.g8.push(plan.stdout_mib as f64 / elapsed);
    }

    // G9: stream in of the archive, each round paired with a round of host
    // `tar -x` into an overlay. The host filesystem's speed changes tenfold
    // within a minute here, so the two sides take turns.
    let archive = host::build_archive(plan.archive_bytes);
    let rounds = plan.count(&["G9"], plan.throughput_rounds);
    if rounds > 0 {
        let baseline = TarBaseline::new(rootfs)?;
        for round in 0..rounds {
            // Each side goes first in every other round, so that neither
            // always meets the writeback the other's round started.
            let tar_first = round % 2 == 1;
            if tar_first {
                results.g9_tar.push(baseline.round(round, &archive)?);
            }
            let destination = format!("/tmp/stream-{round}");
            let started = Instant::now();
            runtime.block_on(async {
                let mut reader: &[u8] = &archive;
                client
                    .stream_in(&h, &destination, "root", &mut reader)
                    .await
                    .map_err(|error| format!("streaming in: {error}"))
            })?;
            results.g9.push(mib_per_second(archive.len(), started.elapsed()));
            if !tar_first {
                results.g9_tar.push(baseline.round(round, &archive)?);
            }
        }
        baseline.remove()?;
    }
    runtime.block_on(destroy(client, &h))?;

    // G5: create, run true, destroy, with 2 clients.
    for _ in 0..plan.count(&["G5"], plan.cycle_rounds) {
        let started = Instant::now();
        let mut names = Vec::new();
        for worker in 0..2 {
            names.push((0..plan.cycles_per_client).map(|cycle| format!("{name}-g5-{worker}-{cycle}-{}", handle("c"))).collect::<Vec<_>>());
        }
        runtime.block_on(async {
            let tasks = names.into_iter().map(|handles| {
                let client = client.clone();
                tokio::spawn(async move {
                    for h in handles {
                        create(&client, &h).await?;
                        run(&client, &h, &["/bin/true"]).await?;
                        destroy(&client, &h).await?;
                    }
                    Ok::<(), String>(())
                })
            });
            for task in tasks.collect::<Vec<_>>() {
                task.await.map_err(|error| error.to_string())??;
            }
            Ok::<(), String>(())
        })?;
        results.g5.push((2 * plan.cycles_per_client) as f64 / started.elapsed().as_secs_f64());
    }

    // G6: 5 clients creating at once; each create's latency.
    let mut batches = Vec::new();
    for worker in 0..plan.count(&["G6"], 5) {
        batches.push((0..plan.concurrent_creates).map(|i| format!("{}-{worker}-{i}", handle("g6"))).collect::<Vec<_>>());
    }
    let all: Vec<String> = batches.iter().flatten().cloned().collect();
    let latencies = runtime.block_on(async {
        let tasks: Vec<_> = batches
            .into_iter()
            .map(|handles| {
                let client = client.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    for h in handles {
                        let started = Instant::now();
                        create(&client, &h).await?;
                        latencies.push(millis(started.elapsed()));
                    }
                    Ok::<Vec<f64>, String>(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.map_err(|error| error.to_string())??);
        }
        Ok::<Vec<f64>, String>(all)
    })?;
    results.g6 = latencies;
    for h in &all {
        runtime.block_on(destroy(client, h))?;
    }

    // G7: CPU time of the server's whole tree per create and destroy.
    for _ in 0..plan.count(&["G7"], plan.iterations) {
        let h = handle("g7");
        let before = server.cgroup.usage_ns()?;
        runtime.block_on(async {
            create(client, &h).await?;
            destroy(client, &h).await
        })?;
        // Destroy returns before the server's helpers have all exited, so
        // their last exits get a moment to be charged.
        std::thread::sleep(Duration::from_millis(20));
        results.g7.push((server.cgroup.usage_ns()? - before) as f64 / 1e6);
    }

    if plan.wants(&["memory"]) {
        results.memory = memory(plan, server, runtime, name)?;
    }
    Ok(results)
}

/// Resident memory idle, with idle containers, and while streaming.
fn memory(plan: &Plan, server: &Server, runtime: &tokio::runtime::Runtime, name: &str) -> Result<serde_json::Value, String> {
    let client = &server.client;
    let idle = server.memory_kib();
    let handles: Vec<String> = (0..plan.idle_containers).map(|i| format!("{name}-idle-{i}")).collect();
    for h in &handles {
        runtime.block_on(create(client, h))?;
    }
    std::thread::sleep(Duration::from_millis(200));
    let loaded = server.memory_kib();
    // Streaming: sample while a large stdout transfer runs.
    let peak = Arc::new(AtomicU64::new(0));
    let count_arg = format!("count={}", plan.stdout_mib);
    let streaming = runtime.block_on(async {
        let sampler_peak = peak.clone();
        let pid = server.pid();
        let sampler = tokio::spawn(async move {
            loop {
                if let Some(rss) = host::rss_kib(pid) {
                    sampler_peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let outcome = run(client, &handles[0], &["/bin/dd", "if=/dev/zero", "bs=1048576", &count_arg]).await;
        sampler.abort();
        outcome
    });
    streaming?;
    for h in &handles {
        runtime.block_on(destroy(client, h))?;
    }
    let containers = plan.idle_containers.max(1) as f64;
    Ok(serde_json::json!({
        "idle_server_kib": idle.server,
        "idle_total_kib": idle.total,
        "idle_containers": plan.idle_containers,
        "with_containers_server_kib": loaded.server,
        "with_containers_total_kib": loaded.total,
        "idle_server_anon_kib": idle.server_anon,
        "with_containers_server_anon_kib": loaded.server_anon,
        // This is null when the kernel's smaps_rollup has no Pss_Anon line.
        "per_container_server_anon_kib": idle.server_anon
            .zip(loaded.server_anon)
            .map(|(before, after)| (after as f64 - before as f64) / containers),
        "per_container_total_kib": (loaded.total as f64 - idle.total as f64) / containers,
        "streaming_peak_server_rss_kib": peak.load(Ordering::Relaxed),
    }))
}

/// Host `tar -x` into an overlay of the root filesystem: G9's baseline.
struct TarBaseline {
    overlay: host::Overlay,
    _temp: tempfile::TempDir,
}

impl TarBaseline {
    fn new(rootfs: &Path) -> Result<TarBaseline, String> {
        let temp = tempfile::Builder::new()
            .prefix("trellisbench-tar-")
            .tempdir()
            .map_err(|error| format!("creating the tar baseline's directory: {error}"))?;
        let overlay = host::Overlay::mount(rootfs, &temp.path().join("overlay"))?;
        Ok(TarBaseline { overlay, _temp: temp })
    }

    /// Extracts `archive` into a new directory and returns the rate in
    /// MiB/s.
    fn round(&self, round: usize, archive: &[u8]) -> Result<f64, String> {
        let destination = self.overlay.merged.join(format!("tmp/stream-{round}"));
        let started = Instant::now();
        fs::create_dir_all(&destination).map_err(|error| format!("creating {}: {error}", destination.display()))?;
        host::run_with_input("tar", &["-x", "-C", &destination.display().to_string()], archive)?;
        Ok(mib_per_second(archive.len(), started.elapsed()))
    }

    fn remove(self) -> Result<(), String> {
        self.overlay.remove()
    }
}
