//! End-to-end test of the README's command-line session: `trellis run`,
//! `trellis list` and `trellis destroy`, through the real `trellis` binary
//! against a real server. Needs root; see `support` for how it skips.

mod support;

use std::process::{Command, Output, Stdio};

use support::TestServer;

/// Runs the `trellis` binary with `args`, aimed at `server`'s socket
/// through `TRELLIS_TARGET`.
fn trellis(server: &TestServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("TRELLIS_TARGET", &server.socket)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("starting trellis {args:?} failed: {error}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn readme_session() {
    let Some(server) = TestServer::start("readme_session") else { return };

    let ping = trellis(&server, &["ping"]);
    assert!(ping.status.success(), "trellis ping: {}", text(&ping.stderr));

    let run = trellis(&server, &["run", "--", "echo", "hello from the container"]);
    assert_eq!(run.status.code(), Some(0), "trellis run stderr: {}", text(&run.stderr));
    assert_eq!(text(&run.stdout), "hello from the container\n");

    let list = trellis(&server, &["list"]);
    assert!(list.status.success(), "trellis list: {}", text(&list.stderr));
    let handles: Vec<String> = text(&list.stdout).lines().map(str::to_string).collect();
    assert_eq!(handles.len(), 1, "expected the container created by run, got {handles:?}");
    let handle = &handles[0];

    let created_by = trellis(&server, &["properties", "get", handle, "trellis.created-by"]);
    assert_eq!(text(&created_by.stdout), "run\n", "stderr: {}", text(&created_by.stderr));

    let destroy = trellis(&server, &["destroy", handle]);
    assert!(destroy.status.success(), "trellis destroy: {}", text(&destroy.stderr));
    let list = trellis(&server, &["list"]);
    assert_eq!(text(&list.stdout), "", "containers left after destroy");
}

#[test]
fn cli_exit_codes_and_errors() {
    let Some(server) = TestServer::start("cli_exit_codes_and_errors") else { return };
    let handle = server.unique_handle("cli");

    let create = trellis(&server, &["create", &handle, "--property", "team=red"]);
    assert!(create.status.success(), "trellis create: {}", text(&create.stderr));
    assert_eq!(text(&create.stdout), format!("{handle}\n"));

    let run = trellis(&server, &["run", "--handle", &handle, "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(run.status.code(), Some(3));
    assert_eq!(text(&run.stdout), "out\n");
    assert_eq!(text(&run.stderr), "err\n");

    let filtered = trellis(&server, &["list", "--property", "team=red"]);
    assert_eq!(text(&filtered.stdout), format!("{handle}\n"));
    let filtered = trellis(&server, &["list", "--property", "team=blue"]);
    assert_eq!(text(&filtered.stdout), "");

    let missing = server.unique_handle("missing");
    let destroy = trellis(&server, &["destroy", &missing]);
    assert!(!destroy.status.success(), "destroying an unknown handle succeeded");
    assert!(
        text(&destroy.stderr).contains(&format!("unknown handle: {missing}")),
        "stderr: {}",
        text(&destroy.stderr)
    );

    let run = trellis(&server, &["run", "--handle", &missing, "--", "true"]);
    assert_eq!(run.status.code(), Some(125), "run in an unknown container");

    let with_rm = trellis(&server, &["run", "--rm", "--", "true"]);
    assert_eq!(with_rm.status.code(), Some(0), "stderr: {}", text(&with_rm.stderr));
    let list = trellis(&server, &["list"]);
    assert_eq!(text(&list.stdout), format!("{handle}\n"), "run --rm left its container");

    let destroy = trellis(&server, &["destroy", &handle]);
    assert!(destroy.status.success(), "trellis destroy: {}", text(&destroy.stderr));
}
