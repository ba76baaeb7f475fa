//! The supervisor core: one actor per container and per process, and the
//! registry that maps handles to containers.
//!
//! - [`registry::Registry`] reserves handles, enforces the container limit
//!   and guards against a second destroy of the same handle.
//! - [`container::Container`] owns one container's spec, state, properties
//!   and process table, and calls the runtime off the actor thread.
//! - [`process::Process`] fans a process's output out to every attached
//!   client and forwards stdin, signals and resizes to its shim.
//! - [`reaper::Reaper`] destroys containers left idle for their grace time.
//! - [`oom::OomWatcher`] reports a container's out-of-memory kills to its
//!   container actor.

pub mod container;
pub mod oom;
pub mod process;
pub mod reaper;
pub mod registry;
pub mod stats;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use crate::api::{self, ErrorEnvelope};
use crate::runtime::RuntimeError;

pub use container::Container;
pub use process::Process;
pub use registry::Registry;

/// A failed container or process operation, classified by the error the
/// client receives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    #[error("unknown handle: {handle}")]
    NotFound { handle: String },
    #[error("unknown process: {process_id}")]
    ProcessNotFound { process_id: String },
    #[error("Handle '{handle}' already in use")]
    HandleInUse { handle: String },
    #[error("invalid handle {handle:?}: {reason}")]
    InvalidHandle { handle: String, reason: String },
    #[error("max containers reached")]
    MaxContainersReached,
    #[error("Cannot provide both Image.URI and RootFSPath")]
    BothImageAndRootfs,
    #[error("container already being destroyed")]
    AlreadyDestroying { handle: String },
    #[error("container is stopped")]
    Stopped { handle: String },
    #[error("container is being created")]
    BeingCreated { handle: String },
    #[error("process ID '{process_id}' already in use")]
    ProcessIdInUse { process_id: String },
    #[error("property does not exist: {key}")]
    PropertyNotFound { key: String },
    #[error("unprivileged containers are unavailable: {reason}")]
    NoIdMapping { reason: String },
    #[error("failed to write the state file {path}: {reason}")]
    StateFile { path: String, reason: String },
    #[error("{source}")]
    Runtime {
        #[from]
        source: RuntimeError,
    },
    /// The spec's `network` field cannot be served (Garden's texts).
    #[error("{message}")]
    Network { message: String },
    /// A net-in request cannot be served: a port out of range, taken, or
    /// none left in the pool.
    #[error("{message}")]
    InvalidNetIn { message: String },
    #[error("internal error: {operation} did not complete because an actor stopped")]
    Mailbox { operation: &'static str },
}

impl ContainerError {
    /// Returns the HTTP status and the error envelope Garden sends for this
    /// error.
    pub fn to_envelope(&self) -> (u16, ErrorEnvelope) {
        let mut envelope = ErrorEnvelope { message: self.to_string(), ..ErrorEnvelope::default() };
        let status = match self {
            ContainerError::NotFound { handle } => {
                envelope.error_type = api::ERROR_CONTAINER_NOT_FOUND.into();
                envelope.handle = handle.clone();
                404
            }
            ContainerError::ProcessNotFound { process_id } => {
                envelope.error_type = api::ERROR_PROCESS_NOT_FOUND.into();
                envelope.process_id = process_id.clone();
                404
            }
            ContainerError::Runtime { source: RuntimeError::ExecutableNotFound { .. } } => {
                envelope.error_type = api::ERROR_EXECUTABLE_NOT_FOUND.into();
                500
            }
            ContainerError::Runtime { source: RuntimeError::Unavailable { .. } } => {
                envelope.error_type = api::ERROR_SERVICE_UNAVAILABLE.into();
                500
            }
            _ => 500,
        };
        (status, envelope)
    }

    /// Returns whether the error is the client's doing (logged at info)
    /// rather than a fault of the server.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            ContainerError::StateFile { .. }
                | ContainerError::Mailbox { .. }
                | ContainerError::NoIdMapping { .. }
                | ContainerError::Runtime { source: RuntimeError::Failed { .. } | RuntimeError::Unavailable { .. } }
        )
    }
}

/// Server-wide map from stream id to the process it belongs to. The stdout
/// and stderr attaches name only the stream id.
pub type StreamTable = Arc<DashMap<String, actix::Addr<Process>>>;

/// Server-wide source of stream ids, counting up as the Go server does. A
/// server with a depot starts after the ids of earlier runs, so a late
/// attach with an old id never finds another process's stream.
#[derive(Debug, Clone, Default)]
pub struct StreamIds(Arc<AtomicU64>);

impl StreamIds {
    /// Returns a source whose first id is `last + 1`.
    pub fn starting_after(last: u64) -> Self {
        StreamIds(Arc::new(AtomicU64::new(last)))
    }

    /// Returns the next unused stream id.
    pub fn next(&self) -> String {
        (self.0.fetch_add(1, Ordering::Relaxed) + 1).to_string()
    }
}

/// A request for an owned snapshot of an actor's state, for the
/// introspection endpoint.
#[derive(Debug, actix::Message)]
#[rtype(result = "serde_json::Value")]
pub struct Introspect;
