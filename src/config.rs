//! Server configuration: the TOML file of `trellis server --config FILE`
//! and the command-line flags that override it.
//!
//! Keys and flags use the names of gdn, Garden's reference server
//! (`bind-ip`, `default-grace-time` and so on). Every value is checked when
//! it is loaded. An invalid value is reported with the file (or flag), the
//! key and the reason, and an unknown key is an error naming the key.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::Ipv4Network;

/// Largest request body with JSON content the server reads (1 MiB).
pub const MAX_JSON_BODY_BYTES: usize = 1 << 20;

/// The host id that container root maps to in an unprivileged container:
/// the largest id a 32-bit user namespace can map (4294967294).
pub const TOP_ID: u32 = u32::MAX - 1;

/// A configuration value that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("configuration file {path} is not valid TOML: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("{source_name}: unknown key `{key}`; did you mean `{nearest}`?")]
    UnknownKey { source_name: String, key: String, nearest: &'static str },
    #[error("{source_name}: invalid value for `{key}`: {reason}")]
    InvalidValue { source_name: String, key: String, reason: String },
}

impl ConfigError {
    /// Builds the error for a key that is not in [`KEYS`], naming the
    /// closest valid key.
    pub fn unknown_key(source_name: &str, key: &str) -> ConfigError {
        ConfigError::UnknownKey { source_name: source_name.to_string(), key: key.to_string(), nearest: nearest_key(key) }
    }
}

/// Returns the key of [`KEYS`] with the smallest edit distance to `key`.
pub fn nearest_key(key: &str) -> &'static str {
    KEYS.iter().copied().min_by_key(|candidate| edit_distance(key, candidate)).unwrap_or(KEYS[0])
}

/// Levenshtein distance: the number of single-character insertions,
/// deletions and substitutions that turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, b_char) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(a_char != *b_char);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Output format of the server log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Text for a terminal.
    Human,
}

/// Every setting of the server, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// TCP address of the Garden API, used unless `bind_socket` is set.
    pub bind_ip: IpAddr,
    pub bind_port: u16,
    /// Unix socket path of the Garden API; replaces TCP when set.
    pub bind_socket: Option<PathBuf>,
    /// Directory with one state directory per container.
    pub depot: PathBuf,
    /// Root filesystem of containers whose spec names no image.
    pub default_rootfs: PathBuf,
    /// Grace time of containers created without one; zero means never.
    pub default_grace_time: Duration,
    /// Maximum number of containers; zero means only the subnet pool limits it.
    pub max_containers: u64,
    pub debug_bind_ip: IpAddr,
    pub debug_bind_port: u16,
    pub log_level: slog::Level,
    pub log_format: LogFormat,
    /// Short name carried by every host object the server creates.
    pub tag: String,
    /// Pool of container subnets, handed out as /30 blocks.
    pub network_pool: Ipv4Network,
    /// First host port of the net-in pool.
    pub port_pool_start: u16,
    /// Number of host ports in the net-in pool.
    pub port_pool_size: u32,
    /// First host id of the identity part of the uid mapping.
    pub uid_map_start: u32,
    /// Length of the identity part; `None` means up to just below the top id.
    pub uid_map_length: Option<u32>,
    pub gid_map_start: u32,
    pub gid_map_length: Option<u32>,
    /// Forget a finished process (its record, id and state directory) once
    /// its exit status was sent to a client, as gdn's
    /// `--cleanup-process-dirs-on-wait` does. Off: kept until destroy.
    pub cleanup_process_dirs_on_wait: bool,
    /// Maximum finished process records (exit status, kept output, state
    /// directory) per container; beyond it the oldest is dropped. Zero
    /// keeps every record until destroy.
    pub max_finished_processes: usize,
    /// Set no_new_privs on the processes of unprivileged containers and
    /// give their network namespace `net.ipv4.ping_group_range` = `1 65535`.
    pub no_new_privileges: bool,
    /// Hard CPU quota per share, in microseconds per 100 ms period, as
    /// gdn's `--cpu-quota-per-share`; 0 leaves CPU uncapped.
    pub cpu_quota_per_share: u64,
    /// CPU entitlement per share in percent, as gdn's
    /// `--cpu-entitlement-per-share`; 0 derives it from the host's CPU
    /// cores and memory.
    pub cpu_entitlement_per_share: f64,
    /// Destroy every container the depot and the host hold for this
    /// server's tag at start-up, as gdn's `--destroy-containers-on-startup`
    /// does. Off: containers are restored.
    pub destroy_containers_on_startup: bool,
    /// Address that net-in mappings listen on and that outbound traffic is
    /// masqueraded to. `None` means the source address of the host's
    /// default route, found at start-up.
    pub external_ip: Option<Ipv4Addr>,
    /// Name servers written to each container's `/etc/resolv.conf`; empty
    /// means derived from the host's `/etc/resolv.conf`.
    pub dns_servers: Vec<Ipv4Addr>,
    /// Name servers appended after the others.
    pub additional_dns_servers: Vec<Ipv4Addr>,
    /// Lines appended verbatim to each container's `/etc/hosts`.
    pub additional_host_entries: Vec<String>,
    /// Destinations containers may not reach unless a net-out rule allows
    /// them.
    pub deny_networks: Vec<Ipv4Network>,
    /// Let containers reach the host's own addresses.
    pub allow_host_access: bool,
    /// MTU of container links, at most 1500. 0 means the MTU of the host
    /// interface that has the external IP.
    pub mtu: u32,
    /// How long a bridge whose last container went is kept for the next
    /// container of its subnet. Zero removes it at once, in the background.
    pub bridge_idle_time: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            bind_port: 7777,
            bind_socket: None,
            depot: PathBuf::from("/var/lib/trellis/depot"),
            default_rootfs: PathBuf::from("/var/lib/trellis/rootfs/busybox"),
            default_grace_time: Duration::ZERO,
            max_containers: 0,
            debug_bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            debug_bind_port: 17013,
            log_level: slog::Level::Info,
            log_format: LogFormat::Json,
            tag: "trellis".to_string(),
            network_pool: "10.254.0.0/22".parse().expect("default pool is valid"),
            port_pool_start: 61001,
            port_pool_size: 4534,
            uid_map_start: 1,
            uid_map_length: None,
            gid_map_start: 1,
            gid_map_length: None,
            cleanup_process_dirs_on_wait: false,
            max_finished_processes: crate::actors::container::DEFAULT_MAX_FINISHED_PROCESSES,
            no_new_privileges: false,
            cpu_quota_per_share: 0,
            cpu_entitlement_per_share: 0.0,
            destroy_containers_on_startup: false,
            external_ip: None,
            dns_servers: Vec::new(),
            additional_dns_servers: Vec::new(),
            additional_host_entries: Vec::new(),
            deny_networks: Vec::new(),
            allow_host_access: false,
            mtu: 0,
            bridge_idle_time: DEFAULT_BRIDGE_IDLE_TIME,
        }
    }
}

/// Default of `bridge-idle-time`.
pub const DEFAULT_BRIDGE_IDLE_TIME: Duration = Duration::from_secs(30);

/// Every key the configuration file and the flags accept.
pub const KEYS: &[&str] = &[
    "bind-ip",
    "bind-port",
    "bind-socket",
    "depot",
    "default-rootfs",
    "default-grace-time",
    "max-containers",
    "debug-bind-ip",
    "debug-bind-port",
    "log-level",
    "log-format",
    "tag",
    "network-pool",
    "port-pool-start",
    "port-pool-size",
    "uid-map-start",
    "uid-map-length",
    "gid-map-start",
    "gid-map-length",
    "cleanup-process-dirs-on-wait",
    "max-finished-processes",
    "no-new-privileges",
    "cpu-quota-per-share",
    "cpu-entitlement-per-share",
    "destroy-containers-on-startup",
    "external-ip",
    "dns-server",
    "additional-dns-server",
    "additional-host-entry",
    "deny-network",
    "allow-host-access",
    "mtu",
    "bridge-idle-time",
];

/// Keys that take a list: a TOML array of strings, or one string with the
/// values separated by commas.
pub const LIST_KEYS: &[&str] = &["dns-server", "additional-dns-server", "additional-host-entry", "deny-network"];

impl Config {
    /// Loads `path` over the defaults.
    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: path.to_path_buf(), reason: error.to_string() })?;
        Config::from_toml(&text, path)
    }

    /// Parses TOML text over the defaults; `path` names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|error: toml::de::Error| ConfigError::Syntax {
            path: path.to_path_buf(),
            reason: describe_syntax_error(text, &error),
        })?;
        let source_name = path.display().to_string();
        let mut config = Config::default();
        for (key, value) in &table {
            let text = match value {
                toml::Value::String(text) => text.clone(),
                toml::Value::Integer(number) => number.to_string(),
                toml::Value::Float(number) => number.to_string(),
                toml::Value::Boolean(flag) => flag.to_string(),
                toml::Value::Array(items) if LIST_KEYS.contains(&key.as_str()) => {
                    let mut texts = Vec::new();
                    for item in items {
                        match item {
                            toml::Value::String(text) => texts.push(text.clone()),
                            other => {
                                return Err(ConfigError::InvalidValue {
                                    source_name,
                                    key: key.clone(),
                                    reason: format!("expected an array of strings, found a {} in it", other.type_str()),
                                })
                            }
                        }
                    }
                    texts.join(",")
                }
                other => {
                    if !KEYS.contains(&key.as_str()) {
                        return Err(ConfigError::unknown_key(&source_name, key));
                    }
                    return Err(ConfigError::InvalidValue {
                        source_name,
                        key: key.clone(),
                        reason: format!("expected a string or an integer, found a {}", other.type_str()),
                    });
                }
            };
            config.set(&source_name, key, &text)?;
        }
        config.validate(&source_name)?;
        Ok(config)
    }

    /// Sets one key from its text form; `source_name` names the file or
    /// "command line" in errors.
    pub fn set(&mut self, source_name: &str, key: &str, text: &str) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::InvalidValue {
            source_name: source_name.to_string(),
            key: key.to_string(),
            reason,
        };
        match key {
            "bind-ip" => self.bind_ip = parse_ip(text).map_err(invalid)?,
            "bind-port" => self.bind_port = parse_number(text).map_err(invalid)?,
            "bind-socket" => self.bind_socket = if text.is_empty() { None } else { Some(parse_path(text).map_err(invalid)?) },
            "depot" => self.depot = parse_path(text).map_err(invalid)?,
            "default-rootfs" => self.default_rootfs = parse_path(text).map_err(invalid)?,
            "default-grace-time" => self.default_grace_time = parse_duration(text).map_err(invalid)?,
            "max-containers" => self.max_containers = parse_number(text).map_err(invalid)?,
            "debug-bind-ip" => self.debug_bind_ip = parse_ip(text).map_err(invalid)?,
            "debug-bind-port" => self.debug_bind_port = parse_number(text).map_err(invalid)?,
            "log-level" => self.log_level = parse_level(text).map_err(invalid)?,
            "log-format" => {
                self.log_format = match text {
                    "json" => LogFormat::Json,
                    "human" => LogFormat::Human,
                    _ => return Err(invalid(format!("`{text}` is not one of json, human"))),
                }
            }
            "tag" => self.tag = parse_tag(text).map_err(invalid)?,
            "network-pool" => self.network_pool = parse_pool(text).map_err(invalid)?,
            "port-pool-start" => self.port_pool_start = parse_number(text).map_err(invalid)?,
            "port-pool-size" => self.port_pool_size = parse_number(text).map_err(invalid)?,
            "uid-map-start" => self.uid_map_start = parse_number(text).map_err(invalid)?,
            "uid-map-length" => self.uid_map_length = Some(parse_number(text).map_err(invalid)?),
            "gid-map-start" => self.gid_map_start = parse_number(text).map_err(invalid)?,
            "gid-map-length" => self.gid_map_length = Some(parse_number(text).map_err(invalid)?),
            "cleanup-process-dirs-on-wait" => self.cleanup_process_dirs_on_wait = parse_bool(text).map_err(invalid)?,
            "max-finished-processes" => self.max_finished_processes = parse_number(text).map_err(invalid)?,
            "no-new-privileges" => self.no_new_privileges = parse_bool(text).map_err(invalid)?,
            "cpu-quota-per-share" => self.cpu_quota_per_share = parse_number(text).map_err(invalid)?,
            "cpu-entitlement-per-share" => {
                let percent: f64 = parse_number(text).map_err(invalid)?;
                if !percent.is_finite() || percent < 0.0 {
                    return Err(invalid(format!("`{text}` is not a non-negative percentage")));
                }
                self.cpu_entitlement_per_share = percent;
            }
            "destroy-containers-on-startup" => self.destroy_containers_on_startup = parse_bool(text).map_err(invalid)?,
            "external-ip" => self.external_ip = if text.is_empty() { None } else { Some(parse_ipv4(text).map_err(invalid)?) },
            "dns-server" => self.dns_servers = parse_list(text, parse_ipv4).map_err(invalid)?,
            "additional-dns-server" => self.additional_dns_servers = parse_list(text, parse_ipv4).map_err(invalid)?,
            "additional-host-entry" => self.additional_host_entries = parse_list(text, |entry| Ok(entry.to_string())).map_err(invalid)?,
            "deny-network" => self.deny_networks = parse_list(text, parse_cidr).map_err(invalid)?,
            "allow-host-access" => self.allow_host_access = parse_bool(text).map_err(invalid)?,
            "mtu" => {
                let mtu: u32 = parse_number(text).map_err(invalid)?;
                if mtu != 0 && !(68..=1500).contains(&mtu) {
                    return Err(invalid(format!("`{text}` is not 0 or an MTU from 68 to 1500")));
                }
                self.mtu = mtu;
            }
            "bridge-idle-time" => self.bridge_idle_time = parse_duration(text).map_err(invalid)?,
            _ => return Err(ConfigError::unknown_key(source_name, key)),
        }
        Ok(())
    }

    /// Checks the rules that involve more than one key.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::InvalidValue {
            source_name: source_name.to_string(),
            key: key.to_string(),
            reason,
        };
        if self.port_pool_start == 0 {
            return Err(invalid("port-pool-start", "must be at least 1".into()));
        }
        if self.port_pool_size == 0 || u32::from(self.port_pool_start) + self.port_pool_size > 65536 {
            return Err(invalid(
                "port-pool-size",
                format!("must be at least 1, and port-pool-start ({}) plus the size must not exceed 65536", self.port_pool_start),
            ));
        }
        for (prefix, start, length) in [("uid", self.uid_map_start, self.uid_map_length), ("gid", self.gid_map_start, self.gid_map_length)] {
            if start == 0 || start >= TOP_ID {
                return Err(invalid(&format!("{prefix}-map-start"), format!("must be between 1 and {}", TOP_ID - 1)));
            }
            if let Some(length) = length {
                if length == 0 || u64::from(start) + u64::from(length) > u64::from(TOP_ID) {
                    return Err(invalid(
                        &format!("{prefix}-map-length"),
                        format!("must be at least 1 and end below the top id {TOP_ID} (start {start})"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Renders the configuration as TOML that [`Config::from_toml`] reads
    /// back to the same values, one line per key of [`KEYS`]. Unset
    /// optional keys are written as comments.
    pub fn to_toml(&self) -> String {
        let quoted = |text: &str| toml::Value::String(text.to_string()).to_string();
        let optional = |key: &str, value: Option<String>| match value {
            Some(value) => format!("{key} = {value}"),
            None => format!("# {key} is not set"),
        };
        fn list<T: ToString>(items: &[T]) -> String {
            let items: Vec<String> = items.iter().map(|item| toml::Value::String(item.to_string()).to_string()).collect();
            format!("[{}]", items.join(", "))
        }
        let lines = [
            format!("bind-ip = {}", quoted(&self.bind_ip.to_string())),
            format!("bind-port = {}", self.bind_port),
            optional("bind-socket", self.bind_socket.as_ref().map(|path| quoted(&path.display().to_string()))),
            format!("depot = {}", quoted(&self.depot.display().to_string())),
            format!("default-rootfs = {}", quoted(&self.default_rootfs.display().to_string())),
            format!("default-grace-time = {}", quoted(&format_duration(self.default_grace_time))),
            format!("max-containers = {}", self.max_containers),
            format!("debug-bind-ip = {}", quoted(&self.debug_bind_ip.to_string())),
            format!("debug-bind-port = {}", self.debug_bind_port),
            format!("log-level = {}", quoted(level_name(self.log_level))),
            format!("log-format = {}", quoted(match self.log_format {
                LogFormat::Json => "json",
                LogFormat::Human => "human",
            })),
            format!("tag = {}", quoted(&self.tag)),
            format!("network-pool = {}", quoted(&self.network_pool.to_string())),
            format!("port-pool-start = {}", self.port_pool_start),
            format!("port-pool-size = {}", self.port_pool_size),
            format!("uid-map-start = {}", self.uid_map_start),
            optional("uid-map-length", self.uid_map_length.map(|length| length.to_string())),
            format!("gid-map-start = {}", self.gid_map_start),
            optional("gid-map-length", self.gid_map_length.map(|length| length.to_string())),
            format!("cleanup-process-dirs-on-wait = {}", self.cleanup_process_dirs_on_wait),
            format!("no-new-privileges = {}", self.no_new_privileges),
            format!("max-finished-processes = {}", self.max_finished_processes),
            format!("cpu-quota-per-share = {}", self.cpu_quota_per_share),
            format!("cpu-entitlement-per-share = {}", self.cpu_entitlement_per_share),
            format!("destroy-containers-on-startup = {}", self.destroy_containers_on_startup),
            optional("external-ip", self.external_ip.map(|address| quoted(&address.to_string()))),
            format!("dns-server = {}", list(&self.dns_servers)),
            format!("additional-dns-server = {}", list(&self.additional_dns_servers)),
            format!("additional-host-entry = {}", list(&self.additional_host_entries)),
            format!("deny-network = {}", list(&self.deny_networks)),
            format!("allow-host-access = {}", self.allow_host_access),
            format!("mtu = {}", self.mtu),
            format!("bridge-idle-time = {}", quoted(&format_duration(self.bridge_idle_time))),
        ];
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }

    /// Returns the maximum number of containers: the number of /30 blocks
    /// in the network pool, lowered to `max-containers` when that is set.
    pub fn effective_max_containers(&self) -> u64 {
        let blocks = 1u64 << (30 - u32::from(self.network_pool.prefix()));
        if self.max_containers > 0 {
            blocks.min(self.max_containers)
        } else {
            blocks
        }
    }
}

fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse().map_err(|_| format!("`{text}` is not an IP address"))
}

fn parse_ipv4(text: &str) -> Result<Ipv4Addr, String> {
    text.trim().parse().map_err(|_| format!("`{text}` is not an IPv4 address"))
}

fn parse_cidr(text: &str) -> Result<Ipv4Network, String> {
    let network: Ipv4Network = text.trim().parse().map_err(|_| format!("`{text}` is not an IPv4 CIDR such as 10.0.0.0/8"))?;
    Ipv4Network::new(network.network(), network.prefix()).map_err(|error| error.to_string())
}

/// Parses a comma-separated list; an empty text is an empty list.
fn parse_list<T>(text: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    text.split(',').map(|item| parse(item.trim())).collect()
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("`{text}` is not one of true, false")),
    }
}

fn parse_number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a non-negative integer in range"))
}

fn parse_path(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("the path is empty".into());
    }
    let path = PathBuf::from(text);
    if !path.is_absolute() {
        return Err(format!("`{text}` is not an absolute path"));
    }
    Ok(path)
}

/// Parses a level with the names `POST /log-level` takes, so the flag, the
/// file and the debug listener agree.
fn parse_level(text: &str) -> Result<slog::Level, String> {
    crate::logging::parse_level(text)
}

/// Returns the name of `level` that [`parse_level`] reads back.
fn level_name(level: slog::Level) -> &'static str {
    match level {
        slog::Level::Trace => "trace",
        slog::Level::Debug => "debug",
        slog::Level::Info => "info",
        slog::Level::Warning => "warn",
        slog::Level::Error => "error",
        slog::Level::Critical => "critical",
    }
}

/// Formats a duration in the largest unit that keeps it exact, in the form
/// [`parse_duration`] reads ("0", "30s", "250ms", "1500ns").
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0".to_string();
    }
    for (unit, size) in [("h", 3_600_000_000_000u128), ("m", 60_000_000_000), ("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)] {
        if nanos % size == 0 {
            return format!("{}{unit}", nanos / size);
        }
    }
    format!("{nanos}ns")
}

/// Returns the parser's message prefixed with the line and column where it
/// found the error, counted from 1.
fn describe_syntax_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', "; ");
    let Some(span) = error.span() else {
        return message;
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
    format!("line {line}, column {column}: {message}")
}

/// Accepts 1 to 16 lowercase letters and digits: the tag names cgroup
/// directories and mount points as it is. Interface names, which the kernel
/// limits to 15 bytes, must use a shortened form of it.
fn parse_tag(text: &str) -> Result<String, String> {
    let valid = !text.is_empty() && text.len() <= 16 && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!("`{text}` must be 1 to 16 lowercase letters or digits"))
    }
}

fn parse_pool(text: &str) -> Result<Ipv4Network, String> {
    let pool: Ipv4Network = text.parse().map_err(|_| format!("`{text}` is not an IPv4 CIDR such as 10.254.0.0/22"))?;
    if pool.prefix() > 30 {
        return Err(format!("`{text}` is smaller than one /30 block"));
    }
    if pool.network() != pool.ip() {
        return Err(format!("`{text}` has host bits set; the network address is {}", pool.network()));
    }
    Ok(pool)
}

/// Parses a duration such as `0`, `500ms`, `30s`, `5m`, `2h` or `1h30m`.
/// A bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let invalid = || format!("`{text}` is not a duration such as 0, 30s, 5m or 1h30m");
    if text.is_empty() {
        return Err(invalid());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
        if digits == 0 {
            return Err(invalid());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => Duration::from_nanos(1),
            "us" | "µs" => Duration::from_micros(1),
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(invalid()),
        };
        let part = unit.checked_mul(u32::try_from(number).map_err(|_| invalid())?).ok_or_else(invalid)?;
        total = total.checked_add(part).ok_or_else(invalid)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/trellis.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = load("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.bind_port, 7777);
        assert_eq!(config.effective_max_containers(), 256);
    }

    #[test]
    fn every_key_is_read() {
        let config = load(
            r#"
            bind-ip = "0.0.0.0"
            bind-port = 7778
            bind-socket = "/run/trellis.sock"
            depot = "/srv/depot"
            default-rootfs = "/srv/rootfs"
            default-grace-time = "5m"
            max-containers = 10
            debug-bind-ip = "127.0.0.2"
            debug-bind-port = 17014
            log-level = "debug"
            log-format = "human"
            tag = "t1"
            network-pool = "10.200.0.0/24"
            port-pool-start = 40000
            port-pool-size = 100
            uid-map-start = 1000
            uid-map-length = 5000
            gid-map-start = 2000
            gid-map-length = 6000
            external-ip = "192.0.2.1"
            dns-server = ["192.0.2.53", "192.0.2.54"]
            additional-dns-server = "198.51.100.53"
            additional-host-entry = ["192.0.2.9 db"]
            deny-network = "0.0.0.0/0,10.0.0.0/8"
            allow-host-access = true
            mtu = 1400
            "#,
        )
        .unwrap();
        assert_eq!(config.bind_ip, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(config.bind_port, 7778);
        assert_eq!(config.bind_socket, Some(PathBuf::from("/run/trellis.sock")));
        assert_eq!(config.depot, PathBuf::from("/srv/depot"));
        assert_eq!(config.default_rootfs, PathBuf::from("/srv/rootfs"));
        assert_eq!(config.default_grace_time, Duration::from_secs(300));
        assert_eq!(config.max_containers, 10);
        assert_eq!(config.debug_bind_port, 17014);
        assert_eq!(config.log_level, slog::Level::Debug);
        assert_eq!(config.log_format, LogFormat::Human);
        assert_eq!(config.tag, "t1");
        assert_eq!(config.network_pool.to_string(), "10.200.0.0/24");
        assert_eq!(config.port_pool_start, 40000);
        assert_eq!(config.port_pool_size, 100);
        assert_eq!((config.uid_map_start, config.uid_map_length), (1000, Some(5000)));
        assert_eq!((config.gid_map_start, config.gid_map_length), (2000, Some(6000)));
        assert_eq!(config.effective_max_containers(), 10);
        assert_eq!(config.external_ip, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(config.dns_servers, vec![Ipv4Addr::new(192, 0, 2, 53), Ipv4Addr::new(192, 0, 2, 54)]);
        assert_eq!(config.additional_dns_servers, vec![Ipv4Addr::new(198, 51, 100, 53)]);
        assert_eq!(config.additional_host_entries, vec!["192.0.2.9 db".to_string()]);
        assert_eq!(config.deny_networks.len(), 2);
        assert_eq!(config.deny_networks[1].to_string(), "10.0.0.0/8");
        assert!(config.allow_host_access);
        assert_eq!(config.mtu, 1400);
    }

    #[test]
    fn printed_config_has_every_key_and_reads_back() {
        let config = load(
            "bind-port = 7001\nmtu = 1400\ndeny-network = [\"192.0.2.0/24\", \"198.51.100.7/32\"]\n\
             dns-server = \"198.51.100.53\"\nexternal-ip = \"198.51.100.1\"\nallow-host-access = true\n\
             max-finished-processes = 5\ncpu-entitlement-per-share = 1.5\ncpu-quota-per-share = 2000\n\
             destroy-containers-on-startup = true\nadditional-host-entry = \"192.0.2.9 outside\"\n",
        )
        .unwrap();
        let printed = config.to_toml();
        for key in KEYS {
            let shown = printed.lines().any(|line| line.starts_with(&format!("{key} = ")) || line == format!("# {key} is not set"));
            assert!(shown, "--print-config leaves out {key}:\n{printed}");
        }
        let read_back = Config::from_toml(&printed, Path::new("printed.toml")).unwrap();
        assert_eq!(read_back, config);
    }

    #[test]
    fn unknown_key_is_named() {
        let error = load("bind-adress = \"1.2.3.4\"").unwrap_err();
        assert_eq!(
            error,
            ConfigError::UnknownKey { source_name: "/etc/trellis.toml".into(), key: "bind-adress".into(), nearest: "bind-port" }
        );
        assert!(error.to_string().contains("/etc/trellis.toml"));
        assert!(error.to_string().contains("did you mean `bind-port`?"), "{error}");
    }

    #[test]
    fn nearest_key_fixes_typos() {
        assert_eq!(nearest_key("bind-prot"), "bind-port");
        assert_eq!(nearest_key("default_grace_time"), "default-grace-time");
        assert_eq!(nearest_key("loglevel"), "log-level");
        assert_eq!(nearest_key("max-container"), "max-containers");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn printed_config_reads_back() {
        let defaults = Config::default();
        assert_eq!(load(&defaults.to_toml()).unwrap(), defaults);
        let mut changed = Config::default();
        for (key, value) in [("bind-socket", "/run/t.sock"), ("default-grace-time", "1h30m250ms"), ("log-level", "warn"), ("log-format", "human"), ("uid-map-length", "5000"), ("no-new-privileges", "true"), ("tag", "t1")] {
            changed.set("test", key, value).unwrap();
        }
        let text = changed.to_toml();
        assert_eq!(load(&text).unwrap(), changed, "{text}");
        assert!(text.contains("default-grace-time = \"5400250ms\""), "{text}");
    }

    #[test]
    fn invalid_values_name_file_and_key() {
        for (text, key) in [
            ("bind-ip = \"localhost\"", "bind-ip"),
            ("bind-port = 70000", "bind-port"),
            ("bind-port = -1", "bind-port"),
            ("default-grace-time = \"5 minutes\"", "default-grace-time"),
            ("depot = \"relative/dir\"", "depot"),
            ("log-level = \"loud\"", "log-level"),
            ("tag = \"Has-Caps\"", "tag"),
            ("network-pool = \"10.0.0.1/22\"", "network-pool"),
            ("network-pool = \"10.0.0.0/31\"", "network-pool"),
            ("port-pool-start = 65000\nport-pool-size = 1000", "port-pool-size"),
            ("uid-map-start = 0", "uid-map-start"),
            ("max-containers = true", "max-containers"),
            ("cpu-quota-per-share = -1", "cpu-quota-per-share"),
            ("cpu-entitlement-per-share = -0.5", "cpu-entitlement-per-share"),
            ("external-ip = \"::1\"", "external-ip"),
            ("deny-network = \"0.0.0.0/40\"", "deny-network"),
            ("dns-server = [1]", "dns-server"),
            ("mtu = 9000", "mtu"),
        ] {
            let error = load(text).unwrap_err();
            match &error {
                ConfigError::InvalidValue { source_name, key: found, .. } => {
                    assert_eq!(source_name, "/etc/trellis.toml", "{text}");
                    assert_eq!(found, key, "{text}");
                }
                other => panic!("{text}: unexpected error {other:?}"),
            }
        }
    }

    #[test]
    fn syntax_error_names_file() {
        let error = load("depot = \"/d\"\nbind-port = ").unwrap_err();
        assert!(matches!(error, ConfigError::Syntax { .. }));
        assert!(error.to_string().contains("/etc/trellis.toml"), "{error}");
        assert!(error.to_string().contains("line 2, column"), "{error}");
    }

    #[test]
    fn shipped_file_matches_defaults() {
        let text = include_str!("../config/trellis.toml");
        assert_eq!(load(text).unwrap(), Config::default());
        // Every key is documented in the shipped file.
        for key in KEYS {
            assert!(text.contains(&format!("{key} =")), "config/trellis.toml does not document {key}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("-5s").is_err());
    }
}
