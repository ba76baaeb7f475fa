//! The SubnetPool: gives each container a subnet and an address, as
//! Garden's `network` spec field requests.
//!
//! Without a `network` field a container gets the lowest free /30 block of
//! the dynamic pool: the gateway (host side) at N+1 and the container at
//! N+2. With `a.b.c.d/n` (or `a.b.c.d`, read as /30) it gets an address in
//! that static subnet, which must lie outside the dynamic pool and may be
//! shared by several containers: the network address asks for the next
//! free address, any other address for exactly that one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use actix::prelude::*;
use ipnetwork::Ipv4Network;

/// A failed subnet or address allocation. The messages are Garden's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("invalid CIDR address: {text}")]
    InvalidCidr { text: String },
    #[error("the requested subnet ({subnet}) overlaps the dynamic allocation range ({pool})")]
    OverlapsPool { subnet: Ipv4Network, pool: Ipv4Network },
    #[error("the requested subnet ({subnet}) overlaps an existing subnet ({other})")]
    OverlapsSubnet { subnet: Ipv4Network, other: Ipv4Network },
    #[error("a container IP must not equal the gateway IP")]
    GatewayAddress { ip: Ipv4Addr },
    #[error("a container IP must not equal the broadcast IP")]
    BroadcastAddress { ip: Ipv4Addr },
    #[error("the requested IP is already allocated")]
    AddressTaken { ip: Ipv4Addr },
    #[error("insufficient subnets remaining in the pool")]
    SubnetsExhausted { pool: Ipv4Network },
    #[error("insufficient IPs remaining in the pool")]
    AddressesExhausted { subnet: Ipv4Network },
}

/// The network of one container: its subnet, the gateway on the host side
/// and its own address. Stored with the container so that a restarted
/// server can claim it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkAllocation {
    #[serde(with = "cidr_text")]
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub container_ip: Ipv4Addr,
    /// Whether the subnet is a block of the dynamic pool.
    pub dynamic: bool,
}

/// Serialises a subnet as its CIDR text, such as `10.254.0.0/30`.
mod cidr_text {
    use ipnetwork::Ipv4Network;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(subnet: &Ipv4Network, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(subnet)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Ipv4Network, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|_| serde::de::Error::custom(format!("invalid CIDR address: {text}")))
    }
}

/// The request of a spec's `network` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubnetRequest {
    /// A /30 block of the dynamic pool.
    Dynamic,
    /// An address in a static subnet: `None` takes the next free one.
    Static { subnet: Ipv4Network, ip: Option<Ipv4Addr> },
}

impl SubnetRequest {
    /// Parses the `network` field: empty, `a.b.c.d/n` or `a.b.c.d` (a /30).
    pub fn parse(text: &str) -> Result<SubnetRequest, SubnetError> {
        if text.is_empty() {
            return Ok(SubnetRequest::Dynamic);
        }
        let invalid = || SubnetError::InvalidCidr { text: text.to_string() };
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, prefix.parse::<u8>().map_err(|_| invalid())?),
            None => (text, 30),
        };
        let ip: Ipv4Addr = address.parse().map_err(|_| invalid())?;
        let subnet = Ipv4Network::new(ip, prefix).map_err(|_| invalid())?;
        let subnet = Ipv4Network::new(subnet.network(), prefix).map_err(|_| invalid())?;
        let ip = if ip == subnet.network() { None } else { Some(ip) };
        Ok(SubnetRequest::Static { subnet, ip })
    }
}

/// Returns the gateway of a subnet: its first address after the network
/// address.
fn gateway_of(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

/// Returns whether two subnets share any address.
fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Allocation state, without the actor.
#[derive(Debug, Clone)]
pub struct Subnets {
    pool: Ipv4Network,
    /// Indexes of the allocated /30 blocks of the dynamic pool.
    dynamic: BTreeSet<u32>,
    /// Static subnets in use, each with its allocated container addresses.
    statics: BTreeMap<Ipv4Network, BTreeSet<Ipv4Addr>>,
}

impl Subnets {
    pub fn new(pool: Ipv4Network) -> Subnets {
        Subnets { pool, dynamic: BTreeSet::new(), statics: BTreeMap::new() }
    }

    /// Number of /30 blocks in the dynamic pool.
    pub fn capacity(&self) -> u32 {
        1u32 << (30 - u32::from(self.pool.prefix().min(30)))
    }

    fn block(&self, index: u32) -> Ipv4Network {
        let base = u32::from(self.pool.network()) + index * 4;
        Ipv4Network::new(Ipv4Addr::from(base), 30).expect("a /30 prefix is valid")
    }

    /// Allocates a subnet and address for `request`.
    pub fn allocate(&mut self, request: SubnetRequest) -> Result<NetworkAllocation, SubnetError> {
        match request {
            SubnetRequest::Dynamic => {
                let index = (0..self.capacity())
                    .find(|index| !self.dynamic.contains(index))
                    .ok_or(SubnetError::SubnetsExhausted { pool: self.pool })?;
                self.dynamic.insert(index);
                let subnet = self.block(index);
                let gateway = gateway_of(subnet);
                let container_ip = Ipv4Addr::from(u32::from(gateway) + 1);
                Ok(NetworkAllocation { subnet, gateway, container_ip, dynamic: true })
            }
            SubnetRequest::Static { subnet, ip } => self.allocate_static(subnet, ip),
        }
    }

    fn allocate_static(&mut self, subnet: Ipv4Network, ip: Option<Ipv4Addr>) -> Result<NetworkAllocation, SubnetError> {
        if overlaps(subnet, self.pool) {
            return Err(SubnetError::OverlapsPool { subnet, pool: self.pool });
        }
        if let Some(other) = self.statics.keys().find(|other| **other != subnet && overlaps(**other, subnet)) {
            return Err(SubnetError::OverlapsSubnet { subnet, other: *other });
        }
        let gateway = gateway_of(subnet);
        let broadcast = subnet.broadcast();
        let taken = self.statics.get(&subnet).cloned().unwrap_or_default();
        let container_ip = match ip {
            Some(ip) if ip == gateway => return Err(SubnetError::GatewayAddress { ip }),
            Some(ip) if ip == broadcast => return Err(SubnetError::BroadcastAddress { ip }),
            Some(ip) if taken.contains(&ip) => return Err(SubnetError::AddressTaken { ip }),
            Some(ip) => ip,
            None => {
                // Skips the network address, the gateway and the broadcast
                // address.
                let first = u32::from(gateway) + 1;
                let last = u32::from(broadcast);
                (first..last)
                    .map(Ipv4Addr::from)
                    .find(|candidate| !taken.contains(candidate))
                    .ok_or(SubnetError::AddressesExhausted { subnet })?
            }
        };
        self.statics.entry(subnet).or_default().insert(container_ip);
        Ok(NetworkAllocation { subnet, gateway, container_ip, dynamic: false })
    }

    /// Marks an allocation as taken again (used when state is rebuilt).
    pub fn claim(&mut self, allocation: &NetworkAllocation) -> Result<(), SubnetError> {
        if allocation.dynamic {
            let index = (u32::from(allocation.subnet.network()) - u32::from(self.pool.network())) / 4;
            if !self.dynamic.insert(index) {
                return Err(SubnetError::AddressTaken { ip: allocation.container_ip });
            }
            return Ok(());
        }
        self.allocate_static(allocation.subnet, Some(allocation.container_ip)).map(|_| ())
    }

    /// Returns an allocation to the pool; releasing one that is not held
    /// does nothing. Returns whether its subnet is now unused.
    pub fn release(&mut self, allocation: &NetworkAllocation) -> bool {
        if allocation.dynamic {
            if self.pool.contains(allocation.subnet.network()) {
                let index = (u32::from(allocation.subnet.network()) - u32::from(self.pool.network())) / 4;
                self.dynamic.remove(&index);
            }
            return true;
        }
        let Some(addresses) = self.statics.get_mut(&allocation.subnet) else {
            return true;
        };
        addresses.remove(&allocation.container_ip);
        if addresses.is_empty() {
            self.statics.remove(&allocation.subnet);
            return true;
        }
        false
    }

    /// Number of allocated container addresses, dynamic and static.
    pub fn allocated_count(&self) -> usize {
        self.dynamic.len() + self.statics.values().map(BTreeSet::len).sum::<usize>()
    }
}

/// The pool actor.
pub struct SubnetPool {
    mailbox: crate::actors::stats::MailboxStats,
    subnets: Subnets,
}

impl SubnetPool {
    pub fn new(pool: Ipv4Network) -> SubnetPool {
        SubnetPool { mailbox: Default::default(), subnets: Subnets::new(pool) }
    }
}

impl Actor for SubnetPool {
    type Context = Context<Self>;
}

/// Allocates a container's network from the text of its spec's `network`
/// field.
#[derive(Message)]
#[rtype(result = "Result<NetworkAllocation, SubnetError>")]
pub struct AllocateNetwork {
    pub network: String,
}

impl Handler<AllocateNetwork> for SubnetPool {
    type Result = Result<NetworkAllocation, SubnetError>;

    fn handle(&mut self, message: AllocateNetwork, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let request = SubnetRequest::parse(&message.network)?;
        self.subnets.allocate(request)
    }
}

/// Marks the allocation of a restored container as taken again.
#[derive(Message)]
#[rtype(result = "Result<(), SubnetError>")]
pub struct ClaimNetwork {
    pub allocation: NetworkAllocation,
}

impl Handler<ClaimNetwork> for SubnetPool {
    type Result = Result<(), SubnetError>;

    fn handle(&mut self, message: ClaimNetwork, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        self.subnets.claim(&message.allocation)
    }
}

/// Returns a container's network to the pool.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseNetwork {
    pub allocation: NetworkAllocation,
}

impl Handler<ReleaseNetwork> for SubnetPool {
    type Result = ();

    fn handle(&mut self, message: ReleaseNetwork, _ctx: &mut Context<Self>) {
        self.mailbox.count();
        self.subnets.release(&message.allocation);
    }
}

impl Handler<crate::actors::Introspect> for SubnetPool {
    type Result = ResponseFuture<serde_json::Value>;

    fn handle(&mut self, _message: crate::actors::Introspect, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let mailbox = crate::actors::stats::measure_mailbox(self, ctx);
        let mut snapshot = serde_json::json!({
            "pool": self.subnets.pool.to_string(),
            "capacity": self.subnets.capacity(),
            "allocated": self.subnets.allocated_count(),
            "dynamic_allocated": self.subnets.dynamic.len(),
            "static_subnets": self.subnets.statics.keys().map(ToString::to_string).collect::<Vec<_>>(),
        });
        Box::pin(async move {
            snapshot["mailbox"] = mailbox.await;
            snapshot
        })
    }
}

crate::impl_mailbox_probe!(SubnetPool, mailbox);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(text: &str) -> Ipv4Network {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    fn request(text: &str) -> SubnetRequest {
        SubnetRequest::parse(text).unwrap()
    }

    #[test]
    fn dynamic_lowest_free_block_first() {
        let mut subnets = Subnets::new(net("10.254.0.0/22"));
        assert_eq!(subnets.capacity(), 256);
        let first = subnets.allocate(SubnetRequest::Dynamic).unwrap();
        assert_eq!(first.subnet, net("10.254.0.0/30"));
        assert_eq!(first.gateway, ip("10.254.0.1"));
        assert_eq!(first.container_ip, ip("10.254.0.2"));
        let second = subnets.allocate(SubnetRequest::Dynamic).unwrap();
        assert_eq!(second.subnet, net("10.254.0.4/30"));
        subnets.allocate(SubnetRequest::Dynamic).unwrap();
        subnets.release(&second);
        assert_eq!(subnets.allocate(SubnetRequest::Dynamic).unwrap().subnet, net("10.254.0.4/30"));
        assert_eq!(subnets.allocate(SubnetRequest::Dynamic).unwrap().subnet, net("10.254.0.12/30"));
    }

    #[test]
    fn dynamic_exhaustion() {
        let mut subnets = Subnets::new(net("10.0.0.0/29"));
        subnets.allocate(SubnetRequest::Dynamic).unwrap();
        subnets.allocate(SubnetRequest::Dynamic).unwrap();
        let error = subnets.allocate(SubnetRequest::Dynamic).unwrap_err();
        assert_eq!(error.to_string(), "insufficient subnets remaining in the pool");
    }

    #[test]
    fn parse_network_field() {
        assert_eq!(request(""), SubnetRequest::Dynamic);
        assert_eq!(request("10.9.0.0/24"), SubnetRequest::Static { subnet: net("10.9.0.0/24"), ip: None });
        assert_eq!(request("10.9.0.7/24"), SubnetRequest::Static { subnet: net("10.9.0.0/24"), ip: Some(ip("10.9.0.7")) });
        assert_eq!(request("10.9.0.6"), SubnetRequest::Static { subnet: net("10.9.0.4/30"), ip: Some(ip("10.9.0.6")) });
        for bad in ["10.9.0.0/33", "10.9.0/24", "banana", "10.9.0.0/", "/24", "10.9.0.0/x"] {
            let error = SubnetRequest::parse(bad).unwrap_err();
            assert_eq!(error.to_string(), format!("invalid CIDR address: {bad}"));
        }
    }

    #[test]
    fn static_next_free_and_exact() {
        let mut subnets = Subnets::new(net("10.254.0.0/22"));
        let first = subnets.allocate(request("10.9.0.0/29")).unwrap();
        assert_eq!(first.gateway, ip("10.9.0.1"));
        assert_eq!(first.container_ip, ip("10.9.0.2"));
        let exact = subnets.allocate(request("10.9.0.5/29")).unwrap();
        assert_eq!(exact.container_ip, ip("10.9.0.5"));
        let next = subnets.allocate(request("10.9.0.0/29")).unwrap();
        assert_eq!(next.container_ip, ip("10.9.0.3"));
        assert_eq!(subnets.allocate(request("10.9.0.0/29")).unwrap().container_ip, ip("10.9.0.4"));
        assert_eq!(subnets.allocate(request("10.9.0.0/29")).unwrap().container_ip, ip("10.9.0.6"));
        let full = subnets.allocate(request("10.9.0.0/29")).unwrap_err();
        assert_eq!(full.to_string(), "insufficient IPs remaining in the pool");
    }

    #[test]
    fn static_errors() {
        let mut subnets = Subnets::new(net("10.254.0.0/22"));
        let error = subnets.allocate(request("10.254.1.0/24")).unwrap_err();
        assert_eq!(error.to_string(), "the requested subnet (10.254.1.0/24) overlaps the dynamic allocation range (10.254.0.0/22)");
        let error = subnets.allocate(request("10.0.0.0/8")).unwrap_err();
        assert!(matches!(error, SubnetError::OverlapsPool { .. }), "{error}");

        subnets.allocate(request("10.9.0.0/24")).unwrap();
        let error = subnets.allocate(request("10.9.0.0/16")).unwrap_err();
        assert_eq!(error.to_string(), "the requested subnet (10.9.0.0/16) overlaps an existing subnet (10.9.0.0/24)");
        let error = subnets.allocate(request("10.9.0.1/24")).unwrap_err();
        assert_eq!(error.to_string(), "a container IP must not equal the gateway IP");
        let error = subnets.allocate(request("10.9.0.255/24")).unwrap_err();
        assert_eq!(error.to_string(), "a container IP must not equal the broadcast IP");
        let error = subnets.allocate(request("10.9.0.2/24")).unwrap_err();
        assert_eq!(error.to_string(), "the requested IP is already allocated");
        assert_eq!(subnets.allocated_count(), 1);
    }

    #[test]
    fn static_subnet_freed_with_last_address() {
        let mut subnets = Subnets::new(net("10.254.0.0/22"));
        let a = subnets.allocate(request("10.9.0.0/24")).unwrap();
        let b = subnets.allocate(request("10.9.0.0/24")).unwrap();
        assert!(!subnets.release(&a));
        assert!(subnets.release(&b));
        // The subnet is gone, so a wider one no longer overlaps anything.
        subnets.allocate(request("10.9.0.0/16")).unwrap();
    }

    proptest! {
        /// Any sequence of dynamic allocations and releases hands out each
        /// block at most once and always the lowest free one, and releasing
        /// everything makes the pool full again.
        #[test]
        fn dynamic_blocks_unique_and_lowest(operations in proptest::collection::vec(any::<(bool, u8)>(), 1..200)) {
            let mut subnets = Subnets::new(net("10.254.0.0/26"));
            let mut held: Vec<NetworkAllocation> = Vec::new();
            for (allocate, pick) in operations {
                if allocate || held.is_empty() {
                    match subnets.allocate(SubnetRequest::Dynamic) {
                        Ok(allocation) => {
                            let lowest = (0..16u32)
                                .map(|index| Ipv4Network::new(Ipv4Addr::from(u32::from(ip("10.254.0.0")) + index * 4), 30).unwrap())
                                .find(|block| !held.iter().any(|other| other.subnet == *block))
                                .unwrap();
                            prop_assert_eq!(allocation.subnet, lowest);
                            held.push(allocation);
                        }
                        Err(error) => {
                            prop_assert_eq!(held.len(), 16);
                            let exhausted = matches!(error, SubnetError::SubnetsExhausted { .. });
                            prop_assert!(exhausted, "unexpected error {}", error);
                        }
                    }
                } else {
                    let allocation = held.remove(usize::from(pick) % held.len());
                    subnets.release(&allocation);
                }
            }
            for allocation in held.drain(..) {
                subnets.release(&allocation);
            }
            prop_assert_eq!(subnets.allocated_count(), 0);
        }
    }

    #[actix::test]
    async fn actor_allocates_and_releases() {
        let pool = SubnetPool::new(net("10.200.0.0/24")).start();
        let allocation = pool.send(AllocateNetwork { network: String::new() }).await.unwrap().unwrap();
        assert_eq!(allocation.subnet, net("10.200.0.0/30"));
        pool.send(ReleaseNetwork { allocation }).await.unwrap();
        let again = pool.send(AllocateNetwork { network: String::new() }).await.unwrap().unwrap();
        assert_eq!(again.subnet, net("10.200.0.0/30"));
        let error = pool.send(AllocateNetwork { network: "nonsense".into() }).await.unwrap().unwrap_err();
        assert_eq!(error.to_string(), "invalid CIDR address: nonsense");
    }
}
