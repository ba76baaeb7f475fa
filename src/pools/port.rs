//! The PortPool: hands out host ports for net-in, first in first out, so a
//! released port is reused as late as possible.

use std::collections::{BTreeSet, VecDeque};

use actix::prelude::*;

/// A failed port allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("no free host port left in the pool {start}..{end}")]
    Exhausted { start: u16, end: u32 },
    #[error("host port {port} is not in the pool or already allocated")]
    Unavailable { port: u16 },
}

/// Allocation state, without the actor.
#[derive(Debug, Clone)]
pub struct Ports {
    start: u16,
    end: u32,
    free: VecDeque<u16>,
    allocated: BTreeSet<u16>,
}

impl Ports {
    /// A pool of `size` ports from `start`; the range must end at or below 65536.
    pub fn new(start: u16, size: u32) -> Ports {
        let end = (u32::from(start) + size).min(65536);
        Ports { start, end, free: (u32::from(start)..end).map(|port| port as u16).collect(), allocated: BTreeSet::new() }
    }

    /// Takes the port that has been free the longest.
    pub fn allocate(&mut self) -> Result<u16, PortError> {
        let port = self.free.pop_front().ok_or(PortError::Exhausted { start: self.start, end: self.end })?;
        self.allocated.insert(port);
        Ok(port)
    }

    /// Takes a specific port of the pool (used when state is rebuilt).
    pub fn claim(&mut self, port: u16) -> Result<(), PortError> {
        let position = self.free.iter().position(|&free| free == port).ok_or(PortError::Unavailable { port })?;
        self.free.remove(position);
        self.allocated.insert(port);
        Ok(())
    }

    /// Puts a port at the back of the queue; a port not allocated is ignored.
    pub fn release(&mut self, port: u16) {
        if self.allocated.remove(&port) {
            self.free.push_back(port);
        }
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }
}

/// The pool actor.
pub struct PortPool {
    ports: Ports,
}

impl PortPool {
    pub fn new(start: u16, size: u32) -> PortPool {
        PortPool { ports: Ports::new(start, size) }
    }
}

impl Actor for PortPool {
    type Context = Context<Self>;
}

/// Allocates a host port.
#[derive(Message)]
#[rtype(result = "Result<u16, PortError>")]
pub struct AllocatePort;

impl Handler<AllocatePort> for PortPool {
    type Result = Result<u16, PortError>;

    fn handle(&mut self, _message: AllocatePort, _ctx: &mut Context<Self>) -> Self::Result {
        self.ports.allocate()
    }
}

/// Returns a host port to the pool.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleasePort {
    pub port: u16,
}

impl Handler<ReleasePort> for PortPool {
    type Result = ();

    fn handle(&mut self, message: ReleasePort, _ctx: &mut Context<Self>) {
        self.ports.release(message.port);
    }
}

impl Handler<crate::actors::Introspect> for PortPool {
    type Result = MessageResult<crate::actors::Introspect>;

    fn handle(&mut self, _message: crate::actors::Introspect, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(serde_json::json!({
            "start": self.ports.start,
            "end": self.ports.end,
            "free": self.ports.free_count(),
            "allocated": self.ports.allocated.len(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_reuse() {
        let mut ports = Ports::new(61001, 3);
        assert_eq!(ports.allocate().unwrap(), 61001);
        assert_eq!(ports.allocate().unwrap(), 61002);
        ports.release(61001);
        assert_eq!(ports.allocate().unwrap(), 61003);
        assert_eq!(ports.allocate().unwrap(), 61001);
        assert!(matches!(ports.allocate(), Err(PortError::Exhausted { .. })));
    }

    #[test]
    fn claim_and_bounds() {
        let mut ports = Ports::new(65534, 10);
        assert_eq!(ports.free_count(), 2);
        ports.claim(65535).unwrap();
        assert_eq!(ports.claim(65535), Err(PortError::Unavailable { port: 65535 }));
        ports.release(1000);
        assert_eq!(ports.free_count(), 1);
    }

    #[actix::test]
    async fn actor_allocates() {
        let pool = PortPool::new(40000, 2).start();
        assert_eq!(pool.send(AllocatePort).await.unwrap().unwrap(), 40000);
        pool.send(ReleasePort { port: 40000 }).await.unwrap();
        assert_eq!(pool.send(AllocatePort).await.unwrap().unwrap(), 40001);
        let snapshot = pool.send(crate::actors::Introspect).await.unwrap();
        assert_eq!(snapshot["allocated"], 1);
        assert_eq!(snapshot["free"], 1);
    }
}
