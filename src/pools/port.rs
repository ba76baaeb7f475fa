//! The PortPool: hands out host ports for net-in, first in first out, so a
//! released port is reused as late as possible. A host port that a client
//! names explicitly is reserved too, inside the range or outside it, so no
//! two mappings share a host port.

use std::collections::{BTreeSet, VecDeque};

use actix::prelude::*;

/// A failed port allocation. The messages are Garden's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("port pool is exhausted")]
    Exhausted { start: u16, end: u32 },
    #[error("port already acquired: {port}")]
    Unavailable { port: u16 },
}

/// Allocation state, without the actor.
#[derive(Debug, Clone)]
pub struct Ports {
    start: u16,
    end: u32,
    free: VecDeque<u16>,
    allocated: BTreeSet<u16>,
    /// Explicit host ports outside the range, reserved while mapped.
    outside: BTreeSet<u16>,
}

impl Ports {
    /// A pool of `size` ports from `start`; the range must end at or below 65536.
    pub fn new(start: u16, size: u32) -> Ports {
        let end = (u32::from(start) + size).min(65536);
        Ports { start, end, free: (u32::from(start)..end).map(|port| port as u16).collect(), allocated: BTreeSet::new(), outside: BTreeSet::new() }
    }

    fn in_range(&self, port: u16) -> bool {
        port >= self.start && u32::from(port) < self.end
    }

    /// Takes the port that has been free the longest.
    pub fn allocate(&mut self) -> Result<u16, PortError> {
        let port = self.free.pop_front().ok_or(PortError::Exhausted { start: self.start, end: self.end })?;
        self.allocated.insert(port);
        Ok(port)
    }

    /// Takes a specific port: one of the pool leaves the queue, one outside
    /// the range is only recorded. Fails when the port is already taken.
    pub fn claim(&mut self, port: u16) -> Result<(), PortError> {
        if !self.in_range(port) {
            if !self.outside.insert(port) {
                return Err(PortError::Unavailable { port });
            }
            return Ok(());
        }
        let position = self.free.iter().position(|&free| free == port).ok_or(PortError::Unavailable { port })?;
        self.free.remove(position);
        self.allocated.insert(port);
        Ok(())
    }

    /// Puts a port at the back of the queue; a port not allocated is ignored.
    pub fn release(&mut self, port: u16) {
        if self.outside.remove(&port) {
            return;
        }
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
    mailbox: crate::actors::stats::MailboxStats,
    ports: Ports,
}

impl PortPool {
    pub fn new(start: u16, size: u32) -> PortPool {
        PortPool { mailbox: Default::default(), ports: Ports::new(start, size) }
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
        self.mailbox.count();
        self.ports.allocate()
    }
}

/// Reserves a host port that the client named.
#[derive(Message)]
#[rtype(result = "Result<(), PortError>")]
pub struct ClaimPort {
    pub port: u16,
}

impl Handler<ClaimPort> for PortPool {
    type Result = Result<(), PortError>;

    fn handle(&mut self, message: ClaimPort, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        self.ports.claim(message.port)
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
        self.mailbox.count();
        self.ports.release(message.port);
    }
}

impl Handler<crate::actors::Introspect> for PortPool {
    type Result = ResponseFuture<serde_json::Value>;

    fn handle(&mut self, _message: crate::actors::Introspect, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let mailbox = crate::actors::stats::measure_mailbox(self, ctx);
        let mut snapshot = serde_json::json!({
            "start": self.ports.start,
            "end": self.ports.end,
            "free": self.ports.free_count(),
            "allocated": self.ports.allocated.len(),
            "outside_range": self.ports.outside.len(),
        });
        Box::pin(async move {
            snapshot["mailbox"] = mailbox.await;
            snapshot
        })
    }
}

crate::impl_mailbox_probe!(PortPool, mailbox);

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
        let error = ports.allocate().unwrap_err();
        assert_eq!(error.to_string(), "port pool is exhausted");
    }

    #[test]
    fn explicit_ports_reserved() {
        let mut ports = Ports::new(61001, 3);
        ports.claim(61002).unwrap();
        assert_eq!(ports.claim(61002).unwrap_err().to_string(), "port already acquired: 61002");
        ports.claim(8080).unwrap();
        assert_eq!(ports.claim(8080).unwrap_err().to_string(), "port already acquired: 8080");
        assert_eq!(ports.allocate().unwrap(), 61001);
        assert_eq!(ports.allocate().unwrap(), 61003);
        ports.release(8080);
        ports.claim(8080).unwrap();
        ports.release(61002);
        assert_eq!(ports.allocate().unwrap(), 61002);
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
