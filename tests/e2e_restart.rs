//! End-to-end tests of server restarts against a real server. Containers
//! and their state come back, and processes keep running and can be
//! attached again with the output produced meanwhile. `kill -9` at fault
//! points leaves every container whole or gone, and start-up removes what
//! no container owns. Needs root; see `support` for how it skips. Every test
//! ends with the harness's leak check.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{command_spec, SharedOutput, TestServer};
use trellis::api::{ContainerSpec, MemoryLimits, NetOutRule, ProcessSpec};
use trellis::client::ProcessIo;

/// Fault point variable of the server (see `trellis::state`).
const FAULT_POINT: &str = trellis::state::FAULT_POINT_VARIABLE;

fn output_io(stdout: &SharedOutput) -> ProcessIo {
    ProcessIo { stdin: None, stdout: Some(Box::new(stdout.clone())), stderr: None }
}

/// Waits until `output` contains `needle`; panics after a minute.
async fn wait_for_text(output: &SharedOutput, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !output.contains(needle.as_bytes()) {
        assert!(Instant::now() < deadline, "waited a minute for {needle:?} in the output");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `path` exists; panics after a minute.
fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(Instant::now() < deadline, "waited a minute for {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Returns the host path of the container's root directory, from the
/// runtime record the server keeps in the depot.
fn container_root(server: &TestServer, handle: &str) -> PathBuf {
    let path = server.depot.join(handle).join("runtime.json");
    let record: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    PathBuf::from(record["root"].as_str().expect("runtime record names the root"))
}

/// Returns the pid of the container's garden-init, from the runtime record.
fn init_pid(server: &TestServer, handle: &str) -> i32 {
    let path = server.depot.join(handle).join("runtime.json");
    let record: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    record["init_pid"].as_i64().expect("runtime record names garden-init") as i32
}

fn listed(server: &TestServer) -> BTreeSet<String> {
    server.block_on(server.client.list(&Default::default())).unwrap().into_iter().collect()
}

/// Returns a shell script that prints `ready`, waits for `/restart-go`, prints
/// `while-down`, creates `/restart-done`, then reads a line and exits with
/// `status`.
fn gated_script(status: i32, read_stdin: bool) -> String {
    let tail = if read_stdin { "read line; echo got-$line; " } else { "" };
    format!(
        "echo ready; while [ ! -e /restart-go ]; do sleep 0.05; done; echo while-down; touch /restart-done; {tail}exit {status}"
    )
}

#[test]
fn restart_keeps_containers_and_state() {
    let Some(mut server) = TestServer::start("restart_keeps_containers_and_state") else { return };
    let handle = server.unique_handle("kept");
    let mut spec = ContainerSpec {
        handle: handle.clone(),
        grace_time: 3_600_000_000_000,
        properties: [("owner".to_string(), "restart-test".to_string())].into_iter().collect(),
        ..ContainerSpec::default()
    };
    spec.limits.memory_limits = MemoryLimits { limit_in_bytes: 64 << 20 };
    server.block_on(server.client.create(&spec)).unwrap();
    server.block_on(server.client.set_property(&handle, "later", "set-after-create")).unwrap();
    let info_before = server.block_on(server.client.info(&handle)).unwrap();
    let ids_before = server.block_on(server.client.run(&handle, &command_spec("true", &[]), ProcessIo::default())).unwrap().stream_id().to_string();

    server.restart();

    assert!(listed(&server).contains(&handle), "the container is listed after the restart");
    let info_after = server.block_on(server.client.info(&handle)).unwrap();
    assert_eq!(info_after.state, info_before.state);
    assert_eq!(info_after.properties, info_before.properties);
    let memory = server.block_on(server.client.memory_limits(&handle)).unwrap();
    assert_eq!(memory.limit_in_bytes, 64 << 20);

    let snapshot = server.introspect();
    assert_eq!(snapshot["pools"]["uid"]["holders"], serde_json::json!(1), "the restored container holds its id mapping again");

    let output = server.run_command(&handle, "echo", &["after restart"]);
    assert_eq!(output.stdout_text(), "after restart\n");
    assert_eq!(output.status, 0);

    let ids_after = server.block_on(server.client.run(&handle, &command_spec("true", &[]), ProcessIo::default())).unwrap().stream_id().to_string();
    assert_ne!(ids_after, ids_before, "stream ids must not repeat across restarts");
    let before: u64 = ids_before.parse().unwrap();
    let after: u64 = ids_after.parse().unwrap();
    assert!(after > before, "stream id {after} after the restart is not above {before}");
}

#[test]
fn process_reattached_after_kill() {
    let Some(mut server) = TestServer::start("process_reattached_after_kill") else { return };
    let handle = server.create("live");
    let root = container_root(&server, &handle);
    let spec = ProcessSpec { id: format!("{}-live", server.name), ..command_spec("sh", &["-c", &gated_script(3, true)]) };
    let first = SharedOutput::default();
    server.block_on(async {
        let process = server.client.run(&handle, &spec, output_io(&first)).await.unwrap();
        wait_for_text(&first, "ready\n").await;
        // The client goes away with the server.
        std::mem::forget(process);
    });

    server.kill_server();
    // Output produced while no server runs.
    fs::write(root.join("restart-go"), b"").unwrap();
    wait_for_file(&root.join("restart-done"));
    server.start_again(&[]);

    let second = SharedOutput::default();
    let status = server.block_on(async {
        let mut process = server.client.attach(&handle, &spec.id, output_io(&second)).await.unwrap();
        process.write_stdin(b"hello\n").await.unwrap();
        process.wait().await.unwrap()
    });
    assert_eq!(status, 3);
    assert_eq!(String::from_utf8_lossy(&second.take()), "while-down\ngot-hello\n");
}

#[test]
fn exit_while_down_reported_on_attach() {
    let Some(mut server) = TestServer::start("exit_while_down_reported_on_attach") else { return };
    let handle = server.create("exited");
    let root = container_root(&server, &handle);
    let spec = ProcessSpec { id: format!("{}-exits", server.name), ..command_spec("sh", &["-c", &gated_script(7, false)]) };
    let first = SharedOutput::default();
    server.block_on(async {
        let process = server.client.run(&handle, &spec, output_io(&first)).await.unwrap();
        wait_for_text(&first, "ready\n").await;
        std::mem::forget(process);
    });

    server.stop();
    fs::write(root.join("restart-go"), b"").unwrap();
    let exit_file = server.depot.join(&handle).join("processes/0/exit-status");
    wait_for_file(&exit_file);
    assert_eq!(fs::read_to_string(&exit_file).unwrap().trim(), "7");
    server.start_again(&[]);

    for round in 0..2 {
        let output = SharedOutput::default();
        let status = server.block_on(async {
            let mut process = server.client.attach(&handle, &spec.id, output_io(&output)).await.unwrap();
            process.wait().await.unwrap()
        });
        assert_eq!(status, 7, "attach {round}");
        if round == 0 {
            assert_eq!(String::from_utf8_lossy(&output.take()), "while-down\n");
        }
    }
}

#[test]
fn dead_init_destroyed_at_startup() {
    let Some(mut server) = TestServer::start("dead_init_destroyed_at_startup") else { return };
    let dead = server.create("dead");
    let alive = server.create("alive");
    let pid = init_pid(&server, &dead);
    server.kill_server();

    // As after a host reboot: garden-init, which the test's server started,
    // is gone.
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "garden-init");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "garden-init {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.start_again(&[]);

    let handles = listed(&server);
    assert!(!handles.contains(&dead), "a container without garden-init is not restored");
    assert!(handles.contains(&alive), "the other container is restored");
    assert!(!server.depot.join(&dead).exists(), "the dead container's directory is removed");
    let log = server.log_text();
    assert!(log.lines().any(|line| line.contains(&dead) && line.contains("garden-init is gone")), "the log names the destroyed container");
}

#[test]
fn bad_state_files_reported_rest_served() {
    let Some(mut server) = TestServer::start("bad_state_files_reported_rest_served") else { return };
    let truncated = server.create("truncated");
    let newer = server.create("newer");
    let good = server.create("good");
    let newer_info = server.block_on(server.client.info(&newer)).unwrap();
    let newer_port = server.block_on(server.client.net_in(&newer, 0, 8080)).unwrap().host_port;
    // The newer container's links: its host veth, named in its runtime
    // record, and its subnet's bridge.
    let record: serde_json::Value = serde_json::from_slice(&fs::read(server.depot.join(&newer).join("runtime.json")).unwrap()).unwrap();
    let gateway: std::net::Ipv4Addr = newer_info.host_ip.parse().unwrap();
    let prefix = trellis::linux::network::link_prefix(&server.tag);
    let newer_links = [
        format!("link {}", record["host_veth"].as_str().expect("the runtime record names the host veth")),
        format!("link {prefix}b{}", trellis::linux::network::address_id(std::net::Ipv4Addr::from(u32::from(gateway) - 1))),
    ];
    server.stop();

    let truncated_file = server.depot.join(&truncated).join("container.json");
    let bytes = fs::read(&truncated_file).unwrap();
    fs::write(&truncated_file, &bytes[..bytes.len() / 2]).unwrap();
    let newer_file = server.depot.join(&newer).join("container.json");
    let original = fs::read(&newer_file).unwrap();
    let mut value: serde_json::Value = serde_json::from_slice(&original).unwrap();
    value["version"] = serde_json::json!(99);
    fs::write(&newer_file, serde_json::to_vec(&value).unwrap()).unwrap();
    server.start_again(&[]);
    // A failed check must still put the newer container's file back, or
    // the cleanup could not destroy it and its garden-init would be left.
    let checks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let handles = listed(&server);
        assert!(handles.contains(&good));
        assert!(!handles.contains(&truncated));
        assert!(!handles.contains(&newer));
        let log = server.log_text();
        assert!(
            log.lines().any(|line| line.contains(&truncated) && line.contains("not a valid state file")),
            "the log says why the truncated container was not restored"
        );
        assert!(
            log.lines().any(|line| line.contains(&newer) && line.contains("format version 99")),
            "the log says why the newer container was not restored"
        );
        assert!(!server.depot.join(&truncated).exists(), "the unreadable container is destroyed");
        assert!(newer_file.exists(), "the newer container is left in place");
        let output = server.run_command(&good, "echo", &["served"]);
        assert_eq!(output.stdout_text(), "served\n");
        // The newer container still runs: its links stay, and its address and
        // host port are not given to another container.
        let table = server.in_netns("nft", &["list", "table", "ip", &format!("trellis_{}", server.tag)]).unwrap();
        assert!(
            table.lines().any(|line| line.contains(&format!("dport {newer_port} ")) || line.contains(&format!("{newer_port} : jump"))),
            "the net-in mapping of the container left in place is not in the table:\n{table}"
        );
        let links_after = server.links_of_tag();
        for link in &newer_links {
            assert!(links_after.contains(link), "{link} of a container left in place was removed: {links_after:?}");
        }
        for _ in 0..3 {
            let other = server.create("other");
            let info = server.block_on(server.client.info(&other)).unwrap();
            assert_ne!(info.container_ip, newer_info.container_ip, "a new container got the address of one left in place");
            let port = server.block_on(server.client.net_in(&other, 0, 8080)).unwrap().host_port;
            assert_ne!(port, newer_port, "a new container got the host port of one left in place");
        }
    }));

    // Put the newer one back, so the cleanup can destroy it.
    server.stop();
    fs::write(&newer_file, original).unwrap();
    server.start_again(&[]);
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
    assert!(listed(&server).contains(&newer));
}

#[test]
fn destroy_on_startup_starts_empty() {
    let Some(mut server) = TestServer::start("destroy_on_startup_starts_empty") else { return };
    let first = server.create("wiped");
    let second = server.create("wiped");
    let spec = command_spec("sleep", &["1000"]);
    server.block_on(server.client.run(&second, &spec, ProcessIo::default())).unwrap();
    server.stop();
    server.add_config(&["destroy-containers-on-startup = true"]);
    server.start_again(&[]);

    assert!(listed(&server).is_empty(), "no container survives destroy-containers-on-startup");
    for handle in [&first, &second] {
        assert!(!server.depot.join(handle).exists(), "{handle}'s directory is removed");
    }
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

/// Starts the server again with `point` armed, runs `action`, which must
/// make the server abort there, and starts it again without the fault.
fn crash_at(server: &mut TestServer, point: &str, action: impl FnOnce(&TestServer)) {
    server.stop();
    server.start_again(&[(FAULT_POINT, point)]);
    action(server);
    assert!(server.wait_for_crash(), "the server did not abort at {point}");
    server.start_again(&[]);
}

#[test]
fn crash_during_create_whole_or_gone() {
    let Some(mut server) = TestServer::start("crash_during_create_whole_or_gone") else { return };
    for point in ["create.after-rootfs", "create.after-cgroup", "create.after-runtime", "create.after-persist"] {
        let handle = server.unique_handle("crash");
        crash_at(&mut server, point, |server| {
            let spec = ContainerSpec { handle: handle.clone(), ..ContainerSpec::default() };
            assert!(server.block_on(server.client.create(&spec)).is_err(), "create must fail when the server aborts at {point}");
        });
        if listed(&server).contains(&handle) {
            let output = server.run_command(&handle, "echo", &["whole"]);
            assert_eq!(output.stdout_text(), "whole\n", "{point}");
            server.block_on(server.client.destroy(&handle)).unwrap();
        } else {
            assert!(!server.depot.join(&handle).exists(), "{point}: a half-made container left its directory");
        }
        assert_eq!(server.leftovers(), Vec::<String>::new(), "{point}");
    }
    let log = server.log_text();
    assert!(log.contains("container destroyed at start-up"), "the restarted server logs what it removed");
}

#[test]
fn crash_during_run_and_destroy() {
    let Some(mut server) = TestServer::start("crash_during_run_and_destroy") else { return };
    let handle = server.create("crash-run");
    crash_at(&mut server, "run.after-start", |server| {
        let spec = ProcessSpec { id: "crashed-run".into(), ..command_spec("sh", &["-c", "echo started; exit 5"]) };
        assert!(server.block_on(server.client.run(&handle, &spec, ProcessIo::default())).is_err());
    });
    assert!(listed(&server).contains(&handle), "the container survives a crash during run");
    let output = server.run_command(&handle, "echo", &["usable"]);
    assert_eq!(output.stdout_text(), "usable\n");
    // The process the crashed run started is found again by its directory.
    let status = server.block_on(async {
        let mut process = server.client.attach(&handle, "crashed-run", ProcessIo::default()).await.unwrap();
        process.wait().await.unwrap()
    });
    assert_eq!(status, 5);

    crash_at(&mut server, "destroy.before-teardown", |server| {
        assert!(server.block_on(server.client.destroy(&handle)).is_err());
    });
    assert!(!listed(&server).contains(&handle), "a destroy under way finishes at start-up");
    assert!(!server.depot.join(&handle).exists());
    assert_eq!(server.leftovers(), Vec::<String>::new());

    // Killed halfway through teardown: garden-init is gone, the rest not.
    let second = server.create("crash-teardown");
    crash_at(&mut server, "teardown.after-init-killed", |server| {
        assert!(server.block_on(server.client.destroy(&second)).is_err());
    });
    assert!(!listed(&server).contains(&second), "a half torn down container is finished at start-up");
    assert!(!server.depot.join(&second).exists());
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn orphan_cgroup_removed_at_startup() {
    let Some(mut server) = TestServer::start("orphan_cgroup_removed_at_startup") else { return };
    let handle = server.create("owner");
    // A cgroup under the server's tag that no container owns, with a
    // process this test started in it.
    let parents: Vec<PathBuf> = support::cgroups_named(&server.tag)
        .into_iter()
        .filter(|path| path.file_name().is_some_and(|name| name == server.tag.as_str()))
        .collect();
    assert!(!parents.is_empty(), "the container's cgroup parent exists");
    let stray_name = format!("{}-stray", server.name);
    let mut sleeper = std::process::Command::new("sleep").arg("1000").spawn().unwrap();
    for parent in &parents {
        let stray = parent.join(&stray_name);
        fs::create_dir(&stray).unwrap();
        fs::write(stray.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    }
    server.stop();
    server.start_again(&[]);

    assert!(listed(&server).contains(&handle), "the owned container is kept");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if sleeper.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = sleeper.kill();
            let _ = sleeper.wait();
            panic!("the process in the orphan cgroup was not killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for parent in &parents {
        assert!(!parent.join(&stray_name).exists(), "orphan cgroup {} is removed", parent.join(&stray_name).display());
    }
    let log = server.log_text();
    assert!(log.lines().any(|line| line.contains("orphan removed at start-up") && line.contains(&stray_name)), "the removal is logged");
}

#[test]
fn grace_timer_restarts_full_after_restart() {
    let Some(mut server) = TestServer::start("grace_timer_restarts_full_after_restart") else { return };
    let handle = server.unique_handle("graced");
    let spec = ContainerSpec { handle: handle.clone(), grace_time: 4_000_000_000, ..ContainerSpec::default() };
    server.block_on(server.client.create(&spec)).unwrap();
    // Most of the grace time passes before the stop.
    std::thread::sleep(Duration::from_secs(3));
    server.stop();
    server.start_again(&[]);
    let restarted = Instant::now();
    assert!(listed(&server).contains(&handle), "the container is restored");

    // A fresh, full timer: still there when the old deadline has long
    // passed, and reaped once the new one has.
    while restarted.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(listed(&server).contains(&handle), "the restored container kept the time left of its old timer");
    let deadline = Instant::now() + Duration::from_secs(60);
    while listed(&server).contains(&handle) {
        assert!(Instant::now() < deadline, "the restored container was not reaped after its grace time");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(restarted.elapsed() >= Duration::from_secs(4), "reaped before a full grace time after the restart");
    assert!(!server.depot.join(&handle).exists());
}

#[test]
fn output_while_down_is_bounded() {
    let Some(mut server) = TestServer::start("output_while_down_is_bounded") else { return };
    let handle = server.create("bounded");
    let root = container_root(&server, &handle);
    // About 1.9 MB of numbered lines while no server runs, more than the
    // shim keeps; the process must finish all the same.
    let script = "echo ready; while [ ! -e /restart-go ]; do sleep 0.05; done; seq 1 280000; echo end; touch /restart-done";
    let spec = ProcessSpec { id: format!("{}-flood", server.name), ..command_spec("sh", &["-c", script]) };
    let first = SharedOutput::default();
    server.block_on(async {
        let process = server.client.run(&handle, &spec, output_io(&first)).await.unwrap();
        wait_for_text(&first, "ready\n").await;
        std::mem::forget(process);
    });
    server.kill_server();
    fs::write(root.join("restart-go"), b"").unwrap();
    wait_for_file(&root.join("restart-done"));
    server.start_again(&[]);

    let output = SharedOutput::default();
    let status = server.block_on(async {
        let mut process = server.client.attach(&handle, &spec.id, output_io(&output)).await.unwrap();
        process.wait().await.unwrap()
    });
    assert_eq!(status, 0);
    let text = String::from_utf8_lossy(&output.take()).into_owned();
    assert!(text.ends_with("279999\n280000\nend\n"), "the newest output is kept: {:?}", &text[text.len().saturating_sub(40)..]);
    assert!(text.len() <= trellis::linux::shim::DETACHED_OUTPUT_LIMIT, "kept {} bytes, more than the bound", text.len());
    assert!(!text.starts_with("1\n"), "the oldest output was dropped");
}

#[test]
fn shim_sleeps_without_server() {
    let Some(mut server) = TestServer::start("shim_sleeps_without_server") else { return };
    let handle = server.create("idle");
    let spec = ProcessSpec { id: format!("{}-idle", server.name), ..command_spec("sleep", &["1000"]) };
    server.block_on(server.client.run(&handle, &spec, ProcessIo::default())).unwrap();
    server.kill_server();

    use std::os::unix::fs::PermissionsExt;
    let socket = server.depot.join(&handle).join("processes/0/sock");
    let mode = fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the shim's socket {} is open to other users: {mode:o}", socket.display());

    let shims = support::processes_working_under(&server.depot);
    assert_eq!(shims.len(), 1, "one shim runs: {shims:?}");
    let pid = shims[0].0;
    // A shim that spun on the closed connection would be seen running.
    let mut running = 0;
    for _ in 0..40 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = stat.rsplit_once(')').unwrap().1.split_whitespace().next().unwrap().to_string();
        if state == "R" {
            running += 1;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(running <= 2, "the shim was running in {running} of 40 samples");
    server.start_again(&[]);
    server.block_on(server.client.destroy(&handle)).unwrap();
}

/// Creates, runs and destroys 1000 containers, killing the server with
/// SIGKILL at a random step every 50 cycles. Not in the default run; see
/// the README.
#[test]
#[ignore = "soak test: about 1000 containers; run with --ignored"]
fn soak_restart_cycles() {
    let Some(mut server) = TestServer::start("soak_restart_cycles") else { return };
    let mut seed = u64::from(std::process::id()) | 1;
    let mut random = move |bound: u64| {
        // xorshift64, enough to vary the kill step between runs.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    let mut kills = 0;
    for cycle in 0..1000u64 {
        let kill_step = if cycle % 50 == 49 { Some(random(3)) } else { None };
        kills += usize::from(kill_step.is_some());
        let handle = server.unique_handle("soak");
        server.block_on(server.client.create(&ContainerSpec { handle: handle.clone(), ..ContainerSpec::default() })).unwrap();
        // A host port too, so that the port pool is exercised.
        server.block_on(server.client.net_in(&handle, 0, 8080)).unwrap();
        if kill_step == Some(0) {
            server.kill_server();
            server.start_again(&[]);
            assert!(listed(&server).contains(&handle), "cycle {cycle}: created container lost");
        }

        let expected = (cycle % 200) as i64;
        let spec = ProcessSpec { id: format!("soak-{cycle}"), ..command_spec("sh", &["-c", &format!("exit {expected}")]) };
        let status = if kill_step == Some(1) {
            let process = server.block_on(server.client.run(&handle, &spec, ProcessIo::default())).unwrap();
            std::mem::forget(process);
            server.kill_server();
            server.start_again(&[]);
            server.block_on(async {
                let mut process = server.client.attach(&handle, &spec.id, ProcessIo::default()).await.unwrap();
                process.wait().await.unwrap()
            })
        } else {
            server.run(&handle, &spec, None).unwrap().status
        };
        assert_eq!(status, expected, "cycle {cycle}: exit status lost");

        server.block_on(server.client.destroy(&handle)).unwrap();
        if kill_step == Some(2) {
            server.kill_server();
            server.start_again(&[]);
            assert!(!listed(&server).contains(&handle), "cycle {cycle}: destroyed container came back");
        }
    }
    assert_eq!(kills, 20, "the server is killed every 50 cycles");
    assert!(listed(&server).is_empty());
    let snapshot = server.introspect();
    assert_eq!(snapshot["pools"]["uid"]["holders"], serde_json::json!(0), "every id mapping is back in the pool");
    assert_eq!(snapshot["pools"]["subnet"]["allocated"], serde_json::json!(0), "every subnet is back in the pool: {}", snapshot["pools"]);
    assert_eq!(snapshot["pools"]["port"]["allocated"], serde_json::json!(0), "every host port is back in the pool: {}", snapshot["pools"]);
    assert_eq!(server.leftovers(), Vec::<String>::new());
    let log = server.log_text();
    assert_eq!(log.matches("\"server listening\"").count(), 21, "the server started once plus once per kill");
}

#[test]
fn crash_during_stream_in_keeps_container() {
    use tokio::io::AsyncWriteExt;
    let Some(mut server) = TestServer::start("crash_during_stream_in_keeps_container") else { return };
    let handle = server.create("stream");
    let mut header = tar::Header::new_ustar();
    header.set_path("partial").unwrap();
    header.set_size(1 << 20);
    header.set_mode(0o644);
    header.set_cksum();
    let (writer, task) = server.block_on(async {
        let (mut writer, mut reader) = tokio::io::duplex(64 * 1024);
        let client = server.client.clone();
        let target = handle.clone();
        let task = tokio::spawn(async move { client.stream_in(&target, "/", "", &mut reader).await });
        writer.write_all(header.as_bytes()).await.unwrap();
        writer.write_all(&[b'x'; 64 * 1024]).await.unwrap();
        // The archive stays unfinished, so the server is in the middle of
        // the stream in when it is killed.
        tokio::time::sleep(Duration::from_millis(500)).await;
        (writer, task)
    });
    server.kill_server();
    // The client notices the dead server only when it sends more, so the
    // archive ends here, still short of its declared size.
    drop(writer);
    let result = server.block_on(task).unwrap();
    assert!(result.is_err(), "a stream in cut by the server's death must fail");
    server.start_again(&[]);

    assert!(listed(&server).contains(&handle), "the container survives a crash during stream in");
    let output = server.run_command(&handle, "echo", &["after stream in"]);
    assert_eq!(output.stdout_text(), "after stream in\n");
}

#[test]
fn full_depot_rejects_changes_keeps_state() {
    let options = support::ServerOptions { depot_tmpfs_mib: Some(64), ..support::ServerOptions::default() };
    let Some(mut server) = TestServer::start_with("full_depot_rejects_changes_keeps_state", options) else { return };
    let handle = server.create("full");
    server.block_on(server.client.set_property(&handle, "before", "kept")).unwrap();

    // Fill the depot's filesystem to the last block.
    let filler = server.depot.join("filler");
    {
        use std::io::Write;
        let mut file = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        loop {
            if file.write_all(&block).is_err() {
                break;
            }
        }
        let single = [0u8; 1];
        while file.write_all(&single).is_ok() {}
    }
    let error = server.block_on(server.client.set_property(&handle, "after", "lost")).unwrap_err();
    assert!(error.to_string().contains("container.json"), "the error names the state file: {error}");
    let properties = server.block_on(server.client.properties(&handle)).unwrap();
    assert!(!properties.contains_key("after"), "a change that could not be stored is not applied");

    // A restart on the full disk restores the last stored state.
    server.stop();
    server.start_again(&[]);
    let properties = server.block_on(server.client.properties(&handle)).unwrap();
    assert_eq!(properties.get("before").map(String::as_str), Some("kept"));
    assert!(!properties.contains_key("after"));
    fs::remove_file(&filler).unwrap();
}

#[test]
fn earlier_release_depot_upgraded() {
    let Some(mut server) = TestServer::start("earlier_release_depot_upgraded") else { return };
    let handle = server.create("old");
    server.block_on(server.client.set_property(&handle, "kept", "yes")).unwrap();
    server.stop();

    // Turn the directory into what the first releases wrote: a state file
    // without version, processes or id mappings, and no runtime record.
    let dir = server.depot.join(&handle);
    fs::remove_file(dir.join("runtime.json")).unwrap();
    let state_file = dir.join("container.json");
    let mut value: serde_json::Value = serde_json::from_slice(&fs::read(&state_file).unwrap()).unwrap();
    let object = value.as_object_mut().unwrap();
    for field in ["version", "processes", "id_mappings"] {
        object.remove(field);
    }
    fs::write(&state_file, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    server.start_again(&[]);

    assert!(listed(&server).contains(&handle), "the earlier release's container is restored");
    let properties = server.block_on(server.client.properties(&handle)).unwrap();
    assert_eq!(properties.get("kept").map(String::as_str), Some("yes"));
    let output = server.run_command(&handle, "id", &["-u"]);
    assert_eq!(output.stdout_text(), "0\n");
    assert!(dir.join("runtime.json").exists(), "the runtime record is written again");
    let upgraded: serde_json::Value = serde_json::from_slice(&fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(upgraded["version"], serde_json::json!(trellis::state::STATE_VERSION), "the state file is upgraded in place");
}

/// Lists the loop devices whose backing file is below the server's depot.
fn loop_devices_of(server: &TestServer) -> Vec<String> {
    let output = std::process::Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
        .unwrap();
    let depot = server.depot.to_string_lossy().into_owned();
    String::from_utf8_lossy(&output.stdout).lines().filter(|line| line.contains(&depot)).map(str::to_string).collect()
}

#[test]
fn restart_keeps_disk_limit_and_oom_watch() {
    let Some(mut server) = TestServer::start("restart_keeps_disk_limit_and_oom_watch") else { return };
    let handle = server.unique_handle("limited");
    let mut spec = ContainerSpec { handle: handle.clone(), ..ContainerSpec::default() };
    spec.limits.memory_limits = MemoryLimits { limit_in_bytes: 64 << 20 };
    spec.limits.disk_limits.byte_hard = 10 << 20;
    spec.limits.disk_limits.scope = 1;
    server.block_on(server.client.create(&spec)).unwrap();
    let oom = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"]);
    assert_eq!(oom.status, 137, "a 128 MiB buffer is killed under 64 MiB: {}", oom.stderr_text());

    server.restart();

    // The disk limit's filesystem is still the writable layer.
    let fits = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/fits", "bs=1M", "count=9"]);
    assert_eq!(fits.status, 0, "9 MiB fit in 10 MiB after the restart: {}", fits.stderr_text());
    let over = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/over", "bs=1M", "count=2"]);
    assert_ne!(over.status, 0, "the limit still holds after the restart");
    assert!(over.stderr_text().contains("No space left on device"), "{}", over.stderr_text());
    let metrics = server.block_on(server.client.metrics(&handle)).unwrap();
    assert!(metrics.disk_stat.exclusive_bytes_used >= 9 << 20, "{:?}", metrics.disk_stat);

    // The event of the kill before the restart is kept, and the watch runs
    // again: a second kill adds a second event.
    let events = |server: &TestServer| server.block_on(server.client.info(&handle)).unwrap().events.unwrap_or_default();
    assert_eq!(events(&server), vec!["Out of memory".to_string()]);
    let again = server.run_command(&handle, "dd", &["if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"]);
    assert_eq!(again.status, 137);
    let deadline = Instant::now() + Duration::from_secs(5);
    while events(&server).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(events(&server), vec!["Out of memory".to_string(), "Out of memory".to_string()]);

    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(loop_devices_of(&server), Vec::<String>::new(), "destroy releases the restored loop device");
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn restart_keeps_network_allocations() {
    let Some(mut server) = TestServer::start("restart_keeps_network_allocations") else { return };
    let first = server.create("first");
    let mapping = server.block_on(server.client.net_in(&first, 0, 8080)).unwrap();
    let before = server.block_on(server.client.info(&first)).unwrap();

    server.restart();

    let after = server.block_on(server.client.info(&first)).unwrap();
    assert_eq!(after.container_ip, before.container_ip);
    assert_eq!(after.host_ip, before.host_ip);
    assert_eq!(after.mapped_ports, before.mapped_ports);
    // The pools took the subnet and the host port back: a new container
    // gets another subnet, and the port can't be mapped twice.
    let second = server.create("second");
    let other = server.block_on(server.client.info(&second)).unwrap();
    assert_ne!(other.container_ip, before.container_ip, "the restored subnet is not given out again");
    let error = server.block_on(server.client.net_in(&second, mapping.host_port, 80)).unwrap_err();
    assert!(error.to_string().contains("already acquired"), "{error}");
}

#[test]
fn crash_during_net_in_and_out() {
    let Some(mut server) = TestServer::start("crash_during_net_in_and_out") else { return };
    let handle = server.create("crash-net");
    // The rules are in the kernel when the server dies, but not in the
    // state file; the restarted server's fresh firewall table has neither.
    crash_at(&mut server, "net-in.after-apply", |server| {
        assert!(server.block_on(server.client.net_in(&handle, 0, 8080)).is_err(), "net-in must fail when the server aborts");
    });
    let info = server.block_on(server.client.info(&handle)).unwrap();
    assert_eq!(info.mapped_ports.unwrap_or_default(), Vec::new(), "a mapping the server never recorded is not reported");
    let table = format!("trellis_{}", server.tag);
    let rules = server.in_netns("nft", &["list", "table", "ip", &table]).unwrap();
    assert!(!rules.contains("dport 61001"), "the unrecorded mapping is still in the table:\n{rules}");
    let mapped = server.block_on(server.client.net_in(&handle, 0, 8080)).expect("net-in after the crash");
    assert_eq!(mapped.host_port, 61001, "the port of the lost mapping is free again");

    let rule = NetOutRule {
        protocol: trellis::api::PROTOCOL_TCP,
        networks: vec![trellis::api::IpRange { start: Some("192.0.2.9".parse().unwrap()), end: Some("192.0.2.9".parse().unwrap()) }],
        ..NetOutRule::default()
    };
    crash_at(&mut server, "net-out.after-apply", |server| {
        assert!(server.block_on(server.client.net_out(&handle, &rule)).is_err(), "net-out must fail when the server aborts");
    });
    let rules = server.in_netns("nft", &["list", "table", "ip", &table]).unwrap();
    assert!(!rules.contains("192.0.2.9"), "the unrecorded net-out rule is still in the table:\n{rules}");
    assert!(rules.contains("dport 61001"), "the recorded mapping is back in the table:\n{rules}");
    server.block_on(server.client.net_out(&handle, &rule)).expect("net-out after the crash");

    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(server.leftovers(), Vec::<String>::new());
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

/// Waits until `output` has stopped growing for half a second and returns
/// its bytes, so a client cut off by a killed server has read everything
/// the kernel still held for it.
fn settled(output: &SharedOutput) -> Vec<u8> {
    let mut length = output.len();
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(50));
        if output.len() != length {
            length = output.len();
            stable_since = Instant::now();
        }
    }
    output.take()
}

/// Returns the lines `1` to `last`, as `seq` prints them.
fn numbered_lines(last: u32) -> String {
    (1..=last).map(|number| format!("{number}\n")).collect()
}

/// Returns a script that prints the lines `1` to `last` in bursts of 100,
/// a tenth of a second apart, then `end`, and exits 0 once `/seq-go`
/// exists.
fn numbered_script(last: u32) -> String {
    format!(
        "i=1; while [ $i -le {last} ]; do seq $i $((i + 99)); i=$((i + 100)); sleep 0.1; done; echo end; \
         while [ ! -e /seq-go ]; do sleep 0.05; done"
    )
}

/// Waits until `received` plus the output collected so far contains at
/// least `lines` lines; panics after a minute.
fn wait_for_lines(received: &[u8], output: &SharedOutput, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = received.iter().filter(|byte| **byte == b'\n').count() + output.count_lines();
        if seen >= lines {
            return;
        }
        assert!(Instant::now() < deadline, "waited a minute for {lines} lines, have {seen}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn output_kept_across_kills() {
    const LAST: u32 = 8000;
    let Some(mut server) = TestServer::start("output_kept_across_kills") else { return };
    let handle = server.create("numbered");
    let root = container_root(&server, &handle);
    let spec = ProcessSpec { id: format!("{}-numbered", server.name), ..command_spec("sh", &["-c", &numbered_script(LAST)]) };
    let mut received = Vec::new();

    // Killed while a client is attached and output flows to it.
    let first = SharedOutput::default();
    server.block_on(async {
        let process = server.client.run(&handle, &spec, output_io(&first)).await.unwrap();
        std::mem::forget(process);
    });
    wait_for_lines(&received, &first, 1500);
    server.kill_server();
    received.extend(settled(&first));
    server.start_again(&[]);

    // Killed while no client is attached: the output waits in the new
    // server's buffer and the shim, unacknowledged.
    std::thread::sleep(Duration::from_millis(1500));
    server.kill_server();
    server.start_again(&[]);

    // Attached again, then killed a third time while output flows.
    let second = SharedOutput::default();
    server.block_on(async {
        let process = server.client.attach(&handle, &spec.id, output_io(&second)).await.unwrap();
        std::mem::forget(process);
    });
    wait_for_lines(&received, &second, 5000);
    server.kill_server();
    received.extend(settled(&second));
    server.start_again(&[]);

    let last = SharedOutput::default();
    let status = server.block_on(async {
        let mut process = server.client.attach(&handle, &spec.id, output_io(&last)).await.unwrap();
        wait_for_text(&last, "end\n").await;
        fs::write(root.join("seq-go"), b"").unwrap();
        process.wait().await.unwrap()
    });
    assert_eq!(status, 0);
    received.extend(last.take());

    let text = String::from_utf8(received).unwrap();
    let problem = sequence_problem(&text, LAST, REPEAT_LIMIT);
    assert!(problem.is_none(), "the output across attaches is not the sequence: {}", problem.unwrap_or_default());
}

/// Bytes of output that the kills may deliver twice: what was written to a
/// client but not yet acknowledged to the shim when it died. The script
/// writes bursts of about 500 bytes, and two kills have a client attached.
/// A few bursts each is far below the 38 KiB of the whole output, so a
/// replay of everything fails.
const REPEAT_LIMIT: usize = 4 * 1024;

/// Checks that `text` is the lines `1` to `last` and `end`, in order and
/// with no line missing. Lines already seen may come again (the chunk in
/// flight at a kill), up to `repeat_limit` bytes in all. Returns what is
/// wrong, or `None`.
fn sequence_problem(text: &str, last: u32, repeat_limit: usize) -> Option<String> {
    let mut next = 1;
    let mut repeated = 0;
    for (index, line) in text.lines().enumerate() {
        if line == "end" && next == last + 1 {
            next += 1;
            continue;
        }
        let Ok(number) = line.parse::<u32>() else {
            return Some(format!("line {} is {line:?}, expected {next}", index + 1));
        };
        if number == next {
            next += 1;
        } else if number < next && next <= last + 1 {
            repeated += line.len() + 1;
        } else {
            return Some(format!("line {} is {number}, expected {next}: output was lost", index + 1));
        }
    }
    if next != last + 2 {
        return Some(format!("the output ended before line {next}"));
    }
    (repeated > repeat_limit).then(|| format!("{repeated} bytes came twice, more than {repeat_limit}"))
}

#[test]
fn sequence_check_allows_only_repeats() {
    let exact = numbered_lines(5) + "end\n";
    assert_eq!(sequence_problem(&exact, 5, 0), None);
    let repeat = "1\n2\n3\n2\n3\n4\n5\nend\n";
    assert_eq!(sequence_problem(repeat, 5, 4), None);
    assert!(sequence_problem(repeat, 5, 3).is_some(), "a repeat above the limit passed");
    assert!(sequence_problem("1\n2\n4\n5\nend\n", 5, 100).is_some(), "a gap passed");
    assert!(sequence_problem("1\n2\n3\n4\n5\n", 5, 100).is_some(), "a missing end passed");
}

#[test]
fn previous_release_shim_reattached() {
    let Some(mut server) = TestServer::start("previous_release_shim_reattached") else { return };
    let handle = server.create("old-shim");
    let root = container_root(&server, &handle);

    // A server whose shims speak protocol version 1, as the previous
    // release's do, starts the process.
    server.stop();
    server.start_again(&[(trellis::linux::shim::PROTOCOL_VARIABLE, "1")]);
    let spec = ProcessSpec { id: format!("{}-old", server.name), ..command_spec("sh", &["-c", &gated_script(4, true)]) };
    let first = SharedOutput::default();
    server.block_on(async {
        let process = server.client.run(&handle, &spec, output_io(&first)).await.unwrap();
        wait_for_text(&first, "ready\n").await;
        std::mem::forget(process);
    });

    server.kill_server();
    fs::write(root.join("restart-go"), b"").unwrap();
    wait_for_file(&root.join("restart-done"));
    // This release's server takes the version 1 shim over.
    server.start_again(&[]);

    let second = SharedOutput::default();
    let status = server.block_on(async {
        let mut process = server.client.attach(&handle, &spec.id, output_io(&second)).await.unwrap();
        process.write_stdin(b"old\n").await.unwrap();
        process.wait().await.unwrap()
    });
    assert_eq!(status, 4);
    assert_eq!(String::from_utf8_lossy(&second.take()), "while-down\ngot-old\n");
    let log = server.log_text();
    let reconnected = log.lines().find(|line| line.contains("process shim reconnected") && line.contains(&spec.id));
    let reconnected = reconnected.expect("the restarted server logs the reconnected shim");
    assert!(reconnected.contains(r#""protocol_version":1"#), "the shim did not speak version 1: {reconnected}");

    // A process of this release's shim still runs alongside.
    let output = server.run_command(&handle, "echo", &["new"]);
    assert_eq!(output.stdout_text(), "new\n");
}

#[test]
fn lost_shim_reported_on_attach() {
    let Some(mut server) = TestServer::start("lost_shim_reported_on_attach") else { return };
    let handle = server.create("lost-shim");
    let spec = ProcessSpec { id: format!("{}-lost", server.name), ..command_spec("sleep", &["1000"]) };
    server.block_on(server.client.run(&handle, &spec, ProcessIo::default())).unwrap();
    server.kill_server();

    // The shim this test's server started goes away while no server runs.
    let shims = support::processes_working_under(&server.depot);
    assert_eq!(shims.len(), 1, "one shim runs: {shims:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shims[0].0 as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    server.start_again(&[]);

    let result = server.block_on(async {
        let mut process = server.client.attach(&handle, &spec.id, ProcessIo::default()).await.unwrap();
        process.wait().await
    });
    let error = result.expect_err("the attach of a process whose shim is gone reports an error").to_string();
    assert!(error.contains("unreachable"), "the error does not say why: {error}");
    server.block_on(server.client.destroy(&handle)).unwrap();
}

/// Destroy renames a container's state directory away and deletes it on a
/// thread, so the handle is free at once. Shutdown finishes the deletion,
/// and start-up deletes what a killed server left.
#[test]
fn destroy_discards_state_directory() {
    let Some(mut server) = TestServer::start("destroy_discards_state_directory") else { return };
    let handle = server.create("reused");
    assert_eq!(server.run_command(&handle, "sh", &["-c", "echo data > /tmp/written"]).status, 0);
    server.block_on(server.client.destroy(&handle)).unwrap();
    assert!(!server.depot.join(&handle).exists(), "the handle's directory is gone when destroy returns");
    let spec = ContainerSpec { handle: handle.clone(), ..ContainerSpec::default() };
    server.block_on(server.client.create(&spec)).expect("the handle can be used again at once");
    let output = server.run_command(&handle, "ls", &["/tmp"]);
    assert_eq!(output.stdout_text(), "", "the new container starts with the image's empty /tmp");
    server.block_on(server.client.destroy(&handle)).unwrap();
    server.stop();
    let discarded = |server: &TestServer| -> Vec<String> {
        fs::read_dir(&server.depot)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("removed@"))
            .collect()
    };
    assert_eq!(discarded(&server), Vec::<String>::new(), "a stopped server leaves no discarded directory");

    // A server killed after the rename, before the deletion.
    let point = "trash.before-delete";
    server.start_again(&[(FAULT_POINT, point)]);
    let crashed = server.create("crashed");
    let _ = server.block_on(server.client.destroy(&crashed));
    assert!(server.wait_for_crash(), "the server did not abort at {point}");
    let left = discarded(&server);
    assert_eq!(left.len(), 1, "the killed server left one discarded directory: {left:?}");
    assert!(!server.depot.join(&crashed).exists(), "the destroyed container's directory was renamed");
    server.start_again(&[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !discarded(&server).is_empty() {
        assert!(Instant::now() < deadline, "start-up did not delete {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(listed(&server).is_empty(), "a discarded directory is not a container");
    let log = server.log_text();
    assert!(
        log.lines().any(|line| line.contains(&left[0]) && line.contains("an earlier server left")),
        "the log names the deleted directory"
    );
    assert!(
        !log.lines().any(|line| line.contains(&left[0]) && line.contains("container destroyed at start-up")),
        "a discarded directory is not treated as a container"
    );
    assert_eq!(server.leftovers(), Vec::<String>::new());
}
