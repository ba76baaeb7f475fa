//! The Registry actor: maps handles to container actors.
//!
//! It validates and reserves handles in one step, so two creates of one
//! handle cannot both proceed, counts creates in progress against the
//! container limit, and refuses a second destroy of a handle whose destroy
//! is running. The work itself happens in the container actors and the
//! runtime.
//!
//! Before the server serves requests, [`Registry::restore_from_depot`]
//! rebuilds the containers of the previous run from their state files (see
//! [`crate::state`]) and removes what the depot and the host hold for
//! containers that cannot be restored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::{error, info, warn, Logger};

use super::container::{self, blocking, AdoptProcess, Container, ContainerState, DestroyContainer, GetProperties, NetIn, NetOut, PersistState};
use super::reaper::{Defuse, Reaper, Strap};
use super::stats::{measure_mailbox, MailboxStats};
use super::{ContainerError, Introspect, StreamTable};
use crate::api::ContainerSpec;
use crate::pools::port::ClaimPort;
use crate::pools::subnet::{AllocateNetwork, ClaimNetwork, ReleaseNetwork};
use crate::pools::uid::{AcquireIdMappings, ReleaseIdMappings, UidPool};
use crate::pools::NetworkPools;
use crate::runtime::stdio::{ShimFrame, StartFailure};
use crate::runtime::{ContainerConfig, ContainerRuntime, Runtime, StartedProcess, StdioConnection};
use crate::state::{self, StateError};

/// Maximum handle length, in bytes.
pub const MAX_HANDLE_LEN: usize = 255;

/// Settings of the registry, from the server configuration.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub depot: PathBuf,
    pub default_grace_time: Duration,
    /// Maximum number of containers, creates in progress included; zero
    /// means no limit.
    pub max_containers: u64,
    /// Counts out-of-memory kills across all containers, for the
    /// operator's metrics.
    pub oom_events: Arc<std::sync::atomic::AtomicU64>,
    /// Finished process records each container keeps; zero keeps all.
    pub max_finished_processes: usize,
}

enum Entry {
    Creating,
    Ready { addr: Addr<Container>, privileged: bool },
    Destroying { addr: Addr<Container>, privileged: bool },
}

/// The registry of containers.
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    runtime: Arc<dyn Runtime>,
    uid_pool: Addr<UidPool>,
    network_pools: NetworkPools,
    reaper: Addr<Reaper>,
    settings: RegistrySettings,
    stream_table: StreamTable,
    logger: Logger,
    mailbox: MailboxStats,
}

impl Registry {
    pub fn new(
        runtime: Arc<dyn Runtime>,
        uid_pool: Addr<UidPool>,
        network_pools: NetworkPools,
        reaper: Addr<Reaper>,
        settings: RegistrySettings,
        stream_table: StreamTable,
        logger: Logger,
    ) -> Registry {
        Registry {
            entries: BTreeMap::new(),
            runtime,
            uid_pool,
            network_pools,
            reaper,
            settings,
            stream_table,
            logger,
            mailbox: MailboxStats::default(),
        }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

/// Attempts of a destroy at start-up before the container is given up.
const STARTUP_DESTROY_ATTEMPTS: u32 = 3;
/// Pause between those attempts.
const STARTUP_DESTROY_PAUSE: Duration = Duration::from_secs(1);

impl Registry {
    /// Rebuilds the containers of the previous run from the depot, or with
    /// `destroy_all` destroys them all. Containers that cannot be restored
    /// (unreadable state, no runtime record, garden-init gone, a destroy
    /// that was under way) are destroyed. Host objects under the server's
    /// tag that no container owns are removed. Each of these is logged.
    ///
    /// Blocks on runtime calls, so it runs once at start-up before the
    /// registry takes messages. It must run inside the actix system, because
    /// it starts the restored actors.
    pub fn restore_from_depot(&mut self, destroy_all: bool) {
        let depot = self.settings.depot.clone();
        let entries = match std::fs::read_dir(&depot) {
            Ok(entries) => entries,
            Err(error) => {
                warn!(self.logger, "cannot list the depot; nothing restored"; "depot" => %depot.display(), "error" => %error);
                return;
            }
        };
        let mut owned = BTreeSet::new();
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let Some(handle) = entry.file_name().to_str().map(str::to_string) else {
                warn!(self.logger, "depot entry with an invalid handle as its name left in place"; "path" => %entry.path().display());
                continue;
            };
            // A destroyed container's directory that waits to be deleted
            // has a name no handle can have, and the runtime deletes it.
            if crate::linux::trash::is_discarded(&handle) {
                continue;
            }
            let dir = entry.path();
            if destroy_all {
                self.destroy_at_startup(&handle, &dir, "destroy-containers-on-startup is set");
                continue;
            }
            match self.restore_one(&handle, &dir) {
                Restore::Served | Restore::LeftInPlace => {
                    owned.insert(handle);
                }
                Restore::Destroyed => {}
            }
        }
        for removed in self.runtime.remove_orphans(&owned) {
            warn!(self.logger, "orphan removed at start-up"; "object" => removed);
        }
        info!(self.logger, "containers restored"; "count" => self.entries.len());
    }

    /// Restores one container directory, or destroys it when it cannot be
    /// restored.
    fn restore_one(&mut self, handle: &str, dir: &Path) -> Restore {
        let record = match state::read_record(dir) {
            Ok(record) => record,
            Err(error @ StateError::NewerVersion { .. }) => {
                // A newer server's container is neither served nor
                // destroyed: a downgrade must not lose it.
                error!(self.logger, "container not restored and left in place"; "handle" => handle,
                    "reason" => crate::linux::error_chain(&error));
                self.keep_in_place(handle, dir);
                return Restore::LeftInPlace;
            }
            Err(error) => {
                self.destroy_at_startup(handle, dir, &crate::linux::error_chain(&error));
                return Restore::Destroyed;
            }
        };
        if record.state == ContainerState::Destroying {
            self.destroy_at_startup(handle, dir, "its destroy was under way when the previous server stopped");
            return Restore::Destroyed;
        }
        let network = container::NetworkRecord::from_record(record.network.as_ref());
        let config = ContainerConfig {
            handle: handle.to_string(),
            spec: record.spec.clone(),
            container_dir: dir.to_path_buf(),
            id_mappings: record.id_mappings.clone(),
            network: network.allocation,
        };
        let restored = match self.runtime.restore(&config) {
            Ok(restored) => restored,
            Err(error) => {
                self.destroy_at_startup(handle, dir, &format!("its host objects cannot be found: {error}"));
                return Restore::Destroyed;
            }
        };
        if !restored.init_alive {
            warn!(self.logger, "container destroyed at start-up"; "handle" => handle, "reason" => "its garden-init is gone");
            self.destroy_runtime_with_retries(handle, restored.container.as_ref());
            return Restore::Destroyed;
        }

        // The pools take back the subnet and host ports before the listener
        // is bound, so no request can be given them first.
        if let Some(allocation) = network.allocation {
            self.network_pools.subnets.do_send(ClaimNetwork { allocation });
        }
        for mapping in &network.mapped_ports {
            if let Ok(port) = u16::try_from(mapping.host_port) {
                self.network_pools.ports.do_send(ClaimPort { port });
            }
        }
        let privileged = record.spec.privileged;
        let grace_time = record.grace_time;
        let processes = restored.container.reattach_processes();
        let container = Container::restore(
            record,
            restored.container,
            dir.to_path_buf(),
            self.stream_table.clone(),
            &self.logger,
            self.network_pools.clone(),
        )
            .with_oom_counter(self.settings.oom_events.clone())
            .with_max_finished_processes(self.settings.max_finished_processes);
        let addr = container.start();
        for (process_id, result) in processes {
            let started = result.unwrap_or_else(|error| {
                // The process stays known, and an attach reports the error
                // as its end.
                warn!(self.logger, "process cannot be reattached"; "handle" => handle, "process_id" => &process_id, "error" => %error);
                let mut frames = bytes::BytesMut::new();
                ShimFrame::StartFailed { failure: StartFailure::Other, message: error.to_string() }.encode(&mut frames);
                StartedProcess { pid: 0, stdio: StdioConnection::Replay(frames.to_vec()) }
            });
            addr.do_send(AdoptProcess { process_id, started });
        }
        if !privileged {
            self.uid_pool.do_send(AcquireIdMappings);
        }
        self.entries.insert(handle.to_string(), Entry::Ready { addr, privileged });
        self.reaper.do_send(Strap { handle: handle.to_string(), grace_time });
        info!(self.logger, "container restored"; "handle" => handle);
        Restore::Served
    }

    /// Keeps what a container left in place holds: its subnet and host ports
    /// go back to their pools as taken, and its links stay. Only the
    /// `network` field of the newer format is read, as this release writes
    /// it. A container whose field cannot be read keeps only its links.
    fn keep_in_place(&self, handle: &str, dir: &Path) {
        let value: Option<serde_json::Value> = std::fs::read(dir.join(state::STATE_FILE)).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
        if value.is_none() {
            warn!(self.logger, "the state of a container left in place is not JSON, so its address and ports may be given again"; "handle" => handle);
        }
        let network = container::NetworkRecord::from_record(value.as_ref().and_then(|value| value.get("network")));
        if let Some(allocation) = network.allocation {
            self.network_pools.subnets.do_send(ClaimNetwork { allocation });
        }
        let mut kept = crate::runtime::KeptNetwork { allocation: network.allocation, mapped_ports: Vec::new(), net_out: network.net_out.clone() };
        for mapping in &network.mapped_ports {
            if let (Ok(port), Ok(container_port)) = (u16::try_from(mapping.host_port), u16::try_from(mapping.container_port)) {
                self.network_pools.ports.do_send(ClaimPort { port });
                kept.mapped_ports.push((port, container_port));
            }
        }
        self.runtime.keep_in_place(handle, dir, &kept);
    }

    /// Destroys a container found at start-up that is not served, through
    /// the runtime's restore when possible, else by removing what its
    /// directory and tag name.
    fn destroy_at_startup(&self, handle: &str, dir: &Path, reason: &str) {
        warn!(self.logger, "container destroyed at start-up"; "handle" => handle, "reason" => reason);
        let record = state::read_record(dir).ok();
        let restored = record.and_then(|record| {
            let config = ContainerConfig {
                handle: handle.to_string(),
                spec: record.spec,
                container_dir: dir.to_path_buf(),
                id_mappings: record.id_mappings,
                network: None,
            };
            self.runtime.restore(&config).ok()
        });
        match restored {
            Some(restored) => self.destroy_runtime_with_retries(handle, restored.container.as_ref()),
            None => {
                if let Err(error) = self.runtime.remove_unrestorable(handle, dir) {
                    error!(self.logger, "removing a container at start-up failed"; "handle" => handle, "error" => %error);
                }
            }
        }
    }

    fn destroy_runtime_with_retries(&self, handle: &str, container: &dyn ContainerRuntime) {
        for attempt in 1..=STARTUP_DESTROY_ATTEMPTS {
            match container.destroy() {
                Ok(()) => return,
                Err(error) => {
                    error!(self.logger, "destroying a container at start-up failed"; "handle" => handle,
                        "attempt" => attempt, "error" => %error);
                    if attempt < STARTUP_DESTROY_ATTEMPTS {
                        std::thread::sleep(STARTUP_DESTROY_PAUSE);
                    }
                }
            }
        }
    }
}

/// The outcome of start-up for one depot directory.
enum Restore {
    /// The container is restored and served.
    Served,
    /// The container and its host objects are destroyed.
    Destroyed,
    /// The directory is neither served nor touched, and its host objects
    /// count as owned (a newer server's format).
    LeftInPlace,
}

/// Checks a client-chosen handle: 1 to 255 bytes of `A-Z a-z 0-9 _ . + -`,
/// and not `.` or `..`. The handle names the container's state directory, and
/// the bulk routes split handle lists on commas.
pub fn validate_handle(handle: &str) -> Result<(), ContainerError> {
    let invalid = |reason: &str| ContainerError::InvalidHandle { handle: handle.to_string(), reason: reason.to_string() };
    if handle.is_empty() || handle.len() > MAX_HANDLE_LEN {
        return Err(invalid("a handle must be 1 to 255 bytes long"));
    }
    if handle == "." || handle == ".." {
        return Err(invalid("a handle must not be . or .."));
    }
    if !handle.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'+' | b'-')) {
        return Err(invalid("a handle may only contain letters, digits and _ . + -"));
    }
    Ok(())
}

/// Creates a container.
#[derive(Message)]
#[rtype(result = "Result<String, ContainerError>")]
pub struct CreateContainer {
    pub spec: ContainerSpec,
}

impl Handler<CreateContainer> for Registry {
    type Result = ResponseActFuture<Self, Result<String, ContainerError>>;

    fn handle(&mut self, message: CreateContainer, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let mut spec = message.spec;
        if spec.grace_time == 0 {
            spec.grace_time = i64::try_from(self.settings.default_grace_time.as_nanos()).unwrap_or(i64::MAX);
        }
        if spec.handle.is_empty() {
            spec.handle = uuid::Uuid::new_v4().to_string();
        }
        let handle = spec.handle.clone();
        let checks = validate_handle(&handle).and_then(|()| {
            if !spec.image.uri.is_empty() && !spec.rootfs.is_empty() {
                return Err(ContainerError::BothImageAndRootfs);
            }
            self.runtime.check_spec(&spec)?;
            if self.settings.max_containers > 0 && self.entries.len() as u64 >= self.settings.max_containers {
                return Err(ContainerError::MaxContainersReached);
            }
            if self.entries.contains_key(&handle) {
                return Err(ContainerError::HandleInUse { handle: handle.clone() });
            }
            Ok(())
        });
        if let Err(error) = checks {
            return Box::pin(fut::ready(Err(error)));
        }
        self.entries.insert(handle.clone(), Entry::Creating);

        let runtime = self.runtime.clone();
        let uid_pool = self.uid_pool.clone();
        let network_pools = self.network_pools.clone();
        let container_dir = self.settings.depot.join(&handle);
        let stream_table = self.stream_table.clone();
        let oom_events = self.settings.oom_events.clone();
        let logger = self.logger.clone();
        let privileged = spec.privileged;
        let grace_time = spec.grace_time;
        let max_finished_processes = self.settings.max_finished_processes;
        let create = async move {
            let allocation = network_pools
                .subnets
                .send(AllocateNetwork { network: spec.network.clone() })
                .await
                .map_err(|_| ContainerError::Mailbox { operation: "allocating a subnet" })?
                .map_err(|error| ContainerError::Network { message: error.to_string() })?;
            let release_network = || network_pools.subnets.do_send(ReleaseNetwork { allocation });
            let id_mappings = if privileged {
                None
            } else {
                let mappings = uid_pool
                    .send(AcquireIdMappings)
                    .await
                    .map_err(|_| ContainerError::Mailbox { operation: "acquiring id mappings" })
                    .and_then(|result| result.map_err(|reason| ContainerError::NoIdMapping { reason }));
                match mappings {
                    Ok(mappings) => Some(mappings),
                    Err(error) => {
                        release_network();
                        return Err(error);
                    }
                }
            };
            let config = ContainerConfig {
                handle: spec.handle.clone(),
                spec: spec.clone(),
                container_dir: container_dir.clone(),
                id_mappings: id_mappings.clone(),
                network: Some(allocation),
            };
            let created = create_in_runtime(runtime, config).await;
            state::fault_point("create.after-runtime");
            let container_runtime = match created {
                Ok(container_runtime) => container_runtime,
                Err(error) => {
                    if !privileged {
                        uid_pool.do_send(ReleaseIdMappings);
                    }
                    release_network();
                    return Err(error);
                }
            };
            let net_in = spec.netin.clone();
            let net_out = spec.netout_rules.clone();
            let container = Container::new(
                spec.handle.clone(),
                spec,
                container_runtime.clone(),
                id_mappings,
                container_dir,
                stream_table,
                &logger,
                Some(allocation),
                network_pools.clone(),
            )
            .with_oom_counter(oom_events)
            .with_max_finished_processes(max_finished_processes);
            let addr = container.start();
            let persisted = apply_spec_network(&addr, net_in, net_out).await.and(
                addr.send(PersistState)
                    .await
                    .map_err(|_| ContainerError::Mailbox { operation: "writing the container state" })
                    .and_then(|result| result),
            );
            if let Err(error) = persisted {
                // Roll back: the container exists in the runtime but the
                // server could not record it.
                // The actor returns the network and ports once its destroy
                // succeeds.
                match addr.send(DestroyContainer).await {
                    Ok(Ok(())) => {}
                    Ok(Err(cleanup)) => warn!(logger, "rollback of container failed"; "error" => %cleanup),
                    Err(_) => {
                        if let Err(cleanup) = blocking(move || container_runtime.destroy()).await {
                            warn!(logger, "rollback of container failed"; "error" => %cleanup);
                        }
                    }
                }
                if !privileged {
                    uid_pool.do_send(ReleaseIdMappings);
                }
                return Err(error);
            }
            state::fault_point("create.after-persist");
            Ok(addr)
        };
        Box::pin(create.into_actor(self).map(move |result, registry, _| match result {
            Ok(addr) => {
                registry.entries.insert(handle.clone(), Entry::Ready { addr, privileged });
                registry.reaper.do_send(Strap { handle: handle.clone(), grace_time });
                Ok(handle)
            }
            Err(error) => {
                registry.entries.remove(&handle);
                Err(error)
            }
        }))
    }
}

/// Applies the `NetIn` and `NetOut` entries of a spec to a new container.
async fn apply_spec_network(addr: &Addr<Container>, net_in: Vec<crate::api::NetIn>, net_out: Vec<crate::api::NetOutRule>) -> Result<(), ContainerError> {
    for mapping in net_in {
        addr.send(NetIn { host_port: mapping.host_port, container_port: mapping.container_port })
            .await
            .map_err(|_| ContainerError::Mailbox { operation: "applying the spec's net-in" })??;
    }
    if !net_out.is_empty() {
        addr.send(NetOut { rules: net_out }).await.map_err(|_| ContainerError::Mailbox { operation: "applying the spec's net-out" })??;
    }
    Ok(())
}

/// Makes the container directory and calls the runtime; removes the
/// directory again when the runtime fails.
async fn create_in_runtime(
    runtime: Arc<dyn Runtime>,
    config: ContainerConfig,
) -> Result<Arc<dyn crate::runtime::ContainerRuntime>, ContainerError> {
    blocking(move || {
        std::fs::create_dir_all(&config.container_dir).map_err(|error| {
            crate::runtime::RuntimeError::failed(format!(
                "cannot create the container directory {}: {error}",
                config.container_dir.display()
            ))
        })?;
        let result = runtime.create(&config);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&config.container_dir);
        }
        result
    })
    .await
}

/// Looks up a container by handle.
#[derive(Message)]
#[rtype(result = "Result<Addr<Container>, ContainerError>")]
pub struct LookupContainer {
    pub handle: String,
}

impl Handler<LookupContainer> for Registry {
    type Result = Result<Addr<Container>, ContainerError>;

    fn handle(&mut self, message: LookupContainer, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        match self.entries.get(&message.handle) {
            Some(Entry::Ready { addr, .. } | Entry::Destroying { addr, .. }) => Ok(addr.clone()),
            Some(Entry::Creating) | None => Err(ContainerError::NotFound { handle: message.handle }),
        }
    }
}

/// Lists handles whose properties match every filter pair.
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct ListContainers {
    pub filters: Vec<(String, String)>,
}

impl Handler<ListContainers> for Registry {
    type Result = ResponseFuture<Vec<String>>;

    fn handle(&mut self, message: ListContainers, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        // `garden.state=all` asks to include containers still being created;
        // those have no properties here yet, so the pair only stops filtering.
        let filters: Vec<(String, String)> = message
            .filters
            .into_iter()
            .filter(|(key, value)| !(key == container::PROPERTY_STATE && value == "all"))
            .collect();
        let candidates: Vec<(String, Addr<Container>)> = self
            .entries
            .iter()
            .filter_map(|(handle, entry)| match entry {
                Entry::Ready { addr, .. } | Entry::Destroying { addr, .. } => Some((handle.clone(), addr.clone())),
                Entry::Creating => None,
            })
            .collect();
        Box::pin(async move {
            let mut handles = Vec::new();
            for (handle, addr) in candidates {
                if filters.is_empty() {
                    handles.push(handle);
                    continue;
                }
                let Ok(Ok(properties)) = addr.send(GetProperties).await else {
                    continue;
                };
                if filters.iter().all(|(key, value)| properties.get(key) == Some(value)) {
                    handles.push(handle);
                }
            }
            handles
        })
    }
}

/// Destroys a container and forgets its handle.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct DestroyByHandle {
    pub handle: String,
}

impl Handler<DestroyByHandle> for Registry {
    type Result = ResponseActFuture<Self, Result<(), ContainerError>>;

    fn handle(&mut self, message: DestroyByHandle, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let handle = message.handle;
        let (addr, privileged) = match self.entries.remove(&handle) {
            None => return Box::pin(fut::ready(Err(ContainerError::NotFound { handle }))),
            Some(Entry::Creating) => {
                self.entries.insert(handle.clone(), Entry::Creating);
                return Box::pin(fut::ready(Err(ContainerError::BeingCreated { handle })));
            }
            Some(entry @ Entry::Destroying { .. }) => {
                self.entries.insert(handle.clone(), entry);
                return Box::pin(fut::ready(Err(ContainerError::AlreadyDestroying { handle })));
            }
            Some(Entry::Ready { addr, privileged }) => (addr, privileged),
        };
        self.entries.insert(handle.clone(), Entry::Destroying { addr: addr.clone(), privileged });
        let destroy = async move {
            addr.send(DestroyContainer)
                .await
                .map_err(|_| ContainerError::Mailbox { operation: "destroying the container" })
                .and_then(|result| result)
        };
        Box::pin(destroy.into_actor(self).map(move |result, registry, _| {
            match &result {
                Ok(()) => {
                    registry.entries.remove(&handle);
                    registry.reaper.do_send(Defuse { handle: handle.clone() });
                    if !privileged {
                        registry.uid_pool.do_send(ReleaseIdMappings);
                    }
                    info!(registry.logger, "container removed from registry"; "handle" => &handle);
                }
                Err(_) => {
                    if let Some(Entry::Destroying { addr, privileged }) = registry.entries.remove(&handle) {
                        registry.entries.insert(handle, Entry::Ready { addr, privileged });
                    }
                }
            }
            result
        }))
    }
}

/// Returns the number of containers, creates in progress included.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CountContainers;

impl Handler<CountContainers> for Registry {
    type Result = usize;

    fn handle(&mut self, _message: CountContainers, _ctx: &mut Context<Self>) -> usize {
        self.mailbox.count();
        self.entries.len()
    }
}

impl Handler<Introspect> for Registry {
    type Result = ResponseFuture<serde_json::Value>;

    fn handle(&mut self, _message: Introspect, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let mailbox = measure_mailbox(self, ctx);
        let entries: Vec<(String, &'static str, Option<Addr<Container>>)> = self
            .entries
            .iter()
            .map(|(handle, entry)| match entry {
                Entry::Creating => (handle.clone(), "creating", None),
                Entry::Ready { addr, .. } => (handle.clone(), "ready", Some(addr.clone())),
                Entry::Destroying { addr, .. } => (handle.clone(), "destroying", Some(addr.clone())),
            })
            .collect();
        Box::pin(async move {
            let mut containers = Vec::new();
            for (handle, entry_state, addr) in entries {
                let detail = match addr {
                    Some(addr) => addr.send(Introspect).await.unwrap_or(serde_json::Value::Null),
                    None => serde_json::Value::Null,
                };
                containers.push(serde_json::json!({ "handle": handle, "entry": entry_state, "container": detail }));
            }
            let handles: Vec<serde_json::Value> = containers.iter().map(|entry| entry["handle"].clone()).collect();
            serde_json::json!({ "count": containers.len(), "handles": handles, "containers": containers, "mailbox": mailbox.await })
        })
    }
}

crate::impl_mailbox_probe!(Registry, mailbox);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_rules() {
        for good in ["web-1", "a", "executor-healthcheck-0123", "a+b", "x.y_z", &"h".repeat(255)] {
            assert!(validate_handle(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a,b", "a b", "ü", &"h".repeat(256)] {
            let error = validate_handle(bad).unwrap_err();
            assert!(error.to_string().starts_with("invalid handle"), "{bad}: {error}");
        }
    }
}
