//! The SubnetPool: hands out /30 blocks of the dynamic network pool, lowest
//! free block first.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use actix::prelude::*;
use ipnetwork::Ipv4Network;

/// A failed subnet allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("no free /30 subnet left in the pool {pool}")]
    Exhausted { pool: Ipv4Network },
    #[error("subnet {subnet} is not a /30 block of the pool {pool}")]
    NotInPool { subnet: Ipv4Network, pool: Ipv4Network },
    #[error("subnet {subnet} is already allocated")]
    InUse { subnet: Ipv4Network },
}

/// Allocation state of the dynamic pool, without the actor.
#[derive(Debug, Clone)]
pub struct Subnets {
    pool: Ipv4Network,
    /// Indexes of allocated blocks.
    allocated: BTreeSet<u32>,
}

impl Subnets {
    pub fn new(pool: Ipv4Network) -> Subnets {
        Subnets { pool, allocated: BTreeSet::new() }
    }

    /// Number of /30 blocks in the pool.
    pub fn capacity(&self) -> u32 {
        1u32 << (30 - u32::from(self.pool.prefix()))
    }

    fn block(&self, index: u32) -> Ipv4Network {
        let base = u32::from(self.pool.network()) + index * 4;
        Ipv4Network::new(Ipv4Addr::from(base), 30).expect("a /30 prefix is valid")
    }

    /// Allocates the lowest free block.
    pub fn allocate(&mut self) -> Result<Ipv4Network, SubnetError> {
        let index = (0..self.capacity())
            .find(|index| !self.allocated.contains(index))
            .ok_or(SubnetError::Exhausted { pool: self.pool })?;
        self.allocated.insert(index);
        Ok(self.block(index))
    }

    /// Marks a given block as allocated (used when state is rebuilt).
    pub fn claim(&mut self, subnet: Ipv4Network) -> Result<(), SubnetError> {
        let index = self.index_of(subnet)?;
        if !self.allocated.insert(index) {
            return Err(SubnetError::InUse { subnet });
        }
        Ok(())
    }

    /// Returns a block to the pool; releasing a free block does nothing.
    pub fn release(&mut self, subnet: Ipv4Network) -> Result<(), SubnetError> {
        let index = self.index_of(subnet)?;
        self.allocated.remove(&index);
        Ok(())
    }

    fn index_of(&self, subnet: Ipv4Network) -> Result<u32, SubnetError> {
        let not_in_pool = SubnetError::NotInPool { subnet, pool: self.pool };
        if subnet.prefix() != 30 || subnet.network() != subnet.ip() || !self.pool.contains(subnet.network()) {
            return Err(not_in_pool);
        }
        Ok((u32::from(subnet.network()) - u32::from(self.pool.network())) / 4)
    }

    pub fn allocated_count(&self) -> usize {
        self.allocated.len()
    }
}

/// The pool actor.
pub struct SubnetPool {
    subnets: Subnets,
}

impl SubnetPool {
    pub fn new(pool: Ipv4Network) -> SubnetPool {
        SubnetPool { subnets: Subnets::new(pool) }
    }
}

impl Actor for SubnetPool {
    type Context = Context<Self>;
}

/// Allocates the lowest free /30 block.
#[derive(Message)]
#[rtype(result = "Result<Ipv4Network, SubnetError>")]
pub struct AllocateSubnet;

impl Handler<AllocateSubnet> for SubnetPool {
    type Result = Result<Ipv4Network, SubnetError>;

    fn handle(&mut self, _message: AllocateSubnet, _ctx: &mut Context<Self>) -> Self::Result {
        self.subnets.allocate()
    }
}

/// Returns a block to the pool.
#[derive(Message)]
#[rtype(result = "Result<(), SubnetError>")]
pub struct ReleaseSubnet {
    pub subnet: Ipv4Network,
}

impl Handler<ReleaseSubnet> for SubnetPool {
    type Result = Result<(), SubnetError>;

    fn handle(&mut self, message: ReleaseSubnet, _ctx: &mut Context<Self>) -> Self::Result {
        self.subnets.release(message.subnet)
    }
}

impl Handler<crate::actors::Introspect> for SubnetPool {
    type Result = MessageResult<crate::actors::Introspect>;

    fn handle(&mut self, _message: crate::actors::Introspect, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(serde_json::json!({
            "pool": self.subnets.pool.to_string(),
            "capacity": self.subnets.capacity(),
            "allocated": self.subnets.allocated_count(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Ipv4Network {
        text.parse().unwrap()
    }

    #[test]
    fn lowest_free_block_first() {
        let mut subnets = Subnets::new(net("10.254.0.0/22"));
        assert_eq!(subnets.capacity(), 256);
        assert_eq!(subnets.allocate().unwrap(), net("10.254.0.0/30"));
        assert_eq!(subnets.allocate().unwrap(), net("10.254.0.4/30"));
        assert_eq!(subnets.allocate().unwrap(), net("10.254.0.8/30"));
        subnets.release(net("10.254.0.4/30")).unwrap();
        assert_eq!(subnets.allocate().unwrap(), net("10.254.0.4/30"));
        assert_eq!(subnets.allocate().unwrap(), net("10.254.0.12/30"));
    }

    #[test]
    fn exhaustion_and_foreign_blocks() {
        let mut subnets = Subnets::new(net("10.0.0.0/29"));
        subnets.allocate().unwrap();
        subnets.allocate().unwrap();
        assert!(matches!(subnets.allocate(), Err(SubnetError::Exhausted { .. })));
        assert!(matches!(subnets.release(net("10.1.0.0/30")), Err(SubnetError::NotInPool { .. })));
        assert!(matches!(subnets.claim(net("10.0.0.4/30")), Err(SubnetError::InUse { .. })));
    }

    #[actix::test]
    async fn actor_allocates() {
        let pool = SubnetPool::new(net("10.200.0.0/24")).start();
        assert_eq!(pool.send(AllocateSubnet).await.unwrap().unwrap(), net("10.200.0.0/30"));
        pool.send(ReleaseSubnet { subnet: net("10.200.0.0/30") }).await.unwrap().unwrap();
        assert_eq!(pool.send(AllocateSubnet).await.unwrap().unwrap(), net("10.200.0.0/30"));
    }
}
