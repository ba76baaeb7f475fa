//! Resource pools, each an actor around pure allocation logic:
//! [`subnet::SubnetPool`] (container /30 blocks), [`port::PortPool`]
//! (host ports for net-in) and [`uid::UidPool`] (the user namespace
//! mapping shared by unprivileged containers).

pub mod port;
pub mod subnet;
pub mod uid;
