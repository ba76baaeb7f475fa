//! The server's nftables table: rendering of its scripts, and applying
//! them.
//!
//! One `ip` table per server tag contains every rule. Each change is one
//! script, which the kernel applies as one transaction, so a change is
//! applied whole or not at all. Scripts run in process through
//! libnftables ([`nftlib`]). When it cannot be used, each runs as
//! `nft -f -`.
//!
//! Layout of the table (the link prefix `P` is the bridge name prefix):
//!
//! - `from_containers` (forward hook, for packets from `P*`): first
//!   `ip saddr vmap @bandwidth` enters the sender's chain `b_<id>`, which
//!   drops what exceeds its bandwidth limit; then replies pass, and
//!   `ip saddr vmap @egress` jumps to the sender's chain `c_<id>`; a source
//!   address of no container is dropped.
//! - `c_<id>`: the container's own subnet passes, then `o_<id>` (its
//!   net-out rules) is tried, then other container subnets and the deny
//!   networks are rejected, and everything else passes.
//! - `container_to_host` (input hook, for packets from `P*`): replies and
//!   DNS pass, the rest is rejected unless host access is allowed.
//! - `prerouting` and `output` (nat): `tcp dport vmap @netin` jumps to the
//!   chain `n_<id>` of the container that mapped the port, which DNATs.
//! - `postrouting` (nat): sources in `@subnets` leaving through another
//!   interface than a container bridge are masqueraded.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use ipnetwork::Ipv4Network;

use super::{nftlib, NetworkError};
use crate::api::{NetOutRule, PROTOCOL_ALL, PROTOCOL_ICMP, PROTOCOL_TCP, PROTOCOL_UDP};

/// Kinds of per-container chains: bandwidth, egress, net-out rules and
/// net-in.
const CHAIN_KINDS: [&str; 4] = ["b", "c", "o", "n"];

/// Number of handle characters that prefix a logged connection, as
/// guardian logs them.
const LOG_PREFIX_HANDLE_CHARS: usize = 28;

/// Settings of the base table.
#[derive(Debug, Clone)]
pub struct TableSettings {
    pub table: String,
    /// Prefix of every bridge name, matched with `P*`.
    pub bridge_prefix: String,
    pub external_ip: Ipv4Addr,
    pub deny_networks: Vec<Ipv4Network>,
    pub allow_host_access: bool,
    /// Name servers containers may reach on the host even without host
    /// access.
    pub dns_servers: Vec<Ipv4Addr>,
    /// Whether containers resolve through their gateway, which then must
    /// accept DNS.
    pub dns_through_gateway: bool,
}

/// Renders the start-up script: the table is replaced as a whole.
pub fn table_script(settings: &TableSettings) -> String {
    let table = &settings.table;
    let bridges = format!("\"{}*\"", settings.bridge_prefix);
    let mut script = String::new();
    // Creating the table first makes the delete succeed whether or not it
    // existed, all in the same transaction.
    let _ = writeln!(script, "table ip {table} {{}}");
    let _ = writeln!(script, "delete table ip {table}");
    let _ = writeln!(script, "table ip {table} {{");
    if !settings.deny_networks.is_empty() {
        let elements: Vec<String> = settings.deny_networks.iter().map(ToString::to_string).collect();
        let _ = writeln!(script, "  set deny {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}", elements.join(", "));
    }
    let _ = writeln!(script, "  set subnets {{ type ipv4_addr; flags interval; }}");
    let _ = writeln!(script, "  map egress {{ type ipv4_addr : verdict; }}");
    let _ = writeln!(script, "  map bandwidth {{ type ipv4_addr : verdict; }}");
    let _ = writeln!(script, "  map netin {{ type inet_service : verdict; }}");
    let _ = writeln!(script, "  chain forward {{ type filter hook forward priority filter; policy accept;");
    let _ = writeln!(script, "    iifname {bridges} jump from_containers");
    let _ = writeln!(script, "  }}");
    let _ = writeln!(script, "  chain from_containers {{");
    let _ = writeln!(script, "    ip saddr vmap @bandwidth");
    let _ = writeln!(script, "    ct state established,related accept");
    let _ = writeln!(script, "    ip saddr vmap @egress");
    let _ = writeln!(script, "    drop");
    let _ = writeln!(script, "  }}");
    let _ = writeln!(script, "  chain input {{ type filter hook input priority filter; policy accept;");
    let _ = writeln!(script, "    iifname {bridges} jump container_to_host");
    let _ = writeln!(script, "  }}");
    let _ = writeln!(script, "  chain container_to_host {{");
    let _ = writeln!(script, "    ct state established,related accept");
    if settings.dns_through_gateway {
        let _ = writeln!(script, "    udp dport 53 accept");
        let _ = writeln!(script, "    tcp dport 53 accept");
    }
    for server in &settings.dns_servers {
        let _ = writeln!(script, "    ip daddr {server} udp dport 53 accept");
        let _ = writeln!(script, "    ip daddr {server} tcp dport 53 accept");
    }
    if !settings.allow_host_access {
        let _ = writeln!(script, "    reject with icmp type host-prohibited");
    }
    let _ = writeln!(script, "  }}");
    let external = settings.external_ip;
    let _ = writeln!(script, "  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;");
    let _ = writeln!(script, "    ip daddr {external} tcp dport vmap @netin");
    let _ = writeln!(script, "  }}");
    // Connections the host itself opens to the external IP.
    let _ = writeln!(script, "  chain output {{ type nat hook output priority -100; policy accept;");
    let _ = writeln!(script, "    ip daddr {external} tcp dport vmap @netin");
    let _ = writeln!(script, "  }}");
    let _ = writeln!(script, "  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;");
    let _ = writeln!(script, "    ip saddr @subnets oifname != {bridges} masquerade");
    let _ = writeln!(script, "  }}");
    let _ = writeln!(script, "}}");
    script
}

/// Renders the deletion of the whole table.
pub fn delete_table_script(table: &str) -> String {
    format!("table ip {table} {{}}\ndelete table ip {table}\n")
}

/// One container's part of the table.
#[derive(Debug, Clone)]
pub struct ContainerRules<'a> {
    pub table: &'a str,
    pub bridge_prefix: &'a str,
    /// Suffix of the container's chain names.
    pub id: &'a str,
    pub container_ip: Ipv4Addr,
    pub subnet: Ipv4Network,
    pub has_deny_networks: bool,
}

/// Renders what create adds; `new_subnet` when the container is the first
/// of its subnet, whose masquerade entry is added too.
pub fn add_container_script(rules: &ContainerRules<'_>, new_subnet: bool) -> String {
    let ContainerRules { table, bridge_prefix, id, container_ip, subnet, has_deny_networks } = rules;
    let mut script = String::new();
    for kind in CHAIN_KINDS {
        let _ = writeln!(script, "add chain ip {table} {kind}_{id}");
    }
    let _ = writeln!(script, "add rule ip {table} c_{id} ip daddr {subnet} accept");
    let _ = writeln!(script, "add rule ip {table} c_{id} jump o_{id}");
    let _ = writeln!(script, "add rule ip {table} c_{id} oifname \"{bridge_prefix}*\" reject with icmp type admin-prohibited");
    if *has_deny_networks {
        let _ = writeln!(script, "add rule ip {table} c_{id} ip daddr @deny reject with icmp type admin-prohibited");
    }
    let _ = writeln!(script, "add rule ip {table} c_{id} accept");
    let _ = writeln!(script, "add element ip {table} egress {{ {container_ip} : jump c_{id} }}");
    let _ = writeln!(script, "add element ip {table} bandwidth {{ {container_ip} : jump b_{id} }}");
    if new_subnet {
        let _ = writeln!(script, "add element ip {table} subnets {{ {subnet} }}");
    }
    script
}

/// Renders what destroy removes: exactly what create and the net-in and
/// net-out calls added. `last_of_subnet` removes the masquerade entry too.
pub fn delete_container_script(rules: &ContainerRules<'_>, host_ports: &[u16], last_of_subnet: bool) -> String {
    let ContainerRules { table, id, container_ip, subnet, .. } = rules;
    let mut script = String::new();
    let _ = writeln!(script, "delete element ip {table} egress {{ {container_ip} }}");
    let _ = writeln!(script, "delete element ip {table} bandwidth {{ {container_ip} }}");
    if !host_ports.is_empty() {
        let ports: Vec<String> = host_ports.iter().map(ToString::to_string).collect();
        let _ = writeln!(script, "delete element ip {table} netin {{ {} }}", ports.join(", "));
    }
    if last_of_subnet {
        let _ = writeln!(script, "delete element ip {table} subnets {{ {subnet} }}");
    }
    // Flushed first, so no rule still jumps to a chain being deleted.
    for kind in CHAIN_KINDS {
        let _ = writeln!(script, "flush chain ip {table} {kind}_{id}");
    }
    for kind in CHAIN_KINDS {
        let _ = writeln!(script, "delete chain ip {table} {kind}_{id}");
    }
    script
}

/// Renders the bandwidth limit of what the container sends: a policer
/// that drops packets beyond `rate` bytes per second after a bucket of
/// `burst` bytes. A zero rate removes the limit.
pub fn bandwidth_script(rules: &ContainerRules<'_>, rate: u64, burst: u64) -> String {
    let ContainerRules { table, id, .. } = rules;
    let mut script = format!("flush chain ip {table} b_{id}\n");
    if rate > 0 {
        let _ = writeln!(script, "add rule ip {table} b_{id} limit rate over {rate} bytes/second burst {burst} bytes drop");
    }
    script
}

/// Renders a net-in mapping: host port to the container's address and port.
pub fn net_in_script(rules: &ContainerRules<'_>, host_port: u16, container_port: u16) -> String {
    let ContainerRules { table, id, container_ip, .. } = rules;
    format!(
        "add rule ip {table} n_{id} tcp dport {host_port} dnat to {container_ip}:{container_port}\n\
         add element ip {table} netin {{ {host_port} : jump n_{id} }}\n"
    )
}

/// Checks every rule as guardian does and renders them as one script, so a
/// batch with one bad rule adds nothing.
pub fn net_out_script(rules: &ContainerRules<'_>, handle: &str, net_out: &[NetOutRule]) -> Result<String, NetworkError> {
    let mut script = String::new();
    for rule in net_out {
        for line in render_net_out(rule, handle)? {
            let _ = writeln!(script, "add rule ip {} o_{} {line}", rules.table, rules.id);
        }
    }
    Ok(script)
}

/// Renders one net-out rule as rule bodies: one per network and port
/// range, because overlapping ranges in one anonymous set are an error in
/// nft.
pub fn render_net_out(rule: &NetOutRule, handle: &str) -> Result<Vec<String>, NetworkError> {
    let invalid = |message: String| NetworkError::InvalidRule { message };
    let protocol = match rule.protocol {
        PROTOCOL_ALL => None,
        PROTOCOL_TCP => Some("tcp"),
        PROTOCOL_UDP => Some("udp"),
        PROTOCOL_ICMP => Some("icmp"),
        other => return Err(invalid(format!("invalid protocol: {other}"))),
    };
    if !rule.ports.is_empty() {
        match rule.protocol {
            PROTOCOL_ALL => return Err(invalid("Ports cannot be specified for Protocol ALL".into())),
            PROTOCOL_ICMP => return Err(invalid("Ports cannot be specified for Protocol ICMP".into())),
            _ => {}
        }
    }

    let mut networks = Vec::new();
    for range in &rule.networks {
        let (start, end) = match (range.start, range.end) {
            (None, None) => continue,
            (Some(start), None) => (start, start),
            (None, Some(end)) => (end, end),
            (Some(start), Some(end)) => (start, end),
        };
        let (IpAddr::V4(start), IpAddr::V4(end)) = (start, end) else {
            return Err(invalid(format!("invalid network range {start}-{end}: only IPv4 addresses are supported")));
        };
        if start > end {
            return Err(invalid(format!("invalid network range {start}-{end}: the start is after the end")));
        }
        networks.push(if start == end { format!("ip daddr {start}") } else { format!("ip daddr {start}-{end}") });
    }
    if networks.is_empty() {
        networks.push(String::new());
    }

    let mut ports = Vec::new();
    for range in &rule.ports {
        let end = if range.end == 0 { range.start } else { range.end };
        if range.start > end {
            return Err(invalid(format!("invalid port range {}-{}: the start is after the end", range.start, range.end)));
        }
        let protocol = protocol.unwrap_or("tcp");
        ports.push(if range.start == end { format!("{protocol} dport {end}") } else { format!("{protocol} dport {}-{end}", range.start) });
    }
    if ports.is_empty() {
        ports.push(match protocol {
            Some(name) => format!("meta l4proto {name}"),
            None => String::new(),
        });
    }

    let mut icmp = String::new();
    if let (PROTOCOL_ICMP, Some(control)) = (rule.protocol, rule.icmps) {
        let _ = write!(icmp, "icmp type {}", control.icmp_type);
        if let Some(code) = control.code {
            let _ = write!(icmp, " icmp code {code}");
        }
    }
    let verdict = if rule.log {
        let prefix: String = handle.chars().take(LOG_PREFIX_HANDLE_CHARS).collect();
        format!("log prefix \"{prefix} \" accept")
    } else {
        "accept".to_string()
    };

    let mut lines = Vec::new();
    for network in &networks {
        for port in &ports {
            let parts: Vec<&str> = [network.as_str(), port.as_str(), icmp.as_str(), verdict.as_str()].into_iter().filter(|part| !part.is_empty()).collect();
            lines.push(parts.join(" "));
        }
    }
    Ok(lines)
}

/// Environment variable that selects how scripts reach the kernel:
/// `command` runs `nft -f -` for each script, anything else or nothing
/// uses libnftables when it loads. The command is the way to compare the
/// two, or to avoid a libnftables fault without a new build.
pub const BACKEND_VARIABLE: &str = "TRELLIS_NFT_BACKEND";

/// The way scripts reach the kernel, chosen once per process.
enum Backend {
    /// libnftables in process, with one context for every call.
    Library(Mutex<nftlib::Context>),
    /// An `nft` child process per call, for the stored reason.
    Command { reason: String },
}

/// Returns the backend, choosing it on first use.
///
/// The library context keeps the network namespace of the thread that
/// creates it. The server's threads all stay in the server's namespace
/// (only short-lived netlink threads enter a container's), so whichever
/// thread comes first is fine.
fn backend() -> &'static Backend {
    static BACKEND: OnceLock<Backend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        if std::env::var(BACKEND_VARIABLE).is_ok_and(|value| value == "command") {
            return Backend::Command { reason: format!("{BACKEND_VARIABLE}=command is set") };
        }
        match nftlib::library().and_then(nftlib::Context::new) {
            Ok(context) => Backend::Library(Mutex::new(context)),
            Err(error) => Backend::Command { reason: error.to_string() },
        }
    })
}

/// Applies a script as one transaction, through libnftables when it is
/// loaded, else with `nft -f -`.
pub fn apply(script: &str) -> Result<(), NetworkError> {
    match backend() {
        Backend::Library(context) => {
            let mut context = context.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            context.run(script).map(drop).map_err(|error| NetworkError::Nft { reason: format!("libnftables failed to apply the script: {error}") })
        }
        Backend::Command { .. } => apply_with_command(script),
    }
}

/// Runs a read-only nft command such as `list chains` and returns its
/// output. With the `nft` command, `command` is split on whitespace into
/// its arguments, so quoted words are not supported.
pub fn query(command: &str) -> Result<String, NetworkError> {
    match backend() {
        Backend::Library(context) => {
            let mut context = context.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            context.run(command).map_err(|error| NetworkError::Nft { reason: format!("libnftables failed to run `{command}`: {error}") })
        }
        Backend::Command { .. } => {
            let output = Command::new("nft")
                .args(command.split_whitespace())
                .stdin(Stdio::null())
                .output()
                .map_err(|error| NetworkError::Nft { reason: format!("failed to start nft: {error}") })?;
            if !output.status.success() {
                let stderr = String::from_utf8_lossy(&output.stderr);
                return Err(NetworkError::Nft { reason: format!("nft {command} failed with {}: {}", output.status, stderr.trim()) });
            }
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        }
    }
}

/// Applies a script with `nft -f -` as one transaction.
fn apply_with_command(script: &str) -> Result<(), NetworkError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| NetworkError::Nft { reason: format!("failed to start nft: {error}") })?;
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(script.as_bytes()));
    let output = child.wait_with_output().map_err(|error| NetworkError::Nft { reason: format!("failed to wait for nft: {error}") })?;
    if let Some(Err(error)) = written {
        return Err(NetworkError::Nft { reason: format!("failed to write the script to nft: {error}") });
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(NetworkError::Nft { reason: format!("nft -f failed with {}: {}", output.status, stderr.trim()) });
    }
    Ok(())
}

/// Checks that nftables can be used, for the start-up check, and logs how
/// changes are applied: in process, or through the `nft` command with one
/// warning that gives the reason.
pub fn check_available(logger: &slog::Logger) -> Result<(), NetworkError> {
    let reason = match backend() {
        Backend::Library(_) => {
            slog::info!(logger, "nftables changes are applied in process through libnftables"; "library" => nftlib::LIBRARY_NAME);
            return Ok(());
        }
        Backend::Command { reason } => reason,
    };
    slog::warn!(logger, "libnftables is not used, so every nftables change starts the nft command"; "reason" => reason);
    match Command::new("nft").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(NetworkError::Missing { what: format!("`nft --version` exited with {status}; nftables is unusable") }),
        Err(error) => Err(NetworkError::Missing {
            what: format!("the nft command ({error}) or {} ({reason}); install Debian's nftables package", nftlib::LIBRARY_NAME),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IcmpControl, IpRange, PortRange};

    fn rules() -> ContainerRules<'static> {
        ContainerRules {
            table: "trellis_t1",
            bridge_prefix: "t1b",
            id: "0000ab",
            container_ip: "10.254.0.2".parse().unwrap(),
            subnet: "10.254.0.0/30".parse().unwrap(),
            has_deny_networks: true,
        }
    }

    fn range(start: &str, end: &str) -> IpRange {
        IpRange { start: Some(start.parse().unwrap()), end: Some(end.parse().unwrap()) }
    }

    #[test]
    fn tcp_rule_per_network_and_port_range() {
        let rule = NetOutRule {
            protocol: PROTOCOL_TCP,
            networks: vec![range("10.0.0.0", "10.255.255.255"), range("192.0.2.15", "192.0.2.15")],
            ports: vec![PortRange { start: 80, end: 80 }, PortRange { start: 8000, end: 8999 }],
            log: true,
            ..NetOutRule::default()
        };
        let lines = render_net_out(&rule, "a-handle-longer-than-twenty-eight-characters").unwrap();
        assert_eq!(
            lines,
            vec![
                "ip daddr 10.0.0.0-10.255.255.255 tcp dport 80 log prefix \"a-handle-longer-than-twenty- \" accept",
                "ip daddr 10.0.0.0-10.255.255.255 tcp dport 8000-8999 log prefix \"a-handle-longer-than-twenty- \" accept",
                "ip daddr 192.0.2.15 tcp dport 80 log prefix \"a-handle-longer-than-twenty- \" accept",
                "ip daddr 192.0.2.15 tcp dport 8000-8999 log prefix \"a-handle-longer-than-twenty- \" accept",
            ]
        );
    }

    #[test]
    fn empty_rule_allows_everything() {
        assert_eq!(render_net_out(&NetOutRule::default(), "h").unwrap(), vec!["accept"]);
    }

    #[test]
    fn udp_without_ports_matches_protocol() {
        let rule = NetOutRule { protocol: PROTOCOL_UDP, networks: vec![range("192.0.2.53", "192.0.2.53")], ..NetOutRule::default() };
        assert_eq!(render_net_out(&rule, "h").unwrap(), vec!["ip daddr 192.0.2.53 meta l4proto udp accept"]);
    }

    #[test]
    fn icmp_type_and_code() {
        let mut rule = NetOutRule {
            protocol: PROTOCOL_ICMP,
            networks: vec![range("198.51.100.7", "198.51.100.7")],
            icmps: Some(IcmpControl { icmp_type: 8, code: Some(0) }),
            ..NetOutRule::default()
        };
        assert_eq!(render_net_out(&rule, "h").unwrap(), vec!["ip daddr 198.51.100.7 meta l4proto icmp icmp type 8 icmp code 0 accept"]);
        rule.icmps = Some(IcmpControl { icmp_type: 0, code: None });
        assert_eq!(render_net_out(&rule, "h").unwrap(), vec!["ip daddr 198.51.100.7 meta l4proto icmp icmp type 0 accept"]);
    }

    #[test]
    fn invalid_rules_rejected_with_guardian_messages() {
        let cases = [
            (NetOutRule { protocol: 4, ..NetOutRule::default() }, "invalid protocol: 4"),
            (NetOutRule { protocol: 9, ..NetOutRule::default() }, "invalid protocol: 9"),
            (NetOutRule { ports: vec![PortRange { start: 1, end: 2 }], ..NetOutRule::default() }, "Ports cannot be specified for Protocol ALL"),
            (
                NetOutRule { protocol: PROTOCOL_ICMP, ports: vec![PortRange { start: 1, end: 2 }], ..NetOutRule::default() },
                "Ports cannot be specified for Protocol ICMP",
            ),
            (
                NetOutRule { protocol: PROTOCOL_TCP, ports: vec![PortRange { start: 90, end: 80 }], ..NetOutRule::default() },
                "invalid port range 90-80: the start is after the end",
            ),
            (NetOutRule { networks: vec![range("10.0.0.9", "10.0.0.1")], ..NetOutRule::default() }, "invalid network range 10.0.0.9-10.0.0.1: the start is after the end"),
            (NetOutRule { networks: vec![range("fd00::1", "fd00::1")], ..NetOutRule::default() }, "invalid network range fd00::1-fd00::1: only IPv4 addresses are supported"),
        ];
        for (rule, message) in cases {
            assert_eq!(render_net_out(&rule, "h").unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn batch_with_one_bad_rule_renders_nothing() {
        let good = NetOutRule::default();
        let bad = NetOutRule { protocol: 4, ..NetOutRule::default() };
        assert!(net_out_script(&rules(), "h", &[good, bad]).is_err());
    }

    #[test]
    fn container_add_and_delete_are_symmetric() {
        let add = add_container_script(&rules(), true);
        assert!(add.contains("add chain ip trellis_t1 c_0000ab\n"));
        assert!(add.contains("add rule ip trellis_t1 c_0000ab ip daddr @deny reject with icmp type admin-prohibited\n"));
        assert!(add.contains("add element ip trellis_t1 egress { 10.254.0.2 : jump c_0000ab }\n"));
        assert!(add.contains("add element ip trellis_t1 subnets { 10.254.0.0/30 }\n"));
        let delete = delete_container_script(&rules(), &[61001, 61002], true);
        assert!(delete.contains("delete element ip trellis_t1 egress { 10.254.0.2 }\n"));
        assert!(delete.contains("delete element ip trellis_t1 netin { 61001, 61002 }\n"));
        assert!(delete.contains("delete element ip trellis_t1 subnets { 10.254.0.0/30 }\n"));
        for kind in CHAIN_KINDS {
            assert!(add.contains(&format!("add chain ip trellis_t1 {kind}_0000ab\n")), "{kind}");
            assert!(delete.contains(&format!("delete chain ip trellis_t1 {kind}_0000ab\n")), "{kind}");
        }
        assert!(add.contains("add element ip trellis_t1 bandwidth { 10.254.0.2 : jump b_0000ab }\n"));
        assert!(delete.contains("delete element ip trellis_t1 bandwidth { 10.254.0.2 }\n"));
        let shared = delete_container_script(&rules(), &[], false);
        assert!(!shared.contains("subnets"));
        assert!(!shared.contains("netin"));
    }

    #[test]
    fn bandwidth_policer_replaces_old_limit() {
        assert_eq!(
            bandwidth_script(&rules(), 1048576, 65536),
            "flush chain ip trellis_t1 b_0000ab\nadd rule ip trellis_t1 b_0000ab limit rate over 1048576 bytes/second burst 65536 bytes drop\n"
        );
        assert_eq!(bandwidth_script(&rules(), 0, 65536), "flush chain ip trellis_t1 b_0000ab\n");
    }

    #[test]
    fn table_script_replaces_whole_table() {
        let settings = TableSettings {
            table: "trellis_t1".into(),
            bridge_prefix: "t1b".into(),
            external_ip: "192.0.2.1".parse().unwrap(),
            deny_networks: vec!["0.0.0.0/0".parse().unwrap()],
            allow_host_access: false,
            dns_servers: vec!["192.0.2.53".parse().unwrap()],
            dns_through_gateway: false,
        };
        let script = table_script(&settings);
        assert!(script.starts_with("table ip trellis_t1 {}\ndelete table ip trellis_t1\ntable ip trellis_t1 {\n"));
        assert!(script.contains("elements = { 0.0.0.0/0 }"));
        assert!(script.contains("ip daddr 192.0.2.1 tcp dport vmap @netin"));
        assert!(script.contains("ip daddr 192.0.2.53 udp dport 53 accept"));
        assert!(script.contains("reject with icmp type host-prohibited"));
        let open = table_script(&TableSettings { allow_host_access: true, deny_networks: Vec::new(), ..settings });
        assert!(!open.contains("host-prohibited"));
        assert!(!open.contains("set deny"));
    }
}
