//! Links, addresses and routes, over netlink in process (rtnetlink).
//!
//! Each call runs on a thread of its own with a current-thread tokio
//! runtime, because the callers are blocking runtime calls. A netlink
//! socket belongs to the network namespace of the thread that opens it, so
//! work inside a container's namespace first enters it with `setns` on
//! that thread.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::NetworkError;

/// Interface name of the container's end of its veth pair.
pub const CONTAINER_INTERFACE: &str = "eth0";

/// Runs `work` with a netlink handle on a new thread, inside the network
/// namespace `netns` when given (else the server's own).
pub fn with_netlink<T, F, Fut>(netns: Option<File>, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    // Only the new thread changes namespace, and it ends with the work.
    let thread = std::thread::Builder::new().name("netlink".into()).spawn(move || on_this_thread(netns, work));
    let thread = thread.map_err(|error| NetworkError::Netlink { operation: "starting a netlink thread".into(), reason: error.to_string() })?;
    thread
        .join()
        .map_err(|_| NetworkError::Netlink { operation: "netlink thread".into(), reason: "the thread panicked".into() })?
}

/// Runs `work` with a netlink handle on the calling thread, inside the
/// network namespace `netns` when given. The thread stays in that
/// namespace afterwards, so only a thread that ends with its work may pass
/// one.
pub fn on_this_thread<T, F, Fut>(netns: Option<File>, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    if let Some(netns) = netns {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|error| NetworkError::Netlink { operation: "entering the container's network namespace".into(), reason: error.to_string() })?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| NetworkError::Netlink { operation: "starting a netlink runtime".into(), reason: error.to_string() })?;
    runtime.block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|error| NetworkError::Netlink { operation: "opening a netlink socket".into(), reason: error.to_string() })?;
        let driver = tokio::spawn(connection);
        let result = work(handle).await;
        driver.abort();
        result
    })
}

fn failed(operation: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let operation = operation.into();
    move |error| NetworkError::Netlink { operation, reason: error.to_string() }
}

/// Returns whether a netlink error means "no such device".
fn is_not_found(error: &rtnetlink::Error) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(message) if message.raw_code() == -libc::ENODEV)
}

/// Returns the index of the link named `name`, if it exists.
pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        Err(error) if is_not_found(&error) => Ok(None),
        Err(error) => Err(failed(format!("looking up link {name}"))(error)),
    }
}

/// Returns the index of the peer of the veth `name` (its `IFLA_LINK`),
/// which lives in another namespace for a container's link.
pub async fn veth_peer_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    let link = match links.try_next().await {
        Ok(link) => link,
        Err(error) if is_not_found(&error) => None,
        Err(error) => return Err(failed(format!("looking up link {name}"))(error)),
    };
    Ok(link.and_then(|link| {
        link.attributes.iter().find_map(|attribute| match attribute {
            LinkAttribute::Link(index) => Some(*index),
            _ => None,
        })
    }))
}

/// Returns the name of the link with index `index`, if it exists.
pub async fn link_name_of_index(handle: &Handle, index: u32) -> Result<Option<String>, NetworkError> {
    let mut links = handle.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.as_ref().and_then(link_name).map(str::to_string)),
        Err(error) if is_not_found(&error) => Ok(None),
        Err(error) => Err(failed(format!("looking up link {index}"))(error)),
    }
}

/// Returns the name of a link message.
pub fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|attribute| match attribute {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// Lists the names of every link.
pub async fn link_names(handle: &Handle) -> Result<Vec<String>, NetworkError> {
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.map_err(failed("listing links"))?;
    Ok(links.iter().filter_map(link_name).map(str::to_string).collect())
}

/// Creates the bridge `name` with the gateway address unless it exists, and
/// returns its index.
pub async fn ensure_bridge(handle: &Handle, name: &str, gateway: Ipv4Addr, prefix: u8, mtu: u32) -> Result<u32, NetworkError> {
    if let Some(index) = link_index(handle, name).await? {
        return Ok(index);
    }
    handle
        .link()
        .add(LinkBridge::new(name).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(failed(format!("creating bridge {name}")))?;
    let index = link_index(handle, name)
        .await?
        .ok_or_else(|| NetworkError::Netlink { operation: format!("creating bridge {name}"), reason: "the bridge is missing after creation".into() })?;
    handle
        .address()
        .add(index, IpAddr::V4(gateway), prefix)
        .execute()
        .await
        .map_err(failed(format!("adding {gateway}/{prefix} to {name}")))?;
    Ok(index)
}

/// Creates a veth pair: `host_name` in the server's namespace, attached to
/// the bridge, and its peer [`CONTAINER_INTERFACE`] created directly inside
/// the namespace of `container_netns`.
pub async fn create_veth(handle: &Handle, host_name: &str, bridge: u32, mtu: u32, container_netns: &File) -> Result<u32, NetworkError> {
    // The peer carries IFLA_NET_NS_FD, so the kernel creates it in the
    // container's namespace: moving a link afterwards is much slower.
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(CONTAINER_INTERFACE.to_string())
        .mtu(mtu)
        .setns_by_fd(container_netns.as_raw_fd())
        .build();
    let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.to_string())
        .mtu(mtu)
        .controller(bridge)
        .up()
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    handle.link().add(message).execute().await.map_err(failed(format!("creating veth pair {host_name}")))?;
    link_index(handle, host_name)
        .await?
        .ok_or_else(|| NetworkError::Netlink { operation: format!("creating veth pair {host_name}"), reason: "the link is missing after creation".into() })
}

/// Deletes the link `name`; a missing link counts as deleted.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<(), NetworkError> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(error) if is_not_found(&error) => Ok(()),
        Err(error) => Err(failed(format!("deleting link {name}"))(error)),
    }
}

/// Configures the container's side, run inside its namespace: address and
/// link up, loopback up, default route via the gateway.
pub async fn configure_container_side(handle: &Handle, container_ip: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Result<(), NetworkError> {
    let index = link_index(handle, CONTAINER_INTERFACE)
        .await?
        .ok_or_else(|| NetworkError::Netlink { operation: "configuring the container link".into(), reason: format!("{CONTAINER_INTERFACE} is missing in the container") })?;
    handle
        .address()
        .add(index, IpAddr::V4(container_ip), prefix)
        .execute()
        .await
        .map_err(failed(format!("adding {container_ip}/{prefix} in the container")))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(failed("bringing the container link up"))?;
    if let Some(loopback) = link_index(handle, "lo").await? {
        handle
            .link()
            .set(LinkUnspec::new_with_index(loopback).up().build())
            .execute()
            .await
            .map_err(failed("bringing loopback up in the container"))?;
    }
    let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).output_interface(index).build();
    handle.route().add(route).execute().await.map_err(failed(format!("adding the default route via {gateway}")))?;
    Ok(())
}

/// Returns the address to use as external IP when the operator set none:
/// the preferred source of the default route, else the first IPv4 address
/// of its interface. Only the routing table is read; no packet is sent.
pub async fn default_route_source(handle: &Handle) -> Result<Option<Ipv4Addr>, NetworkError> {
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(failed("listing routes"))?;
    let Some(default) = routes.iter().find(|route| route.header.destination_prefix_length == 0 && route.header.table == 254) else {
        return Ok(None);
    };
    let mut interface = None;
    for attribute in &default.attributes {
        match attribute {
            RouteAttribute::PrefSource(rtnetlink::packet_route::route::RouteAddress::Inet(address)) => return Ok(Some(*address)),
            RouteAttribute::Oif(index) => interface = Some(*index),
            _ => {}
        }
    }
    let Some(interface) = interface else {
        return Ok(None);
    };
    Ok(interface_addresses(handle).await?.into_iter().find(|(index, _)| *index == interface).map(|(_, address)| address))
}

/// Lists every IPv4 address with the index of its link.
pub async fn interface_addresses(handle: &Handle) -> Result<Vec<(u32, Ipv4Addr)>, NetworkError> {
    let messages: Vec<_> = handle.address().get().execute().try_collect().await.map_err(failed("listing addresses"))?;
    let mut found = Vec::new();
    for message in messages {
        for attribute in &message.attributes {
            if let AddressAttribute::Address(IpAddr::V4(address)) = attribute {
                found.push((message.header.index, *address));
            }
        }
    }
    Ok(found)
}

/// Returns the MTU of the link that has `address`, if any link has it.
pub async fn mtu_of_address(handle: &Handle, address: Ipv4Addr) -> Result<Option<u32>, NetworkError> {
    let Some((index, _)) = interface_addresses(handle).await?.into_iter().find(|(_, found)| *found == address) else {
        return Ok(None);
    };
    let mut links = handle.link().get().match_index(index).execute();
    let link = links.try_next().await.map_err(failed("reading a link's MTU"))?;
    Ok(link.and_then(|link| {
        link.attributes.iter().find_map(|attribute| match attribute {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
    }))
}
