//! End-to-end tests of memory, pid and CPU limits, out-of-memory events
//! and metrics against a real `trellis server` with the Linux runtime. They
//! need root; see `support` for how they skip.

mod support;

use std::time::{Duration, Instant};

use support::{command_spec, TestServer};
use trellis::api::{CpuLimits, Limits, MemoryLimits, PidLimits};

const MIB: u64 = 1 << 20;

fn memory_limit(bytes: u64) -> Limits {
    Limits { memory_limits: MemoryLimits { limit_in_bytes: bytes }, ..Limits::default() }
}

fn info_events(server: &TestServer, handle: &str) -> Option<Vec<String>> {
    server.block_on(server.client.info(handle)).unwrap().events
}

/// Polls Info until its events equal `expected`; returns the events seen
/// last when `limit` passes first.
fn wait_for_events(server: &TestServer, handle: &str, expected: &[&str], limit: Duration) -> Option<Vec<String>> {
    let deadline = Instant::now() + limit;
    loop {
        let events = info_events(server, handle);
        let matches = events.as_ref().is_some_and(|events| events.iter().map(String::as_str).eq(expected.iter().copied()));
        if matches || Instant::now() >= deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn oom_kill_is_reported_in_info() {
    let Some(server) = TestServer::start("oom_kill_is_reported_in_info") else { return };
    let handle = server.create_with_limits("oom", memory_limit(64 * MIB));
    assert_eq!(info_events(&server, &handle), None, "no event before any kill");

    // dd allocates a buffer of one block and fills it from /dev/zero.
    let within = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/dev/null", "bs=16M", "count=2"]);
    assert_eq!(within.status, 0, "a 16 MiB buffer fits: {}", within.stderr_text());
    assert_eq!(info_events(&server, &handle), None, "a process within the limit is not an event");

    let past = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"]);
    assert_eq!(past.status, 137, "a 128 MiB buffer is killed: {}", past.stderr_text());
    let events = wait_for_events(&server, &handle, &["Out of memory"], Duration::from_secs(1));
    assert_eq!(events, Some(vec!["Out of memory".to_string()]));

    // A second kill appends a second event; the container stays active.
    let again = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"]);
    assert_eq!(again.status, 137);
    let events = wait_for_events(&server, &handle, &["Out of memory", "Out of memory"], Duration::from_secs(1));
    assert_eq!(events, Some(vec!["Out of memory".to_string(), "Out of memory".to_string()]));
    assert_eq!(server.block_on(server.client.info(&handle)).unwrap().state, "active");
    let (status, metrics) = server.debug_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.lines().any(|line| line == "trellis_oom_events_total 2"),
        "the operator's counter has both kills:\n{metrics}"
    );
    let (status, actors) = server.debug_get("/debug/actors");
    assert_eq!(status, 200);
    let actors: serde_json::Value = serde_json::from_str(&actors).expect("the actor snapshot is JSON");
    let watcher = actors["oom_watchers"]
        .as_array()
        .and_then(|watchers| watchers.iter().find(|watcher| watcher["handle"] == handle.as_str()))
        .unwrap_or_else(|| panic!("no watcher for {handle} in {actors}"));
    assert_eq!(watcher["kills_recorded"], 2, "{watcher}");

    let log = server.log_text();
    let logged = log.lines().find(|line| line.contains("out of memory") && line.contains(&handle));
    assert!(logged.is_some(), "the server logs the kill with the handle:\n{log}");

    assert_eq!(oom_threads(&server), 1, "one watch thread for the one container");
    server.block_on(server.client.destroy(&handle)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while oom_threads(&server) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(oom_threads(&server), 0, "destroy ends the watch thread");
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

/// Counts the server's threads that watch for out-of-memory kills.
fn oom_threads(server: &TestServer) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", server.pid())).unwrap();
    tasks
        .flatten()
        .filter(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == "trellis-oom"))
        .count()
}

#[test]
fn shm_writes_count_against_memory() {
    let Some(server) = TestServer::start("shm_writes_count_against_memory") else { return };
    let handle = server.create_with_limits("shm", memory_limit(64 * MIB));
    let fits = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/dev/shm/fits", "bs=1M", "count=58"]);
    assert_eq!(fits.status, 0, "58 MiB in /dev/shm fits: {}", fits.stderr_text());
    let removed = server.run_command(&handle, "rm", &["/dev/shm/fits"]);
    assert_eq!(removed.status, 0);
    let past = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/dev/shm/past", "bs=1M", "count=65"]);
    assert_ne!(past.status, 0, "65 MiB in /dev/shm exceeds a 64 MiB limit");
    server.block_on(server.client.destroy(&handle)).unwrap();

    // The file's pages belong to no process, so the kernel kills a process
    // of the container, and garden-init must not be the one. Container
    // processes are marked as the kernel's first choice.
    // NOTE: with a debug build the kernel picked dd even without the mark,
    // so here the oom_score_adj check catches a regression; release builds
    // lost garden-init without it.
    let plain = server.create("score");
    let score = server.run_command(&plain, "cat", &["/proc/self/oom_score_adj"]);
    assert_eq!(score.stdout_text().trim(), "500", "container processes carry the OOM score adjustment");
    server.block_on(server.client.destroy(&plain)).unwrap();
    for round in 0..3 {
        let handle = server.create_with_limits(&format!("shm-fresh{round}"), memory_limit(64 * MIB));
        let snapshot = server.introspect();
        let entry = snapshot["registry"]["containers"]
            .as_array()
            .and_then(|containers| containers.iter().find(|entry| entry["handle"] == handle.as_str()))
            .cloned()
            .expect("the container is in the snapshot");
        let init_pid = entry["container"]["runtime"]["init_pid"].as_i64().expect("the snapshot names garden-init's pid");
        let past = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/dev/shm/past", "bs=1M", "count=65"]);
        assert_ne!(past.status, 0, "65 MiB in /dev/shm exceeds a 64 MiB limit");
        let comm = std::fs::read_to_string(format!("/proc/{init_pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "garden-init", "round {round}: garden-init was killed by the out-of-memory killer");
        server.block_on(server.client.destroy(&handle)).unwrap();
    }
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn pid_limit_makes_fork_fail() {
    let Some(server) = TestServer::start("pid_limit_makes_fork_fail") else { return };
    let handle = server.create_with_limits("pids", Limits { pid_limits: PidLimits { max: 50 }, ..Limits::default() });
    // Each background sleep keeps a pid in use, so the loop reaches the limit.
    let script = "i=0; while [ $i -lt 60 ]; do sleep 30 & i=$((i+1)); done; echo started $i";
    let output = server.run_command(&handle, "sh", &["-c", script]);
    assert_eq!(output.status, 2, "stdout {:?}, stderr {:?}", output.stdout_text(), output.stderr_text());
    assert!(output.stderr_text().contains("can't fork: Resource temporarily unavailable"), "{}", output.stderr_text());

    let metrics = server.block_on(server.client.metrics(&handle)).unwrap();
    assert_eq!(metrics.pid_stat.max, 50);
    assert!(metrics.pid_stat.current > 1, "the orphaned sleeps count: {:?}", metrics.pid_stat);
    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn no_limits_report_empty_structs() {
    let Some(server) = TestServer::start("no_limits_report_empty_structs") else { return };
    let handle = server.create("none");
    for kind in ["bandwidth", "cpu", "disk", "memory"] {
        let answer = server.raw_request("GET", &format!("/containers/{handle}/limits/{kind}"), "");
        assert_eq!(answer, (200, "{}\n".to_string()), "{kind}");
    }
    let metrics = server.block_on(server.client.metrics(&handle)).unwrap();
    assert_eq!(metrics.pid_stat.max, 0);
    assert!(metrics.pid_stat.current >= 1, "garden-init counts: {:?}", metrics.pid_stat);
    server.block_on(server.client.destroy(&handle)).unwrap();
}

#[test]
fn limits_read_back_exactly() {
    let Some(server) = TestServer::start("limits_read_back_exactly") else { return };
    let limits = Limits {
        memory_limits: MemoryLimits { limit_in_bytes: 134_217_728 },
        cpu_limits: CpuLimits { weight: 0, limit_in_shares: 50 },
        ..Limits::default()
    };
    let handle = server.create_with_limits("exact", limits);
    assert_eq!(server.block_on(server.client.cpu_limits(&handle)).unwrap(), CpuLimits { weight: 0, limit_in_shares: 50 });
    assert_eq!(server.block_on(server.client.memory_limits(&handle)).unwrap(), MemoryLimits { limit_in_bytes: 134_217_728 });

    // A value beyond what the kernel takes is capped at 2^63 - 1, and the
    // limit reads back as it was set.
    let target = format!("/containers/{handle}/limits/memory");
    let (status, body) = server.raw_request("PUT", &target, &format!("{{\"limit_in_bytes\":{}}}", u64::MAX));
    assert_eq!((status, body), (200, format!("{{\"limit_in_bytes\":{}}}\n", u64::MAX)));
    let metrics = server.block_on(server.client.metrics(&handle)).unwrap();
    assert!(metrics.memory_stat.hierarchical_memory_limit >= 1 << 62, "{:?}", metrics.memory_stat.hierarchical_memory_limit);
    server.block_on(server.client.destroy(&handle)).unwrap();

    // A pid limit beyond the kernel's largest pid count is written as no
    // limit, and reads back as it was set.
    let huge = server.create_with_limits("huge-pids", Limits { pid_limits: PidLimits { max: u64::MAX }, ..Limits::default() });
    let output = server.run_command(&huge, "echo", &["runs"]);
    assert_eq!(output.stdout_text(), "runs\n", "{}", output.stderr_text());
    let metrics = server.block_on(server.client.metrics(&huge)).unwrap();
    assert_eq!(metrics.pid_stat.max, u64::MAX);
    server.block_on(server.client.destroy(&huge)).unwrap();
}

#[test]
fn memory_limit_below_usage_is_rejected() {
    let Some(server) = TestServer::start("memory_limit_below_usage_is_rejected") else { return };
    let handle = server.create_with_limits("below", memory_limit(128 * MIB));
    let filled = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/dev/shm/fill", "bs=1M", "count=40"]);
    assert_eq!(filled.status, 0, "{}", filled.stderr_text());

    let target = format!("/containers/{handle}/limits/memory");
    let (status, body) = server.raw_request("PUT", &target, &format!("{{\"limit_in_bytes\":{}}}", 16 * MIB));
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("below the container's current memory usage"), "{body}");
    // Nothing was half applied.
    assert_eq!(server.block_on(server.client.memory_limits(&handle)).unwrap(), MemoryLimits { limit_in_bytes: 128 * MIB });
    let still = server.run_command(&handle, "ls", &["/dev/shm/fill"]);
    assert_eq!(still.status, 0, "the data was not reclaimed by a lower limit");

    let (status, body) = server.raw_request("PUT", &target, &format!("{{\"limit_in_bytes\":{}}}", 96 * MIB));
    assert_eq!((status, body), (200, format!("{{\"limit_in_bytes\":{}}}\n", 96 * MIB)));
    server.block_on(server.client.destroy(&handle)).unwrap();
}

#[test]
fn metrics_follow_real_usage() {
    let Some(server) = TestServer::start("metrics_follow_real_usage") else { return };
    let handle = server.create("usage");
    let before = server.block_on(server.client.metrics(&handle)).unwrap();

    // Files in /dev/shm are memory charged to the container until removed.
    let filled = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/dev/shm/fill", "bs=1M", "count=100"]);
    assert_eq!(filled.status, 0, "{}", filled.stderr_text());
    let after = server.block_on(server.client.metrics(&handle)).unwrap();
    let grown = after.memory_stat.total_usage_toward_limit.saturating_sub(before.memory_stat.total_usage_toward_limit);
    assert!((90 * MIB..=110 * MIB).contains(&grown), "usage grew by {grown} bytes for 100 MiB");

    // CPU usage grows while a busy loop runs.
    let spec = command_spec("sh", &["-c", "while true; do :; done"]);
    let io = trellis::client::ProcessIo::default();
    let mut busy = server.block_on(server.client.run(&handle, &spec, io)).unwrap();
    let first = server.block_on(server.client.metrics(&handle)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let second = server.block_on(server.client.metrics(&handle)).unwrap();
    assert!(second.cpu_stat.usage > first.cpu_stat.usage, "{:?} then {:?}", first.cpu_stat, second.cpu_stat);
    assert!(second.cpu_stat.user + second.cpu_stat.system > 0, "{:?}", second.cpu_stat);
    assert!(second.age > first.age);
    assert!(second.cpu_entitlement == 0, "no shares set, so no entitlement: {}", second.cpu_entitlement);
    server.block_on(busy.signal(trellis::client::Signal::Kill)).unwrap();
    let _ = server.block_on(busy.wait());
    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

/// Runs `program` with `args` and fails the test with its stderr when it
/// fails.
fn run_tool(program: &str, args: &[&str]) {
    let output = std::process::Command::new(program).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn network_stat_counts_container_interfaces() {
    let Some(server) = TestServer::start("network_stat_counts_interfaces") else { return };
    let handle = server.create("net");
    let init_pid = support::processes_in_cgroups_named(&handle)
        .into_iter()
        .map(|(pid, _)| pid)
        .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "garden-init"))
        .expect("the container's garden-init");

    // A veth pair from the server's private namespace into the
    // container's, on the test network 192.0.2.0/30. Both ends go away
    // with their namespaces.
    let host_end = format!("tlh{}", std::process::id() % 100_000);
    let container_end = format!("tlc{}", std::process::id() % 100_000);
    let container_netns = format!("/proc/{init_pid}/ns/net");
    run_tool("ip", &["-n", &server.name, "link", "add", &host_end, "type", "veth", "peer", "name", &container_end]);
    run_tool("ip", &["-n", &server.name, "link", "set", &container_end, "netns", &init_pid.to_string()]);
    run_tool("ip", &["-n", &server.name, "addr", "add", "192.0.2.1/30", "dev", &host_end]);
    run_tool("ip", &["-n", &server.name, "link", "set", &host_end, "up"]);
    let inside = |args: &[&str]| {
        let mut full = vec!["--net=".to_string() + &container_netns, "ip".to_string()];
        full.extend(args.iter().map(|arg| arg.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        run_tool("nsenter", &full);
    };
    inside(&["addr", "add", "192.0.2.2/30", "dev", &container_end]);
    inside(&["link", "set", &container_end, "up"]);

    let before = server.block_on(server.client.metrics(&handle)).unwrap().network_stat.expect("network statistics");
    // busybox-static, which the tests need for the root filesystem anyway,
    // supplies ping.
    run_tool("ip", &["netns", "exec", &server.name, "busybox", "ping", "-c", "3", "-W", "5", "192.0.2.2"]);
    let after = server.block_on(server.client.metrics(&handle)).unwrap().network_stat.expect("network statistics");
    // Three echo requests in and three replies out, 84 bytes or more each.
    assert!(after.rx_bytes >= before.rx_bytes + 3 * 84, "{before:?} then {after:?}");
    assert!(after.tx_bytes >= before.tx_bytes + 3 * 84, "{before:?} then {after:?}");
    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn operator_cpu_options_apply() {
    let options = support::ServerOptions {
        extra_config: vec!["cpu-quota-per-share = 100".into(), "cpu-entitlement-per-share = 1".into()],
        ..support::ServerOptions::default()
    };
    let Some(server) = TestServer::start_with("operator_cpu_options_apply", options) else { return };
    let handle = server.create_with_limits("quota", Limits { cpu_limits: CpuLimits { weight: 0, limit_in_shares: 100 }, ..Limits::default() });
    let cpu_dir = support::cgroups_named(&server.tag)
        .into_iter()
        .map(|parent| parent.join(&handle))
        .find(|dir| dir.join("cpu.cfs_quota_us").exists())
        .expect("a cpu cgroup");
    let read = |file: &str| std::fs::read_to_string(cpu_dir.join(file)).unwrap().trim().to_string();
    // 100 shares × 100 µs: 10 ms of CPU per 100 ms period.
    assert_eq!(read("cpu.cfs_quota_us"), "10000");
    assert_eq!(read("cpu.cfs_period_us"), "100000");
    assert_eq!(read("cpu.shares"), "100");

    // 100 shares × 1 % of a CPU: the entitlement equals the age.
    let metrics = server.block_on(server.client.metrics(&handle)).unwrap();
    let age = metrics.age as u64;
    assert!(metrics.cpu_entitlement.abs_diff(age) <= 1, "entitlement {} for age {age}", metrics.cpu_entitlement);

    // A CPU change through the 2015 route moves the quota too.
    let target = format!("/containers/{handle}/limits/cpu");
    assert_eq!(server.raw_request("PUT", &target, r#"{"limit_in_shares":300}"#), (200, "{\"limit_in_shares\":300}\n".into()));
    assert_eq!(read("cpu.cfs_quota_us"), "30000");
    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

/// A memory limit too small for garden-init fails the create with an
/// error that names the limit, whether the create starts its own
/// garden-init (the first after a start) or adopts the waiting spare.
#[test]
fn tiny_memory_limit_named_in_error() {
    let Some(server) = TestServer::start("tiny_memory_limit_named_in_error") else { return };
    let tiny = trellis::api::ContainerSpec { handle: server.unique_handle("tiny"), limits: memory_limit(100 * 1024), ..Default::default() };
    let first = server.block_on(server.client.create(&tiny)).unwrap_err().to_string();
    assert!(first.contains("memory limit of 102400 bytes is too small to start the container"), "own garden-init: {first}");

    // An unprivileged create shows the id mappings, and a spare follows.
    let normal = server.create("normal");
    std::thread::sleep(Duration::from_millis(300));
    let tiny = trellis::api::ContainerSpec { handle: server.unique_handle("tiny"), limits: memory_limit(100 * 1024), ..Default::default() };
    let second = server.block_on(server.client.create(&tiny)).unwrap_err().to_string();
    assert!(second.contains("memory limit of 102400 bytes is too small to start the container"), "spare garden-init: {second}");
    server.block_on(server.client.destroy(&normal)).unwrap();
    assert_eq!(server.leftovers(), Vec::<String>::new());
}
