//! Container networking against a real server in a private network
//! namespace: net-out through the deny list, net-in from an outside host
//! and from the host itself, shared and separate subnets, bulk net-out,
//! bandwidth, name files, bad input and pool reuse.
//!
//! The "outside" host is a network namespace each test creates, linked to
//! the server's namespace by a veth pair: the server's end has
//! 192.0.2.1/24 and the outside end 192.0.2.2/24. Small TCP servers run
//! there on threads that entered that namespace.

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::{ServerOptions, TestServer, EXTERNAL_IP};
use trellis::api::{
    BandwidthLimits, ContainerSpec, IcmpControl, IpRange, Limits, NetIn, NetOutRule, PortRange, PROTOCOL_ICMP, PROTOCOL_TCP,
};

/// Address of the server's end of the link to the outside host.
const SERVER_SIDE: &str = "192.0.2.1";
/// Address of the outside host.
const OUTSIDE: &str = "192.0.2.2";

/// The outside host: a network namespace linked to the server's. Dropping
/// it stops its servers and deletes the namespace, which removes the link.
struct OutsideHost {
    name: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn ip(args: &[&str]) {
    let output = std::process::Command::new("ip").args(args).output().expect("running ip");
    assert!(output.status.success(), "ip {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

impl OutsideHost {
    fn create(server: &TestServer) -> OutsideHost {
        let name = format!("{}-out", server.name);
        ip(&["netns", "add", &name]);
        let host = OutsideHost { name, stop: Arc::new(AtomicBool::new(false)), threads: Vec::new() };
        ip(&["-n", &host.name, "link", "set", "lo", "up"]);
        ip(&["-n", &server.name, "link", "add", "out0", "type", "veth", "peer", "name", "out1", "netns", &host.name]);
        ip(&["-n", &server.name, "addr", "add", &format!("{SERVER_SIDE}/24"), "dev", "out0"]);
        ip(&["-n", &server.name, "link", "set", "out0", "up"]);
        ip(&["-n", &host.name, "addr", "add", &format!("{OUTSIDE}/24"), "dev", "out1"]);
        ip(&["-n", &host.name, "link", "set", "out1", "up"]);
        // Replies and net-in connections to the external IP go through
        // the server's namespace.
        ip(&["-n", &host.name, "route", "add", "198.51.100.0/24", "via", SERVER_SIDE]);
        host
    }

    fn netns(&self) -> File {
        File::open(format!("/run/netns/{}", self.name)).expect("opening the outside namespace")
    }

    /// Starts a TCP server on `port` that reads each connection until the
    /// client shuts down its side, then writes `reply`. Each connection's
    /// byte count and the time from its first to its last byte go to the
    /// returned channel.
    fn serve(&mut self, port: u16, reply: &'static [u8]) -> mpsc::Receiver<Received> {
        let (sender, receiver) = mpsc::channel();
        let (bound, ready) = mpsc::channel();
        let netns = self.netns();
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the outside namespace");
            let listener = TcpListener::bind((OUTSIDE, port)).expect("binding in the outside namespace");
            listener.set_nonblocking(true).unwrap();
            bound.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        let _ = sender.send(receive(stream, reply));
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
                    Err(error) => panic!("accept failed: {error}"),
                }
            }
        }));
        ready.recv().expect("the outside server did not start");
        receiver
    }

    /// Runs `work` on a thread inside the outside namespace.
    fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let netns = self.netns();
        std::thread::spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the outside namespace");
            work()
        })
        .join()
        .expect("the outside thread panicked")
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let _ = std::process::Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

/// What an outside server received on one connection.
#[derive(Debug)]
struct Received {
    bytes: usize,
    /// From the first to the last byte received.
    duration: Duration,
}

fn receive(mut stream: TcpStream, reply: &[u8]) -> Received {
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut data = Vec::new();
    let mut buffer = [0u8; 65536];
    let mut first = None;
    let mut last = Instant::now();
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
                data.extend_from_slice(&buffer[..count]);
            }
        }
    }
    let _ = stream.write_all(reply);
    Received { bytes: data.len(), duration: first.map_or(Duration::ZERO, |first| last - first) }
}

/// Returns whether the container can open a TCP connection to
/// `address:port` and get the outside server's reply.
fn tcp_reaches(server: &TestServer, handle: &str, address: &str, port: u16) -> bool {
    let script = format!("echo hello | nc -w 3 {address} {port}");
    let output = server.run_command(handle, "/bin/sh", &["-c", &script]);
    output.status == 0 && output.stdout_text().contains("reply")
}

fn pings(server: &TestServer, handle: &str, address: &str) -> bool {
    let script = format!("ping -c 1 -W 2 {address}");
    server.run_command(handle, "/bin/sh", &["-c", &script]).status == 0
}

fn deny_all() -> ServerOptions {
    ServerOptions { extra_config: vec!["deny-network = [\"0.0.0.0/0\"]".into()], ..ServerOptions::default() }
}

fn single(address: &str) -> IpRange {
    IpRange { start: Some(address.parse().unwrap()), end: Some(address.parse().unwrap()) }
}

/// Returns the number of rules in the nft chain `chain` of the server.
fn chain_rule_count(server: &TestServer, chain: &str) -> usize {
    let table = format!("trellis_{}", server.tag);
    let text = server.in_netns("nft", &["list", "chain", "ip", &table, chain]).expect("listing the chain");
    text.lines().filter(|line| line.trim().ends_with("accept")).count()
}

/// Returns the suffix of a container's chain names, as the server names
/// them.
fn chain_id(container_ip: &str) -> String {
    trellis::linux::network::address_id(container_ip.parse().unwrap())
}

#[test]
fn net_out_opens_denied_destination() {
    let Some(server) = TestServer::start_with("net_out_opens_denied_destination", deny_all()) else { return };
    let mut outside = OutsideHost::create(&server);
    let _allowed = outside.serve(7001, b"reply\n");
    let _other = outside.serve(7002, b"reply\n");
    let handle = server.create("netout");

    assert!(!tcp_reaches(&server, &handle, OUTSIDE, 7001), "a denied network was reachable without a rule");
    assert!(!pings(&server, &handle, OUTSIDE), "ping reached a denied network without a rule");

    let tcp_rule = NetOutRule {
        protocol: PROTOCOL_TCP,
        networks: vec![single(OUTSIDE)],
        ports: vec![PortRange { start: 7001, end: 7001 }],
        ..NetOutRule::default()
    };
    server.block_on(server.client.net_out(&handle, &tcp_rule)).expect("net out tcp");
    assert!(tcp_reaches(&server, &handle, OUTSIDE, 7001), "the rule's port stayed closed");
    assert!(!tcp_reaches(&server, &handle, OUTSIDE, 7002), "a port outside the rule opened");
    assert!(!pings(&server, &handle, OUTSIDE), "a TCP rule let ICMP through");

    let wrong_type = NetOutRule {
        protocol: PROTOCOL_ICMP,
        networks: vec![single(OUTSIDE)],
        icmps: Some(IcmpControl { icmp_type: 13, code: None }),
        ..NetOutRule::default()
    };
    server.block_on(server.client.net_out(&handle, &wrong_type)).expect("net out icmp timestamp");
    assert!(!pings(&server, &handle, OUTSIDE), "an ICMP rule for another type let echo requests through");

    let echo = NetOutRule {
        protocol: PROTOCOL_ICMP,
        networks: vec![single(OUTSIDE)],
        icmps: Some(IcmpControl { icmp_type: 8, code: Some(0) }),
        ..NetOutRule::default()
    };
    server.block_on(server.client.net_out(&handle, &echo)).expect("net out icmp echo");
    assert!(pings(&server, &handle, OUTSIDE), "the echo-request rule did not open ping");
    assert!(!tcp_reaches(&server, &handle, OUTSIDE, 7002), "an ICMP rule opened TCP");

    server.block_on(server.client.destroy(&handle)).expect("destroy");
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

#[test]
fn egress_allowed_without_deny_list() {
    let Some(server) = TestServer::start("egress_allowed_without_deny_list") else { return };
    let mut outside = OutsideHost::create(&server);
    let _listener = outside.serve(7001, b"reply\n");
    let handle = server.create("open");
    assert!(tcp_reaches(&server, &handle, OUTSIDE, 7001), "egress failed although no network is denied");
    // The outside host has no route to container addresses, so replies
    // arrive only because the source was masqueraded.
    assert!(pings(&server, &handle, OUTSIDE));
}

#[test]
fn net_in_from_outside_and_host() {
    let Some(server) = TestServer::start("net_in_from_outside_and_host") else { return };
    let outside = OutsideHost::create(&server);
    let handle = server.create("netin");

    let mapped = server.block_on(server.client.net_in(&handle, 0, 8080)).expect("net in");
    assert_eq!(mapped.host_port, 61001);
    assert_eq!(mapped.container_port, 8080);
    let second = server.block_on(server.client.net_in(&handle, 0, 0)).expect("net in with zero ports");
    assert_eq!(second.host_port, 61002);
    assert_eq!(second.container_port, 61002, "a zero container port takes the host port's number");

    let info = server.block_on(server.client.info(&handle)).expect("info");
    assert_eq!(info.external_ip, EXTERNAL_IP);
    assert_eq!(info.container_ip, "10.254.0.2");
    assert_eq!(info.host_ip, "10.254.0.1");
    let ports: Vec<(u32, u32)> = info.mapped_ports.unwrap_or_default().iter().map(|mapping| (mapping.host_port, mapping.container_port)).collect();
    assert_eq!(ports, vec![(61001, 8080), (61002, 61002)]);
    let properties = info.properties.unwrap_or_default();
    assert_eq!(properties.get("garden.network.container-ip").map(String::as_str), Some("10.254.0.2"));
    assert_eq!(properties.get("garden.network.host-ip").map(String::as_str), Some("10.254.0.1"));
    assert_eq!(properties.get("garden.network.external-ip").map(String::as_str), Some(EXTERNAL_IP));
    assert_eq!(
        properties.get("garden.network.mapped-ports").map(String::as_str),
        Some(r#"[{"HostPort":61001,"ContainerPort":8080},{"HostPort":61002,"ContainerPort":61002}]"#)
    );

    // 1 MiB from the outside host to the container, read back whole.
    let payload: Vec<u8> = (0..(1u32 << 20)).map(|index| (index.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for (label, from_outside, port, container_port) in [("outside", true, 61001u16, 8080u16), ("host", false, 61002, 61002)] {
        let file = format!("/tmp/received-{label}");
        // nc gets a stdin that stays open, because busybox nc ends at
        // the end of its input.
        let listen = format!("sleep 600 | nc -l -p {container_port} > {file} 2>/dev/null &");
        let started = server.run_command(&handle, "/bin/sh", &["-c", &listen]);
        assert_eq!(started.status, 0, "{label}: starting the listener: {}", started.stderr_text());

        let data = payload.clone();
        let target: SocketAddr = format!("{EXTERNAL_IP}:{port}").parse().unwrap();
        let send = move || -> Result<(), String> {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut stream = loop {
                match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                    Ok(stream) => break stream,
                    Err(error) if Instant::now() < deadline => {
                        let _ = error;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(error) => return Err(format!("connecting to {target} failed: {error}")),
                }
            };
            stream.write_all(&data).map_err(|error| error.to_string())?;
            stream.shutdown(Shutdown::Write).map_err(|error| error.to_string())
        };
        let sent = if from_outside { outside.run(send) } else { in_server_netns(&server, send) };
        sent.unwrap_or_else(|error| panic!("{label}: {error}"));

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let output = server.run_command(&handle, "/bin/cat", &[&file]);
            if output.stdout.len() >= payload.len() || Instant::now() >= deadline {
                assert_eq!(output.stdout.len(), payload.len(), "{label}: received size");
                assert!(output.stdout == payload, "{label}: the received bytes differ from the sent ones");
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    server.block_on(server.client.destroy(&handle)).expect("destroy");
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

/// Runs `work` on a thread inside the server's network namespace, as a
/// process of the host would connect.
fn in_server_netns<T: Send + 'static>(server: &TestServer, work: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = File::open(format!("/run/netns/{}", server.name)).expect("opening the server's namespace");
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the server's namespace");
        work()
    })
    .join()
    .expect("the thread in the server's namespace panicked")
}

#[test]
fn shared_subnet_reaches_separate_does_not() {
    let Some(server) = TestServer::start("shared_subnet_reaches_separate_does_not") else { return };
    let create = |label: &str, network: &str| {
        let spec = ContainerSpec { handle: server.unique_handle(label), network: network.to_string(), ..ContainerSpec::default() };
        server.block_on(server.client.create(&spec)).unwrap_or_else(|error| panic!("creating {label}: {error}"))
    };
    let first = create("shared-a", "10.77.0.0/24");
    let second = create("shared-b", "10.77.0.9/24");
    let separate = create("separate", "");

    let second_info = server.block_on(server.client.info(&second)).unwrap();
    assert_eq!(second_info.container_ip, "10.77.0.9");
    assert_eq!(second_info.host_ip, "10.77.0.1");
    let first_info = server.block_on(server.client.info(&first)).unwrap();
    assert_eq!(first_info.container_ip, "10.77.0.2");

    assert!(pings(&server, &first, "10.77.0.9"), "containers on one subnet do not reach each other");
    assert!(!pings(&server, &separate, "10.77.0.9"), "a container reached another subnet");
    assert!(!pings(&server, &first, &server.block_on(server.client.info(&separate)).unwrap().container_ip));

    // The bridge stays while a container of the subnet is left.
    let bridges = || {
        let prefix: String = server.tag.chars().take(8).collect();
        let links = server.in_netns("ip", &["-o", "link", "show"]).unwrap();
        links.lines().filter(|line| line.contains(&format!(": {prefix}b"))).count()
    };
    assert_eq!(bridges(), 2, "one bridge per subnet");
    server.block_on(server.client.destroy(&first)).unwrap();
    assert_eq!(bridges(), 2, "the shared bridge went with the first container");
    assert!(!pings(&server, &separate, "10.77.0.9"));
    for handle in [second, separate] {
        server.block_on(server.client.destroy(&handle)).unwrap();
    }
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

#[test]
fn bulk_net_out_applies_all_or_nothing() {
    let Some(server) = TestServer::start_with("bulk_net_out_applies_all_or_nothing", deny_all()) else { return };
    let mut outside = OutsideHost::create(&server);
    let _listener = outside.serve(9999, b"reply\n");
    let handle = server.create("bulk");
    let info = server.block_on(server.client.info(&handle)).unwrap();
    let chain = format!("o_{}", chain_id(&info.container_ip));

    let rules: Vec<NetOutRule> = (7000..10000u16)
        .map(|port| NetOutRule {
            protocol: PROTOCOL_TCP,
            networks: vec![single(OUTSIDE)],
            ports: vec![PortRange { start: port, end: port }],
            ..NetOutRule::default()
        })
        .collect();
    assert_eq!(rules.len(), 3000);

    let mut with_bad = rules.clone();
    with_bad.push(NetOutRule { protocol: 9, ..NetOutRule::default() });
    let error = server.block_on(server.client.bulk_net_out(&handle, &with_bad)).unwrap_err();
    assert!(error.to_string().contains("invalid protocol: 9"), "{error}");
    assert_eq!(chain_rule_count(&server, &chain), 0, "a failed batch left rules behind");
    assert!(!tcp_reaches(&server, &handle, OUTSIDE, 9999));

    server.block_on(server.client.bulk_net_out(&handle, &rules)).expect("bulk net out");
    assert_eq!(chain_rule_count(&server, &chain), 3000);
    assert!(tcp_reaches(&server, &handle, OUTSIDE, 9999), "the last rule of the batch is not in force");
}

#[test]
fn bandwidth_limits_outbound_transfer() {
    let Some(server) = TestServer::start("bandwidth_limits_outbound_transfer") else { return };
    let mut outside = OutsideHost::create(&server);
    let received = outside.serve(7003, b"");
    let rate = 1u64 << 20;
    let spec = ContainerSpec {
        handle: server.unique_handle("bandwidth"),
        limits: Limits { bandwidth_limits: BandwidthLimits { rate, burst: 64 * 1024 }, ..Limits::default() },
        ..ContainerSpec::default()
    };
    let handle = server.block_on(server.client.create(&spec)).expect("create with a bandwidth limit");
    let limits = server.block_on(server.client.bandwidth_limits(&handle)).unwrap();
    assert_eq!(limits, BandwidthLimits { rate, burst: 64 * 1024 });

    let size_mib = 4;
    let script = format!("dd if=/dev/zero bs=1048576 count={size_mib} 2>/dev/null | nc -w 5 {OUTSIDE} 7003");
    let output = server.run_command(&handle, "/bin/sh", &["-c", &script]);
    assert_eq!(output.status, 0, "sending failed: {}", output.stderr_text());
    let transfer = received.recv_timeout(Duration::from_secs(120)).expect("the outside server got no connection");
    assert_eq!(transfer.bytes, size_mib << 20);
    // At 1 MiB/s, 4 MiB take about 4 s after the first bucket. The margin
    // is wide, because the test checks the limit and not its precision.
    assert!(transfer.duration >= Duration::from_secs(2), "4 MiB took only {:?} under a 1 MiB/s limit", transfer.duration);
    assert!(transfer.duration <= Duration::from_secs(60), "4 MiB took {:?} under a 1 MiB/s limit", transfer.duration);

    // Removing the limit through the 2015 route is not possible (a zero
    // field keeps the value), so a higher rate shows the change applies.
    let raised = BandwidthLimits { rate: 64 << 20, burst: 1 << 20 };
    let qdiscs_before = server.in_netns("tc", &["qdisc", "show"]).unwrap();
    assert!(qdiscs_before.contains("tbf"), "no tbf qdisc on the host end: {qdiscs_before}");
    set_bandwidth(&server, &handle, raised);
    let qdiscs_after = server.in_netns("tc", &["qdisc", "show"]).unwrap();
    assert_ne!(qdiscs_after, qdiscs_before, "the raised rate is not applied");

    server.block_on(server.client.destroy(&handle)).expect("destroy");
    let qdiscs = server.in_netns("tc", &["qdisc", "show"]).unwrap();
    assert!(!qdiscs.contains("tbf"), "qdiscs left after destroy: {qdiscs}");
}

/// Sets bandwidth limits through the 2015 `PUT .../limits/bandwidth` route.
fn set_bandwidth(server: &TestServer, handle: &str, limits: BandwidthLimits) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_string(&limits).unwrap();
    let request = format!(
        "PUT /containers/{handle}/limits/bandwidth HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let socket = server.socket.clone();
    let response = server.block_on(async move {
        let mut stream = tokio::net::UnixStream::connect(socket).await.expect("connecting to the server");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    });
    assert!(response.starts_with("HTTP/1.1 200"), "setting bandwidth failed: {response}");
}

#[test]
fn name_files_written_and_writable() {
    let Some(server) = TestServer::start("name_files_written_and_writable") else { return };
    let handle = server.create("names");
    let hosts = server.run_command(&handle, "/bin/cat", &["/etc/hosts"]);
    let hostname = server.run_command(&handle, "/bin/sh", &["-c", "hostname"]).stdout_text().trim().to_string();
    assert_eq!(hosts.stdout_text(), format!("127.0.0.1 localhost\n10.254.0.2 {hostname}\n"));
    let resolv = server.run_command(&handle, "/bin/cat", &["/etc/resolv.conf"]);
    assert_eq!(resolv.stdout_text(), format!("nameserver {}\n", support::DNS_SERVER));

    let append = server.run_command(&handle, "/bin/sh", &["-c", "echo '192.0.2.9 db' >> /etc/hosts && echo 'search test' >> /etc/resolv.conf"]);
    assert_eq!(append.status, 0, "container root cannot rewrite its name files: {}", append.stderr_text());
    let hosts = server.run_command(&handle, "/bin/cat", &["/etc/hosts"]);
    assert!(hosts.stdout_text().ends_with("192.0.2.9 db\n"));

    let route = server.run_command(&handle, "/bin/sh", &["-c", "ip route"]);
    assert!(route.stdout_text().contains("default via 10.254.0.1"), "{}", route.stdout_text());
    let links = server.run_command(&handle, "/bin/sh", &["-c", "ip link"]);
    assert!(links.stdout_text().contains("mtu 1500"), "{}", links.stdout_text());
}

#[test]
fn host_access_rejected_by_default() {
    let Some(server) = TestServer::start("host_access_rejected_by_default") else { return };
    let handle = server.create("hostaccess");
    let accepted = accept_once_on_host(&server, 7100);
    let reached = tcp_connects(&server, &handle, EXTERNAL_IP, 7100);
    assert!(!reached, "a container reached the host without host access");
    assert!(!accepted.join().unwrap(), "the host accepted a connection from a container");
}

/// Listens on the external IP in the server's namespace, as a service of
/// the host would, and accepts one connection, which it closes at once.
/// The thread returns whether a connection came within 10 seconds.
fn accept_once_on_host(server: &TestServer, port: u16) -> JoinHandle<bool> {
    let netns = File::open(format!("/run/netns/{}", server.name)).expect("opening the server's namespace");
    let (bound, ready) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the server's namespace");
        let listener = TcpListener::bind((EXTERNAL_IP, port)).expect("binding on the external IP");
        listener.set_nonblocking(true).unwrap();
        bound.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if listener.accept().is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    ready.recv().expect("the host listener did not start");
    thread
}

#[test]
fn host_access_allowed_when_configured() {
    let options = ServerOptions { extra_config: vec!["allow-host-access = true".into()], ..ServerOptions::default() };
    let Some(server) = TestServer::start_with("host_access_allowed_when_configured", options) else { return };
    let handle = server.create("hostaccess");
    let accepted = accept_once_on_host(&server, 7100);
    let reached = tcp_connects(&server, &handle, EXTERNAL_IP, 7100);
    assert!(reached, "a container did not reach the host although host access is allowed");
    assert!(accepted.join().unwrap(), "the host saw no connection");
}

/// Returns whether the container's nc connects and then gets the peer's
/// close of the connection.
fn tcp_connects(server: &TestServer, handle: &str, address: &str, port: u16) -> bool {
    let script = format!("nc -w 2 {address} {port} < /dev/null");
    server.run_command(handle, "/bin/sh", &["-c", &script]).status == 0
}

#[test]
fn bad_network_input_rejected() {
    let options = ServerOptions { extra_config: vec!["port-pool-size = 2".into()], ..ServerOptions::default() };
    let Some(server) = TestServer::start_with("bad_network_input_rejected", options) else { return };
    let create_error = |network: &str| {
        let spec = ContainerSpec { handle: server.unique_handle("bad"), network: network.to_string(), ..ContainerSpec::default() };
        server.block_on(server.client.create(&spec)).expect_err(network).to_string()
    };
    assert!(create_error("banana").contains("invalid CIDR address: banana"));
    assert!(create_error("10.254.1.0/24").contains("overlaps the dynamic allocation range (10.254.0.0/22)"));
    assert!(create_error("10.88.0.1/24").contains("a container IP must not equal the gateway IP"));
    assert!(create_error("10.88.0.255/24").contains("a container IP must not equal the broadcast IP"));
    assert_eq!(server.block_on(server.client.list(&Default::default())).unwrap(), Vec::<String>::new());

    let handle = server.create("ports");
    let error = server.block_on(server.client.net_in(&handle, 70000, 80)).unwrap_err();
    assert!(error.to_string().contains("invalid host port 70000"), "{error}");
    server.block_on(server.client.net_in(&handle, 0, 80)).unwrap();
    server.block_on(server.client.net_in(&handle, 0, 81)).unwrap();
    let error = server.block_on(server.client.net_in(&handle, 0, 82)).unwrap_err();
    assert!(error.to_string().contains("port pool is exhausted"), "{error}");
    server.block_on(server.client.net_in(&handle, 8080, 80)).unwrap();
    let error = server.block_on(server.client.net_in(&handle, 8080, 80)).unwrap_err();
    assert!(error.to_string().contains("port already acquired: 8080"), "{error}");

    let bad_rules = [
        (NetOutRule { protocol: 4, ..NetOutRule::default() }, "invalid protocol: 4"),
        (NetOutRule { ports: vec![PortRange { start: 1, end: 2 }], ..NetOutRule::default() }, "Ports cannot be specified for Protocol ALL"),
    ];
    for (rule, message) in bad_rules {
        let error = server.block_on(server.client.net_out(&handle, &rule)).unwrap_err();
        assert!(error.to_string().contains(message), "{error}");
    }
    let info = server.block_on(server.client.info(&handle)).unwrap();
    assert_eq!(chain_rule_count(&server, &format!("o_{}", chain_id(&info.container_ip))), 0);
}

#[test]
fn spec_net_in_and_out_applied_at_create() {
    let Some(server) = TestServer::start_with("spec_net_in_and_out_applied_at_create", deny_all()) else { return };
    let mut outside = OutsideHost::create(&server);
    let _listener = outside.serve(7001, b"reply\n");
    let spec = ContainerSpec {
        handle: server.unique_handle("spec"),
        netin: vec![NetIn { host_port: 0, container_port: 8080 }],
        netout_rules: vec![NetOutRule {
            protocol: PROTOCOL_TCP,
            networks: vec![single(OUTSIDE)],
            ports: vec![PortRange { start: 7001, end: 7001 }],
            ..NetOutRule::default()
        }],
        ..ContainerSpec::default()
    };
    let handle = server.block_on(server.client.create(&spec)).expect("create with NetIn and NetOut");
    let info = server.block_on(server.client.info(&handle)).unwrap();
    let ports: Vec<(u32, u32)> = info.mapped_ports.unwrap_or_default().iter().map(|mapping| (mapping.host_port, mapping.container_port)).collect();
    assert_eq!(ports, vec![(61001, 8080)]);
    assert!(tcp_reaches(&server, &handle, OUTSIDE, 7001), "the spec's net-out rule is not in force");

    // A bad rule in the spec fails create and leaves nothing behind.
    let bad = ContainerSpec {
        handle: server.unique_handle("badspec"),
        netout_rules: vec![NetOutRule { protocol: 7, ..NetOutRule::default() }],
        ..ContainerSpec::default()
    };
    let error = server.block_on(server.client.create(&bad)).unwrap_err();
    assert!(error.to_string().contains("invalid protocol: 7"), "{error}");
    assert_eq!(server.block_on(server.client.list(&Default::default())).unwrap(), vec![handle.clone()]);
    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

#[test]
fn pools_full_after_many_cycles() {
    let options = ServerOptions {
        extra_config: vec!["network-pool = \"10.254.0.0/28\"".into(), "port-pool-size = 4".into()],
        ..ServerOptions::default()
    };
    let Some(server) = TestServer::start_with("pools_full_after_many_cycles", options) else { return };
    for cycle in 0..200 {
        let handle = server.create(&format!("cycle{cycle}"));
        server.block_on(server.client.net_in(&handle, 0, 80)).unwrap_or_else(|error| panic!("cycle {cycle}: net in: {error}"));
        server.block_on(server.client.destroy(&handle)).unwrap_or_else(|error| panic!("cycle {cycle}: destroy: {error}"));
    }
    assert_eq!(server.network_leftovers(), Vec::<String>::new());

    // Every /30 block and every port is free again.
    let mut handles = Vec::new();
    let mut addresses = Vec::new();
    for index in 0..4 {
        let handle = server.create(&format!("full{index}"));
        addresses.push(server.block_on(server.client.info(&handle)).unwrap().container_ip);
        server.block_on(server.client.net_in(&handle, 0, 80)).unwrap_or_else(|error| panic!("port {index}: {error}"));
        handles.push(handle);
    }
    assert_eq!(addresses, vec!["10.254.0.2", "10.254.0.6", "10.254.0.10", "10.254.0.14"]);
    let error = server.block_on(server.client.net_in(&handles[0], 0, 81)).unwrap_err();
    assert!(error.to_string().contains("port pool is exhausted"), "{error}");
}

#[test]
fn restart_keeps_container_network() {
    let Some(mut server) = TestServer::start_with("restart_keeps_container_network", deny_all()) else { return };
    let mut outside = OutsideHost::create(&server);
    let _allowed = outside.serve(7001, b"reply\n");
    let handle = server.create("kept");
    let rule = NetOutRule {
        protocol: PROTOCOL_TCP,
        networks: vec![single(OUTSIDE)],
        ports: vec![PortRange { start: 7001, end: 7001 }],
        ..NetOutRule::default()
    };
    server.block_on(server.client.net_out(&handle, &rule)).expect("net out");
    let mapped = server.block_on(server.client.net_in(&handle, 0, 8080)).expect("net in");
    assert!(tcp_reaches(&server, &handle, OUTSIDE, 7001), "the rule's port is closed before the restart");

    server.restart();

    // The firewall table starts empty, so these pass only when the server
    // put the container's rules back.
    assert!(tcp_reaches(&server, &handle, OUTSIDE, 7001), "the net-out rule is gone after the restart");
    assert!(!pings(&server, &handle, OUTSIDE), "the deny list no longer applies after the restart");

    let listen = "sleep 600 | nc -l -p 8080 > /tmp/after-restart 2>/dev/null &";
    let started = server.run_command(&handle, "/bin/sh", &["-c", listen]);
    assert_eq!(started.status, 0, "starting the listener: {}", started.stderr_text());
    let target: SocketAddr = format!("{EXTERNAL_IP}:{}", mapped.host_port).parse().unwrap();
    let sent = in_server_netns(&server, move || -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut stream = loop {
            match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(error) => return Err(format!("connecting to {target} failed: {error}")),
            }
        };
        stream.write_all(b"mapped after restart").map_err(|error| error.to_string())?;
        stream.shutdown(Shutdown::Write).map_err(|error| error.to_string())
    });
    sent.expect("net-in after the restart");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let received = server.run_command(&handle, "/bin/cat", &["/tmp/after-restart"]).stdout_text();
        if received == "mapped after restart" || Instant::now() >= deadline {
            assert_eq!(received, "mapped after restart", "the net-in mapping after the restart");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!server.log_text().contains("removed orphan link"), "start-up removed a restored container's link");

    server.block_on(server.client.destroy(&handle)).expect("destroy");
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

#[test]
fn restart_removes_links_of_lost_containers() {
    let Some(mut server) = TestServer::start("restart_removes_links_of_lost_containers") else { return };
    let handle = server.create("lost");
    // The state file is what makes a container restorable; without it the
    // container's links belong to no one after the restart.
    let state_file = server.depot.join(&handle).join("container.json");
    std::fs::remove_file(&state_file).expect("removing the state file");
    server.restart();
    let log = server.log_text();
    assert!(log.contains("removed orphan link"), "the links of the lost container were not removed:\n{log}");
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

/// Returns `(index, name)` of each bridge of the server.
fn bridge_links(server: &TestServer) -> Vec<(String, String)> {
    let prefix: String = server.tag.chars().take(8).collect();
    let links = server.in_netns("ip", &["-o", "link", "show"]).unwrap();
    links
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let index = fields.next()?.trim().to_string();
            let name = fields.next()?.trim().split('@').next()?.to_string();
            name.starts_with(&format!("{prefix}b")).then_some((index, name))
        })
        .collect()
}

/// Returns the names of the server's host veths.
fn host_veths(server: &TestServer) -> Vec<String> {
    let prefix: String = server.tag.chars().take(8).collect();
    server.links_of_tag().into_iter().filter_map(|line| line.strip_prefix("link ").map(str::to_string)).filter(|name| name.starts_with(&format!("{prefix}h"))).collect()
}

/// Polls `condition` every 20 ms until it is true or `limit` passes.
fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_bridge_is_reused_then_removed() {
    let options = ServerOptions {
        bridge_idle_time: "2s".into(),
        extra_config: vec!["allow-host-access = true".into()],
        ..ServerOptions::default()
    };
    let Some(server) = TestServer::start_with("idle_bridge_is_reused_then_removed", options) else { return };

    let first = server.create("first");
    let first_info = server.block_on(server.client.info(&first)).unwrap();
    let bridges = bridge_links(&server);
    assert_eq!(bridges.len(), 1, "{bridges:?}");
    let first_veths = host_veths(&server);
    assert_eq!(first_veths.len(), 1, "{first_veths:?}");

    // Destroy leaves the veth to the kernel and keeps the bridge.
    server.block_on(server.client.destroy(&first)).unwrap();
    assert!(eventually(Duration::from_secs(3), || host_veths(&server).is_empty()), "the host veth outlived its container: {:?}", host_veths(&server));
    assert_eq!(bridge_links(&server), bridges, "the bridge went with its last container");

    // The next container gets the same subnet and the same bridge, and
    // its link works through it.
    let second = server.create("second");
    let second_info = server.block_on(server.client.info(&second)).unwrap();
    assert_eq!(second_info.host_ip, first_info.host_ip);
    assert_eq!(bridge_links(&server), bridges, "the idle bridge was not reused");
    let second_veths = host_veths(&server);
    assert_eq!(second_veths.len(), 1, "{second_veths:?}");
    assert_ne!(second_veths, first_veths, "a new container's veth reused the old name");
    assert!(pings(&server, &second, &second_info.host_ip), "the container does not reach its gateway over the reused bridge");

    // Idle for longer than bridge-idle-time, the bridge goes.
    server.block_on(server.client.destroy(&second)).unwrap();
    assert_eq!(bridge_links(&server), bridges, "the bridge went at once");
    assert!(eventually(Duration::from_secs(10), || bridge_links(&server).is_empty()), "the idle bridge was never removed");
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

#[test]
fn janitor_removes_veth_that_outlives_namespace() {
    let Some(server) = TestServer::start("janitor_removes_veth_that_outlives_namespace") else { return };
    let handle = server.create("held");
    let veths = host_veths(&server);
    assert_eq!(veths.len(), 1, "{veths:?}");

    // An open descriptor keeps the container's network namespace, and so
    // its veth pair, alive after its processes are gone.
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(server.depot.join(&handle).join("runtime.json")).unwrap()).unwrap();
    let init_pid = record["init_pid"].as_i64().expect("runtime.json names garden-init");
    assert_eq!(record["host_veth"].as_str(), Some(veths[0].as_str()), "the runtime record names the host veth");
    let netns = File::open(format!("/proc/{init_pid}/ns/net")).unwrap();
    server.block_on(server.client.destroy(&handle)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(host_veths(&server), veths, "the veth went although its namespace is held");

    assert!(eventually(Duration::from_secs(15), || host_veths(&server).is_empty()), "the janitor left the veth");
    // The log is written asynchronously.
    let logged = || server.log_text().contains("a host veth outlived its container's network namespace");
    assert!(eventually(Duration::from_secs(5), logged), "the janitor did not log the veth");
    drop(netns);
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}
