//! How the server applies its nftables scripts: in process through
//! libnftables, or with the `nft` command when asked to, and how nft's
//! errors reach the client. The servers run in private network namespaces,
//! and the libnftables context test makes its own namespace.

mod support;

use std::fs::File;
use std::path::Path;

use support::TestServer;
use trellis::api::{IpRange, NetOutRule, PortRange, PROTOCOL_TCP};
use trellis::linux::network::nftlib::{self, Context, NftLibError};

/// Start-up log message of a server that applies scripts in process.
const IN_PROCESS_MESSAGE: &str = "nftables changes are applied in process through libnftables";
/// Start-up log message of a server that runs the `nft` command.
const COMMAND_MESSAGE: &str = "libnftables is not used, so every nftables change starts the nft command";

fn single(address: &str) -> IpRange {
    IpRange { start: Some(address.parse().unwrap()), end: Some(address.parse().unwrap()) }
}

fn tcp_rule(port: u16) -> NetOutRule {
    NetOutRule { protocol: PROTOCOL_TCP, networks: vec![single("192.0.2.2")], ports: vec![PortRange { start: port, end: port }], ..NetOutRule::default() }
}

/// Returns the suffix of a container's chain names, as the server names
/// them.
fn chain_id(container_ip: &str) -> String {
    trellis::linux::network::address_id(container_ip.parse().unwrap())
}

/// Returns the listing of one chain of the server's table, read with the
/// `nft` command in the server's namespace.
fn list_chain(server: &TestServer, chain: &str) -> String {
    let table = format!("trellis_{}", server.tag);
    server.in_netns("nft", &["list", "chain", "ip", &table, chain]).expect("listing the chain")
}

/// Start-up warning about a forward chain of another table that drops.
const FORWARD_DROP_MESSAGE: &str = "a forward chain of another table drops packets by default";

/// Adds a table of another program with a forward chain whose policy is
/// drop, which the next server start lists and warns about.
fn add_dropping_forward_chain(server: &TestServer, table: &str) {
    let script = format!("table ip {table} {{ chain guard {{ type filter hook forward priority 0; policy drop; }}; }}");
    server.in_netns("nft", &[script.as_str()]).expect("adding a table with a dropping forward chain");
}

/// Counts the lines of the server's log that contain `message` and, when
/// given, `also`.
fn log_count_with(server: &TestServer, message: &str, also: &str) -> usize {
    server.log_text().lines().filter(|line| line.contains(message) && line.contains(also)).count()
}

/// Counts the lines of the server's log that contain `message`.
fn log_count(server: &TestServer, message: &str) -> usize {
    server.log_text().lines().filter(|line| line.contains(message)).count()
}

#[test]
fn rules_applied_without_nft_command() {
    let Some(mut server) = TestServer::start("rules_applied_without_nft_command") else { return };
    assert_eq!(log_count(&server, IN_PROCESS_MESSAGE), 1, "log:\n{}", server.log_text());
    assert_eq!(log_count(&server, COMMAND_MESSAGE), 0);

    // A search path with tc, which the server also runs, but no nft: every
    // change below can only succeed in process.
    let bin = tempfile::tempdir().expect("creating a directory for the search path");
    std::os::unix::fs::symlink("/usr/sbin/tc", bin.path().join("tc")).expect("linking tc");
    let path = bin.path().to_str().unwrap().to_string();
    add_dropping_forward_chain(&server, "other_lib");
    server.stop();
    server.start_again(&[("PATH", path.as_str())]);
    assert_eq!(log_count(&server, IN_PROCESS_MESSAGE), 2, "log:\n{}", server.log_text());
    // The start-up listing of chains also ran without the nft command.
    assert_eq!(log_count_with(&server, FORWARD_DROP_MESSAGE, "other_lib"), 1, "log:\n{}", server.log_text());

    let handle = server.create("lib");
    let info = server.block_on(server.client.info(&handle)).unwrap();
    let id = chain_id(&info.container_ip);
    server.block_on(server.client.net_out(&handle, &tcp_rule(7101))).expect("net out");
    let host_port = server.block_on(server.client.net_in(&handle, 0, 8080)).expect("net in").host_port;
    assert!(list_chain(&server, &format!("o_{id}")).contains("tcp dport 7101 accept"));
    assert!(list_chain(&server, &format!("n_{id}")).contains(&format!("tcp dport {host_port} dnat to {}:8080", info.container_ip)));

    server.block_on(server.client.destroy(&handle)).expect("destroy");
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

#[test]
fn command_backend_when_requested() {
    let Some(mut server) = TestServer::start("command_backend_when_requested") else { return };
    add_dropping_forward_chain(&server, "other_cmd");
    server.stop();
    server.start_again(&[(trellis::linux::network::nft::BACKEND_VARIABLE, "command")]);
    assert_eq!(log_count(&server, COMMAND_MESSAGE), 1, "log:\n{}", server.log_text());
    assert_eq!(log_count_with(&server, FORWARD_DROP_MESSAGE, "other_cmd"), 1, "log:\n{}", server.log_text());

    let handle = server.create("cmd");
    let info = server.block_on(server.client.info(&handle)).unwrap();
    server.block_on(server.client.net_out(&handle, &tcp_rule(7102))).expect("net out");
    assert!(list_chain(&server, &format!("o_{}", chain_id(&info.container_ip))).contains("tcp dport 7102 accept"));

    server.block_on(server.client.destroy(&handle)).expect("destroy");
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

/// An operator removes a container's net-out chain behind the server's
/// back. The next net-out must see that (no stale ruleset cache) and fail
/// with nft's own error text.
#[test]
fn nft_error_reaches_client() {
    let Some(server) = TestServer::start("nft_error_reaches_client") else { return };
    let handle = server.create("gone");
    let info = server.block_on(server.client.info(&handle)).unwrap();
    let id = chain_id(&info.container_ip);
    let table = format!("trellis_{}", server.tag);
    server.block_on(server.client.net_out(&handle, &tcp_rule(7103))).expect("net out before the removal");

    // c_<id> jumps to o_<id>, so it is flushed before o_<id> can go.
    let removal = format!("flush chain ip {table} c_{id}\nflush chain ip {table} o_{id}\ndelete chain ip {table} o_{id}\n");
    server.in_netns("nft", &[removal.as_str()]).expect("removing the net-out chain");

    let error = server.block_on(server.client.net_out(&handle, &tcp_rule(7104))).unwrap_err().to_string();
    assert!(error.contains("libnftables failed to apply the script"), "{error}");
    assert!(error.contains("No such file or directory"), "{error}");
    assert!(error.contains(&format!("o_{id}")), "{error}");

    // Put the chain back, so destroy finds what it removes.
    server.in_netns("nft", &["add", "chain", "ip", &table, &format!("o_{id}")]).expect("restoring the chain");
    server.block_on(server.client.destroy(&handle)).expect("destroy");
    assert_eq!(server.network_leftovers(), Vec::<String>::new());
}

/// A network namespace made with `ip netns add`, deleted on drop.
struct PrivateNetns {
    name: String,
}

impl PrivateNetns {
    fn create() -> PrivateNetns {
        let name = format!("trellis-nftlib-{}", std::process::id());
        let status = std::process::Command::new("ip").args(["netns", "add", &name]).status().expect("running ip netns add");
        assert!(status.success(), "ip netns add {name} failed with {status}");
        PrivateNetns { name }
    }

    fn file(&self) -> File {
        File::open(Path::new("/run/netns").join(&self.name)).expect("opening the namespace")
    }

    /// Runs the `nft` command with `args` inside the namespace.
    fn nft(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("ip").args(["netns", "exec", &self.name, "nft"]).args(args).output().expect("running nft");
        assert!(output.status.success(), "nft {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for PrivateNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

/// Returns the netfilter netlink sockets of this process that lack
/// close-on-exec.
fn inheritable_netfilter_sockets() -> Vec<i32> {
    let option = |fd: i32, name: i32| {
        let mut value: i32 = 0;
        let mut length = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: `value` and `length` are valid for writes of their sizes.
        let result = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&raw mut value).cast(), &mut length) };
        (result == 0).then_some(value)
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("listing /proc/self/fd") {
        let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else { continue };
        if option(fd, libc::SO_DOMAIN) != Some(libc::AF_NETLINK) || option(fd, libc::SO_PROTOCOL) != Some(libc::NETLINK_NETFILTER) {
            continue;
        }
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            found.push(fd);
        }
    }
    found
}

/// One context reused across runs lists and uses what another process
/// changed in between, a failed run leaves the ruleset as it was, and
/// children of the process do not inherit the context's socket.
#[test]
fn context_reloads_changed_ruleset() {
    let test = "context_reloads_changed_ruleset";
    if !nix::unistd::geteuid().is_root() {
        support::skip(test, "needs root to create a network namespace");
        return;
    }
    let library = match nftlib::library() {
        Ok(library) => library,
        Err(error) => {
            support::skip(test, &format!("libnftables is not loadable: {error}"));
            return;
        }
    };
    let netns = PrivateNetns::create();
    let file = netns.file();
    // The context belongs to the namespace of the thread that creates it,
    // so a thread of its own enters the namespace first.
    let worker = std::thread::spawn(move || -> Result<(Context, String), NftLibError> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the namespace");
        let mut context = Context::new(library)?;
        context.run("table ip t {\n  chain a {\n  }\n}\n")?;
        let listing = context.run("list chains")?;
        Ok((context, listing))
    });
    let (mut context, listing) = worker.join().unwrap().expect("creating the table through libnftables");
    assert!(listing.contains("chain a"), "{listing}");
    let inherited = inheritable_netfilter_sockets();
    assert_eq!(inherited, Vec::<i32>::new(), "netfilter sockets that children would inherit");

    // The listing comes from the context's ruleset cache, which the first
    // listing filled. After another process adds a chain, the kernel's
    // generation id differs and the next run must reload the cache.
    netns.nft(&["add", "chain", "ip", "t", "b"]);
    let listing = context.run("list chains").expect("listing the chains again");
    assert!(listing.contains("chain b"), "the listing missed a chain another process added:\n{listing}");

    // A set reference is evaluated against the cache too.
    netns.nft(&["add", "set", "ip", "t", "s", "{ type ipv4_addr; }"]);
    context.run("add rule ip t a ip daddr @s accept\n").expect("a rule using the set another process added");
    assert!(netns.nft(&["list", "chain", "ip", "t", "a"]).contains("ip daddr @s accept"));

    // Another process deletes the table, and the context must not act on
    // its cached copy.
    netns.nft(&["delete", "table", "ip", "t"]);
    let error = context.run("add chain ip t c\n").unwrap_err().to_string();
    assert!(error.contains("No such file or directory"), "{error}");
    assert!(error.contains("add chain ip t c"), "{error}");

    // One script is one transaction: the bad last line undoes the first.
    let error = context.run("table ip u {}\nadd rule ip u missing accept\n").unwrap_err().to_string();
    assert!(error.contains("missing"), "{error}");
    assert!(!netns.nft(&["list", "tables"]).contains("table ip u"));
    drop(context);
}
