//! The `trellis` client commands for operators, through the real binary.
//! The tests cover tables and `--json`, limits, create with a network,
//! limits, port mappings and a bind mount, and net-out rules with ICMP and
//! in bulk. They also cover stream in and out of a directory with
//! progress, help texts, `--print-config`, and clear errors for an
//! unreachable server or a typo in the configuration.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::TestServer;

/// Runs the `trellis` binary with `args`, aimed at `server`'s socket.
fn trellis(server: &TestServer, args: &[&str]) -> Output {
    trellis_at(&server.socket, args)
}

fn trellis_at(target: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("TRELLIS_TARGET", target)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("starting trellis {args:?} failed: {error}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `args` and returns stdout, failing the test with stderr when the
/// command fails.
fn success(server: &TestServer, args: &[&str]) -> String {
    let output = trellis(server, args);
    assert!(output.status.success(), "trellis {args:?} failed: {}", text(&output.stderr));
    text(&output.stdout)
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|error| panic!("not JSON ({error}): {stdout}"))
}

#[test]
fn tables_and_json_output() {
    let Some(server) = TestServer::start("tables_and_json_output") else { return };
    let handle = server.unique_handle("table");
    success(&server, &["create", &handle, "--property", "team=red"]);

    let list = success(&server, &["list"]);
    let mut lines = list.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("HANDLE"), "{list}");
    assert!(header.contains("STATE"), "{list}");
    assert!(header.contains("MAPPED PORTS"), "{list}");
    let row = lines.next().expect("a row for the container");
    assert!(row.starts_with(&handle), "{list}");
    assert!(row.contains("active"), "{list}");
    assert_eq!(lines.next(), None, "{list}");

    let listed = json(&success(&server, &["list", "--json"]));
    assert_eq!(listed[&handle]["Info"]["State"], "active", "{listed}");

    let info = success(&server, &["info", &handle]);
    assert!(info.lines().any(|line| line.starts_with("state") && line.ends_with("active")), "{info}");
    assert!(info.lines().any(|line| line.starts_with("property") && line.ends_with("team=red")), "{info}");
    assert_eq!(json(&success(&server, &["info", &handle, "--json"]))["Properties"]["team"], "red");

    let capacity = success(&server, &["capacity"]);
    assert!(capacity.lines().any(|line| line.starts_with("max containers")), "{capacity}");
    assert!(json(&success(&server, &["capacity", "--json"]))["max_containers"].as_u64().is_some_and(|count| count > 0));

    let limits = success(&server, &["limits", &handle, "--memory", "64M"]);
    assert!(limits.lines().any(|line| line.starts_with("memory") && line.ends_with("64.0 MiB")), "{limits}");
    let limits = json(&success(&server, &["limits", &handle, "--json"]));
    assert_eq!(limits["memory"]["limit_in_bytes"], 64 << 20, "{limits}");

    let metrics = success(&server, &["metrics", &handle]);
    assert!(metrics.starts_with("HANDLE"), "{metrics}");
    assert!(metrics.contains(&handle), "{metrics}");

    let bulk = success(&server, &["bulk-info", &handle, "no-such-container"]);
    assert!(bulk.lines().any(|line| line.starts_with("no-such-container") && line.contains("error: unknown handle")), "{bulk}");

    success(&server, &["grace-time", &handle, "1h"]);
    let bad_duration = trellis(&server, &["grace-time", &handle, "soon"]);
    assert_eq!(bad_duration.status.code(), Some(2));
    assert!(text(&bad_duration.stderr).contains("invalid duration \"soon\""), "{}", text(&bad_duration.stderr));

    let missing = trellis(&server, &["info", "no-such-container"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(text(&missing.stderr), "trellis: unknown handle: no-such-container\n");
}

#[test]
fn create_sets_network_limits_and_net_in() {
    let Some(server) = TestServer::start("create_sets_network_limits_and_net_in") else { return };
    let handle = server.unique_handle("spec");
    let shared = tempfile::Builder::new().prefix("trellis-test-cli-mount").tempdir().unwrap();
    std::fs::write(shared.path().join("note.txt"), "from the host\n").unwrap();
    let mount = format!("{}:/mnt/shared:ro", shared.path().display());
    #[rustfmt::skip]
    let created = success(&server, &[
        "create", &handle, "--network", "10.77.0.9/24", "--memory", "64M", "--cpu-shares", "512", "--pids", "40",
        "--bandwidth-rate", "1M", "--bandwidth-burst", "64K", "--net-in", "0:8080", "--net-in", "61010:22",
        "--env", "GREETING=hello", "--grace-time", "1h", "--bind-mount", &mount,
    ]);
    assert_eq!(created, format!("{handle}\n"));

    let info = json(&success(&server, &["info", &handle, "--json"]));
    assert_eq!(info["ContainerIP"], "10.77.0.9", "{info}");
    assert_eq!(info["HostIP"], "10.77.0.1", "{info}");
    let ports = info["MappedPorts"].as_array().unwrap_or_else(|| panic!("no mapped ports: {info}"));
    assert_eq!(ports.len(), 2, "{info}");
    assert_eq!(ports[0]["ContainerPort"], 8080, "{info}");
    assert!(ports[0]["HostPort"].as_u64().is_some_and(|port| port >= 61001), "the pool picks the host port: {info}");
    assert_eq!(ports[1]["HostPort"], 61010, "{info}");
    assert_eq!(ports[1]["ContainerPort"], 22, "{info}");

    let limits = json(&success(&server, &["limits", &handle, "--json"]));
    assert_eq!(limits["memory"]["limit_in_bytes"], 64 << 20, "{limits}");
    // The server may report shares set as `weight` in `limit_in_shares`.
    let shares = limits["cpu"]["weight"].as_u64().max(limits["cpu"]["limit_in_shares"].as_u64());
    assert_eq!(shares, Some(512), "{limits}");
    assert_eq!(limits["bandwidth"]["rate"], 1 << 20, "{limits}");
    assert_eq!(limits["bandwidth"]["burst"], 64 << 10, "{limits}");
    let metrics = json(&success(&server, &["metrics", &handle, "--json"]));
    assert_eq!(metrics["PidStat"]["Max"], 40, "{metrics}");

    let environment = success(&server, &["run", "--handle", &handle, "--", "sh", "-c", "echo $GREETING"]);
    assert_eq!(environment, "hello\n");
    let mounted = success(&server, &["run", "--handle", &handle, "--", "cat", "/mnt/shared/note.txt"]);
    assert_eq!(mounted, "from the host\n");
    let write = trellis(&server, &["run", "--handle", &handle, "--", "touch", "/mnt/shared/new"]);
    assert_ne!(write.status.code(), Some(0), "a read-only bind mount was writable");

    // Limits need a new container; run with --handle rejects them.
    let run = trellis(&server, &["run", "--handle", &handle, "--memory", "1M", "--", "true"]);
    assert_eq!(run.status.code(), Some(125));
    assert!(text(&run.stderr).contains("need a new container, not --handle"), "{}", text(&run.stderr));

    let bad_pair = trellis(&server, &["create", "--net-in", "8080"]);
    assert_eq!(bad_pair.status.code(), Some(2));
    assert!(text(&bad_pair.stderr).contains("invalid port mapping \"8080\": expected HOST:CONTAINER"), "{}", text(&bad_pair.stderr));
    let bad_network = trellis(&server, &["create", "--network", "10.77.0"]);
    assert_eq!(bad_network.status.code(), Some(2));
    assert!(text(&bad_network.stderr).contains("invalid network \"10.77.0\""), "{}", text(&bad_network.stderr));
    let overlap = trellis(&server, &["create", "--network", "10.254.1.0/24"]);
    assert_eq!(overlap.status.code(), Some(1));
    assert!(text(&overlap.stderr).contains("overlaps the dynamic allocation range"), "{}", text(&overlap.stderr));
    assert_eq!(success(&server, &["list", "--quiet"]), format!("{handle}\n"), "a rejected create left a container");

    let disk = server.unique_handle("disk");
    success(&server, &["create", &disk, "--disk", "10M", "--disk-scope", "exclusive"]);
    let limits = json(&success(&server, &["limits", &disk, "--json"]));
    assert_eq!(limits["disk"]["byte_hard"], 10 << 20, "{limits}");
    assert_eq!(limits["disk"]["scope"], 1, "exclusive is scope 1: {limits}");

    success(&server, &["destroy", &handle, &disk]);
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

/// Returns the accept rules of the server's nft chain `chain`, one per line.
fn chain_rules(server: &TestServer, chain: &str) -> Vec<String> {
    let table = format!("trellis_{}", server.tag);
    let listing = server.in_netns("nft", &["list", "chain", "ip", &table, chain]).expect("listing the chain");
    listing.lines().map(str::trim).filter(|line| line.ends_with("accept")).map(String::from).collect()
}

/// Returns the suffix of a container's chain names, as the server names
/// them.
fn chain_id(container_ip: &str) -> String {
    trellis::linux::network::address_id(container_ip.parse().unwrap())
}

#[test]
fn net_out_icmp_and_bulk_rules() {
    let Some(server) = TestServer::start("net_out_icmp_and_bulk_rules") else { return };
    let handle = server.unique_handle("netout");
    success(&server, &["create", &handle]);
    let info = json(&success(&server, &["info", &handle, "--json"]));
    let chain = format!("o_{}", chain_id(info["ContainerIP"].as_str().unwrap()));
    let before = chain_rules(&server, &chain).len();

    #[rustfmt::skip]
    success(&server, &["net-out", &handle, "--protocol", "icmp", "--network", "192.0.2.7", "--icmp-type", "8", "--icmp-code", "0"]);
    let rules = chain_rules(&server, &chain);
    assert_eq!(rules.len(), before + 1, "{rules:?}");
    let icmp = rules.last().unwrap();
    assert!(icmp.contains("192.0.2.7"), "{icmp}");
    assert!(icmp.contains("icmp type echo-request"), "{icmp}");
    assert!(icmp.contains("icmp code"), "{icmp}");

    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("rules.json");
    let rules_json = r#"[
        {"protocol": 1, "networks": [{"start": "198.51.100.10", "end": "198.51.100.20"}], "ports": [{"start": 8000, "end": 8080}]},
        {"protocol": 3, "networks": [{"start": "198.51.100.30", "end": "198.51.100.30"}], "icmps": {"type": 0}}
    ]"#;
    std::fs::write(&file, rules_json).unwrap();
    success(&server, &["bulk-net-out", &handle, "--rules", file.to_str().unwrap()]);
    let rules = chain_rules(&server, &chain);
    assert_eq!(rules.len(), before + 3, "{rules:?}");
    assert!(rules.iter().any(|rule| rule.contains("198.51.100.10-198.51.100.20") && rule.contains("8000-8080")), "{rules:?}");
    assert!(rules.iter().any(|rule| rule.contains("198.51.100.30") && rule.contains("icmp type echo-reply")), "{rules:?}");

    let piped = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["bulk-net-out", &handle, "--rules", "-"])
        .env("TRELLIS_TARGET", &server.socket)
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(piped.status.success(), "{}", text(&piped.stderr));
    assert_eq!(chain_rules(&server, &chain).len(), before + 5, "the rules from stdin were not added");

    // Bad input leaves the chain as it was.
    let count = before + 5;
    let tcp_icmp = trellis(&server, &["net-out", &handle, "--protocol", "tcp", "--icmp-type", "8"]);
    assert_eq!(tcp_icmp.status.code(), Some(1));
    assert_eq!(text(&tcp_icmp.stderr), "trellis: invalid --icmp-type: ICMP options need --protocol icmp, not tcp\n");
    let code_alone = trellis(&server, &["net-out", &handle, "--protocol", "icmp", "--icmp-code", "0"]);
    assert_eq!(code_alone.status.code(), Some(2));
    assert!(text(&code_alone.stderr).contains("--icmp-type"), "{}", text(&code_alone.stderr));

    std::fs::write(&file, r#"[{"protocol": 1, "ports": [{"start": 80"#).unwrap();
    let malformed = trellis(&server, &["bulk-net-out", &handle, "--rules", file.to_str().unwrap()]);
    assert_eq!(malformed.status.code(), Some(1));
    let stderr = text(&malformed.stderr);
    assert!(stderr.starts_with(&format!("trellis: invalid rules file {}: ", file.display())), "{stderr}");
    assert!(stderr.trim_end().ends_with("expected a JSON array of net-out rules"), "{stderr}");

    let missing = trellis(&server, &["bulk-net-out", &handle, "--rules", "/no/such/rules.json"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).starts_with("trellis: cannot read the rules file /no/such/rules.json: "), "{}", text(&missing.stderr));

    // The server checks each rule and adds none when one is invalid.
    std::fs::write(&file, r#"[{"protocol": 1, "ports": [{"start": 80, "end": 80}]}, {"protocol": 4}]"#).unwrap();
    let rejected = trellis(&server, &["bulk-net-out", &handle, "--rules", file.to_str().unwrap()]);
    assert_eq!(rejected.status.code(), Some(1));
    assert!(text(&rejected.stderr).contains("invalid protocol: 4"), "{}", text(&rejected.stderr));
    assert_eq!(chain_rules(&server, &chain).len(), count, "rejected input changed the chain");

    let empty = trellis(&server, &["bulk-net-out", &handle, "--rules", "/dev/null"]);
    assert_eq!(empty.status.code(), Some(1));
    assert!(text(&empty.stderr).starts_with("trellis: invalid rules file /dev/null: "), "{}", text(&empty.stderr));

    std::fs::write(&file, rules_json).unwrap();
    let unknown = trellis(&server, &["bulk-net-out", "no-such-container", "--rules", file.to_str().unwrap()]);
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(text(&unknown.stderr), "trellis: unknown handle: no-such-container\n");
    assert_eq!(chain_rules(&server, &chain).len(), count);

    success(&server, &["destroy", &handle]);
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

/// Writes a directory tree with a nested file, a 3 MiB file and a link.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("sub/deeper/note.txt"), "hello from the host\n").unwrap();
    let big: Vec<u8> = (0..3 << 20).map(|index: u32| (index % 251) as u8).collect();
    std::fs::write(root.join("big.bin"), big).unwrap();
    std::os::unix::fs::symlink("sub/deeper/note.txt", root.join("link")).unwrap();
}

#[test]
fn stream_directory_in_and_out() {
    let Some(server) = TestServer::start("stream_directory_in_and_out") else { return };
    let handle = server.unique_handle("files");
    success(&server, &["create", &handle]);
    let local = tempfile::Builder::new().prefix("trellis-test-cli-files").tempdir().unwrap();
    let source = local.path().join("source");
    make_tree(&source);

    let sent = trellis(&server, &["stream-in", &handle, source.to_str().unwrap(), "/data", "--progress", "always"]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    let progress = text(&sent.stderr);
    assert!(progress.lines().last().is_some_and(|line| line.starts_with("sent ") && line.contains(" bytes) in ")), "{progress}");

    let cat = success(&server, &["run", "--handle", &handle, "--", "cat", "/data/sub/deeper/note.txt"]);
    assert_eq!(cat, "hello from the host\n");

    let copy = local.path().join("copy");
    let received = trellis(&server, &["stream-out", &handle, "/data/", copy.to_str().unwrap(), "--progress", "always"]);
    assert!(received.status.success(), "{}", text(&received.stderr));
    assert!(text(&received.stderr).lines().last().is_some_and(|line| line.starts_with("received ")), "{}", text(&received.stderr));
    assert_eq!(std::fs::read(copy.join("big.bin")).unwrap(), std::fs::read(source.join("big.bin")).unwrap());
    assert_eq!(std::fs::read_to_string(copy.join("sub/deeper/note.txt")).unwrap(), "hello from the host\n");
    assert_eq!(std::fs::read_link(copy.join("link")).unwrap(), Path::new("sub/deeper/note.txt"));

    let archive = local.path().join("note.tar");
    success(&server, &["stream-out", &handle, "/data/sub/deeper/note.txt", archive.to_str().unwrap(), "--tar", "--progress", "never"]);
    let bytes = std::fs::read(&archive).unwrap();
    assert_eq!(&bytes[257..262], b"ustar", "not a tar archive");

    // The archive goes back in through stdin, as it is.
    let piped = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["stream-in", &handle, "-", "/piped"])
        .env("TRELLIS_TARGET", &server.socket)
        .stdin(std::fs::File::open(&archive).unwrap())
        .output()
        .unwrap();
    assert!(piped.status.success(), "{}", text(&piped.stderr));
    let cat = success(&server, &["run", "--handle", &handle, "--", "cat", "/piped/note.txt"]);
    assert_eq!(cat, "hello from the host\n");

    let quiet = trellis(&server, &["stream-in", &handle, source.to_str().unwrap(), "/quiet", "--progress", "never"]);
    assert!(quiet.status.success());
    assert_eq!(text(&quiet.stderr), "");

    let missing_source = trellis(&server, &["stream-in", &handle, "/no/such/path", "/data"]);
    assert_eq!(missing_source.status.code(), Some(1));
    assert!(text(&missing_source.stderr).starts_with("trellis: cannot read /no/such/path: "), "{}", text(&missing_source.stderr));

    let missing_container = trellis(&server, &["stream-out", "no-such-container", "/data/", copy.to_str().unwrap()]);
    assert_eq!(missing_container.status.code(), Some(1));
    assert_eq!(text(&missing_container.stderr), "trellis: unknown handle: no-such-container\n");
}

#[test]
fn unreachable_server_is_clear() {
    let directory = tempfile::tempdir().unwrap();
    let absent = directory.path().join("absent.sock");
    let output = trellis_at(&absent, &["list"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.starts_with(&format!("trellis: cannot connect to unix:{}: ", absent.display())), "{stderr}");
    assert!(stderr.contains("No such file or directory"), "{stderr}");

    // Connecting to a socket file without a listener fails with ECONNREFUSED.
    let stale = directory.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let output = trellis_at(&stale, &["capacity"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("Connection refused"), "{}", text(&output.stderr));

    let run = trellis_at(&stale, &["run", "--", "true"]);
    assert_eq!(run.status.code(), Some(125), "run uses its own code for failed requests");
}

#[test]
fn help_names_units() {
    let help = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_trellis")).args(args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
        text(&output.stdout)
    };
    let top = help(&["--help"]);
    for command in ["capacity", "list", "info", "bulk-info", "metrics", "limits", "grace-time", "net-in", "net-out", "bulk-net-out", "stream-in", "stream-out", "run", "attach", "stop", "destroy", "properties", "server"] {
        assert!(top.contains(&format!("  {command}")), "--help lacks {command}:\n{top}");
    }
    let limits = help(&["limits", "--help"]);
    assert!(limits.contains("in bytes"), "{limits}");
    assert!(limits.contains("cgroup shares"), "{limits}");
    assert!(help(&["stream-in", "--help"]).contains("--progress"));

    let create = help(&["create", "--help"]);
    for option in ["--network", "--memory <BYTES>", "--pids <COUNT>", "--disk-scope", "--net-in <HOST:CONTAINER>", "--bind-mount"] {
        assert!(create.contains(option), "create --help lacks {option}:\n{create}");
    }
    assert!(create.contains("[HANDLE]  Handle of the new container"), "{create}");

    let net_out = help(&["net-out", "--help"]);
    assert!(net_out.contains("--icmp-type <TYPE>"), "{net_out}");
    assert!(net_out.contains("--icmp-code <CODE>"), "{net_out}");

    // Every positional argument of every command has help text.
    #[rustfmt::skip]
    let commands: [&[&str]; 10] = [
        &["info"], &["grace-time"], &["net-in"], &["bulk-net-out"], &["attach"], &["stop"], &["destroy"], &["metrics"],
        &["properties", "get"], &["properties", "set"],
    ];
    for command in commands {
        let usage = help(&[command, &["--help"]].concat());
        let arguments = usage.split("Arguments:").nth(1).unwrap_or_else(|| panic!("{command:?} has no arguments:\n{usage}"));
        let arguments = arguments.split("Options:").next().unwrap();
        for line in arguments.lines().filter(|line| line.trim_start().starts_with('<') || line.trim_start().starts_with('[')) {
            assert!(line.trim().contains("  "), "{command:?}: an argument without help: {line:?}");
        }
    }

    let server = help(&["server", "--help"]);
    assert!(server.contains("--print-config"), "{server}");
    assert!(server.contains("0 picks a free port"), "{server}");
}

#[test]
fn print_config_shows_effective_values() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("trellis.toml");
    std::fs::write(&file, "bind-port = 7001\nlog-format = \"human\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["server", "--print-config", "--config"])
        .arg(&file)
        .args(["--bind-port", "7002", "--max-containers", "9"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed: toml::Table = text(&output.stdout).parse().expect("--print-config prints TOML");
    assert_eq!(printed["bind-port"].as_integer(), Some(7002), "the flag overrides the file");
    assert_eq!(printed["log-format"].as_str(), Some("human"));
    assert_eq!(printed["max-containers"].as_integer(), Some(9));
    assert_eq!(printed["depot"].as_str(), Some("/var/lib/trellis/depot"));

    std::fs::write(&file, "debug-bind-prot = 17014\n").unwrap();
    let typo = Command::new(env!("CARGO_BIN_EXE_trellis")).args(["server", "--print-config", "--config"]).arg(&file).output().unwrap();
    assert_eq!(typo.status.code(), Some(1));
    assert_eq!(
        text(&typo.stderr),
        format!("trellis server: {}: unknown key `debug-bind-prot`; did you mean `debug-bind-port`?\n", file.display())
    );
}
