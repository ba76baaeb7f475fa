//! Trellis: a Garden-compatible container server for Linux.
//!
//! Module map:
//!
//! - [`api`]: Garden's wire types and Go-compatible JSON decoding, shared by
//!   the server and the client.
//! - [`client`]: the Rust Garden client, hijacked process routes included.
//! - [`http`]: the HTTP front end: plain routes on actix-web, a connection
//!   demux in front of it for the four hijacked process routes, and the
//!   error envelope.
//! - [`actors`]: the supervisor core: Registry, Container, Process, Reaper.
//! - [`pools`]: SubnetPool, PortPool and UidPool actors.
//! - [`runtime`]: the boundary between actors and kernel work, its stdio
//!   framing, and the in-memory runtime for tests.
//! - [`linux`]: the Linux runtime: namespaces, garden-init, the process shim,
//!   the tar helper of stream in and out, root filesystems and mounts,
//!   cgroups, users.
//! - [`cli`]: the `trellis` subcommands.
//! - [`config`]: the server configuration file and flags.
//! - [`logging`]: the log level that the debug listener can change.
//! - [`state`]: the per-container state file in the depot, which a
//!   restarted server rebuilds its containers from.
//!
//! `api` and `client` depend on neither actix nor `linux`.

pub mod actors;
pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod http;
pub mod linux;
pub mod logging;
pub mod pools;
pub mod runtime;
pub mod state;
