//! Client commands that read and change containers: capacity, info, bulk
//! info and metrics, limits, grace time and network rules. Each prints a
//! table by default and JSON with `--json`. The parsers for sizes, port
//! mappings and address ranges here also serve `create` and `run`.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::IpAddr;
use std::time::Duration;

use super::client::{connect, TargetArgs};
use super::output::{self, OutputArgs};
use crate::api::{
    BandwidthLimits, ContainerInfo, CpuLimits, DecodeError, DiskLimits, IcmpControl, IpRange, MemoryLimits, NetIn,
    NetOutRule, PortRange, Properties, DISK_SCOPE_EXCLUSIVE, DISK_SCOPE_TOTAL,
};
use crate::client::ClientError;

/// Options of `trellis limits`.
#[derive(Debug, clap::Args)]
pub struct LimitsArgs {
    /// Handle of the container.
    pub handle: String,
    /// Set the memory limit, in bytes (suffixes K, M, G for KiB, MiB, GiB).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Set the CPU weight, in cgroup shares (the kernel uses 2 to 262144
    /// and raises smaller values to 2; its default is 1024).
    #[arg(long, value_name = "SHARES")]
    pub cpu_shares: Option<u64>,
    /// Set the hard disk limit, in bytes (suffixes K, M, G).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub disk_bytes: Option<u64>,
    /// Set the hard limit on inodes (files and directories), a count.
    #[arg(long, value_name = "COUNT")]
    pub disk_inodes: Option<u64>,
    /// Set the bandwidth rate, in bytes per second (suffixes K, M, G).
    #[arg(long, value_name = "BYTES_PER_SECOND", value_parser = parse_size)]
    pub bandwidth_rate: Option<u64>,
    /// Set the bandwidth burst, in bytes (suffixes K, M, G).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub bandwidth_burst: Option<u64>,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Options of `trellis net-out`.
#[derive(Debug, clap::Args)]
pub struct NetOutArgs {
    /// Handle of the container.
    pub handle: String,
    /// Protocol the rule allows: all, tcp, udp or icmp.
    #[arg(long, default_value = "all", value_parser = parse_protocol)]
    pub protocol: u8,
    /// Destination addresses, as IP or FIRST-LAST; repeat for several
    /// (default: any).
    #[arg(long = "network", value_name = "IP[-IP]", value_parser = parse_ip_range)]
    pub networks: Vec<IpRange>,
    /// Destination ports, as PORT or FIRST-LAST; repeat for several
    /// (default: any; tcp and udp only).
    #[arg(long = "ports", value_name = "PORT[-PORT]", value_parser = parse_port_range)]
    pub ports: Vec<PortRange>,
    /// ICMP type the rule allows, 0 to 255 (such as 8 for echo request);
    /// only with --protocol icmp. Default: every type.
    #[arg(long, value_name = "TYPE")]
    pub icmp_type: Option<u8>,
    /// ICMP code the rule allows within --icmp-type, 0 to 255. Default:
    /// every code.
    #[arg(long, value_name = "CODE", requires = "icmp_type")]
    pub icmp_code: Option<u8>,
    /// Log the first packet of each connection the rule allows.
    #[arg(long)]
    pub log: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Options of `trellis bulk-net-out`.
#[derive(Debug, clap::Args)]
pub struct BulkNetOutArgs {
    /// Handle of the container.
    pub handle: String,
    /// File with a JSON array of Garden net-out rules in the wire format,
    /// such as `[{"protocol":1,"networks":[{"start":"192.0.2.1","end":"192.0.2.1"}],"ports":[{"start":80,"end":80}]}]`;
    /// `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub rules: String,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Errors of commands that read local input before calling the server.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The rules file could not be read.
    #[error("cannot read the rules file {path}: {source}")]
    ReadRules {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The rules file is not a JSON array of net-out rules.
    #[error("invalid rules file {path}: {source}; expected a JSON array of net-out rules")]
    InvalidRules {
        path: String,
        #[source]
        source: DecodeError,
    },
    /// The rules file contains an empty array.
    #[error("invalid rules file {path}: the array contains no rules")]
    NoRules { path: String },
    /// A request to the server failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Runs `trellis capacity`.
pub async fn capacity(target: &TargetArgs, output: OutputArgs) -> Result<(), ClientError> {
    let capacity = connect(target)?.capacity().await?;
    if output.json {
        print!("{}", output::json(&capacity));
        return Ok(());
    }
    print!(
        "{}",
        output::key_values(&[
            ("memory", format!("{} ({} bytes)", output::bytes(capacity.memory_in_bytes), capacity.memory_in_bytes)),
            ("disk", format!("{} ({} bytes)", output::bytes(capacity.disk_in_bytes), capacity.disk_in_bytes)),
            ("max containers", capacity.max_containers.to_string()),
        ])
    );
    Ok(())
}

/// Runs `trellis list`: handles only with `quiet`, else a table with each
/// container's state, address and process count from bulk info.
pub async fn list(target: &TargetArgs, filter: Vec<(String, String)>, quiet: bool, output: OutputArgs) -> Result<(), ClientError> {
    let client = connect(target)?;
    let filter: Properties = filter.into_iter().collect();
    let handles = client.list(&filter).await?;
    if quiet {
        for handle in handles {
            println!("{handle}");
        }
        return Ok(());
    }
    let names: Vec<&str> = handles.iter().map(String::as_str).collect();
    let infos = if names.is_empty() { BTreeMap::new() } else { client.bulk_info(&names).await? };
    if output.json {
        print!("{}", output::json(&infos));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = handles
        .iter()
        .map(|handle| match infos.get(handle) {
            Some(entry) => match &entry.err {
                // Destroyed between the list and the bulk info.
                Some(error) => vec![handle.clone(), format!("error: {}", error.message), String::new(), String::new()],
                None => info_row(handle, &entry.info),
            },
            None => vec![handle.clone(), "unknown".into(), String::new(), String::new()],
        })
        .collect();
    print!("{}", output::table(&["HANDLE", "STATE", "CONTAINER IP", "MAPPED PORTS"], &rows));
    Ok(())
}

/// Returns a table row. Garden servers send no process ids in an info
/// (`ProcessIDs` is null), so the row shows mapped ports instead.
fn info_row(handle: &str, info: &ContainerInfo) -> Vec<String> {
    vec![handle.to_string(), info.state.clone(), dash_if_empty(&info.container_ip), mapped_ports(info)]
}

/// Returns the container's port mappings as `host->container`, or `-`.
fn mapped_ports(info: &ContainerInfo) -> String {
    let ports: Vec<String> = info
        .mapped_ports
        .iter()
        .flatten()
        .map(|mapping| format!("{}->{}", mapping.host_port, mapping.container_port))
        .collect();
    if ports.is_empty() {
        "-".into()
    } else {
        ports.join(", ")
    }
}

fn dash_if_empty(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

/// Runs `trellis info`.
pub async fn info(target: &TargetArgs, handle: &str, output: OutputArgs) -> Result<(), ClientError> {
    let info = connect(target)?.info(handle).await?;
    if output.json {
        print!("{}", output::json(&info));
        return Ok(());
    }
    let mut pairs = vec![
        ("handle", handle.to_string()),
        ("state", info.state.clone()),
        ("host ip", dash_if_empty(&info.host_ip)),
        ("container ip", dash_if_empty(&info.container_ip)),
        ("external ip", dash_if_empty(&info.external_ip)),
        ("path", dash_if_empty(&info.container_path)),
    ];
    pairs.push(("mapped ports", mapped_ports(&info)));
    let events = info.events.clone().unwrap_or_default();
    pairs.push(("events", if events.is_empty() { "-".into() } else { events.join(", ") }));
    let properties = info.properties.clone().unwrap_or_default();
    let property_lines: Vec<String> = properties.iter().map(|(key, value)| format!("{key}={value}")).collect();
    for line in &property_lines {
        pairs.push(("property", line.clone()));
    }
    print!("{}", output::key_values(&pairs));
    Ok(())
}

/// Runs `trellis bulk-info`.
pub async fn bulk_info(target: &TargetArgs, handles: &[String], output: OutputArgs) -> Result<(), ClientError> {
    let names: Vec<&str> = handles.iter().map(String::as_str).collect();
    let infos = connect(target)?.bulk_info(&names).await?;
    if output.json {
        print!("{}", output::json(&infos));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = infos
        .iter()
        .map(|(handle, entry)| match &entry.err {
            Some(error) => vec![handle.clone(), format!("error: {}", error.message), String::new(), String::new()],
            None => info_row(handle, &entry.info),
        })
        .collect();
    print!("{}", output::table(&["HANDLE", "STATE", "CONTAINER IP", "MAPPED PORTS"], &rows));
    Ok(())
}

/// Runs `trellis metrics`.
pub async fn metrics(target: &TargetArgs, handles: &[String], output: OutputArgs) -> Result<(), ClientError> {
    let client = connect(target)?;
    let names: Vec<&str> = handles.iter().map(String::as_str).collect();
    let entries = if let [handle] = names.as_slice() {
        // One handle uses the single-container route, whose errors are
        // the request's own.
        let metrics = client.metrics(handle).await?;
        if output.json {
            print!("{}", output::json(&metrics));
            return Ok(());
        }
        BTreeMap::from([(handle.to_string(), Ok(metrics))])
    } else {
        let entries = client.bulk_metrics(&names).await?;
        if output.json {
            print!("{}", output::json(&entries));
            return Ok(());
        }
        entries
            .into_iter()
            .map(|(handle, entry)| match entry.err {
                Some(error) => (handle, Err(error.message)),
                None => (handle, Ok(entry.metrics)),
            })
            .collect()
    };
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|(handle, metrics)| match metrics {
            Ok(metrics) => vec![
                handle.clone(),
                output::bytes(metrics.memory_stat.total_usage_toward_limit),
                format!("{:.2} s", Duration::from_nanos(metrics.cpu_stat.usage).as_secs_f64()),
                output::bytes(metrics.disk_stat.total_bytes_used),
            ],
            Err(message) => vec![handle.clone(), format!("error: {message}"), String::new(), String::new()],
        })
        .collect();
    print!("{}", output::table(&["HANDLE", "MEMORY", "CPU TIME", "DISK"], &rows));
    Ok(())
}

/// Runs `trellis limits`: sets the limits given as options, then prints
/// the limits in effect.
pub async fn limits(args: LimitsArgs) -> Result<(), ClientError> {
    let client = connect(&args.target)?;
    let handle = args.handle.as_str();
    if let Some(limit_in_bytes) = args.memory {
        client.set_memory_limits(handle, &MemoryLimits { limit_in_bytes }).await?;
    }
    if let Some(shares) = args.cpu_shares {
        client.set_cpu_limits(handle, &CpuLimits { weight: shares, limit_in_shares: 0 }).await?;
    }
    if args.disk_bytes.is_some() || args.disk_inodes.is_some() {
        let current = client.disk_limits(handle).await?;
        let limits = DiskLimits {
            byte_hard: args.disk_bytes.unwrap_or(current.byte_hard),
            inode_hard: args.disk_inodes.unwrap_or(current.inode_hard),
            ..current
        };
        client.set_disk_limits(handle, &limits).await?;
    }
    if args.bandwidth_rate.is_some() || args.bandwidth_burst.is_some() {
        let current = client.bandwidth_limits(handle).await?;
        let limits = BandwidthLimits {
            rate: args.bandwidth_rate.unwrap_or(current.rate),
            burst: args.bandwidth_burst.unwrap_or(current.burst),
        };
        client.set_bandwidth_limits(handle, &limits).await?;
    }

    let memory = client.memory_limits(handle).await?;
    let cpu = client.cpu_limits(handle).await?;
    let disk = client.disk_limits(handle).await?;
    let bandwidth = client.bandwidth_limits(handle).await?;
    if args.output.json {
        let value = serde_json::json!({ "memory": memory, "cpu": cpu, "disk": disk, "bandwidth": bandwidth });
        print!("{}", output::json(&value));
        return Ok(());
    }
    let limit = |value: u64, text: String| if value == 0 { "unlimited".to_string() } else { text };
    print!(
        "{}",
        output::key_values(&[
            ("memory", limit(memory.limit_in_bytes, output::bytes(memory.limit_in_bytes))),
            ("cpu shares", limit(cpu.weight.max(cpu.limit_in_shares), cpu.weight.max(cpu.limit_in_shares).to_string())),
            ("disk bytes (hard)", limit(disk.byte_hard, output::bytes(disk.byte_hard))),
            ("disk inodes (hard)", limit(disk.inode_hard, disk.inode_hard.to_string())),
            ("bandwidth rate", limit(bandwidth.rate, format!("{}/s", output::bytes(bandwidth.rate)))),
            ("bandwidth burst", limit(bandwidth.burst, output::bytes(bandwidth.burst))),
        ])
    );
    Ok(())
}

/// Runs `trellis grace-time`.
pub async fn grace_time(target: &TargetArgs, handle: &str, grace_time: Duration) -> Result<(), ClientError> {
    connect(target)?.set_grace_time(handle, grace_time).await
}

/// Runs `trellis net-in` and prints the host and container ports.
pub async fn net_in(target: &TargetArgs, handle: &str, host_port: u32, container_port: u32, output: OutputArgs) -> Result<(), ClientError> {
    let mapping = connect(target)?.net_in(handle, host_port, container_port).await?;
    if output.json {
        print!("{}", output::json(&mapping));
    } else {
        print!(
            "{}",
            output::table(&["HOST PORT", "CONTAINER PORT"], &[vec![mapping.host_port.to_string(), mapping.container_port.to_string()]])
        );
    }
    Ok(())
}

/// Runs `trellis net-out`.
pub async fn net_out(args: NetOutArgs) -> Result<(), ClientError> {
    let handle = args.handle.clone();
    let target = args.target.clone();
    let rule = net_out_rule(args)?;
    connect(&target)?.net_out(&handle, &rule).await
}

/// Builds the rule of `trellis net-out`, rejecting ICMP options on a
/// protocol other than ICMP.
fn net_out_rule(args: NetOutArgs) -> Result<NetOutRule, ClientError> {
    let icmps = args.icmp_type.map(|icmp_type| IcmpControl { icmp_type, code: args.icmp_code });
    if icmps.is_some() && args.protocol != PROTOCOL_ICMP {
        return Err(ClientError::InvalidArgument {
            what: "--icmp-type",
            reason: format!("ICMP options need --protocol icmp, not {}", protocol_name(args.protocol)),
        });
    }
    Ok(NetOutRule { protocol: args.protocol, networks: args.networks, ports: args.ports, icmps, log: args.log })
}

/// Runs `trellis bulk-net-out`: reads the rules from a file or stdin and
/// sends them in one request, so the server adds all of them or none.
pub async fn bulk_net_out(args: BulkNetOutArgs) -> Result<(), CommandError> {
    let rules = read_rules(&args.rules)?;
    connect(&args.target)?.bulk_net_out(&args.handle, &rules).await?;
    Ok(())
}

/// Reads and decodes a JSON array of net-out rules from `path`, or from
/// stdin when `path` is `-`.
fn read_rules(path: &str) -> Result<Vec<NetOutRule>, CommandError> {
    let mut bytes = Vec::new();
    let read = if path == "-" {
        std::io::stdin().read_to_end(&mut bytes).map(drop)
    } else {
        std::fs::read(path).map(|contents| bytes = contents)
    };
    read.map_err(|source| CommandError::ReadRules { path: path.to_string(), source })?;
    decode_rules(path, &bytes)
}

/// Decodes a rules file the way the server decodes a bulk net-out body.
fn decode_rules(path: &str, bytes: &[u8]) -> Result<Vec<NetOutRule>, CommandError> {
    let rules: Vec<NetOutRule> =
        crate::api::decode(bytes).map_err(|source| CommandError::InvalidRules { path: path.to_string(), source })?;
    if rules.is_empty() {
        return Err(CommandError::NoRules { path: path.to_string() });
    }
    Ok(rules)
}

/// Parses a byte count with an optional binary suffix: K, M, G or T (also
/// KiB, MiB, GiB, TiB), case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size {text:?}: expected a byte count such as 1048576, 512K, 64M or 2G");
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    let number: u64 = digits.parse().map_err(|_| invalid())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(invalid()),
    };
    number.checked_mul(1 << shift).ok_or_else(invalid)
}

/// Garden's protocol number for ICMP in a net-out rule.
const PROTOCOL_ICMP: u8 = 3;

/// Garden's protocol numbers and their names on the command line.
const PROTOCOLS: [(u8, &str); 4] = [(0, "all"), (1, "tcp"), (2, "udp"), (PROTOCOL_ICMP, "icmp")];

/// Parses a protocol name into Garden's protocol number.
fn parse_protocol(text: &str) -> Result<u8, String> {
    PROTOCOLS
        .iter()
        .find(|(_, name)| *name == text)
        .map(|(number, _)| *number)
        .ok_or_else(|| format!("invalid protocol {text:?}: expected all, tcp, udp or icmp"))
}

fn protocol_name(number: u8) -> &'static str {
    PROTOCOLS.iter().find(|(known, _)| *known == number).map_or("unknown", |(_, name)| name)
}

/// Parses a disk limit scope: `total` (image plus writes) or `exclusive`
/// (only what the container writes).
pub fn parse_disk_scope(text: &str) -> Result<u8, String> {
    match text {
        "total" => Ok(DISK_SCOPE_TOTAL),
        "exclusive" => Ok(DISK_SCOPE_EXCLUSIVE),
        _ => Err(format!("invalid disk scope {text:?}: expected total or exclusive")),
    }
}

/// Parses a port mapping `HOST:CONTAINER`. Either port may be 0: a host
/// port 0 lets the server pick one, a container port 0 means the same as
/// the host port.
pub fn parse_net_in(text: &str) -> Result<NetIn, String> {
    let invalid = || format!("invalid port mapping {text:?}: expected HOST:CONTAINER, two ports from 0 to 65535, such as 8080:80");
    let (host, container) = text.split_once(':').ok_or_else(invalid)?;
    let parse = |part: &str| part.trim().parse::<u16>().map(u32::from).map_err(|_| invalid());
    Ok(NetIn { host_port: parse(host)?, container_port: parse(container)? })
}

/// Parses a destination address range, `IP` or `FIRST-LAST`.
pub fn parse_ip_range(text: &str) -> Result<IpRange, String> {
    let parse = |part: &str| part.trim().parse::<IpAddr>().map_err(|_| format!("invalid address {part:?} in {text:?}: expected IP or FIRST-LAST"));
    let (start, end) = match text.split_once('-') {
        Some((start, end)) => (parse(start)?, parse(end)?),
        None => (parse(text)?, parse(text)?),
    };
    Ok(IpRange { start: Some(start), end: Some(end) })
}

fn parse_port_range(text: &str) -> Result<PortRange, String> {
    let parse = |part: &str| match part.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("invalid port {part:?} in {text:?}: expected a port from 1 to 65535, or FIRST-LAST")),
    };
    let (start, end) = match text.split_once('-') {
        Some((start, end)) => (parse(start)?, parse(end)?),
        None => (parse(text)?, parse(text)?),
    };
    if start > end {
        return Err(format!("invalid port range {text:?}: the first port is above the last"));
    }
    Ok(PortRange { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        for bad in ["", "M", "1.5G", "-1", "10X", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_port_range("80"), Ok(PortRange { start: 80, end: 80 }));
        assert_eq!(parse_port_range("8000-8080"), Ok(PortRange { start: 8000, end: 8080 }));
        assert!(parse_port_range("0").is_err());
        assert!(parse_port_range("90-80").is_err());
        let range = parse_ip_range("192.0.2.1-192.0.2.9").unwrap();
        assert_eq!(range.start, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(range.end, Some("192.0.2.9".parse().unwrap()));
        assert!(parse_ip_range("nowhere").is_err());
        assert_eq!(parse_protocol("udp"), Ok(2));
        assert!(parse_protocol("sctp").is_err());
    }

    #[test]
    fn net_in_pairs_parse() {
        assert_eq!(parse_net_in("8080:80"), Ok(NetIn { host_port: 8080, container_port: 80 }));
        assert_eq!(parse_net_in("0:22"), Ok(NetIn { host_port: 0, container_port: 22 }));
        for bad in ["8080", "8080:", ":80", "a:80", "70000:80", "1:2:3", "-1:80"] {
            assert!(parse_net_in(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(parse_disk_scope("exclusive"), Ok(DISK_SCOPE_EXCLUSIVE));
        assert!(parse_disk_scope("all").is_err());
    }

    fn net_out_args(args: &[&str]) -> NetOutArgs {
        use clap::Parser;
        let mut line = vec!["trellis", "net-out", "h"];
        line.extend_from_slice(args);
        let cli = crate::cli::Cli::try_parse_from(line).unwrap();
        let crate::cli::Command::Client(crate::cli::client::ClientCommand::NetOut(args)) = cli.command else {
            panic!("not a net-out command");
        };
        *args
    }

    #[test]
    fn icmp_options_need_icmp() {
        let rule = net_out_rule(net_out_args(&["--protocol", "icmp", "--icmp-type", "8", "--icmp-code", "0"])).unwrap();
        assert_eq!(rule.icmps, Some(IcmpControl { icmp_type: 8, code: Some(0) }));
        let rule = net_out_rule(net_out_args(&["--protocol", "icmp", "--icmp-type", "3"])).unwrap();
        assert_eq!(rule.icmps, Some(IcmpControl { icmp_type: 3, code: None }));
        assert_eq!(net_out_rule(net_out_args(&["--protocol", "icmp"])).unwrap().icmps, None);

        let error = net_out_rule(net_out_args(&["--protocol", "tcp", "--icmp-type", "8"])).unwrap_err();
        assert_eq!(error.to_string(), "invalid --icmp-type: ICMP options need --protocol icmp, not tcp");
        assert!(net_out_rule(net_out_args(&["--icmp-type", "8"])).is_err(), "the default protocol is all");
    }

    #[test]
    fn rules_files_decode() {
        let rules = decode_rules("f", br#"[{"protocol":3,"icmps":{"type":8,"code":0}},{"protocol":1,"ports":[{"start":80,"end":81}]}]"#).unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].icmps, Some(IcmpControl { icmp_type: 8, code: Some(0) }));
        assert_eq!(rules[1].ports, vec![PortRange { start: 80, end: 81 }]);
        for bad in [&b""[..], b"{}", b"[{\"protocol\":\"tcp\"}]", b"[", b"[]"] {
            assert!(decode_rules("f", bad).is_err(), "{:?} was accepted", String::from_utf8_lossy(bad));
        }
    }
}
