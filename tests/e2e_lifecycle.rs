//! End-to-end tests of the container and process lifecycle: a real
//! `trellis server` with the Linux runtime, reached through the Rust client
//! over a Unix socket. They need root; see `support` for how they skip.

mod support;

use std::collections::BTreeMap;

use support::{command_spec, cgroups_named, mounts_under, TestServer};
use trellis::api::{BindMount, ContainerSpec, Limits, MemoryLimits, Properties, TtySpec, WindowSize};
use trellis::client::{ClientError, ProcessIo, Signal};

#[test]
fn create_run_list_destroy() {
    let Some(server) = TestServer::start("create_run_list_destroy") else { return };
    let handle = server.create("echo");

    let output = server.run_command(&handle, "echo", &["hello from the container"]);
    assert_eq!(output.stdout_text(), "hello from the container\n");
    assert_eq!(output.stderr_text(), "");
    assert_eq!(output.status, 0);

    let listed = server.block_on(server.client.list(&Properties::new())).unwrap();
    assert!(listed.contains(&handle), "{handle} missing from {listed:?}");
    let info = server.block_on(server.client.info(&handle)).unwrap();
    assert_eq!(info.state, "active");

    server.block_on(server.client.destroy(&handle)).unwrap();
    let listed = server.block_on(server.client.list(&Properties::new())).unwrap();
    assert!(!listed.contains(&handle), "{handle} still listed after destroy");
    let error = server.block_on(server.client.info(&handle)).unwrap_err();
    assert!(matches!(error, ClientError::ContainerNotFound { .. }), "{error:?}");
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn list_filters_by_property() {
    let Some(server) = TestServer::start("list_filters_by_property") else { return };
    let red = ContainerSpec {
        handle: server.unique_handle("red"),
        properties: Properties::from([("team".into(), "red".into()), ("tier".into(), "a b/c".into())]),
        ..ContainerSpec::default()
    };
    let blue = ContainerSpec {
        handle: server.unique_handle("blue"),
        properties: Properties::from([("team".into(), "blue".into())]),
        ..ContainerSpec::default()
    };
    let red_handle = server.block_on(server.client.create(&red)).unwrap();
    let blue_handle = server.block_on(server.client.create(&blue)).unwrap();

    let filter = Properties::from([("team".into(), "red".into())]);
    assert_eq!(server.block_on(server.client.list(&filter)).unwrap(), std::slice::from_ref(&red_handle));
    let filter = Properties::from([("team".into(), "red".into()), ("tier".into(), "a b/c".into())]);
    assert_eq!(server.block_on(server.client.list(&filter)).unwrap(), std::slice::from_ref(&red_handle));
    let filter = Properties::from([("team".into(), "blue".into()), ("tier".into(), "a b/c".into())]);
    assert!(server.block_on(server.client.list(&filter)).unwrap().is_empty());

    server.block_on(server.client.set_property(&blue_handle, "color", "teal")).unwrap();
    assert_eq!(server.block_on(server.client.property(&blue_handle, "color")).unwrap(), "teal");
    server.block_on(server.client.remove_property(&blue_handle, "color")).unwrap();
    let properties = server.block_on(server.client.properties(&blue_handle)).unwrap();
    assert!(!properties.contains_key("color"), "{properties:?}");
}

#[test]
fn exit_codes_reach_client() {
    let Some(server) = TestServer::start("exit_codes_reach_client") else { return };
    let handle = server.create("exit");
    for (script, expected) in [("exit 0", 0), ("exit 1", 1), ("exit 42", 42), ("exit 255", 255)] {
        let output = server.run_command(&handle, "sh", &["-c", script]);
        assert_eq!(output.status, expected, "sh -c {script:?}");
    }
    assert_eq!(server.run_command(&handle, "true", &[]).status, 0);
    assert_eq!(server.run_command(&handle, "false", &[]).status, 1);
}

#[test]
fn stdin_round_trip_with_cat() {
    let Some(server) = TestServer::start("stdin_round_trip_with_cat") else { return };
    let handle = server.create("cat");
    // Stdin travels as JSON strings, so the input is text; multi-byte
    // characters check that no character is cut between messages.
    let line = "stdin line with ü, € and 🦀 characters\n";
    // About 1 MiB, so stdin spans many 32 KiB messages.
    let input = line.repeat((1 << 20) / line.len() + 1);
    let output = server
        .run(&handle, &command_spec("cat", &[]), Some(input.clone().into_bytes()))
        .unwrap();
    assert_eq!(output.status, 0);
    assert_eq!(output.stdout.len(), input.len());
    assert!(output.stdout == input.as_bytes(), "stdout differs from stdin");
    assert_eq!(output.stderr_text(), "");
}

#[test]
fn attach_to_running_process() {
    let Some(server) = TestServer::start("attach_to_running_process") else { return };
    let handle = server.create("attach");
    // The process waits for end of input before it exits, so the close is
    // part of the exchange and never races the exit.
    let mut spec =
        command_spec("sh", &["-c", "read first; echo got-$first; read second; echo got-$second >&2; cat >/dev/null; exit 7"]);
    spec.id = format!("{}-process", server.name);

    server.block_on(async {
        // The first client attaches no output, so the process runs
        // detached until the second client attaches.
        let mut first = server.client.run(&handle, &spec, ProcessIo::default()).await.unwrap();
        assert_eq!(first.id(), spec.id);

        let stdout = support::SharedOutput::default();
        let stderr = support::SharedOutput::default();
        let io = ProcessIo {
            stdin: None,
            stdout: Some(Box::new(stdout.clone())),
            stderr: Some(Box::new(stderr.clone())),
        };
        let mut second = server.client.attach(&handle, &spec.id, io).await.unwrap();
        assert_eq!(second.id(), spec.id);
        assert_ne!(second.stream_id(), first.stream_id());

        second.write_stdin(b"one\n").await.unwrap();
        // The two writes travel on different connections, so waiting for
        // the first line's output keeps their order.
        support::wait_for_output(&stdout, "got-one\n".len(), "the answer to the first line").await;
        // The close goes on the same connection as the second line, which
        // keeps it behind that line.
        first.write_stdin(b"two\n").await.unwrap();
        first.close_stdin().await.unwrap();

        assert_eq!(second.wait().await.unwrap(), 7);
        assert_eq!(first.wait().await.unwrap(), 7);
        assert_eq!(String::from_utf8(stdout.take()).unwrap(), "got-one\n");
        assert_eq!(String::from_utf8(stderr.take()).unwrap(), "got-two\n");
    });
}

#[test]
fn signal_terminates_process() {
    let Some(server) = TestServer::start("signal_terminates_process") else { return };
    let handle = server.create("signal");
    server.block_on(async {
        let spec = command_spec("sh", &["-c", "trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 1; done"]);
        let stdout = support::SharedOutput::default();
        let io = ProcessIo {
            stdout: Some(Box::new(stdout.clone())),
            ..ProcessIo::default()
        };
        let mut process = server.client.run(&handle, &spec, io).await.unwrap();
        support::wait_for_output(&stdout, "ready\n".len(), "the ready line").await;
        process.signal(Signal::Terminate).await.unwrap();
        assert_eq!(process.wait().await.unwrap(), 3);
        assert_eq!(String::from_utf8(stdout.take()).unwrap(), "ready\ngot-term\n");
    });
}

#[test]
fn stop_ends_processes() {
    let Some(server) = TestServer::start("stop_ends_processes") else { return };
    let handle = server.create("stop");
    server.block_on(async {
        let spec = command_spec("sleep", &["1000"]);
        let mut process = server.client.run(&handle, &spec, ProcessIo::default()).await.unwrap();
        server.client.stop(&handle, true).await.unwrap();
        let status = process.wait().await.unwrap();
        assert_ne!(status, 0, "sleep killed by stop exited with 0");
        let info = server.client.info(&handle).await.unwrap();
        assert_eq!(info.state, "stopped");
    });
}

#[test]
fn bad_input_gets_envelope() {
    let Some(server) = TestServer::start("bad_input_gets_envelope") else { return };
    let client = &server.client;
    let unknown = server.unique_handle("unknown");

    let error = server.block_on(client.info(&unknown)).unwrap_err();
    assert!(matches!(&error, ClientError::ContainerNotFound { handle } if *handle == unknown), "{error:?}");
    let error = server.block_on(client.destroy(&unknown)).unwrap_err();
    assert!(matches!(&error, ClientError::ContainerNotFound { handle } if *handle == unknown), "{error:?}");
    let error = server
        .block_on(client.run(&unknown, &command_spec("true", &[]), ProcessIo::default()))
        .err()
        .expect("run in an unknown container fails");
    assert!(matches!(&error, ClientError::ContainerNotFound { handle } if *handle == unknown), "{error:?}");

    let handle = server.create("dup");
    let duplicate = ContainerSpec {
        handle: handle.clone(),
        ..ContainerSpec::default()
    };
    let error = server.block_on(client.create(&duplicate)).unwrap_err();
    assert_eq!(error.to_string(), format!("Handle '{handle}' already in use"));

    let error = server
        .block_on(client.run(&handle, &command_spec("/does/not/exist", &[]), ProcessIo::default()))
        .err()
        .expect("run of a missing executable fails");
    assert!(matches!(error, ClientError::ExecutableNotFound { .. }), "{error:?}");

    let error = server
        .block_on(client.attach(&handle, "idontexist", ProcessIo::default()))
        .err()
        .expect("attach to an unknown process fails");
    assert!(matches!(&error, ClientError::ProcessNotFound { process_id } if process_id == "idontexist"), "{error:?}");

    // The server keeps serving after all of these.
    server.block_on(client.ping()).unwrap();
    assert_eq!(server.run_command(&handle, "echo", &["still serving"]).stdout_text(), "still serving\n");
}

#[test]
fn failed_create_leaves_nothing() {
    let Some(server) = TestServer::start("failed_create_leaves_nothing") else { return };
    let missing_rootfs = ContainerSpec {
        handle: server.unique_handle("no-rootfs"),
        rootfs: format!("/nonexistent/{}/rootfs", server.name),
        ..ContainerSpec::default()
    };
    // The root filesystem and the cgroup exist before garden-init starts,
    // and garden-init cannot start in a cgroup that allows one page of
    // memory, so this create fails half way.
    let tiny_memory = ContainerSpec {
        handle: server.unique_handle("tiny-memory"),
        limits: Limits {
            memory_limits: MemoryLimits { limit_in_bytes: 4096 },
            ..Limits::default()
        },
        ..ContainerSpec::default()
    };
    let mut failures = BTreeMap::new();
    for spec in [missing_rootfs, tiny_memory] {
        let error = server.block_on(server.client.create(&spec)).unwrap_err();
        assert!(matches!(error, ClientError::Server { .. }), "{}: {error:?}", spec.handle);
        failures.insert(spec.handle.clone(), error.to_string());
    }

    let listed = server.block_on(server.client.list(&Properties::new())).unwrap();
    for handle in failures.keys() {
        assert!(!listed.contains(handle), "failed create of {handle} is listed");
        assert_eq!(cgroups_named(handle), Vec::<std::path::PathBuf>::new(), "cgroups of {handle}");
        let server_mounts = mounts_under(&std::path::PathBuf::from(format!("/proc/{}/mountinfo", server.pid())), &server.depot);
        assert!(
            server_mounts.iter().all(|mount| !mount.contains(handle.as_str())),
            "mounts of {handle} left: {server_mounts:?}"
        );
        let named: Vec<String> = walk_names(&server.depot).into_iter().filter(|name| name.contains(handle.as_str())).collect();
        assert!(named.is_empty(), "files of {handle} left in the depot: {named:?}");
    }
    // A valid create still works afterwards.
    let handle = server.create("after-failures");
    assert_eq!(server.run_command(&handle, "true", &[]).status, 0);
}

#[test]
fn missing_bind_source_rejected() {
    let Some(server) = TestServer::start("missing_bind_source_rejected") else { return };
    let missing_bind_source = ContainerSpec {
        handle: server.unique_handle("no-bind-source"),
        bind_mounts: vec![BindMount {
            src_path: format!("/nonexistent/{}/source", server.name),
            dst_path: "/mnt/source".into(),
            ..BindMount::default()
        }],
        ..ContainerSpec::default()
    };
    let error = server.block_on(server.client.create(&missing_bind_source)).unwrap_err();
    assert!(matches!(error, ClientError::Server { .. }), "{error:?}");
    let listed = server.block_on(server.client.list(&Properties::new())).unwrap();
    assert!(!listed.contains(&missing_bind_source.handle), "failed create is listed");
    assert_eq!(cgroups_named(&missing_bind_source.handle), Vec::<std::path::PathBuf>::new());
}

/// Returns the paths of every file and directory below `directory`, without
/// following symbolic links.
fn walk_names(directory: &std::path::Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else { continue };
        for entry in entries.flatten() {
            names.push(entry.path().display().to_string());
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    names
}

#[test]
fn tty_window_size_and_resize() {
    let Some(server) = TestServer::start("tty_window_size_and_resize") else { return };
    let handle = server.create("tty");
    let mut spec = command_spec("sh", &[]);
    spec.tty = Some(TtySpec {
        window_size: Some(WindowSize { columns: 100, rows: 30 }),
    });
    server.block_on(async {
        let stdout = support::SharedOutput::default();
        let io = ProcessIo {
            stdout: Some(Box::new(stdout.clone())),
            stderr: Some(Box::new(support::SharedOutput::default())),
            ..ProcessIo::default()
        };
        let mut process = server.client.run(&handle, &spec, io).await.unwrap();

        // A terminal echoes input and may add prompts, so the test looks
        // for the sizes in the output rather than comparing it whole.
        // The terminal echoes the typed line, so the marker is computed by
        // the shell: only the command's own output contains `first-42`.
        process.write_stdin(b"stty size; echo first-$((40+2))\n").await.unwrap();
        wait_for_text(&stdout, "first-42\r\n").await;
        process.resize(120, 40).await.unwrap();
        process.write_stdin(b"stty size; exit 4\n").await.unwrap();
        assert_eq!(process.wait().await.unwrap(), 4);

        let text = String::from_utf8_lossy(&stdout.take()).into_owned();
        assert!(text.contains("30 100\r\n"), "first size missing from {text:?}");
        assert!(text.contains("40 120\r\n"), "size after resize missing from {text:?}");
    });
}

/// Waits until `output` contains `needle`; panics after a minute.
async fn wait_for_text(output: &support::SharedOutput, needle: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if output.contains(needle.as_bytes()) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "waited a minute for {needle:?} in the output");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
