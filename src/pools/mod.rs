//! Resource pools, each an actor around pure allocation logic:
//! [`subnet::SubnetPool`] (container /30 blocks), [`port::PortPool`]
//! (host ports for net-in) and [`uid::UidPool`] (the user namespace
//! mapping shared by unprivileged containers).

pub mod port;
pub mod subnet;
pub mod uid;

/// The addresses of the two network pool actors, which containers return
/// their subnet and host ports to.
#[derive(Clone)]
pub struct NetworkPools {
    pub subnets: actix::Addr<subnet::SubnetPool>,
    pub ports: actix::Addr<port::PortPool>,
}
