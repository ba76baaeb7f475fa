//! End-to-end tests of grace time, limits, metrics, capacity and
//! concurrency against a real `trellis server` with the Linux runtime,
//! reached over its Unix socket. They need root; see `support` for how
//! they skip.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{command_spec, processes_in_cgroups_named, ServerOptions, TestServer};
use trellis::api::{ContainerSpec, CpuLimits, Limits, MemoryLimits, PidLimits, Properties};
use trellis::client::{ClientError, ProcessIo};

/// Polls the unfiltered list until `handle` is gone and returns how long
/// that took; fails after `limit`.
fn wait_until_gone(server: &TestServer, handle: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let listed = server.block_on(server.client.list(&Properties::new())).unwrap();
        if !listed.iter().any(|found| found == handle) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{handle} still listed after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn listed(server: &TestServer, handle: &str) -> bool {
    server.block_on(server.client.list(&Properties::new())).unwrap().iter().any(|found| found == handle)
}

/// Returns the container's cgroup in the hierarchy that has `file`.
fn cgroup_with(server: &TestServer, handle: &str, file: &str) -> PathBuf {
    support::cgroups_named(&server.tag)
        .into_iter()
        .map(|parent| parent.join(handle))
        .find(|dir| dir.join(file).exists())
        .unwrap_or_else(|| panic!("no cgroup of {handle} has {file}"))
}

fn read_number(path: &Path) -> u64 {
    std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

#[test]
fn reaping_releases_everything() {
    let Some(server) = TestServer::start("reaping_releases_everything") else { return };
    let handle = server.create("reaped");
    // A process that outlives its Run connection, as after a detach.
    let process = server.block_on(server.client.run(&handle, &command_spec("sleep", &["1000"]), ProcessIo::default())).unwrap();
    drop(process);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_in_cgroups_named(&server.tag).iter().any(|(_, command)| command.contains("sleep")) {
        assert!(Instant::now() < deadline, "sleep did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.depot.join(&handle).exists());

    server.block_on(server.client.set_grace_time(&handle, Duration::from_millis(500))).unwrap();
    let took = wait_until_gone(&server, &handle, Duration::from_secs(10));
    eprintln!("reaped {took:?} after SetGraceTime(500ms)");
    let error = server.block_on(server.client.info(&handle)).unwrap_err();
    assert!(matches!(error, ClientError::ContainerNotFound { .. }), "{error:?}");
    assert!(!server.depot.join(&handle).exists(), "the depot entry is left");
    assert_eq!(server.leftovers(), Vec::<String>::new());
    // The server logs asynchronously, so the line may reach the file a
    // moment after the container is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log_text().lines().any(|line| line.contains("\"reaping\"") && line.contains(&handle)) {
        assert!(Instant::now() < deadline, "no reaping line for {handle} in the log");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn idle_container_with_short_grace_time_goes() {
    let Some(server) = TestServer::start("idle_container_with_short_grace_time_goes") else { return };
    let spec = ContainerSpec { handle: server.unique_handle("short"), grace_time: 500_000_000, ..ContainerSpec::default() };
    let handle = server.block_on(server.client.create(&spec)).unwrap();
    let properties = server.block_on(server.client.properties(&handle)).unwrap();
    assert_eq!(properties.get("garden.grace-time").map(String::as_str), Some("500000000"));
    let took = wait_until_gone(&server, &handle, Duration::from_secs(10));
    eprintln!("gone {took:?} after create with a 500 ms grace time");
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn open_run_connection_keeps_container() {
    let Some(server) = TestServer::start("open_run_connection_keeps_container") else { return };
    let handle = server.create("streaming");
    let stdout = support::SharedOutput::default();
    let io = ProcessIo { stdout: Some(Box::new(stdout.clone())), ..ProcessIo::default() };
    let spec = command_spec("sh", &["-c", "for i in 1 2 3 4 5 6 7 8; do echo tick; sleep 0.25; done"]);
    server.block_on(async {
        let mut process = server.client.run(&handle, &spec, io).await.unwrap();
        support::wait_for_output(&stdout, "tick\n".len(), "the first tick").await;
        server.client.set_grace_time(&handle, Duration::from_millis(50)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let listed = server.client.list(&Properties::new()).await.unwrap();
        assert!(listed.contains(&handle), "reaped while its process streamed");
        assert!(stdout.len() < 8 * "tick\n".len(), "the process ended before the check");
        assert_eq!(process.wait().await.unwrap(), 0);
    });
    assert_eq!(String::from_utf8(stdout.take()).unwrap(), "tick\n".repeat(8));
    // The countdown starts when the connection ends.
    wait_until_gone(&server, &handle, Duration::from_secs(10));
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn limits_are_applied_and_reported() {
    let Some(server) = TestServer::start("limits_are_applied_and_reported") else { return };
    let spec = ContainerSpec {
        handle: server.unique_handle("limits"),
        limits: Limits {
            memory_limits: MemoryLimits { limit_in_bytes: 64 << 20 },
            cpu_limits: CpuLimits { weight: 512, limit_in_shares: 0 },
            pid_limits: PidLimits { max: 128 },
            ..Limits::default()
        },
        ..ContainerSpec::default()
    };
    let handle = server.block_on(server.client.create(&spec)).unwrap();
    let memory_dir = cgroup_with(&server, &handle, "memory.limit_in_bytes");
    let cpu_dir = cgroup_with(&server, &handle, "cpu.shares");
    let memsw = memory_dir.join("memory.memsw.limit_in_bytes");
    assert_eq!(read_number(&memory_dir.join("memory.limit_in_bytes")), 64 << 20);
    if memsw.exists() {
        assert_eq!(read_number(&memsw), 64 << 20);
    }
    assert_eq!(read_number(&cpu_dir.join("cpu.shares")), 512);

    // Read back as set; CPU as shares, never weight, because clients
    // compare the struct exactly.
    assert_eq!(server.raw_request("GET", &format!("/containers/{handle}/limits/memory"), ""), (200, "{\"limit_in_bytes\":67108864}\n".into()));
    assert_eq!(server.raw_request("GET", &format!("/containers/{handle}/limits/cpu"), ""), (200, "{\"limit_in_shares\":512}\n".into()));
    for kind in ["bandwidth", "disk"] {
        assert_eq!(server.raw_request("GET", &format!("/containers/{handle}/limits/{kind}"), ""), (200, "{}\n".into()));
    }

    // Raising writes memsw first, lowering the memory limit first; either
    // order the other way round fails with EINVAL.
    let target = format!("/containers/{handle}/limits/memory");
    assert_eq!(server.raw_request("PUT", &target, r#"{"limit_in_bytes":134217728}"#), (200, "{\"limit_in_bytes\":134217728}\n".into()));
    assert_eq!(read_number(&memory_dir.join("memory.limit_in_bytes")), 128 << 20);
    if memsw.exists() {
        assert_eq!(read_number(&memsw), 128 << 20);
    }
    assert_eq!(server.raw_request("PUT", &target, r#"{"limit_in_bytes":33554432}"#).0, 200);
    assert_eq!(read_number(&memory_dir.join("memory.limit_in_bytes")), 32 << 20);
    if memsw.exists() {
        assert_eq!(read_number(&memsw), 32 << 20);
    }
    assert_eq!(server.raw_request("PUT", &target, r#"{"limit_in_bytes":0}"#), (200, "{\"limit_in_bytes\":33554432}\n".into()));

    let target = format!("/containers/{handle}/limits/cpu");
    assert_eq!(server.raw_request("PUT", &target, r#"{"limit_in_shares":300}"#), (200, "{\"limit_in_shares\":300}\n".into()));
    assert_eq!(read_number(&cpu_dir.join("cpu.shares")), 300);
    let cpu = server.block_on(server.client.cpu_limits(&handle)).unwrap();
    assert_eq!(cpu, CpuLimits { weight: 0, limit_in_shares: 300 });

    // Bandwidth and disk are stored and reported only.
    let target = format!("/containers/{handle}/limits/bandwidth");
    assert_eq!(server.raw_request("PUT", &target, r#"{"rate":1000,"burst":2000}"#), (200, "{\"rate\":1000,\"burst\":2000}\n".into()));
    let bandwidth = server.block_on(server.client.bandwidth_limits(&handle)).unwrap();
    assert_eq!((bandwidth.rate, bandwidth.burst), (1000, 2000));

    // A process that forks past the pid limit fails.
    let metrics = server.block_on(server.client.metrics(&handle)).unwrap();
    assert_eq!(metrics.pid_stat.max, 128);
    assert_eq!(metrics.memory_stat.hierarchical_memory_limit, 32 << 20);
    server.block_on(server.client.destroy(&handle)).unwrap();

    // A container created without a memory limit gets its first one: a
    // change down from unlimited, so the memory limit is written first.
    let handle = server.create("unlimited");
    let memory_dir = cgroup_with(&server, &handle, "memory.limit_in_bytes");
    let target = format!("/containers/{handle}/limits/memory");
    assert_eq!(server.raw_request("GET", &target, ""), (200, "{}\n".into()));
    assert_eq!(server.raw_request("PUT", &target, r#"{"limit_in_bytes":67108864}"#), (200, "{\"limit_in_bytes\":67108864}\n".into()));
    assert_eq!(read_number(&memory_dir.join("memory.limit_in_bytes")), 64 << 20);
    let memsw = memory_dir.join("memory.memsw.limit_in_bytes");
    if memsw.exists() {
        assert_eq!(read_number(&memsw), 64 << 20);
    }
    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn metrics_report_cgroup_usage() {
    let Some(server) = TestServer::start("metrics_report_cgroup_usage") else { return };
    let handle = server.create("metrics");
    let busy = "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; echo done";
    let output = server.run_command(&handle, "sh", &["-c", busy]);
    assert_eq!(output.stdout_text(), "done\n");
    let metrics = server.block_on(server.client.metrics(&handle)).unwrap();
    assert_ne!(metrics, trellis::api::Metrics::default());
    assert!(metrics.cpu_stat.usage > 0, "{metrics:?}");
    assert!(metrics.cpu_stat.user + metrics.cpu_stat.system > 0, "{metrics:?}");
    assert!(metrics.pid_stat.current >= 1, "garden-init counts: {metrics:?}");
    assert_eq!(metrics.pid_stat.max, 0, "no pid limit was set");
    assert!(metrics.memory_stat.total_usage_toward_limit > 0, "{metrics:?}");
    assert!(metrics.age > 0, "{metrics:?}");

    let missing = server.unique_handle("missing");
    let entries = server.block_on(server.client.bulk_metrics(&[&handle, &missing])).unwrap();
    assert!(entries[&handle].err.is_none());
    assert!(entries[&handle].metrics.cpu_stat.usage >= metrics.cpu_stat.usage);
    let error = entries[&missing].err.as_ref().expect("an error for the unknown handle");
    assert_eq!(error.message, format!("unknown handle: {missing}"));
    let infos = server.block_on(server.client.bulk_info(&[&handle, &missing])).unwrap();
    assert_eq!(infos[&handle].info.state, "active");
    assert!(infos[&missing].err.is_some());
}

#[test]
fn capacity_and_max_containers() {
    let Some(server) = TestServer::start("capacity_default_pool") else { return };
    let capacity = server.block_on(server.client.capacity()).unwrap();
    assert_eq!(capacity.max_containers, 256, "10.254.0.0/22 holds 256 blocks of /30");
    assert!(capacity.memory_in_bytes > 0, "{capacity:?}");
    assert!(capacity.disk_in_bytes > 0, "{capacity:?}");
    assert!(capacity.schedulable_disk_in_bytes > 0, "{capacity:?}");
    drop(server);

    let options = ServerOptions { max_containers: Some(2), ..ServerOptions::default() };
    let Some(server) = TestServer::start_with("capacity_max_containers", options) else { return };
    assert_eq!(server.block_on(server.client.capacity()).unwrap().max_containers, 2);
    // Three creates at once: two fit, creates in progress included.
    let specs: Vec<ContainerSpec> =
        (0..3).map(|_| ContainerSpec { handle: server.unique_handle("max"), ..ContainerSpec::default() }).collect();
    let results = server.block_on(async {
        let (a, b, c) = tokio::join!(
            server.client.create(&specs[0]),
            server.client.create(&specs[1]),
            server.client.create(&specs[2])
        );
        vec![a, b, c]
    });
    let created: Vec<&String> = results.iter().filter_map(|result| result.as_ref().ok()).collect();
    assert_eq!(created.len(), 2, "{results:?}");
    let failed = results.iter().find_map(|result| result.as_ref().err()).unwrap();
    assert_eq!(failed.to_string(), "max containers reached");
    let loser = specs.iter().find(|spec| !created.contains(&&spec.handle)).unwrap();
    assert!(!server.depot.join(&loser.handle).exists(), "the refused create left its depot entry");
    assert!(support::cgroups_named(&loser.handle).is_empty(), "the refused create left a cgroup");
}

#[test]
fn concurrent_creates_and_destroys() {
    let Some(server) = TestServer::start("concurrent_creates_and_destroys") else { return };
    // Two creates of one handle: exactly one succeeds.
    let spec = ContainerSpec { handle: server.unique_handle("twice"), ..ContainerSpec::default() };
    let (first, second) = server.block_on(async { tokio::join!(server.client.create(&spec), server.client.create(&spec)) });
    let (won, lost) = match (first, second) {
        (Ok(handle), Err(error)) | (Err(error), Ok(handle)) => (handle, error),
        other => panic!("expected one success and one failure, got {other:?}"),
    };
    assert_eq!(lost.to_string(), format!("Handle '{}' already in use", spec.handle));

    // A destroy during a run: the Run client gets an exit status, the
    // destroy succeeds, a second destroy of the same handle is refused or
    // finds nothing.
    server.block_on(async {
        let mut process = server.client.run(&won, &command_spec("sleep", &["1000"]), ProcessIo::default()).await.unwrap();
        let (first, second) = tokio::join!(server.client.destroy(&won), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            server.client.destroy(&won).await
        });
        let results = [first, second];
        assert_eq!(results.iter().filter(|result| result.is_ok()).count(), 1, "{results:?}");
        for error in results.iter().filter_map(|result| result.as_ref().err()) {
            let text = error.to_string();
            assert!(
                text == "container already being destroyed" || matches!(error, ClientError::ContainerNotFound { .. }),
                "{text}"
            );
        }
        let waited = process.wait().await;
        match waited {
            Ok(status) => assert_eq!(status, 137),
            Err(error) => panic!("the Run client got no exit status: {error}"),
        }
    });

    // A destroy racing a reap: every client gets a response and nothing
    // is left behind.
    let handle = server.create("reap-race");
    server.block_on(async {
        let (set, destroyed) = tokio::join!(server.client.set_grace_time(&handle, Duration::ZERO), async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            server.client.destroy(&handle).await
        });
        set.unwrap_or_else(|error| assert!(matches!(error, ClientError::ContainerNotFound { .. }), "{error}"));
        if let Err(error) = destroyed {
            let text = error.to_string();
            assert!(
                text == "container already being destroyed" || matches!(error, ClientError::ContainerNotFound { .. }),
                "{text}"
            );
        }
    });
    wait_until_gone(&server, &handle, Duration::from_secs(10));
    assert!(!listed(&server, &won));
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn grace_time_rules_on_a_real_server() {
    let options = ServerOptions { default_grace_time: "1s".into(), ..ServerOptions::default() };
    let Some(server) = TestServer::start_with("grace_time_rules_on_a_real_server", options) else { return };
    // The server default applies to a spec without a grace time.
    let idle = server.create("idle");
    let properties = server.block_on(server.client.properties(&idle)).unwrap();
    assert_eq!(properties.get("garden.grace-time").map(String::as_str), Some("1000000000"));
    // The others start with an hour, so the time their creates take does
    // not count, and get 1 s once everything is in place.
    let create_for_an_hour = |label: &str| {
        let spec = ContainerSpec { handle: server.unique_handle(label), grace_time: 3_600_000_000_000, ..ContainerSpec::default() };
        server.block_on(server.client.create(&spec)).unwrap()
    };
    let info_polled = create_for_an_hour("info-polled");
    let bulk_polled = create_for_an_hour("bulk-polled");
    let running = create_for_an_hour("running");

    server.block_on(async {
        // A Run connection open for 2.5 s keeps its container.
        let spec = command_spec("sleep", &["2.5"]);
        let mut process = server.client.run(&running, &spec, ProcessIo::default()).await.unwrap();
        for handle in [&info_polled, &bulk_polled, &running] {
            server.client.set_grace_time(handle, Duration::from_secs(1)).await.unwrap();
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(2000) {
            server.client.info(&info_polled).await.unwrap();
            server.client.bulk_info(&[&bulk_polled]).await.unwrap();
            server.client.bulk_metrics(&[&bulk_polled]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let listed = server.client.list(&Properties::new()).await.unwrap();
        assert!(listed.contains(&info_polled), "Info polling did not keep the container");
        assert!(listed.contains(&running), "an open Run connection did not keep the container");
        assert!(!listed.contains(&idle), "the idle container outlived its grace time");
        assert!(!listed.contains(&bulk_polled), "bulk polling kept the container");
        // Keep it for the zero-reset check at the end.
        server.client.set_grace_time(&info_polled, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(process.wait().await.unwrap(), 0);
    });
    // The countdown starts when the Run connection ends.
    wait_until_gone(&server, &running, Duration::from_secs(10));

    // Garden's quirk: zero on an idle container with a timer reaps it now.
    server.block_on(server.client.set_grace_time(&info_polled, Duration::ZERO)).unwrap();
    wait_until_gone(&server, &info_polled, Duration::from_secs(10));
    assert_eq!(server.leftovers(), Vec::<String>::new());
}
