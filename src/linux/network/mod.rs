//! Container networking: a bridge per subnet, a veth pair per container,
//! the server's nftables table, `/etc/hosts` and `/etc/resolv.conf`, and
//! bandwidth limits with tc.
//!
//! - [`links`]: netlink work (rtnetlink) on the host and in containers.
//! - [`nft`]: rendering and applying the firewall and NAT table.
//! - [`nftlib`]: libnftables, through which [`nft`] applies scripts.
//! - [`resolv`]: the contents of the per-container name files.
//! - [`tc`]: bandwidth limits on the host end of a container's link.
//!
//! [`HostNetwork`] is built once at start-up. It owns the table and
//! counts the containers of each subnet. [`ContainerNetwork`] is one
//! container's part, and removes exactly what it added.
//!
//! Deleting a network device is slow: the kernel waits for RCU grace
//! periods, tens of milliseconds here. So neither is on a destroy's path:
//! - A container's veth pair goes with its network namespace, which the
//!   kernel tears down once the container's last process is gone. Each
//!   pair gets a fresh random name, so a new container does not wait for
//!   the old pair's name to be free. The janitor deletes a host end that is still
//!   there [`VETH_CHECK_DELAY`] later.
//! - A bridge whose last container went stays idle for `bridge-idle-time`,
//!   so that the next container of its subnet reuses it. The subnet pool
//!   hands out the lowest free block, usually the one just released. The
//!   janitor thread deletes the bridge after that time.

pub mod links;
pub mod nft;
pub mod nftlib;
pub mod resolv;
pub mod tc;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use crate::api::{BandwidthLimits, NetOutRule};
use crate::pools::subnet::NetworkAllocation;

/// Largest MTU given to container links.
pub const MAX_MTU: u32 = 1500;

/// How long after a destroy the janitor checks that the kernel removed the
/// container's host veth with its namespace.
pub const VETH_CHECK_DELAY: Duration = Duration::from_secs(10);

/// A failed network operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("{operation} failed: {reason}")]
    Netlink { operation: String, reason: String },
    #[error("{reason}")]
    Nft { reason: String },
    #[error("{message}")]
    InvalidRule { message: String },
    #[error("networking needs {what}")]
    Missing { what: String },
    #[error("no external IP: set external-ip, because the host has no default route with an IPv4 address")]
    NoExternalIp,
    #[error("failed to {operation}: {reason}")]
    Host { operation: String, reason: String },
    #[error("{command} failed: {reason}")]
    Tc { command: String, reason: String },
}

impl NetworkError {
    /// Returns whether the client caused the error.
    pub fn is_invalid_request(&self) -> bool {
        matches!(self, NetworkError::InvalidRule { .. })
    }
}

/// The operator's network settings.
#[derive(Debug, Clone, Default)]
pub struct NetworkSettings {
    pub external_ip: Option<Ipv4Addr>,
    pub dns_servers: Vec<Ipv4Addr>,
    pub additional_dns_servers: Vec<Ipv4Addr>,
    pub additional_host_entries: Vec<String>,
    pub deny_networks: Vec<Ipv4Network>,
    pub allow_host_access: bool,
    /// 0 means the MTU of the interface holding the external IP.
    pub mtu: u32,
    /// How long a bridge without containers is kept for reuse.
    pub bridge_idle_time: Duration,
}

/// Digits of the names derived from addresses: letters and digits only,
/// because the names end up in interface names and nft identifiers.
const NAME_DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// Returns an IPv4 address in six base-62 digits (62^6 > 2^32).
pub fn address_id(address: Ipv4Addr) -> String {
    let mut value = u64::from(u32::from(address));
    let mut digits = [b'0'; 6];
    for digit in digits.iter_mut().rev() {
        *digit = NAME_DIGITS[(value % 62) as usize];
        value /= 62;
    }
    String::from_utf8(digits.to_vec()).expect("digits are ASCII")
}

/// Returns the prefix of the server's interface names: the tag, cut to 8
/// bytes so that prefix, kind letter and six digits fit the kernel's 15.
///
/// NOTE: two tags that share their first 8 bytes share this prefix, and
/// their servers then see each other's links as their own at start-up.
pub fn link_prefix(tag: &str) -> String {
    tag.chars().take(8).collect()
}

/// Returns six random name digits.
fn random_id() -> String {
    let mut value = uuid::Uuid::new_v4().as_u128();
    let mut digits = [b'0'; 6];
    for digit in &mut digits {
        *digit = NAME_DIGITS[(value % 62) as usize];
        value /= 62;
    }
    String::from_utf8(digits.to_vec()).expect("digits are ASCII")
}

/// Names of one container's host objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkNames {
    /// The bridge of the container's subnet.
    pub bridge: String,
    /// The host end of the container's veth pair.
    pub host_veth: String,
    /// Suffix of the container's nft chains.
    pub chain_id: String,
}

impl LinkNames {
    /// Names for a new container: its host veth gets a random name.
    pub fn new(prefix: &str, allocation: &NetworkAllocation) -> LinkNames {
        LinkNames::with_host_veth(prefix, allocation, format!("{prefix}h{}", random_id()))
    }

    /// Names of an existing container whose host veth is `host_veth`.
    /// Releases before random names derived it from the container's
    /// address, which [`LinkNames::derived_host_veth`] returns.
    pub fn with_host_veth(prefix: &str, allocation: &NetworkAllocation, host_veth: String) -> LinkNames {
        LinkNames {
            bridge: format!("{prefix}b{}", address_id(allocation.subnet.network())),
            host_veth,
            chain_id: address_id(allocation.container_ip),
        }
    }

    /// Returns the host veth name that earlier releases derived from the
    /// container's address.
    pub fn derived_host_veth(prefix: &str, allocation: &NetworkAllocation) -> String {
        format!("{prefix}h{}", address_id(allocation.container_ip))
    }
}

/// The server's links, guarded by one lock that also serialises every
/// change of links and of the table, so a bridge is never deleted while
/// a create attaches to it.
#[derive(Debug, Default)]
struct LinkBook {
    /// Containers per subnet.
    users: HashMap<Ipv4Network, usize>,
    /// Bridges without containers, by name, with when their last container
    /// went.
    idle: HashMap<String, Instant>,
    /// Bridges the janitor is deleting, outside the lock.
    deleting: HashSet<String>,
    /// Host veths left to the kernel, with when to check that they went.
    dying_veths: Vec<(String, Instant)>,
    stopping: bool,
}

/// The book and the condition the janitor and waiting creates wait on.
#[derive(Debug, Default)]
struct Links {
    book: Mutex<LinkBook>,
    changed: Condvar,
}

impl Links {
    fn lock(&self) -> MutexGuard<'_, LinkBook> {
        self.book.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Locks the book once the janitor is not deleting `bridge`.
    fn lock_for_bridge(&self, bridge: &str) -> MutexGuard<'_, LinkBook> {
        let mut book = self.lock();
        while book.deleting.contains(bridge) {
            book = self.changed.wait(book).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        book
    }
}

/// Deletes idle bridges once they have been idle for `idle_time`, and host
/// veths that outlived their namespace. Sleeps until the next deadline or
/// a change; returns once the book is marked as stopping.
fn janitor(links: Arc<Links>, idle_time: Duration, logger: slog::Logger) {
    let mut book = links.lock();
    loop {
        if book.stopping {
            return;
        }
        let now = Instant::now();
        let bridges: Vec<String> = book.idle.iter().filter(|(_, since)| now >= **since + idle_time).map(|(name, _)| name.clone()).collect();
        // Veths due within a second are checked together, so a busy
        // server does not wake the janitor for each one.
        let batch_end = now + Duration::from_secs(1);
        let veths: Vec<String> = if book.dying_veths.iter().any(|(_, at)| now >= *at) {
            book.dying_veths.iter().filter(|(_, at)| *at <= batch_end).map(|(name, _)| name.clone()).collect()
        } else {
            Vec::new()
        };
        if bridges.is_empty() && veths.is_empty() {
            let next = book.idle.values().map(|since| *since + idle_time).chain(book.dying_veths.iter().map(|(_, at)| *at)).min();
            book = match next {
                Some(at) => links.changed.wait_timeout(book, at.saturating_duration_since(now)).unwrap_or_else(|poisoned| poisoned.into_inner()).0,
                None => links.changed.wait(book).unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
            continue;
        }
        if !veths.is_empty() {
            book.dying_veths.retain(|(_, at)| *at > batch_end);
        }
        for bridge in &bridges {
            book.idle.remove(bridge);
            book.deleting.insert(bridge.clone());
        }
        drop(book);

        let work_bridges = bridges.clone();
        let deleted = links::with_netlink(None, move |handle| async move {
            let mut outlived = Vec::new();
            if !veths.is_empty() {
                let existing: HashSet<String> = links::link_names(&handle).await?.into_iter().collect();
                for veth in veths.into_iter().filter(|veth| existing.contains(veth)) {
                    links::delete_link(&handle, &veth).await?;
                    outlived.push(veth);
                }
            }
            for bridge in &work_bridges {
                links::delete_link(&handle, bridge).await?;
            }
            Ok(outlived)
        });
        match deleted {
            Ok(outlived) => {
                for veth in outlived {
                    slog::warn!(logger, "a host veth outlived its container's network namespace and was deleted"; "link" => veth);
                }
                if !bridges.is_empty() {
                    slog::debug!(logger, "idle bridges deleted"; "bridges" => bridges.join(","));
                }
            }
            Err(error) => slog::warn!(logger, "deleting idle links failed"; "error" => %error),
        }

        book = links.lock();
        for bridge in &bridges {
            book.deleting.remove(bridge);
        }
        links.changed.notify_all();
    }
}

/// The server's side of networking, set up at start-up.
pub struct HostNetwork {
    settings: NetworkSettings,
    external_ip: Ipv4Addr,
    mtu: u32,
    table: String,
    prefix: String,
    resolv: resolv::ResolvSource,
    links: Arc<Links>,
    /// Links of this tag found at start-up that no restored container has
    /// claimed yet.
    startup_links: Mutex<HashSet<String>>,
    logger: slog::Logger,
}

impl HostNetwork {
    /// Checks the host, finds the external IP and MTU, notes the links left
    /// by an earlier server with this tag and writes a fresh table.
    pub fn start(settings: NetworkSettings, tag: &str, logger: slog::Logger) -> Result<HostNetwork, NetworkError> {
        nft::check_available(&logger)?;
        tc::check_available()?;
        // Containers' traffic is routed through the host.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|error| NetworkError::Host { operation: "enable net.ipv4.ip_forward".into(), reason: error.to_string() })?;

        let external_ip = match settings.external_ip {
            Some(address) => address,
            None => links::with_netlink(None, |handle| async move { links::default_route_source(&handle).await })?
                .ok_or(NetworkError::NoExternalIp)?,
        };
        let mtu = if settings.mtu > 0 {
            settings.mtu.min(MAX_MTU)
        } else {
            links::with_netlink(None, move |handle| async move { links::mtu_of_address(&handle, external_ip).await })?
                .unwrap_or(MAX_MTU)
                .min(MAX_MTU)
        };
        let resolv = resolv::ResolvSource::from_settings(&settings)?;
        let prefix = link_prefix(tag);
        let table = format!("trellis_{tag}");

        // Links of this tag that exist now belong to containers of an
        // earlier server. Restore claims those of the containers it brings
        // back, and `remove_unclaimed_links` deletes the rest.
        let stale_prefix = prefix.clone();
        let found = links::with_netlink(None, move |handle| async move {
            let names = links::link_names(&handle).await?;
            Ok(names.into_iter().filter(|name| is_container_link(&stale_prefix, name)).collect::<Vec<_>>())
        })?;

        probe_link_types(&prefix)?;
        warn_about_forward_drops(&logger);

        let network = HostNetwork {
            external_ip,
            mtu,
            table,
            prefix,
            resolv,
            links: Arc::new(Links::default()),
            startup_links: Mutex::new(found.into_iter().collect()),
            logger,
            settings,
        };
        nft::apply(&nft::table_script(&network.table_settings()))?;
        let janitor_links = network.links.clone();
        let idle_time = network.settings.bridge_idle_time;
        let janitor_logger = network.logger.clone();
        std::thread::Builder::new()
            .name("trellis-links".into())
            .spawn(move || janitor(janitor_links, idle_time, janitor_logger))
            .map_err(|error| NetworkError::Host { operation: "start the link janitor thread".into(), reason: error.to_string() })?;
        slog::info!(network.logger, "network ready";
            "external_ip" => %external_ip, "mtu" => mtu, "table" => &network.table,
            "deny_networks" => network.settings.deny_networks.len());
        Ok(network)
    }

    fn table_settings(&self) -> nft::TableSettings {
        nft::TableSettings {
            table: self.table.clone(),
            bridge_prefix: format!("{}b", self.prefix),
            external_ip: self.external_ip,
            deny_networks: self.settings.deny_networks.clone(),
            allow_host_access: self.settings.allow_host_access,
            dns_servers: self.settings.dns_servers.iter().chain(&self.settings.additional_dns_servers).copied().collect(),
            dns_through_gateway: self.resolv.uses_gateway(),
        }
    }

    pub fn external_ip(&self) -> Ipv4Addr {
        self.external_ip
    }

    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Returns the `/etc/hosts` of a container.
    pub fn hosts_file(&self, allocation: &NetworkAllocation, hostname: &str) -> String {
        resolv::hosts_file(allocation.container_ip, hostname, &self.settings.additional_host_entries)
    }

    /// Returns the `/etc/resolv.conf` of a container.
    pub fn resolv_conf(&self, allocation: &NetworkAllocation) -> String {
        self.resolv.render(allocation.gateway, &self.settings.additional_dns_servers)
    }

    fn lock_links(&self) -> MutexGuard<'_, LinkBook> {
        self.links.lock()
    }


    /// Deletes the table, for a server that stops for good.
    pub fn remove_table(&self) -> Result<(), NetworkError> {
        nft::apply(&nft::delete_table_script(&self.table))
    }

    /// Reconnects a container restored after a restart. Its bridge and veth
    /// pair still exist, so only its part of the fresh table is added. A
    /// container whose host veth is gone is connected as new.
    pub fn reattach(self: &Arc<Self>, handle: &str, allocation: NetworkAllocation, init_pid: i32, host_veth: Option<&str>) -> Result<ContainerNetwork, NetworkError> {
        let host_veth = match host_veth {
            Some(name) => name.to_string(),
            // A container whose record names no veth: its link's peer is
            // the host end, whatever its name.
            None => host_veth_of(init_pid)?.unwrap_or_else(|| LinkNames::derived_host_veth(&self.prefix, &allocation)),
        };
        let names = LinkNames::with_host_veth(&self.prefix, &allocation, host_veth);
        let veth_exists = {
            let mut startup_links = self.startup_links.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let exists = startup_links.remove(&names.host_veth);
            startup_links.remove(&names.bridge);
            exists
        };
        if !veth_exists {
            return self.attach(handle, allocation, open_netns(init_pid)?);
        }
        let container = ContainerNetwork {
            host: self.clone(),
            handle: handle.to_string(),
            allocation,
            names,
            state: Mutex::new(AttachState::default()),
        };
        let mut book = self.links.lock_for_bridge(&container.names.bridge);
        let users = book.users.get(&allocation.subnet).copied().unwrap_or(0);
        let mut state = container.lock_state();
        state.veth_created = true;
        book.users.insert(allocation.subnet, users + 1);
        book.idle.remove(&container.names.bridge);
        state.counted = true;
        let bridge_prefix = format!("{}b", self.prefix);
        let rules = nft::ContainerRules { bridge_prefix: &bridge_prefix, ..container.rules() };
        let added = nft::apply(&nft::add_container_script(&rules, users == 0));
        state.rules_added = added.is_ok();
        drop(state);
        drop(book);
        if let Err(error) = added {
            if let Err(cleanup) = container.detach() {
                slog::warn!(self.logger, "rollback of a failed network reattach left objects behind"; "handle" => handle, "error" => %cleanup);
            }
            return Err(error);
        }
        Ok(container)
    }

    /// Deletes the links found at start-up that no restored container
    /// claimed, and returns their names.
    pub fn remove_unclaimed_links(&self) -> Result<Vec<String>, NetworkError> {
        let unclaimed: Vec<String> = {
            let mut startup_links = self.startup_links.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            startup_links.drain().collect()
        };
        if unclaimed.is_empty() {
            return Ok(unclaimed);
        }
        // Held so that no create attaches to a bridge being deleted.
        let _serial = self.lock_links();
        links::with_netlink(None, move |handle| async move {
            for name in &unclaimed {
                links::delete_link(&handle, name).await?;
            }
            Ok(unclaimed)
        })
    }

    /// Connects a container whose network namespace `netns` is: bridge,
    /// veth pair, addresses, routes and its part of the table. On failure
    /// everything added is removed again.
    pub fn attach(self: &Arc<Self>, handle: &str, allocation: NetworkAllocation, netns: File) -> Result<ContainerNetwork, NetworkError> {
        let container = ContainerNetwork {
            host: self.clone(),
            handle: handle.to_string(),
            allocation,
            names: LinkNames::new(&self.prefix, &allocation),
            state: Mutex::new(AttachState::default()),
        };
        match container.attach(netns) {
            Ok(()) => Ok(container),
            Err(error) => {
                if let Err(cleanup) = container.detach() {
                    slog::warn!(self.logger, "rollback of a failed network attach left objects behind"; "handle" => handle, "error" => %cleanup);
                }
                Err(error)
            }
        }
    }
}

impl Drop for HostNetwork {
    fn drop(&mut self) {
        self.lock_links().stopping = true;
        self.links.changed.notify_all();
    }
}

/// Returns the name of the host end of the veth pair whose other end is
/// the container link of process `pid`'s network namespace.
fn host_veth_of(pid: i32) -> Result<Option<String>, NetworkError> {
    let netns = open_netns(pid)?;
    let peer = links::with_netlink(Some(netns), |handle| async move { links::veth_peer_index(&handle, links::CONTAINER_INTERFACE).await })?;
    let Some(peer) = peer else { return Ok(None) };
    links::with_netlink(None, move |handle| async move { links::link_name_of_index(&handle, peer).await })
}

/// Opens the network namespace of process `pid`.
pub fn open_netns(pid: i32) -> Result<File, NetworkError> {
    let path = format!("/proc/{pid}/ns/net");
    File::open(&path).map_err(|error| NetworkError::Host { operation: format!("open {path}"), reason: error.to_string() })
}

/// Returns whether `name` is a bridge or host veth made by a server whose
/// link names start with `prefix`.
fn is_container_link(prefix: &str, name: &str) -> bool {
    name.len() == prefix.len() + 7 && name.starts_with(prefix) && matches!(name.as_bytes()[prefix.len()], b'b' | b'h')
}

/// Checks that the kernel can create the link types containers need, by
/// creating and deleting a bridge and a veth pair named with `prefix`.
fn probe_link_types(prefix: &str) -> Result<(), NetworkError> {
    let bridge = format!("{prefix}pbridge");
    // Seven characters after the prefix, as every name of this server.
    let veth = format!("{prefix}pvetha0");
    let peer = format!("{prefix}pvethb0");
    links::with_netlink(None, move |handle| async move {
        let created = handle.link().add(rtnetlink::LinkBridge::new(&bridge).build()).execute().await;
        links::delete_link(&handle, &bridge).await?;
        created.map_err(|error| NetworkError::Missing { what: format!("bridge links (kernel module `bridge`): creating one failed: {error}") })?;
        let created = handle.link().add(rtnetlink::LinkVeth::new(&veth, &peer).build()).execute().await;
        links::delete_link(&handle, &veth).await?;
        created.map_err(|error| NetworkError::Missing { what: format!("veth links (kernel module `veth`): creating one failed: {error}") })
    })
}

/// Logs a warning for each forward chain of another table whose policy is
/// drop: such a chain drops container traffic that this server's table
/// accepts, because an nftables accept ends only its own base chain.
fn warn_about_forward_drops(logger: &slog::Logger) {
    let text = match nft::query("list chains") {
        Ok(text) => text,
        Err(error) => {
            slog::warn!(logger, "listing the nftables chains failed, so forward chains that drop are not reported"; "error" => %error);
            return;
        }
    };
    let mut table = "";
    let mut chain = "";
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("table ") {
            table = rest.trim_end_matches('{').trim();
        } else if let Some(rest) = line.strip_prefix("chain ") {
            chain = rest.trim_end_matches('{').trim();
        } else if line.contains("hook forward") && line.contains("policy drop") {
            slog::warn!(logger, "a forward chain of another table drops packets by default, so container traffic may be dropped";
                "table" => table, "chain" => chain);
        }
    }
}

/// Progress of attach, so that detach undoes exactly the steps taken.
#[derive(Debug, Default)]
struct AttachState {
    /// Counted as a user of its subnet (and so of the bridge).
    counted: bool,
    rules_added: bool,
    veth_created: bool,
    host_ports: Vec<u16>,
}

/// One container's network objects.
pub struct ContainerNetwork {
    host: Arc<HostNetwork>,
    handle: String,
    allocation: NetworkAllocation,
    names: LinkNames,
    state: Mutex<AttachState>,
}

impl ContainerNetwork {
    fn lock_state(&self) -> MutexGuard<'_, AttachState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn rules(&self) -> nft::ContainerRules<'_> {
        nft::ContainerRules {
            table: &self.host.table,
            bridge_prefix: "",
            id: &self.names.chain_id,
            container_ip: self.allocation.container_ip,
            subnet: self.allocation.subnet,
            has_deny_networks: !self.host.settings.deny_networks.is_empty(),
        }
    }

    /// Creates the container's links and rules. The links (bridge, veth
    /// pair, and the container side inside its namespace) are made on a
    /// netlink thread while this thread applies the rules, which do not
    /// need the links to exist.
    fn attach(&self, netns: File) -> Result<(), NetworkError> {
        let subnet = self.allocation.subnet;
        let gateway = self.allocation.gateway;
        let container_ip = self.allocation.container_ip;
        let mtu = self.host.mtu;
        let bridge = self.names.bridge.clone();
        let host_veth = self.names.host_veth.clone();

        let mut book = self.host.links.lock_for_bridge(&bridge);
        let users = book.users.get(&subnet).copied().unwrap_or(0);
        book.idle.remove(&bridge);
        book.users.insert(subnet, users + 1);
        let mut state = self.lock_state();
        state.counted = true;

        let netlink = std::thread::Builder::new().name("netlink".into()).spawn(move || {
            let container_netns = netns
                .try_clone()
                .map_err(|error| (false, NetworkError::Host { operation: "duplicate a namespace descriptor".into(), reason: error.to_string() }))?;
            // The host side first: the peer can only be configured once
            // it exists. Then this thread, which ends with the work, enters
            // the container's namespace.
            links::on_this_thread(None, move |handle| async move {
                let bridge_index = links::ensure_bridge(&handle, &bridge, gateway, subnet.prefix(), mtu).await?;
                links::create_veth(&handle, &host_veth, bridge_index, mtu, &netns).await
            })
            .map_err(|error| (false, error))?;
            links::on_this_thread(Some(container_netns), move |handle| async move {
                links::configure_container_side(&handle, container_ip, subnet.prefix(), gateway).await
            })
            .map_err(|error| (true, error))
        });
        let bridge_prefix = format!("{}b", self.host.prefix);
        let rules = nft::ContainerRules { bridge_prefix: &bridge_prefix, ..self.rules() };
        let applied = nft::apply(&nft::add_container_script(&rules, users == 0));
        state.rules_added = applied.is_ok();
        let linked = match netlink {
            Ok(thread) => thread.join().unwrap_or_else(|_| Err((true, NetworkError::Netlink { operation: "netlink thread".into(), reason: "the thread panicked".into() }))),
            Err(error) => Err((false, NetworkError::Netlink { operation: "starting a netlink thread".into(), reason: error.to_string() })),
        };
        // A failure after the veth was made leaves it for detach.
        state.veth_created = match &linked {
            Ok(()) => true,
            Err((made, _)) => *made,
        };
        drop(state);
        drop(book);
        applied?;
        linked.map_err(|(_, error)| error)
    }

    /// Maps `host_port` on the external IP to `container_port`.
    pub fn net_in(&self, host_port: u16, container_port: u16) -> Result<(), NetworkError> {
        let _serial = self.host.lock_links();
        let mut state = self.lock_state();
        nft::apply(&nft::net_in_script(&self.rules(), host_port, container_port))?;
        state.host_ports.push(host_port);
        Ok(())
    }

    /// Adds net-out rules, all or none.
    pub fn net_out(&self, rules: &[NetOutRule]) -> Result<(), NetworkError> {
        let script = nft::net_out_script(&self.rules(), &self.handle, rules)?;
        if script.is_empty() {
            return Ok(());
        }
        let _serial = self.host.lock_links();
        nft::apply(&script)
    }

    /// Sets the bandwidth limit of the container's link in both
    /// directions; a zero rate removes it.
    pub fn set_bandwidth(&self, limits: &BandwidthLimits) -> Result<(), NetworkError> {
        tc::apply(&self.names.host_veth, limits, self.host.mtu)?;
        let burst = tc::effective_burst(limits, self.host.mtu);
        let _serial = self.host.lock_links();
        nft::apply(&nft::bandwidth_script(&self.rules(), limits.rate, burst))
    }

    /// Removes what attach, net-in and net-out added. Objects already
    /// gone count as removed. The kernel deletes the veth pair with the
    /// container's network namespace. A bridge whose last container this
    /// was stays idle for reuse, and the janitor deletes it later.
    pub fn detach(&self) -> Result<(), NetworkError> {
        let subnet = self.allocation.subnet;
        let mut book = self.host.lock_links();
        let mut state = self.lock_state();
        let users = book.users.get(&subnet).copied().unwrap_or(0);
        let last = state.counted && users <= 1;

        if state.rules_added {
            nft::apply(&nft::delete_container_script(&self.rules(), &state.host_ports, last))?;
            state.rules_added = false;
            state.host_ports.clear();
        }
        let now = Instant::now();
        if state.veth_created {
            book.dying_veths.push((self.names.host_veth.clone(), now + VETH_CHECK_DELAY));
            state.veth_created = false;
        }
        if state.counted {
            if users <= 1 {
                book.users.remove(&subnet);
                book.idle.insert(self.names.bridge.clone(), now);
            } else {
                book.users.insert(subnet, users - 1);
            }
            state.counted = false;
        }
        self.host.links.changed.notify_all();
        Ok(())
    }

    pub fn allocation(&self) -> &NetworkAllocation {
        &self.allocation
    }

    pub fn names(&self) -> &LinkNames {
        &self.names
    }

    /// Returns a snapshot for the introspection endpoint.
    pub fn describe(&self) -> serde_json::Value {
        let state = self.lock_state();
        serde_json::json!({
            "container_ip": self.allocation.container_ip.to_string(),
            "gateway": self.allocation.gateway.to_string(),
            "subnet": self.allocation.subnet.to_string(),
            "bridge": self.names.bridge,
            "host_veth": self.names.host_veth,
            "host_ports": state.host_ports,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interface_limit() {
        let allocation = NetworkAllocation {
            subnet: "255.255.255.252/30".parse().unwrap(),
            gateway: "255.255.255.253".parse().unwrap(),
            container_ip: "255.255.255.254".parse().unwrap(),
            dynamic: false,
        };
        let names = LinkNames::new(&link_prefix("sixteencharacter"), &allocation);
        assert_eq!(names.bridge.len(), 15);
        assert_eq!(names.host_veth.len(), 15);
        assert!(names.bridge.starts_with("sixteenc"));
        assert_ne!(names.bridge, names.host_veth);
    }

    #[test]
    fn address_ids_are_distinct_and_fixed_width() {
        assert_eq!(address_id(Ipv4Addr::new(0, 0, 0, 0)), "000000");
        assert_eq!(address_id(Ipv4Addr::new(0, 0, 0, 61)), "00000Z");
        assert_eq!(address_id(Ipv4Addr::new(0, 0, 0, 62)), "000010");
        assert_ne!(address_id(Ipv4Addr::new(10, 254, 0, 2)), address_id(Ipv4Addr::new(10, 254, 0, 6)));
        assert_eq!(address_id(Ipv4Addr::new(255, 255, 255, 255)).len(), 6);
    }
}
