//! End-to-end tests of the Garden process model against a real server:
//! TTY, stdin, signals and exit statuses, attach, process ids, users and
//! environment, stop, finished processes and bad input. Needs root; see
//! `support` for how it skips.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use support::{command_spec, SharedOutput, TestServer};
use trellis::api::{BindMount, ProcessSpec, ResourceLimits, TtySpec, WindowSize};
use trellis::client::{ClientError, ProcessIo, Signal};

fn output_io(stdout: &SharedOutput, stderr: &SharedOutput) -> ProcessIo {
    ProcessIo { stdin: None, stdout: Some(Box::new(stdout.clone())), stderr: Some(Box::new(stderr.clone())) }
}

fn text(output: &SharedOutput) -> String {
    String::from_utf8_lossy(&output.take()).into_owned()
}

/// Waits until `output` contains `needle`; panics after a minute.
async fn wait_for_text(output: &SharedOutput, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !output.contains(needle.as_bytes()) {
        assert!(Instant::now() < deadline, "waited a minute for {needle:?} in the output");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn tty_defaults_onlcr_and_sigwinch() {
    let Some(server) = TestServer::start("tty_defaults_onlcr_and_sigwinch") else { return };
    let handle = server.create("tty");
    let tty = |path: &str, args: &[&str]| ProcessSpec { tty: Some(TtySpec::default()), ..command_spec(path, args) };

    let stty = server.run(&handle, &tty("stty", &["-a"]), None).expect("running stty");
    assert!(stty.stdout_text().contains("rows 24; columns 80;"), "stty -a: {}", stty.stdout_text());
    assert!(!stty.stdout_text().contains("-onlcr"), "onlcr is off: {}", stty.stdout_text());

    let zero = ProcessSpec {
        tty: Some(TtySpec { window_size: Some(WindowSize { columns: 123, rows: 0 }) }),
        ..command_spec("stty", &["size"])
    };
    assert_eq!(server.run(&handle, &zero, None).expect("stty size").stdout_text(), "24 123\r\n");

    // The terminal belongs to the container's own devpts, so the process
    // finds it under /dev/pts, owned by container root.
    let named = server.run(&handle, &tty("sh", &["-c", "tty && stat -c '%u' $(tty)"]), None).expect("tty");
    assert_eq!(named.status, 0, "tty: {}", named.stdout_text());
    let text = named.stdout_text();
    let lines: Vec<&str> = text.lines().map(|line| line.trim_end_matches('\r')).collect();
    assert!(lines.first().is_some_and(|name| name.starts_with("/dev/pts/")), "tty printed {lines:?}");
    assert_eq!(lines.get(1), Some(&"0"), "terminal owner inside the container: {lines:?}");

    // stdout and stderr share the terminal; stderr carries nothing.
    let merged = server.run(&handle, &tty("sh", &["-c", "echo out; echo err >&2; printf 'new\\nline'"]), None).expect("sh");
    assert_eq!(merged.stdout_text(), "out\r\nerr\r\nnew\r\nline");
    assert!(merged.stderr.is_empty(), "stderr: {:?}", merged.stderr_text());

    server.block_on(async {
        let stdout = SharedOutput::default();
        let stderr = SharedOutput::default();
        let script = "trap 'echo winch $(stty size)' WINCH; echo ready; while true; do sleep 0.05; done";
        let mut process = server.client.run(&handle, &tty("sh", &["-c", script]), output_io(&stdout, &stderr)).await.unwrap();
        wait_for_text(&stdout, "ready\r\n").await;
        process.resize(90, 33).await.unwrap();
        wait_for_text(&stdout, "winch 33 90\r\n").await;
        process.signal(Signal::Kill).await.unwrap();
        assert_eq!(process.wait().await.unwrap(), 137);
    });
}

#[test]
fn stdin_eof_only_on_close() {
    let Some(server) = TestServer::start("stdin_eof_only_on_close") else { return };
    let handle = server.create("stdin");
    server.block_on(async {
        let stdout = SharedOutput::default();
        let stderr = SharedOutput::default();
        // A background writer keeps output streaming while stdin is used.
        let script = "(i=0; while [ $i -lt 200 ]; do echo tick >&2; i=$((i+1)); sleep 0.01; done) & cat; echo eof-seen; wait";
        let mut process = server.client.run(&handle, &command_spec("sh", &["-c", script]), output_io(&stdout, &stderr)).await.unwrap();
        for number in 0..50 {
            process.write_stdin(format!("line {number}\n").as_bytes()).await.unwrap();
        }
        wait_for_text(&stdout, "line 49\n").await;
        // Every line arrived, and no end of file yet.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!stdout.contains(b"eof-seen"), "the process saw end of file before stdin was closed");
        process.close_stdin().await.unwrap();
        assert_eq!(process.wait().await.unwrap(), 0);
        let expected: String = (0..50).map(|number| format!("line {number}\n")).collect::<String>() + "eof-seen\n";
        assert_eq!(text(&stdout), expected);
        assert!(stderr.contains(b"tick\n"));
    });

    // Signals are still accepted after stdin was closed.
    server.block_on(async {
        let spec = command_spec("sh", &["-c", "cat > /dev/null; echo closed; exec sleep 100"]);
        let stdout = SharedOutput::default();
        let mut process = server.client.run(&handle, &spec, output_io(&stdout, &SharedOutput::default())).await.unwrap();
        process.close_stdin().await.unwrap();
        wait_for_text(&stdout, "closed\n").await;
        process.signal(Signal::Terminate).await.unwrap();
        assert_eq!(process.wait().await.unwrap(), 143);
    });
}

#[test]
fn exit_does_not_wait_for_children() {
    let Some(server) = TestServer::start("exit_does_not_wait_for_children") else { return };
    let handle = server.create("orphans");
    // The child keeps the output pipes open; the exit status still comes.
    let orphan = server.run_command(&handle, "sh", &["-c", "sleep 1000 & echo parent; exit 3"]);
    assert_eq!((orphan.status, orphan.stdout_text().as_str()), (3, "parent\n"));

    // Orphans that exit are reaped by garden-init: no zombie remains.
    let spawn = server.run_command(&handle, "sh", &["-c", "for i in 1 2 3 4 5 6 7 8; do (sleep 0.1 &) ; done"]);
    assert_eq!(spawn.status, 0);
    std::thread::sleep(Duration::from_millis(500));
    let states = server.run_command(&handle, "sh", &["-c", "cat /proc/[0-9]*/stat"]);
    let stat_text = states.stdout_text();
    let zombies: Vec<&str> = stat_text.lines().filter(|line| line.contains(") Z ")).collect();
    assert!(zombies.is_empty(), "zombies in the container: {zombies:?}");

    let killed = server.block_on(async {
        let mut process = server.client.run(&handle, &command_spec("sleep", &["100"]), ProcessIo::default()).await.unwrap();
        process.signal(Signal::Kill).await.unwrap();
        process.wait().await.unwrap()
    });
    assert_eq!(killed, 137);
}

#[test]
fn attach_gets_kept_output_and_same_status() {
    let Some(server) = TestServer::start("attach_gets_kept_output_and_same_status") else { return };
    let handle = server.create("attach");
    let spec = ProcessSpec {
        id: format!("{}-early", server.name),
        ..command_spec("sh", &["-c", "echo early; echo early-err >&2; read line; echo late-$line; exit 12"])
    };
    server.block_on(async {
        // The Run client attaches no output.
        let mut run = server.client.run(&handle, &spec, ProcessIo::default()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;

        let first_out = SharedOutput::default();
        let first_err = SharedOutput::default();
        let mut first = server.client.attach(&handle, &spec.id, output_io(&first_out, &first_err)).await.unwrap();
        wait_for_text(&first_out, "early\n").await;
        wait_for_text(&first_err, "early-err\n").await;

        let second_out = SharedOutput::default();
        let mut second = server.client.attach(&handle, &spec.id, output_io(&second_out, &SharedOutput::default())).await.unwrap();
        // A client that disappears is dropped without stalling the others.
        let gone = server.client.attach(&handle, &spec.id, output_io(&SharedOutput::default(), &SharedOutput::default())).await.unwrap();
        drop(gone);

        second.write_stdin(b"x\n").await.unwrap();
        assert_eq!(first.wait().await.unwrap(), 12);
        assert_eq!(second.wait().await.unwrap(), 12);
        assert_eq!(run.wait().await.unwrap(), 12);
        assert_eq!(text(&first_out), "early\nlate-x\n");
        assert_eq!(text(&second_out), "late-x\n");

        // Attaching to the finished process still returns its status, again
        // and again.
        for round in 0..3 {
            let mut late = server.client.attach(&handle, &spec.id, ProcessIo::default()).await.unwrap();
            assert_eq!(late.wait().await.unwrap(), 12, "late attach {round}");
        }
    });
}

#[test]
fn process_ids_given_generated_and_unique() {
    let Some(server) = TestServer::start("process_ids_given_generated_and_unique") else { return };
    let handle = server.create("ids");
    server.block_on(async {
        let given = format!("{}/../odd id", server.name);
        let spec = ProcessSpec { id: given.clone(), ..command_spec("true", &[]) };
        let mut process = server.client.run(&handle, &spec, ProcessIo::default()).await.unwrap();
        assert_eq!(process.id(), given);
        assert_eq!(process.wait().await.unwrap(), 0);

        // The finished process still holds its id.
        let error = server.client.run(&handle, &spec, ProcessIo::default()).await.err().expect("a duplicate id is rejected");
        assert!(error.to_string().contains(&format!("process ID '{given}' already in use")), "error: {error}");

        let mut generated = Vec::new();
        for _ in 0..3 {
            let mut process = server.client.run(&handle, &command_spec("true", &[]), ProcessIo::default()).await.unwrap();
            generated.push(process.id().to_string());
            process.wait().await.unwrap();
        }
        for id in &generated {
            assert!(uuid::Uuid::parse_str(id).is_ok(), "generated id {id:?} is not a UUID");
        }
        generated.sort();
        generated.dedup();
        assert_eq!(generated.len(), 3, "generated ids repeat");
    });
    // The container keeps working after the rejected Run.
    assert_eq!(server.run_command(&handle, "echo", &["ok"]).stdout_text(), "ok\n");
}

#[test]
fn users_env_dirs_and_rlimits() {
    let Some(server) = TestServer::start("users_env_dirs_and_rlimits") else { return };
    let handle = server.create("users");
    let as_user = |user: &str, path: &str, args: &[&str]| {
        let spec = ProcessSpec { user: user.into(), ..command_spec(path, args) };
        server.run(&handle, &spec, None).unwrap_or_else(|error| panic!("running {path} as {user:?}: {error}"))
    };

    assert_eq!(as_user("1000000000:1000000000", "id", &[]).stdout_text(), "uid=1000000000 gid=1000000000\n");
    assert_eq!(as_user("1001:1002", "id", &["-u"]).stdout_text(), "1001\n");
    assert_eq!(as_user("1001:1002", "id", &["-g"]).stdout_text(), "1002\n");
    assert_eq!(as_user("alice", "id", &["-u"]).stdout_text(), "1001\n");
    assert!(as_user("root", "id", &["-G"]).stdout_text().split_whitespace().any(|gid| gid == "10"), "root is not in wheel");
    assert_eq!(as_user("alice", "pwd", &[]).stdout_text(), "/home/alice\n");

    let env = ProcessSpec { env: vec!["TEST=hello".into(), "FRUIT=banana".into()], ..command_spec("env", &[]) };
    let env_text = server.run(&handle, &env, None).expect("env").stdout_text();
    assert!(env_text.starts_with("TEST=hello\nFRUIT=banana\n"), "env order: {env_text}");
    assert!(env_text.contains("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"), "root PATH: {env_text}");
    assert!(env_text.contains("USER=root\n"), "USER: {env_text}");
    assert!(env_text.contains("HOME=/root\n"), "HOME: {env_text}");
    let alice_env = as_user("alice", "env", &[]).stdout_text();
    assert!(alice_env.contains("PATH=/usr/local/bin:/usr/bin:/bin\n"), "alice PATH: {alice_env}");

    // A missing working directory under a parent alice cannot write.
    let prepare = server.run_command(&handle, "sh", &["-c", "mkdir -p /locked && chmod 0555 /locked"]);
    assert_eq!(prepare.status, 0);
    let dir_spec = ProcessSpec { user: "alice".into(), dir: "/locked/a/b".into(), ..command_spec("sh", &["-c", "pwd; stat -c '%U %a' ."]) };
    let dir = server.run(&handle, &dir_spec, None).expect("running in a new directory");
    assert_eq!(dir.stdout_text(), "/locked/a/b\nalice 755\n");

    let limits = ProcessSpec {
        rlimits: ResourceLimits { nproc: Some(4567), nofile: Some(1234), ..ResourceLimits::default() },
        ..command_spec("sh", &["-c", "ulimit -u; ulimit -n"])
    };
    assert_eq!(server.run(&handle, &limits, None).expect("ulimit").stdout_text(), "4567\n1234\n");

    match server.run(&handle, &command_spec("no-such-program", &[]), None) {
        Err(ClientError::ExecutableNotFound { message }) => assert!(message.contains("executable file not found in $PATH"), "{message}"),
        other => panic!("missing bare executable: {other:?}"),
    }
    match server.run(&handle, &command_spec("/bin/no-such-program", &[]), None) {
        Err(ClientError::ExecutableNotFound { message }) => assert!(message.contains("no such file or directory"), "{message}"),
        other => panic!("missing executable path: {other:?}"),
    }
}

#[test]
fn bad_run_requests_fail_clearly() {
    let Some(server) = TestServer::start("bad_run_requests_fail_clearly") else { return };
    let handle = server.create("badrun");
    let error_of = |spec: ProcessSpec| server.run(&handle, &spec, None).expect_err("the run fails").to_string();

    let bind = ProcessSpec {
        bind_mounts: vec![BindMount { src_path: "/tmp".into(), dst_path: "/mnt".into(), ..BindMount::default() }],
        ..command_spec("true", &[])
    };
    assert!(error_of(bind).contains("Running a process with bind mounts and no image provided is not allowed"));
    let unknown_user = error_of(ProcessSpec { user: "nobody-here".into(), ..command_spec("true", &[]) });
    assert!(unknown_user.contains("unable to find user nobody-here"), "{unknown_user}");
    let unknown_group = error_of(ProcessSpec { user: "alice:no-such-group".into(), ..command_spec("true", &[]) });
    assert!(unknown_group.contains("no-such-group"), "{unknown_group}");
    let file_dir = error_of(ProcessSpec { dir: "/etc/passwd".into(), ..command_spec("true", &[]) });
    assert!(file_dir.contains("/etc/passwd"), "error names the directory: {file_dir}");
    assert!(file_dir.contains("Not a directory"), "error gives the cause: {file_dir}");

    assert_eq!(server.run_command(&handle, "echo", &["still working"]).stdout_text(), "still working\n");
}

/// Sends a raw request on the server's socket and returns the stream
/// positioned after the response head, with the head.
fn raw_request(server: &TestServer, request: &str) -> (UnixStream, String) {
    let mut stream = UnixStream::connect(&server.socket).expect("connecting to the server");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("reading the response head");
        head.push(byte[0]);
    }
    (stream, String::from_utf8_lossy(&head).into_owned())
}

fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        if stream.read(&mut byte).expect("reading a line") == 0 {
            break;
        }
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn bad_messages_ignored_and_logged() {
    let Some(server) = TestServer::start("bad_messages_ignored_and_logged") else { return };
    let handle = server.create("badmsg");
    let id = format!("{}-raw", server.name);
    let body = format!(r#"{{"id":"{id}","path":"sh","args":["-c","read line; echo got-$line; read more; echo more-$more; exit 9"],"rlimits":{{}},"image":{{}}}}"#) + "\n";
    let request = format!(
        "POST /containers/{handle}/processes HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (mut control, head) = raw_request(&server, &request);
    assert!(head.starts_with("HTTP/1.1 201"), "head: {head}");
    let handshake: serde_json::Value = serde_json::from_str(&read_line(&mut control)).expect("handshake JSON");
    let stream_id = handshake["stream_id"].as_str().expect("stream id").to_string();
    let (mut stdout, stdout_head) = raw_request(
        &server,
        &format!("GET /containers/{handle}/processes/{id}/attaches/{stream_id}/stdout HTTP/1.1\r\nHost: api\r\n\r\n"),
    );
    assert!(stdout_head.starts_with("HTTP/1.1 200"), "stdout head: {stdout_head}");

    let messages = [
        format!(r#"{{"process_id":"{id}","signal":5}}"#),
        format!(r#"{{"process_id":"{id}","tty":{{"window_size":{{"columns":10,"rows":5}}}}}}"#),
        format!(r#"{{"process_id":"{id}","source":0,"data":"first\n"}}"#),
        format!(r#"{{"process_id":"{id}","source":0}}"#),
        format!(r#"{{"process_id":"{id}","source":0,"data":"after-close\n"}}"#),
    ];
    for message in &messages {
        control.write_all(format!("{message}\n").as_bytes()).unwrap();
    }
    let exit: serde_json::Value = serde_json::from_str(&read_line(&mut control)).expect("exit JSON");
    assert_eq!(exit["exit_status"], 9, "exit message: {exit}");
    let mut output = String::new();
    stdout.read_to_string(&mut output).expect("reading stdout");
    // The stdin sent after the close never reached the process.
    assert_eq!(output, "got-first\nmore-\n");

    // The server logs asynchronously, so a line may still be half written
    // when the test reads the log: only whole JSON lines count.
    for needle in ["unknown signal ignored", "resize ignored", "stdin ignored"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let line = loop {
            let log = server.log_text();
            let found = log
                .lines()
                .filter(|line| serde_json::from_str::<serde_json::Value>(line).is_ok())
                .find(|line| line.contains(needle))
                .map(str::to_string);
            if let Some(line) = found {
                break line;
            }
            assert!(Instant::now() < deadline, "no complete {needle:?} line in the server log:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(line.contains(&format!("\"process_id\":\"{id}\"")), "log line without the process id: {line}");
    }
    assert_eq!(server.run_command(&handle, "echo", &["fine"]).stdout_text(), "fine\n");
}

#[test]
fn stop_terms_then_kills_and_keeps_init() {
    let Some(server) = TestServer::start("stop_terms_then_kills_and_keeps_init") else { return };
    let handle = server.create("stop");
    let statuses = server.block_on(async {
        let trapping = command_spec("sh", &["-c", "trap 'exit 42' TERM; echo ready; while true; do sleep 0.05; done"]);
        let ignoring = command_spec("sh", &["-c", "trap '' TERM; echo ready; while true; do sleep 0.05; done"]);
        let out_a = SharedOutput::default();
        let out_b = SharedOutput::default();
        let mut a = server.client.run(&handle, &trapping, output_io(&out_a, &SharedOutput::default())).await.unwrap();
        let mut b = server.client.run(&handle, &ignoring, output_io(&out_b, &SharedOutput::default())).await.unwrap();
        wait_for_text(&out_a, "ready\n").await;
        wait_for_text(&out_b, "ready\n").await;
        let started = Instant::now();
        server.client.stop(&handle, false).await.expect("stop");
        let took = started.elapsed();
        (a.wait().await.unwrap(), b.wait().await.unwrap(), took)
    });
    assert_eq!(statuses.0, 42, "trapping process");
    assert!(statuses.1 == 137 || statuses.1 == 255, "TERM-ignoring process: {}", statuses.1);
    assert!(statuses.2 >= Duration::from_secs(10), "SIGKILL came before 10 s: {:?}", statuses.2);

    let info = server.block_on(server.client.info(&handle)).expect("info");
    assert_eq!(info.state, "stopped");
    let refused = server.run(&handle, &command_spec("true", &[]), None).expect_err("run on a stopped container fails");
    assert!(refused.to_string().contains("stopped"), "{refused}");
    // garden-init survived the stop and is the only process left.
    let left = support::processes_in_cgroups_named(&handle);
    assert_eq!(left.len(), 1, "processes left in the container's cgroups: {left:?}");
    assert!(left[0].1.contains("__garden-init"), "the survivor is not garden-init: {left:?}");
}

#[test]
fn stop_kill_catches_forking_processes() {
    let Some(server) = TestServer::start("stop_kill_catches_forking_processes") else { return };
    let handle = server.create("forks");
    let status = server.block_on(async {
        let stdout = SharedOutput::default();
        let spec = command_spec("sh", &["-c", "echo ready; while true; do sleep 100 & done"]);
        let mut process = server.client.run(&handle, &spec, output_io(&stdout, &SharedOutput::default())).await.unwrap();
        wait_for_text(&stdout, "ready\n").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.client.stop(&handle, true).await.expect("stop with kill");
        process.wait().await.unwrap()
    });
    assert_eq!(status, 137);
    let cgroups = support::processes_in_cgroups_named(&handle);
    assert_eq!(cgroups.len(), 1, "processes left in the container's cgroups: {cgroups:?}");
    assert!(cgroups[0].1.contains("__garden-init"), "the survivor is not garden-init: {cgroups:?}");
}

#[test]
fn stop_grace_kill_catches_forking_processes() {
    let Some(server) = TestServer::start("stop_grace_kill_catches_forking_processes") else { return };
    let handle = server.create("graceforks");
    // An ignored signal stays ignored across fork and execve, so every
    // `sleep` ignores TERM too and only the kill phase after 10 s ends them.
    let status = server.block_on(async {
        let stdout = SharedOutput::default();
        let spec = command_spec("sh", &["-c", "trap '' TERM; echo ready; while true; do sleep 100 & done"]);
        let mut process = server.client.run(&handle, &spec, output_io(&stdout, &SharedOutput::default())).await.unwrap();
        wait_for_text(&stdout, "ready\n").await;
        server.client.stop(&handle, false).await.expect("stop without kill");
        process.wait().await.unwrap()
    });
    assert!(status == 137 || status == 255, "TERM-ignoring forking process: {status}");
    let left = support::processes_in_cgroups_named(&handle);
    assert_eq!(left.len(), 1, "processes left in the container's cgroups: {left:?}");
    assert!(left[0].1.contains("__garden-init"), "the survivor is not garden-init: {left:?}");
}

/// Returns the number of open fds of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("listing the server's fds").count()
}

#[test]
fn finished_processes_cost_little() {
    const WARM_UP: usize = 20;
    const RUNS: usize = 150;
    let Some(server) = TestServer::start("finished_processes_cost_little") else { return };
    let handle = server.create("health");
    let spec = command_spec("echo", &["healthy"]);
    for _ in 0..WARM_UP {
        assert_eq!(server.run(&handle, &spec, None).expect("warm-up run").status, 0);
    }
    let fds_before = fd_count(server.pid());
    for round in 0..RUNS {
        let output = server.run(&handle, &spec, None).unwrap_or_else(|error| panic!("round {round}: {error}"));
        assert_eq!(output.stdout_text(), "healthy\n");
    }
    let fds_after = fd_count(server.pid());
    // Each finished process once held the shim socket; none may stay open.
    assert!(fds_after < fds_before + 10, "server fds grew from {fds_before} to {fds_after} over {RUNS} finished processes");
}

#[test]
fn cleanup_on_wait_forgets_process() {
    let options = support::ServerOptions {
        extra_config: vec!["cleanup-process-dirs-on-wait = true".into()],
        ..support::ServerOptions::default()
    };
    let Some(server) = TestServer::start_with("cleanup_on_wait_forgets_process", options) else { return };
    let handle = server.create("cleanup");
    let spec = ProcessSpec { id: format!("{}-reused", server.name), ..command_spec("sh", &["-c", "echo once; exit 6"]) };
    let first = server.run(&handle, &spec, None).expect("first run");
    assert_eq!((first.status, first.stdout_text().as_str()), (6, "once\n"));

    // Once the exit status was delivered the id is free, Attach no longer
    // finds the process, and its state directory is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match server.block_on(server.client.attach(&handle, &spec.id, ProcessIo::default())) {
            Err(ClientError::ProcessNotFound { process_id }) => {
                assert_eq!(process_id, spec.id);
                break;
            }
            other => {
                assert!(Instant::now() < deadline, "the finished process is still attachable: {:?}", other.map(|process| process.id().to_string()));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let processes_dir = server.depot.join(&handle).join("processes");
    assert!(processes_dir.is_dir(), "no process state directory at {}", processes_dir.display());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&processes_dir).map(|entries| entries.count()).unwrap_or(0) > 0 {
        assert!(Instant::now() < deadline, "process state directories remain in {}", processes_dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = server.run(&handle, &spec, None).expect("reusing the id");
    assert_eq!(second.status, 6);
}

/// Returns the number of process state directories of a container.
fn process_dir_count(server: &TestServer, handle: &str) -> usize {
    let processes_dir = server.depot.join(handle).join("processes");
    std::fs::read_dir(&processes_dir).unwrap_or_else(|error| panic!("listing {}: {error}", processes_dir.display())).count()
}

/// Waits until the container has `expected` process state directories.
fn wait_for_dir_count(server: &TestServer, handle: &str, expected: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let count = process_dir_count(server, handle);
        if count == expected {
            return;
        }
        assert!(Instant::now() < deadline, "{count} process state directories, expected {expected}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn finished_records_are_capped() {
    const MAX_FINISHED: usize = 3;
    const RUNS: usize = 40;
    let options = support::ServerOptions {
        extra_config: vec![format!("max-finished-processes = {MAX_FINISHED}")],
        ..support::ServerOptions::default()
    };
    let Some(server) = TestServer::start_with("finished_records_are_capped", options) else { return };
    let handle = server.create("capped");
    let id = |run: usize| format!("{}-run-{run}", server.name);

    // The oldest process keeps running throughout; a running process never
    // counts against the maximum.
    let running_id = format!("{}-running", server.name);
    let running_spec = ProcessSpec { id: running_id.clone(), ..command_spec("sh", &["-c", "echo started; exec sleep 300"]) };
    let started = SharedOutput::default();
    let mut running = server
        .block_on(server.client.run(&handle, &running_spec, output_io(&started, &SharedOutput::default())))
        .expect("starting the long-running process");
    server.block_on(wait_for_text(&started, "started\n"));

    for run in 0..RUNS {
        let spec = ProcessSpec { id: id(run), ..command_spec("sh", &["-c", &format!("echo run {run}; exit {}", run % 100 + 1)]) };
        let output = server.run(&handle, &spec, None).unwrap_or_else(|error| panic!("run {run}: {error}"));
        assert_eq!(output.status, (run % 100 + 1) as i64, "exit status of run {run}");
    }

    // The oldest finished records are gone with a clear error.
    for run in [0, RUNS - MAX_FINISHED - 1] {
        match server.block_on(server.client.attach(&handle, &id(run), ProcessIo::default())) {
            Err(ClientError::ProcessNotFound { process_id }) => assert_eq!(process_id, id(run)),
            Err(other) => panic!("attaching to dropped run {run} failed with another error: {other}"),
            Ok(_) => panic!("run {run} is still attachable, beyond the {MAX_FINISHED} newest finished"),
        }
    }
    // The newest finished ones still report their exit status.
    for run in RUNS - MAX_FINISHED..RUNS {
        let mut process = server
            .block_on(server.client.attach(&handle, &id(run), ProcessIo::default()))
            .unwrap_or_else(|error| panic!("attaching to run {run}: {error}"));
        assert_eq!(server.block_on(process.wait()).expect("waiting"), (run % 100 + 1) as i64, "exit status of run {run}");
    }
    let dropped = server.log_text().matches("finished process record dropped").count();
    assert_eq!(dropped, RUNS - MAX_FINISHED, "records dropped according to the log");

    // State directories: the running process's and the kept finished ones.
    wait_for_dir_count(&server, &handle, MAX_FINISHED + 1);

    // The running process is still there, and its exit pushes out the
    // oldest kept record.
    let mut attached = server
        .block_on(server.client.attach(&handle, &running_id, ProcessIo::default()))
        .expect("attaching to the running process");
    server.block_on(attached.signal(Signal::Kill)).expect("sending kill");
    assert_eq!(server.block_on(running.wait()).expect("waiting"), 137);
    assert_eq!(server.block_on(attached.wait()).expect("waiting"), 137);
    wait_for_dir_count(&server, &handle, MAX_FINISHED);
    let oldest_kept = RUNS - MAX_FINISHED;
    assert!(
        matches!(server.block_on(server.client.attach(&handle, &id(oldest_kept), ProcessIo::default())), Err(ClientError::ProcessNotFound { .. })),
        "run {oldest_kept} is still attachable after the running process finished"
    );

    // A dropped id is free again.
    let reused = ProcessSpec { id: id(0), ..command_spec("echo", &["again"]) };
    let output = server.run(&handle, &reused, None).expect("reusing a dropped id");
    assert_eq!((output.status, output.stdout_text().as_str()), (0, "again\n"));
}

/// Returns the soft and hard value of each row of a `/proc/<pid>/limits`
/// text, by the row's name ("Max open files").
fn limits_table(text: &str) -> std::collections::HashMap<String, (String, String)> {
    text.lines()
        .skip(1)
        .filter(|line| line.len() > 26)
        .map(|line| {
            let (name, values) = line.split_at(26);
            let mut fields = values.split_whitespace();
            let soft = fields.next().unwrap_or_default().to_string();
            let hard = fields.next().unwrap_or_default().to_string();
            (name.trim().to_string(), (soft, hard))
        })
        .collect()
}

#[test]
fn every_rlimit_and_group_applied() {
    let Some(server) = TestServer::start("every_rlimit_and_group_applied") else { return };
    let handle = server.create("rlimits");

    // Raising a hard limit above the server's own needs CAP_SYS_RESOURCE,
    // which a server may lack, so each value is capped at the hard limit
    // this test (and so the server it starts) runs with.
    use nix::sys::resource::{getrlimit, Resource};
    let within = |resource: Resource, wanted: u64| getrlimit(resource).map(|(_, hard)| wanted.min(hard)).expect("reading an rlimit");
    let rlimits = ResourceLimits {
        address_space: Some(within(Resource::RLIMIT_AS, 3_000_000_000)),
        core: Some(within(Resource::RLIMIT_CORE, 1_000_000)),
        cpu: Some(within(Resource::RLIMIT_CPU, 3000)),
        data: Some(within(Resource::RLIMIT_DATA, 2_000_000_000)),
        fsize: Some(within(Resource::RLIMIT_FSIZE, 4_000_000_000)),
        locks: Some(within(Resource::RLIMIT_LOCKS, 77)),
        memlock: Some(within(Resource::RLIMIT_MEMLOCK, 65536)),
        msgqueue: Some(within(Resource::RLIMIT_MSGQUEUE, 8192)),
        nice: Some(within(Resource::RLIMIT_NICE, 5)),
        nofile: Some(within(Resource::RLIMIT_NOFILE, 1234)),
        nproc: Some(within(Resource::RLIMIT_NPROC, 4567)),
        rss: Some(within(Resource::RLIMIT_RSS, 600_000_000)),
        rtprio: Some(within(Resource::RLIMIT_RTPRIO, 3)),
        sigpending: Some(within(Resource::RLIMIT_SIGPENDING, 888)),
        stack: Some(within(Resource::RLIMIT_STACK, 9_000_000)),
    };
    let value = |limit: Option<u64>| limit.expect("every rlimit is set").to_string();
    let expected = [
        ("Max address space", value(rlimits.address_space)),
        ("Max core file size", value(rlimits.core)),
        ("Max cpu time", value(rlimits.cpu)),
        ("Max data size", value(rlimits.data)),
        ("Max file size", value(rlimits.fsize)),
        ("Max file locks", value(rlimits.locks)),
        ("Max locked memory", value(rlimits.memlock)),
        ("Max msgqueue size", value(rlimits.msgqueue)),
        ("Max nice priority", value(rlimits.nice)),
        ("Max open files", value(rlimits.nofile)),
        ("Max processes", value(rlimits.nproc)),
        ("Max resident set", value(rlimits.rss)),
        ("Max realtime priority", value(rlimits.rtprio)),
        ("Max pending signals", value(rlimits.sigpending)),
        ("Max stack size", value(rlimits.stack)),
    ];
    for user in ["", "alice"] {
        let spec = ProcessSpec { user: user.into(), rlimits, ..command_spec("cat", &["/proc/self/limits"]) };
        let output = server.run(&handle, &spec, None).unwrap_or_else(|error| panic!("reading limits as {user:?}: {error}"));
        assert_eq!(output.status, 0, "cat /proc/self/limits as {user:?}: {}", output.stderr_text());
        let table = limits_table(&output.stdout_text());
        for (row, value) in &expected {
            let found = table.get(*row).unwrap_or_else(|| panic!("no {row:?} row in:\n{}", output.stdout_text()));
            assert_eq!(found, &(value.clone(), value.clone()), "{row} (soft, hard) as {user:?}");
        }
    }

    // A `user:group` pair by names. alice is in no group of /etc/group, so
    // she has no supplementary groups and busybox `id` prints none.
    let spec = ProcessSpec { user: "alice:staff".into(), ..command_spec("id", &[]) };
    let id = server.run(&handle, &spec, None).expect("running id as alice:staff");
    assert_eq!(id.stdout_text(), "uid=1001(alice) gid=50(staff)\n");
}

#[test]
fn resize_after_stdin_close() {
    let Some(server) = TestServer::start("resize_after_stdin_close") else { return };
    let handle = server.create("resize");
    server.block_on(async {
        let stdout = SharedOutput::default();
        let script = "trap 'echo winch $(stty size)' WINCH; echo ready; while true; do sleep 0.05; done";
        let spec = ProcessSpec { tty: Some(TtySpec::default()), ..command_spec("sh", &["-c", script]) };
        let mut process = server.client.run(&handle, &spec, output_io(&stdout, &SharedOutput::default())).await.unwrap();
        wait_for_text(&stdout, "ready\r\n").await;
        process.close_stdin().await.unwrap();
        process.resize(70, 20).await.unwrap();
        wait_for_text(&stdout, "winch 20 70\r\n").await;
        process.signal(Signal::Kill).await.unwrap();
        assert_eq!(process.wait().await.unwrap(), 137);
    });
}

#[test]
fn successful_run_writes_no_shim_log() {
    let Some(server) = TestServer::start("successful_run_writes_no_shim_log") else { return };
    let handle = server.create("quiet");
    let output = server.run_command(&handle, "echo", &["done"]);
    assert_eq!(output.status, 0);
    assert_eq!(output.stdout_text(), "done\n");

    // Process directories are kept until destroy unless the server cleans
    // them up on wait, which the test server does not.
    let process_dir = server.depot.join(&handle).join("processes/0");
    assert!(process_dir.join("id").is_file(), "no id file in {}", process_dir.display());
    assert!(!process_dir.join("shim.log").exists(), "the shim created its log without an error in {}", process_dir.display());
    server.block_on(server.client.destroy(&handle)).unwrap();
}

/// A shim writes its exit status relative to its process directory, so a
/// directory renamed away (as destroy renames a container's) takes the late
/// write with it, and a directory that took the old path gets none of it.
#[test]
fn late_exit_status_follows_renamed_dir() {
    let Some(server) = TestServer::start("late_exit_status_follows_renamed_dir") else { return };
    let handle = server.create("moved");
    let spec = command_spec("sh", &["-c", "read line; exit 7"]);
    let (stdin_reader, mut stdin_writer) = tokio::io::duplex(64);
    let io = ProcessIo { stdin: Some(Box::new(stdin_reader)), stdout: None, stderr: None };
    let mut process = server.block_on(server.client.run(&handle, &spec, io)).unwrap();

    // The process directory moves away while the process runs, and an
    // empty directory takes its old path.
    let processes = server.depot.join(&handle).join("processes");
    let process_dir = std::fs::read_dir(&processes).unwrap().next().unwrap().unwrap().file_name();
    let original = processes.join(&process_dir);
    let moved = processes.join("moved");
    std::fs::rename(&original, &moved).unwrap();
    std::fs::create_dir(&original).unwrap();

    server.block_on(async {
        use tokio::io::AsyncWriteExt;
        stdin_writer.write_all(b"go\n").await.unwrap();
        drop(stdin_writer);
    });
    let status = server.block_on(process.wait()).unwrap();
    assert_eq!(status, 7);
    let written = std::fs::read_to_string(moved.join("exit-status"));
    let stand_in_written = original.join("exit-status").exists();

    std::fs::remove_dir_all(&original).unwrap();
    std::fs::rename(&moved, &original).unwrap();
    assert_eq!(written.ok().as_deref(), Some("7\n"), "the exit status is missing from the renamed directory");
    assert!(!stand_in_written, "the exit status went to the directory that took the old path");
    server.block_on(server.client.destroy(&handle)).unwrap();
}
