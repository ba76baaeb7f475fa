//! The Container actor: one per container handle.
//!
//! It owns the container's spec, state, properties and process table. Runtime
//! calls run in `spawn_blocking`; handlers that change what the state file
//! records are atomic (no other message interleaves) so the file always
//! matches the actor.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use actix::prelude::*;
use bytes::BytesMut;
use slog::{debug, info, o, warn, Logger};

use super::oom::{OomKilled, OomWatcher};
use super::process::{Process, ProcessExited, ProcessStart};
use super::stats::{measure_mailbox, MailboxStats};
use super::{ContainerError, Introspect, StreamTable};
use crate::api::{
    BandwidthLimits, ContainerInfo, ContainerSpec, CpuLimits, DiskLimits, Limits, MemoryLimits, Metrics, NetInResponse,
    NetOutRule, PortMapping, ProcessSpec, Properties,
};
use crate::pools::port::{AllocatePort, ClaimPort, ReleasePort};
use crate::pools::subnet::{NetworkAllocation, ReleaseNetwork};
use crate::pools::NetworkPools;
use crate::runtime::{ContainerRuntime, IdMappings, RuntimeError, StartedProcess, StdioConnection};
use crate::state::{ContainerRecord, ProcessRecord, STATE_VERSION};

pub use crate::state::{write_atomically, STATE_FILE};

/// Reserved property set to `created` once create has finished.
pub const PROPERTY_STATE: &str = "garden.state";
/// Reserved property holding the effective grace time in nanoseconds.
pub const PROPERTY_GRACE_TIME: &str = "garden.grace-time";
/// Reserved properties of a container's network.
pub const PROPERTY_CONTAINER_IP: &str = "garden.network.container-ip";
pub const PROPERTY_HOST_IP: &str = "garden.network.host-ip";
pub const PROPERTY_EXTERNAL_IP: &str = "garden.network.external-ip";
/// Reserved property listing the net-in mappings as a JSON array of
/// `{"HostPort":…,"ContainerPort":…}`, written at the first net-in.
pub const PROPERTY_MAPPED_PORTS: &str = "garden.network.mapped-ports";

/// Lifecycle state of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Active,
    Stopped,
    Destroying,
}

impl ContainerState {
    /// Returns the `State` that Info reports. A container being destroyed
    /// reports `stopped`, because its processes are being killed.
    pub fn as_info(self) -> &'static str {
        match self {
            ContainerState::Active => "active",
            ContainerState::Stopped | ContainerState::Destroying => "stopped",
        }
    }

    pub fn can_run(self) -> bool {
        self == ContainerState::Active
    }

    pub fn can_stop(self) -> bool {
        self != ContainerState::Destroying
    }

    pub fn can_destroy(self) -> bool {
        self != ContainerState::Destroying
    }

    pub fn can_change_properties(self) -> bool {
        self != ContainerState::Destroying
    }
}

/// Default of [`Container::with_max_finished_processes`]: finished process
/// records kept per container.
pub const DEFAULT_MAX_FINISHED_PROCESSES: usize = 1000;

/// The generations of a container's state file writes: the last one
/// handed out and the last one on disk.
#[derive(Debug, Default)]
struct StateWrites {
    next: std::sync::atomic::AtomicU64,
    written: std::sync::Mutex<u64>,
}

/// The network part of the state file, see [`Container::network_record`].
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NetworkRecord {
    #[serde(default)]
    pub allocation: Option<NetworkAllocation>,
    #[serde(default)]
    pub mapped_ports: Vec<PortMapping>,
    #[serde(default)]
    pub net_out: Vec<NetOutRule>,
}

impl NetworkRecord {
    /// Reads the record's `network` field; a missing or unreadable one is
    /// an empty record.
    pub fn from_record(value: Option<&serde_json::Value>) -> NetworkRecord {
        value.and_then(|value| serde_json::from_value(value.clone()).ok()).unwrap_or_default()
    }
}

/// A process id's entry in the container's process table. A finished
/// process keeps its `Running` slot (its actor, exit status and state
/// directory) until the container is destroyed, the operator's
/// cleanup-process-dirs-on-wait forgets it, or newer finished processes
/// push it out of the `max-finished-processes` records.
enum ProcessSlot {
    /// The runtime is starting it; the id is reserved.
    Starting,
    Running(Addr<Process>),
}

/// The actor of one container.
pub struct Container {
    handle: String,
    spec: ContainerSpec,
    state: ContainerState,
    properties: Properties,
    grace_time: i64,
    runtime: Arc<dyn ContainerRuntime>,
    dir: PathBuf,
    created_at: SystemTime,
    processes: HashMap<String, ProcessSlot>,
    /// The state file's record of each process, by id.
    process_records: BTreeMap<String, ProcessRecord>,
    id_mappings: Option<IdMappings>,
    /// Fields of the state file this server does not know, written back
    /// unchanged.
    unknown_state: BTreeMap<String, serde_json::Value>,
    /// Orders the writes of the state file; see [`Container::persist`].
    state_writes: Arc<StateWrites>,
    /// Ids of finished processes still in `processes`, oldest first.
    finished: VecDeque<String>,
    /// Maximum length of `finished`; zero keeps every record.
    max_finished_processes: usize,
    stream_table: StreamTable,
    logger: Logger,
    /// Notable events for Info: one `Out of memory` per OOM kill.
    events: Vec<String>,
    /// The kernel's OOM kill count already recorded in `events`.
    oom_kills: u64,
    /// Dropped with the actor, which stops the watch.
    oom_watcher: Option<Addr<OomWatcher>>,
    /// The server-wide count of OOM kills, shown in the operator's metrics.
    oom_counter: Option<Arc<std::sync::atomic::AtomicU64>>,
    mailbox: MailboxStats,
    /// The container's subnet and addresses, returned to the pool by
    /// destroy.
    network: Option<NetworkAllocation>,
    /// Net-in mappings, whose host ports destroy returns to the pool.
    mapped_ports: Vec<PortMapping>,
    /// Every net-out rule added, in order, for the state file.
    net_out_rules: Vec<NetOutRule>,
    /// Set for a container restored after a restart, whose net-in mappings
    /// and net-out rules the runtime applies again once the actor starts.
    replay_network: bool,
    external_ip: String,
    pools: NetworkPools,
}

/// The event Garden records for each out-of-memory kill; clients compare
/// Info's events with this text.
pub const OUT_OF_MEMORY_EVENT: &str = "Out of memory";

impl Container {
    /// Builds the actor for a container the runtime has created.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        handle: String,
        spec: ContainerSpec,
        runtime: Arc<dyn ContainerRuntime>,
        id_mappings: Option<IdMappings>,
        dir: PathBuf,
        stream_table: StreamTable,
        logger: &Logger,
        network: Option<NetworkAllocation>,
        pools: NetworkPools,
    ) -> Container {
        let mut properties = spec.properties.clone();
        if spec.grace_time != 0 {
            properties.insert(PROPERTY_GRACE_TIME.into(), spec.grace_time.to_string());
        }
        properties.insert(PROPERTY_STATE.into(), "created".into());
        let external_ip = runtime.external_ip().map(|ip| ip.to_string()).unwrap_or_default();
        if let Some(allocation) = &network {
            properties.insert(PROPERTY_CONTAINER_IP.into(), allocation.container_ip.to_string());
            properties.insert(PROPERTY_HOST_IP.into(), allocation.gateway.to_string());
            if !external_ip.is_empty() {
                properties.insert(PROPERTY_EXTERNAL_IP.into(), external_ip.clone());
            }
        }
        Container {
            logger: logger.new(o!("handle" => handle.clone())),
            grace_time: spec.grace_time,
            handle,
            spec,
            state: ContainerState::Active,
            properties,
            runtime,
            dir,
            created_at: SystemTime::now(),
            processes: HashMap::new(),
            process_records: BTreeMap::new(),
            id_mappings,
            unknown_state: BTreeMap::new(),
            state_writes: Arc::default(),
            finished: VecDeque::new(),
            max_finished_processes: DEFAULT_MAX_FINISHED_PROCESSES,
            stream_table,
            events: Vec::new(),
            oom_kills: 0,
            oom_watcher: None,
            oom_counter: None,
            mailbox: MailboxStats::default(),
            network,
            mapped_ports: Vec::new(),
            net_out_rules: Vec::new(),
            replay_network: false,
            external_ip,
            pools,
        }
    }

    /// Adds this container's out-of-memory kills to `counter` as well.
    pub fn with_oom_counter(mut self, counter: Arc<std::sync::atomic::AtomicU64>) -> Container {
        self.oom_counter = Some(counter);
        self
    }

    /// Sets the out-of-memory events and the kernel's kill count recorded
    /// earlier. The watch then records only kills beyond that count,
    /// including those made while no server watched.
    pub fn with_oom_record(mut self, events: Vec<String>, oom_kills: u64) -> Container {
        self.events = events;
        self.oom_kills = oom_kills;
        self
    }

    /// Rebuilds the actor of a container from its state file after a
    /// restart. The caller reattaches its processes with
    /// [`AdoptProcess`].
    pub fn restore(
        record: ContainerRecord,
        runtime: Arc<dyn ContainerRuntime>,
        dir: PathBuf,
        stream_table: StreamTable,
        logger: &Logger,
        pools: NetworkPools,
    ) -> Container {
        let network = NetworkRecord::from_record(record.network.as_ref());
        let external_ip = runtime.external_ip().map(|ip| ip.to_string()).unwrap_or_default();
        let created_at = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_nanos(u64::try_from(record.created_at_unix_ns).unwrap_or(u64::MAX));
        Container {
            logger: logger.new(o!("handle" => record.handle.clone())),
            handle: record.handle,
            spec: record.spec,
            state: record.state,
            properties: record.properties,
            grace_time: record.grace_time,
            runtime,
            dir,
            created_at,
            processes: HashMap::new(),
            process_records: record.processes.into_iter().map(|process| (process.id.clone(), process)).collect(),
            id_mappings: record.id_mappings,
            unknown_state: record.unknown,
            state_writes: Arc::default(),
            stream_table,
            events: record.events,
            oom_kills: record.oom_kills,
            oom_watcher: None,
            oom_counter: None,
            mailbox: MailboxStats::default(),
            finished: VecDeque::new(),
            max_finished_processes: DEFAULT_MAX_FINISHED_PROCESSES,
            replay_network: network.allocation.is_some(),
            network: network.allocation,
            mapped_ports: network.mapped_ports,
            net_out_rules: network.net_out,
            external_ip,
            pools,
        }
    }

    /// Applies the net-in mappings and net-out rules of a restored container
    /// again, because the server's firewall table starts empty. The actor
    /// takes no other message until they are in place.
    fn start_network_replay(&mut self, ctx: &mut Context<Self>) {
        let runtime = self.runtime.clone();
        let mappings = self.mapped_ports.clone();
        let rules = self.net_out_rules.clone();
        let logger = self.logger.clone();
        let replay = async move {
            let replayed = blocking(move || {
                for mapping in &mappings {
                    let (Ok(host_port), Ok(container_port)) = (u16::try_from(mapping.host_port), u16::try_from(mapping.container_port)) else {
                        continue;
                    };
                    runtime.net_in(host_port, container_port)?;
                }
                if !rules.is_empty() {
                    runtime.net_out(&rules)?;
                }
                Ok(())
            })
            .await;
            match replayed {
                Ok(()) => info!(logger, "network rules restored"),
                Err(error) => warn!(logger, "restoring the container's net-in and net-out rules failed"; "error" => %error),
            }
        };
        ctx.wait(replay.into_actor(self));
    }

    /// Returns the `network` field of the state file: the subnet allocation,
    /// net-in mappings and net-out rules that a restarted server restores.
    fn network_record(&self) -> Option<serde_json::Value> {
        if self.network.is_none() && self.mapped_ports.is_empty() && self.net_out_rules.is_empty() {
            return None;
        }
        let record = NetworkRecord {
            allocation: self.network,
            mapped_ports: self.mapped_ports.clone(),
            net_out: self.net_out_rules.clone(),
        };
        serde_json::to_value(record).ok()
    }

    /// Sets how many finished process records the container keeps; zero
    /// keeps them all until destroy. Beyond the maximum the oldest finished
    /// record is dropped with its state directory. Running processes never
    /// count.
    pub fn with_max_finished_processes(mut self, max: usize) -> Container {
        self.max_finished_processes = max;
        self
    }

    /// Drops the record of a finished process: its id becomes free, Attach
    /// no longer finds it and the runtime removes its state directory.
    ///
    /// The process actor stops by itself once nothing refers to it: the
    /// streams it already has stay attachable for
    /// [`super::process::FINISHED_STREAM_RETENTION`], so a Run whose stdout
    /// or stderr connection arrives after the exit message still receives
    /// the output, and the actor frees its kept output at the same time.
    fn drop_finished(&mut self, process_id: &str, ctx: &mut Context<Self>) {
        if !matches!(self.processes.get(process_id), Some(ProcessSlot::Running(_))) {
            return;
        }
        self.processes.remove(process_id);
        self.finished.retain(|id| id != process_id);
        // The state file catches up with the next write; a restarted server
        // skips records whose process directory is gone.
        self.process_records.remove(process_id);
        let runtime = self.runtime.clone();
        let logger = self.logger.clone();
        let process_id = process_id.to_string();
        ctx.spawn(
            async move {
                let id = process_id.clone();
                if let Err(error) = blocking(move || runtime.forget_process(&id)).await {
                    warn!(logger, "removing a finished process's state failed"; "process_id" => process_id, "error" => %error);
                }
            }
            .into_actor(self),
        );
    }

    /// Returns the state file record of the actor as it is now.
    pub fn state_record(&self) -> ContainerRecord {
        ContainerRecord {
            version: STATE_VERSION,
            handle: self.handle.clone(),
            state: self.state,
            grace_time: self.grace_time,
            properties: self.properties.clone(),
            created_at_unix_ns: self
                .created_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|age| age.as_nanos())
                .unwrap_or(0),
            spec: self.spec.clone(),
            id_mappings: self.id_mappings.clone(),
            processes: self.process_records.values().cloned().collect(),
            network: self.network_record(),
            unknown: self.unknown_state.clone(),
            events: self.events.clone(),
            oom_kills: self.oom_kills,
        }
    }

    /// Returns a future that writes the current state file off the actor
    /// thread.
    ///
    /// Some handlers persist from futures that run while the actor handles
    /// other messages, so writes can overlap. They are serialised, and a
    /// write whose record is older than the one already on disk is skipped,
    /// so the file always ends with the newest record.
    fn persist(&self) -> impl std::future::Future<Output = Result<(), ContainerError>> + 'static {
        let path = self.dir.join(STATE_FILE);
        let bytes = self.state_record().to_bytes();
        let generation = self.state_writes.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let writes = self.state_writes.clone();
        async move {
            let target = path.clone();
            tokio::task::spawn_blocking(move || {
                let mut written = writes.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if *written > generation {
                    return Ok(());
                }
                write_atomically(&target, &bytes)?;
                *written = generation;
                Ok::<(), std::io::Error>(())
            })
            .await
                .map_err(|error| ContainerError::StateFile { path: path.display().to_string(), reason: error.to_string() })?
                .map_err(|error| ContainerError::StateFile { path: path.display().to_string(), reason: error.to_string() })
        }
    }

    fn info(&self) -> ContainerInfo {
        ContainerInfo {
            state: self.state.as_info().into(),
            // Garden reports no events as null, not as an empty list.
            events: (!self.events.is_empty()).then(|| self.events.clone()),
            container_path: self.dir.display().to_string(),
            process_ids: None,
            properties: Some(self.properties.clone()),
            mapped_ports: Some(self.mapped_ports.clone()),
            host_ip: self.network.map(|allocation| allocation.gateway.to_string()).unwrap_or_default(),
            container_ip: self.network.map(|allocation| allocation.container_ip.to_string()).unwrap_or_default(),
            external_ip: self.external_ip.clone(),
            ..ContainerInfo::default()
        }
    }

    fn check_not_destroying(&self) -> Result<(), ContainerError> {
        if self.state.can_change_properties() {
            Ok(())
        } else {
            Err(ContainerError::AlreadyDestroying { handle: self.handle.clone() })
        }
    }
}

impl Actor for Container {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.replay_network {
            self.replay_network = false;
            self.start_network_replay(ctx);
        }
        // Opening the watch only opens cgroup files, cheap enough for the
        // actor thread.
        let watch = match self.runtime.watch_oom() {
            Ok(Some(watch)) => watch,
            Ok(None) => return,
            Err(error) => {
                warn!(self.logger, "out-of-memory kills will not be reported"; "error" => %error);
                return;
            }
        };
        match OomWatcher::new(watch, ctx.address().recipient(), self.oom_kills, &self.handle, &self.logger) {
            Ok(watcher) => self.oom_watcher = Some(watcher.start()),
            Err(error) => warn!(self.logger, "out-of-memory kills will not be reported"; "error" => %error),
        }
    }
}

impl Handler<OomKilled> for Container {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, message: OomKilled, _ctx: &mut Context<Self>) -> Self::Result {
        for _ in 0..message.kills {
            self.events.push(OUT_OF_MEMORY_EVENT.to_string());
        }
        if let Some(counter) = &self.oom_counter {
            counter.fetch_add(message.kills, std::sync::atomic::Ordering::Relaxed);
        }
        self.oom_kills = message.total;
        AtomicResponse::new(Box::pin(self.persist().into_actor(self).map(|result, container, _| {
            if let Err(error) = result {
                warn!(container.logger, "out-of-memory event not persisted"; "error" => %error);
            }
        })))
    }
}

/// Returns the container's Info.
#[derive(Message)]
#[rtype(result = "Result<ContainerInfo, ContainerError>")]
pub struct GetInfo;

impl Handler<GetInfo> for Container {
    type Result = Result<ContainerInfo, ContainerError>;

    fn handle(&mut self, _message: GetInfo, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        Ok(self.info())
    }
}

/// Returns all properties, reserved ones included.
#[derive(Message)]
#[rtype(result = "Result<Properties, ContainerError>")]
pub struct GetProperties;

impl Handler<GetProperties> for Container {
    type Result = Result<Properties, ContainerError>;

    fn handle(&mut self, _message: GetProperties, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        Ok(self.properties.clone())
    }
}

/// Returns one property.
#[derive(Message)]
#[rtype(result = "Result<String, ContainerError>")]
pub struct GetProperty {
    pub key: String,
}

impl Handler<GetProperty> for Container {
    type Result = Result<String, ContainerError>;

    fn handle(&mut self, message: GetProperty, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        self.properties
            .get(&message.key)
            .cloned()
            .ok_or(ContainerError::PropertyNotFound { key: message.key })
    }
}

/// Sets one property, overwriting an existing value.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct SetProperty {
    pub key: String,
    pub value: String,
}

impl Handler<SetProperty> for Container {
    type Result = AtomicResponse<Self, Result<(), ContainerError>>;

    fn handle(&mut self, message: SetProperty, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        if let Err(error) = self.check_not_destroying() {
            return AtomicResponse::new(Box::pin(fut::ready(Err(error))));
        }
        let previous = self.properties.insert(message.key.clone(), message.value);
        let write = self.persist();
        AtomicResponse::new(Box::pin(write.into_actor(self).map(move |result, container, _| {
            if result.is_err() {
                // Keep the actor equal to the file that is on disk.
                match previous {
                    Some(value) => container.properties.insert(message.key, value),
                    None => container.properties.remove(&message.key),
                };
            }
            result
        })))
    }
}

/// Removes one property; removing a missing key succeeds.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct RemoveProperty {
    pub key: String,
}

impl Handler<RemoveProperty> for Container {
    type Result = AtomicResponse<Self, Result<(), ContainerError>>;

    fn handle(&mut self, message: RemoveProperty, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        if let Err(error) = self.check_not_destroying() {
            return AtomicResponse::new(Box::pin(fut::ready(Err(error))));
        }
        let Some(previous) = self.properties.remove(&message.key) else {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(()))));
        };
        let write = self.persist();
        AtomicResponse::new(Box::pin(write.into_actor(self).map(move |result, container, _| {
            if result.is_err() {
                container.properties.insert(message.key, previous);
            }
            result
        })))
    }
}

/// Changes the grace time and stores it as the `garden.grace-time`
/// property (removed for zero).
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct SetGraceTime {
    pub grace_time: i64,
}

impl Handler<SetGraceTime> for Container {
    type Result = AtomicResponse<Self, Result<(), ContainerError>>;

    fn handle(&mut self, message: SetGraceTime, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        if let Err(error) = self.check_not_destroying() {
            return AtomicResponse::new(Box::pin(fut::ready(Err(error))));
        }
        let previous = (self.grace_time, self.properties.get(PROPERTY_GRACE_TIME).cloned());
        self.grace_time = message.grace_time;
        if message.grace_time == 0 {
            self.properties.remove(PROPERTY_GRACE_TIME);
        } else {
            self.properties.insert(PROPERTY_GRACE_TIME.into(), message.grace_time.to_string());
        }
        let write = self.persist();
        AtomicResponse::new(Box::pin(write.into_actor(self).map(move |result, container, _| {
            if result.is_err() {
                container.grace_time = previous.0;
                match previous.1 {
                    Some(value) => container.properties.insert(PROPERTY_GRACE_TIME.into(), value),
                    None => container.properties.remove(PROPERTY_GRACE_TIME),
                };
            }
            result
        })))
    }
}

/// Stops every process of the container (SIGTERM, then SIGKILL after 10 s,
/// or SIGKILL at once with `kill`). The container is `stopped` afterwards.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct StopContainer {
    pub kill: bool,
}

impl Handler<StopContainer> for Container {
    type Result = ResponseActFuture<Self, Result<(), ContainerError>>;

    fn handle(&mut self, message: StopContainer, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        if !self.state.can_stop() {
            return Box::pin(fut::ready(Err(ContainerError::AlreadyDestroying { handle: self.handle.clone() })));
        }
        let runtime = self.runtime.clone();
        let stop = async move { blocking(move || runtime.stop(message.kill)).await };
        Box::pin(stop.into_actor(self).then(|result, container, _| {
            let persist = match result {
                Ok(()) if container.state == ContainerState::Active => {
                    container.state = ContainerState::Stopped;
                    Some(container.persist())
                }
                _ => None,
            };
            async move {
                result?;
                if let Some(persist) = persist {
                    persist.await?;
                }
                Ok(())
            }
            .into_actor(container)
        }))
    }
}

/// Destroys the container: kills every process and removes its host
/// objects. On failure the container returns to its previous state, so
/// destroy can be retried.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct DestroyContainer;

impl Handler<DestroyContainer> for Container {
    type Result = ResponseActFuture<Self, Result<(), ContainerError>>;

    fn handle(&mut self, _message: DestroyContainer, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        if !self.state.can_destroy() {
            return Box::pin(fut::ready(Err(ContainerError::AlreadyDestroying { handle: self.handle.clone() })));
        }
        let previous = self.state;
        self.state = ContainerState::Destroying;
        // Recorded first, so a server that dies during teardown finishes
        // the destroy when it starts again.
        let mark = self.persist();
        let runtime = self.runtime.clone();
        let logger = self.logger.clone();
        let destroy = async move {
            if let Err(error) = mark.await {
                warn!(logger, "recording the destroy in the state file failed; destroying anyway"; "error" => %error);
            }
            crate::state::fault_point("destroy.before-teardown");
            blocking(move || runtime.destroy()).await
        };
        Box::pin(destroy.into_actor(self).map(move |result, container, ctx| {
            match &result {
                Ok(()) => {
                    info!(container.logger, "container destroyed");
                    container.processes.clear();
                    container.finished.clear();
                    container.release_network();
                    ctx.stop();
                }
                Err(error) => {
                    warn!(container.logger, "container destroy failed"; "error" => %error);
                    container.state = previous;
                }
            }
            result
        }))
    }
}

impl Container {
    /// Returns the host ports and the subnet to their pools; destroy calls
    /// it once the runtime has removed the container's network.
    fn release_network(&mut self) {
        for mapping in self.mapped_ports.drain(..) {
            self.pools.ports.do_send(ReleasePort { port: mapping.host_port as u16 });
        }
        if let Some(allocation) = self.network.take() {
            self.pools.subnets.do_send(ReleaseNetwork { allocation });
        }
    }
}

/// Checks a port number of a net-in request: 0 or 1 to 65535.
fn net_in_port(value: u32, role: &str) -> Result<u16, ContainerError> {
    u16::try_from(value).map_err(|_| ContainerError::InvalidNetIn { message: format!("invalid {role} port {value}: ports are 0 to 65535") })
}

/// Maps a host port to a container port (`net/in`). A zero host port takes
/// the next port of the pool, a zero container port the host port's
/// number.
#[derive(Message)]
#[rtype(result = "Result<NetInResponse, ContainerError>")]
pub struct NetIn {
    pub host_port: u32,
    pub container_port: u32,
}

impl Handler<NetIn> for Container {
    type Result = AtomicResponse<Self, Result<NetInResponse, ContainerError>>;

    fn handle(&mut self, message: NetIn, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let checked = self.check_not_destroying().and_then(|()| {
            Ok((net_in_port(message.host_port, "host")?, net_in_port(message.container_port, "container")?))
        });
        let (requested_host, requested_container) = match checked {
            Ok(ports) => ports,
            Err(error) => return AtomicResponse::new(Box::pin(fut::ready(Err(error)))),
        };
        let ports = self.pools.ports.clone();
        let runtime = self.runtime.clone();
        let map = async move {
            let host_port = if requested_host == 0 {
                ports.send(AllocatePort).await.map_err(|_| ContainerError::Mailbox { operation: "allocating a host port" })?
            } else {
                ports.send(ClaimPort { port: requested_host }).await.map_err(|_| ContainerError::Mailbox { operation: "reserving a host port" })?.map(|()| requested_host)
            }
            .map_err(|error| ContainerError::InvalidNetIn { message: error.to_string() })?;
            let container_port = if requested_container == 0 { host_port } else { requested_container };
            if let Err(error) = blocking(move || runtime.net_in(host_port, container_port)).await {
                ports.do_send(ReleasePort { port: host_port });
                return Err(error);
            }
            crate::state::fault_point("net-in.after-apply");
            Ok((host_port, container_port))
        };
        AtomicResponse::new(Box::pin(map.into_actor(self).then(|result, container, _| {
            let recorded = result.map(|(host_port, container_port)| {
                container.mapped_ports.push(PortMapping { host_port: u32::from(host_port), container_port: u32::from(container_port) });
                let list = serde_json::to_string(&container.mapped_ports).unwrap_or_default();
                container.properties.insert(PROPERTY_MAPPED_PORTS.into(), list);
                info!(container.logger, "net-in mapped"; "host_port" => host_port, "container_port" => container_port);
                (NetInResponse { host_port: u32::from(host_port), container_port: u32::from(container_port) }, container.persist())
            });
            async move {
                let (response, persist) = recorded?;
                persist.await?;
                Ok(response)
            }
            .into_actor(container)
        })))
    }
}

/// Adds outbound allow rules (`net/out` and `net/out/bulk`), all or none.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct NetOut {
    pub rules: Vec<NetOutRule>,
}

impl Handler<NetOut> for Container {
    type Result = AtomicResponse<Self, Result<(), ContainerError>>;

    fn handle(&mut self, message: NetOut, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        if let Err(error) = self.check_not_destroying() {
            return AtomicResponse::new(Box::pin(fut::ready(Err(error))));
        }
        let runtime = self.runtime.clone();
        let rules = message.rules;
        let applied = rules.clone();
        let apply = async move {
            blocking(move || runtime.net_out(&applied)).await?;
            crate::state::fault_point("net-out.after-apply");
            Ok::<(), ContainerError>(())
        };
        AtomicResponse::new(Box::pin(apply.into_actor(self).then(move |result, container, _| {
            // The rules are kept in the state file, so a restarted server
            // applies them again.
            let persist = result.map(|()| {
                container.net_out_rules.extend(rules);
                container.persist()
            });
            async move { persist?.await }.into_actor(container)
        })))
    }
}

/// Returns the container's runtime for a stream in or stream out. Those
/// run outside the actor for as long as the client streams, so other
/// requests to the container are not held up. Stopped containers serve
/// them too.
#[derive(Message)]
#[rtype(result = "Result<Arc<dyn ContainerRuntime>, ContainerError>")]
pub struct GetRuntime;

impl Handler<GetRuntime> for Container {
    type Result = Result<Arc<dyn ContainerRuntime>, ContainerError>;

    fn handle(&mut self, _message: GetRuntime, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        self.check_not_destroying()?;
        Ok(self.runtime.clone())
    }
}

/// Starts a process and its actor.
#[derive(Message)]
#[rtype(result = "Result<Addr<Process>, ContainerError>")]
pub struct RunProcess {
    pub spec: ProcessSpec,
}

impl Handler<RunProcess> for Container {
    type Result = ResponseActFuture<Self, Result<Addr<Process>, ContainerError>>;

    fn handle(&mut self, message: RunProcess, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        match self.state {
            ContainerState::Active => {}
            ContainerState::Stopped => {
                return Box::pin(fut::ready(Err(ContainerError::Stopped { handle: self.handle.clone() })))
            }
            ContainerState::Destroying => {
                return Box::pin(fut::ready(Err(ContainerError::AlreadyDestroying { handle: self.handle.clone() })))
            }
        }
        let process_id = if message.spec.id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            message.spec.id.clone()
        };
        if self.processes.contains_key(&process_id) {
            return Box::pin(fut::ready(Err(ContainerError::ProcessIdInUse { process_id })));
        }
        self.processes.insert(process_id.clone(), ProcessSlot::Starting);
        let tty = message.spec.tty.is_some();
        // The record is written while the shim starts, so the reply waits
        // for the longer of the two (a state file write costs two fsyncs)
        // rather than for both in turn. A failed start removes it again.
        self.process_records.insert(process_id.clone(), ProcessRecord { id: process_id.clone(), tty, exit_status: None });
        let recorded = self.persist();

        let runtime = self.runtime.clone();
        let logger = self.logger.clone();
        let stream_table = self.stream_table.clone();
        let exit_listener = ctx.address().recipient();
        let id = process_id.clone();
        let started_at = Instant::now();
        let start = async move {
            let spec = message.spec;
            let run_id = id.clone();
            let started = blocking(move || runtime.run(&run_id, &spec)).await?;
            crate::state::fault_point("run.after-start");
            let (pid, leftover, reader, writer, acknowledge) = split_stdio(started)?;
            info!(logger, "process started"; "process_id" => &id, "pid" => pid,
                "duration_ms" => started_at.elapsed().as_millis() as u64);
            Ok(Process::start_with(ProcessStart {
                process_id: id,
                pid,
                tty,
                logger,
                stream_table,
                leftover,
                reader,
                writer,
                acknowledge,
                exit_listener: Some(exit_listener),
            }))
        };
        let logger = self.logger.clone();
        let start_and_record = async move {
            let (result, written) = futures_util::future::join(start, recorded).await;
            if let (Ok(_), Err(error)) = (&result, written) {
                // The process runs either way, and a restarted server also
                // finds it by its directory, so a failed write is logged
                // and the process still returned.
                warn!(logger, "recording a started process in the state file failed"; "error" => %error);
            }
            result
        };
        Box::pin(start_and_record.into_actor(self).then(move |result: Result<Addr<Process>, ContainerError>, container, _| {
            let removal = match &result {
                Ok(addr) => {
                    container.processes.insert(process_id, ProcessSlot::Running(addr.clone()));
                    None
                }
                Err(_) => {
                    container.processes.remove(&process_id);
                    container.process_records.remove(&process_id);
                    Some(container.persist())
                }
            };
            let logger = container.logger.clone();
            async move {
                if let Some(removal) = removal {
                    if let Err(error) = removal.await {
                        warn!(logger, "removing a process that failed to start from the state file failed"; "error" => %error);
                    }
                }
                result
            }
            .into_actor(container)
        }))
    }
}

/// Returns the actor of a process, for Attach.
#[derive(Message)]
#[rtype(result = "Result<Addr<Process>, ContainerError>")]
pub struct FindProcess {
    pub process_id: String,
}

impl Handler<FindProcess> for Container {
    type Result = Result<Addr<Process>, ContainerError>;

    fn handle(&mut self, message: FindProcess, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        match self.processes.get(&message.process_id) {
            Some(ProcessSlot::Running(addr)) => Ok(addr.clone()),
            _ => Err(ContainerError::ProcessNotFound { process_id: message.process_id }),
        }
    }
}

/// Forgets a finished process whose exit status was sent to a client:
/// its id becomes free, Attach no longer finds it, and the runtime removes
/// its state directory. Used when the operator enables
/// `cleanup-process-dirs-on-wait`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetProcess {
    pub process_id: String,
    /// The process the exit status came from. A second attachment may
    /// deliver it after the id was forgotten and given to a new process,
    /// which must not be forgotten in its place.
    pub process: Addr<Process>,
}

impl Handler<ForgetProcess> for Container {
    type Result = ();

    fn handle(&mut self, message: ForgetProcess, ctx: &mut Context<Self>) {
        self.mailbox.count();
        let current = matches!(self.processes.get(&message.process_id), Some(ProcessSlot::Running(process)) if *process == message.process);
        if !current {
            return;
        }
        debug!(self.logger, "finished process forgotten"; "process_id" => &message.process_id);
        self.drop_finished(&message.process_id, ctx);
    }
}

impl Handler<ProcessExited> for Container {
    type Result = AtomicResponse<Self, ()>;

    /// Records the exit status in the state file, marks the process as
    /// finished and drops the oldest finished records beyond the maximum.
    fn handle(&mut self, message: ProcessExited, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        // RunProcess stores the address in the same poll that starts the
        // actor, so the slot of an exiting process is always `Running`.
        let current = matches!(self.processes.get(&message.process_id), Some(ProcessSlot::Running(process)) if *process == message.process);
        if !current {
            return AtomicResponse::new(Box::pin(fut::ready(())));
        }
        let mut changed = false;
        if let (Some(record), Some(status)) = (self.process_records.get_mut(&message.process_id), message.exit_status) {
            changed = record.exit_status != Some(status);
            record.exit_status = Some(status);
        }
        self.finished.push_back(message.process_id.clone());
        if self.max_finished_processes > 0 {
            while self.finished.len() > self.max_finished_processes {
                let Some(oldest) = self.finished.pop_front() else { break };
                info!(self.logger, "finished process record dropped"; "process_id" => &oldest,
                    "max_finished_processes" => self.max_finished_processes);
                self.drop_finished(&oldest, ctx);
                changed = true;
            }
        }
        if !changed || self.state == ContainerState::Destroying {
            return AtomicResponse::new(Box::pin(fut::ready(())));
        }
        // Atomic, like every other state file write of the actor, so two
        // writes never race on the temporary file.
        let write = self.persist();
        let logger = self.logger.clone();
        let process_id = message.process_id;
        AtomicResponse::new(Box::pin(
            async move {
                if let Err(error) = write.await {
                    warn!(logger, "recording an exit status in the state file failed"; "process_id" => &process_id, "error" => %error);
                }
            }
            .into_actor(self),
        ))
    }
}

/// Gives a restored container the connection to one of its processes that
/// survived the restart, or the replay of a process that ended meanwhile.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AdoptProcess {
    pub process_id: String,
    pub started: StartedProcess,
}

impl Handler<AdoptProcess> for Container {
    type Result = ();

    fn handle(&mut self, message: AdoptProcess, ctx: &mut Context<Self>) {
        let process_id = message.process_id;
        let tty = match self.process_records.get(&process_id) {
            Some(record) => record.tty,
            None => {
                self.process_records.insert(process_id.clone(), ProcessRecord { id: process_id.clone(), tty: false, exit_status: None });
                false
            }
        };
        let (pid, leftover, reader, writer, acknowledge) = match split_stdio(message.started) {
            Ok(halves) => halves,
            Err(error) => {
                warn!(self.logger, "reattaching a process failed"; "process_id" => &process_id, "error" => %error);
                return;
            }
        };
        let addr = Process::start_with(ProcessStart {
            process_id: process_id.clone(),
            pid,
            tty,
            logger: self.logger.clone(),
            stream_table: self.stream_table.clone(),
            leftover,
            reader,
            writer,
            acknowledge,
            exit_listener: Some(ctx.address().recipient()),
        });
        info!(self.logger, "process reattached"; "process_id" => &process_id, "pid" => pid);
        self.processes.insert(process_id, ProcessSlot::Running(addr));
    }
}

/// Writes the container's state file; used once after create.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct PersistState;

impl Handler<PersistState> for Container {
    type Result = AtomicResponse<Self, Result<(), ContainerError>>;

    fn handle(&mut self, _message: PersistState, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        AtomicResponse::new(Box::pin(self.persist().into_actor(self)))
    }
}

impl Handler<Introspect> for Container {
    type Result = ResponseFuture<serde_json::Value>;

    fn handle(&mut self, _message: Introspect, ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let mailbox = measure_mailbox(self, ctx);
        let processes: Vec<(String, Option<Addr<Process>>)> = self
            .processes
            .iter()
            .map(|(id, slot)| match slot {
                ProcessSlot::Starting => (id.clone(), None),
                ProcessSlot::Running(addr) => (id.clone(), Some(addr.clone())),
            })
            .collect();
        let mut snapshot = serde_json::json!({
            "handle": self.handle,
            "state": self.state,
            "grace_time_ns": self.grace_time,
            "properties": self.properties,
            "properties_count": self.properties.len(),
            "limits": self.spec.limits,
            "network": {
                "requested": self.spec.network,
                "subnet": self.network.map(|allocation| allocation.subnet.to_string()),
                "container_ip": self.network.map(|allocation| allocation.container_ip.to_string()),
                "mapped_ports": self.mapped_ports,
                "net_out_rules": self.net_out_rules.len(),
            },
            "container_path": self.dir,
            "process_records": self.process_records.values().collect::<Vec<_>>(),
            "runtime": self.runtime.describe(),
            "oom_kills": self.oom_kills,
        });
        let oom_watcher = self.oom_watcher.clone();
        Box::pin(async move {
            snapshot["oom_watcher"] = match oom_watcher {
                Some(watcher) => watcher.send(Introspect).await.unwrap_or(serde_json::Value::Null),
                None => serde_json::Value::Null,
            };
            let mut list = Vec::new();
            for (id, addr) in processes {
                let value = match addr {
                    None => serde_json::json!({ "process_id": id, "starting": true }),
                    Some(addr) => addr.send(Introspect).await.unwrap_or(serde_json::Value::Null),
                };
                list.push(value);
            }
            snapshot["processes"] = serde_json::Value::Array(list);
            snapshot["mailbox"] = mailbox.await;
            snapshot
        })
    }
}

crate::impl_mailbox_probe!(Container, mailbox);

/// One limit kind, as the 2015 `PUT .../limits/<kind>` routes carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitUpdate {
    Bandwidth(BandwidthLimits),
    Cpu(CpuLimits),
    Disk(DiskLimits),
    Memory(MemoryLimits),
}

/// Returns `current` with the non-zero fields of `update` applied
/// (the 2015 routes leave a limit as it is when its field is zero).
///
/// Setting `limit_in_shares` alone clears `weight`. Otherwise `weight`
/// would stay the effective shares and hide the new value. A disk update takes its `scope` along when
/// it sets any size.
pub fn merge_limits(current: &Limits, update: &LimitUpdate) -> Limits {
    let mut merged = current.clone();
    let keep = |old: u64, new: u64| if new > 0 { new } else { old };
    match update {
        LimitUpdate::Bandwidth(bandwidth) => {
            merged.bandwidth_limits.rate = keep(current.bandwidth_limits.rate, bandwidth.rate);
            merged.bandwidth_limits.burst = keep(current.bandwidth_limits.burst, bandwidth.burst);
        }
        LimitUpdate::Cpu(cpu) => {
            if cpu.weight > 0 {
                merged.cpu_limits = CpuLimits { weight: cpu.weight, limit_in_shares: keep(current.cpu_limits.limit_in_shares, cpu.limit_in_shares) };
            } else if cpu.limit_in_shares > 0 {
                merged.cpu_limits = CpuLimits { weight: 0, limit_in_shares: cpu.limit_in_shares };
            }
        }
        LimitUpdate::Disk(disk) => {
            let old = current.disk_limits;
            merged.disk_limits.inode_soft = keep(old.inode_soft, disk.inode_soft);
            merged.disk_limits.inode_hard = keep(old.inode_hard, disk.inode_hard);
            merged.disk_limits.byte_soft = keep(old.byte_soft, disk.byte_soft);
            merged.disk_limits.byte_hard = keep(old.byte_hard, disk.byte_hard);
            if disk.inode_soft > 0 || disk.inode_hard > 0 || disk.byte_soft > 0 || disk.byte_hard > 0 {
                merged.disk_limits.scope = disk.scope;
            }
        }
        LimitUpdate::Memory(memory) => {
            merged.memory_limits.limit_in_bytes = keep(current.memory_limits.limit_in_bytes, memory.limit_in_bytes);
        }
    }
    merged
}

/// Returns the container's limits as its runtime reports them.
#[derive(Message)]
#[rtype(result = "Result<Limits, ContainerError>")]
pub struct GetLimits;

impl Handler<GetLimits> for Container {
    type Result = Result<Limits, ContainerError>;

    fn handle(&mut self, _message: GetLimits, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        Ok(self.runtime.reported_limits(&self.spec.limits))
    }
}

/// Changes one limit kind of the running container, stores the result in
/// the state file and returns the limits as reported afterwards.
#[derive(Message)]
#[rtype(result = "Result<Limits, ContainerError>")]
pub struct UpdateLimits {
    pub update: LimitUpdate,
}

impl Handler<UpdateLimits> for Container {
    type Result = AtomicResponse<Self, Result<Limits, ContainerError>>;

    fn handle(&mut self, message: UpdateLimits, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        if let Err(error) = self.check_not_destroying() {
            return AtomicResponse::new(Box::pin(fut::ready(Err(error))));
        }
        let current = self.spec.limits.clone();
        let requested = merge_limits(&current, &message.update);
        if requested == current {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(self.runtime.reported_limits(&current)))));
        }
        let runtime = self.runtime.clone();
        let applied = requested.clone();
        let apply = async move { blocking(move || runtime.update_limits(&current, &applied)).await };
        AtomicResponse::new(Box::pin(apply.into_actor(self).then(move |result, container, _| {
            let persist = result.map(|()| {
                info!(container.logger, "limits changed"; "limits" => serde_json::to_string(&requested).unwrap_or_default());
                container.spec.limits = requested;
                container.persist()
            });
            async move { persist?.await }.into_actor(container).map(|result, container, _| {
                result.map(|()| container.runtime.reported_limits(&container.spec.limits))
            })
        })))
    }
}

/// Returns the container's usage.
#[derive(Message)]
#[rtype(result = "Result<Metrics, ContainerError>")]
pub struct GetMetrics;

impl Handler<GetMetrics> for Container {
    type Result = ResponseFuture<Result<Metrics, ContainerError>>;

    fn handle(&mut self, _message: GetMetrics, _ctx: &mut Context<Self>) -> Self::Result {
        self.mailbox.count();
        let runtime = self.runtime.clone();
        let age = self.created_at.elapsed().unwrap_or_default();
        Box::pin(async move { blocking(move || runtime.metrics(age)).await })
    }
}

/// Runs a blocking runtime call off the actor thread.
pub async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, RuntimeError> + Send + 'static,
) -> Result<T, ContainerError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|error| ContainerError::Runtime { source: RuntimeError::failed(format!("runtime call panicked: {error}")) })?
        .map_err(ContainerError::from)
}

type ShimHalves = (
    u32,
    BytesMut,
    Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    bool,
);

/// Splits a started process's stdio connection into its two halves. The
/// last element is whether the shim expects acknowledgements of its
/// output. The runtime has already consumed the start frame.
fn split_stdio(started: StartedProcess) -> Result<ShimHalves, ContainerError> {
    let acknowledge = matches!(started.stdio, StdioConnection::UnixAcknowledged(_));
    let (reader, writer): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Box<dyn tokio::io::AsyncWrite + Send + Unpin>) =
        match started.stdio {
            StdioConnection::Memory(stream) => {
                let (reader, writer) = tokio::io::split(stream);
                (Box::new(reader), Box::new(writer))
            }
            StdioConnection::Replay(frames) => (Box::new(std::io::Cursor::new(frames)), Box::new(tokio::io::sink())),
            StdioConnection::Unix(stream) | StdioConnection::UnixAcknowledged(stream) => {
                let io_error = |error: std::io::Error| {
                    ContainerError::from(RuntimeError::failed(format!("cannot use the process shim socket: {error}")))
                };
                stream.set_nonblocking(true).map_err(io_error)?;
                let stream = tokio::net::UnixStream::from_std(stream).map_err(io_error)?;
                let (reader, writer) = stream.into_split();
                (Box::new(reader), Box::new(writer))
            }
        };
    Ok((started.pid, BytesMut::new(), reader, writer, acknowledge))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::memory::MemoryRuntime;
    use crate::runtime::{ContainerConfig, OomWait, OomWatch, Runtime};
    use std::os::fd::BorrowedFd;

    /// A watch that reports a kill count once, then waits to be stopped.
    struct OneCount {
        initial: u64,
        then: Option<u64>,
    }

    impl OomWatch for OneCount {
        fn initial_kills(&self) -> u64 {
            self.initial
        }

        fn wait(&mut self, stop: BorrowedFd<'_>) -> Result<OomWait, RuntimeError> {
            if let Some(total) = self.then.take() {
                return Ok(OomWait::Kills(total));
            }
            crate::linux::syscalls::wait_readable(stop, -1).map_err(|error| RuntimeError::failed(error.to_string()))?;
            Ok(OomWait::Stopped)
        }
    }

    /// A container of the in-memory runtime whose OOM watch is scripted.
    struct WithOomWatch {
        inner: Arc<dyn ContainerRuntime>,
        watch: std::sync::Mutex<Option<OneCount>>,
    }

    impl ContainerRuntime for WithOomWatch {
        fn run(&self, process_id: &str, spec: &ProcessSpec) -> Result<StartedProcess, RuntimeError> {
            self.inner.run(process_id, spec)
        }
        fn stop(&self, kill: bool) -> Result<(), RuntimeError> {
            self.inner.stop(kill)
        }
        fn destroy(&self) -> Result<(), RuntimeError> {
            self.inner.destroy()
        }
        fn stream_in(&self, destination: &str, user: &str, tar: &mut dyn std::io::Read) -> Result<(), RuntimeError> {
            self.inner.stream_in(destination, user, tar)
        }
        fn stream_out(&self, source: &str, user: &str) -> Result<Box<dyn std::io::Read + Send>, RuntimeError> {
            self.inner.stream_out(source, user)
        }
        fn update_limits(&self, current: &Limits, requested: &Limits) -> Result<(), RuntimeError> {
            self.inner.update_limits(current, requested)
        }
        fn reported_limits(&self, set: &Limits) -> Limits {
            self.inner.reported_limits(set)
        }
        fn metrics(&self, age: std::time::Duration) -> Result<Metrics, RuntimeError> {
            self.inner.metrics(age)
        }
        fn describe(&self) -> serde_json::Value {
            self.inner.describe()
        }
        fn watch_oom(&self) -> Result<Option<Box<dyn OomWatch>>, RuntimeError> {
            Ok(self.watch.lock().unwrap().take().map(|watch| Box::new(watch) as Box<dyn OomWatch>))
        }
    }

    #[actix::test]
    async fn oom_kills_become_info_events() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ContainerSpec { handle: "box".into(), ..ContainerSpec::default() };
        let config = ContainerConfig { handle: "box".into(), spec: spec.clone(), container_dir: dir.path().to_path_buf(), id_mappings: None, network: None };
        let inner = MemoryRuntime::new().create(&config).unwrap();
        // One kill was recorded before a restart, two more happened while
        // no server watched, and one comes after the watch starts.
        let runtime = Arc::new(WithOomWatch { inner, watch: std::sync::Mutex::new(Some(OneCount { initial: 3, then: Some(4) })) });
        let logger = Logger::root(slog::Discard, o!());
        let pools = NetworkPools {
            subnets: crate::pools::subnet::SubnetPool::new("10.254.0.0/22".parse().unwrap()).start(),
            ports: crate::pools::port::PortPool::new(61001, 10).start(),
        };
        let container = Container::new("box".into(), spec, runtime, None, dir.path().to_path_buf(), StreamTable::default(), &logger, None, pools)
            .with_oom_record(vec![OUT_OF_MEMORY_EVENT.to_string()], 1)
            .start();

        let mut events = Vec::new();
        for _ in 0..500 {
            events = container.send(GetInfo).await.unwrap().unwrap().events.unwrap_or_default();
            if events.len() == 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(events, vec![OUT_OF_MEMORY_EVENT; 4]);

        // The state file keeps the events and the count for a restart.
        let mut record = serde_json::Value::Null;
        for _ in 0..500 {
            let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap_or_default();
            record = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
            if record["oom_kills"] == 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(record["oom_kills"], 4);
        assert_eq!(record["events"].as_array().map(Vec::len), Some(4));
    }

    #[test]
    fn state_predicates() {
        assert!(ContainerState::Active.can_run());
        assert!(!ContainerState::Stopped.can_run());
        assert!(ContainerState::Stopped.can_stop());
        assert!(!ContainerState::Destroying.can_destroy());
        assert!(!ContainerState::Destroying.can_change_properties());
        assert_eq!(ContainerState::Stopped.as_info(), "stopped");
    }

    #[test]
    fn limit_updates_keep_zero_fields() {
        let mut current = Limits::default();
        current.memory_limits.limit_in_bytes = 64 << 20;
        current.cpu_limits.weight = 512;
        current.bandwidth_limits = BandwidthLimits { rate: 10, burst: 20 };
        let unchanged = merge_limits(&current, &LimitUpdate::Memory(MemoryLimits { limit_in_bytes: 0 }));
        assert_eq!(unchanged, current);
        assert_eq!(merge_limits(&current, &LimitUpdate::Cpu(CpuLimits::default())), current);
        let memory = merge_limits(&current, &LimitUpdate::Memory(MemoryLimits { limit_in_bytes: 128 << 20 }));
        assert_eq!(memory.memory_limits.limit_in_bytes, 128 << 20);
        let cpu = merge_limits(&current, &LimitUpdate::Cpu(CpuLimits { weight: 0, limit_in_shares: 50 }));
        assert_eq!(cpu.cpu_limits, CpuLimits { weight: 0, limit_in_shares: 50 });
        let bandwidth = merge_limits(&current, &LimitUpdate::Bandwidth(BandwidthLimits { rate: 0, burst: 99 }));
        assert_eq!(bandwidth.bandwidth_limits, BandwidthLimits { rate: 10, burst: 99 });
        let disk = merge_limits(&current, &LimitUpdate::Disk(DiskLimits { byte_hard: 1 << 30, scope: 1, ..DiskLimits::default() }));
        assert_eq!(disk.disk_limits, DiskLimits { byte_hard: 1 << 30, scope: 1, ..DiskLimits::default() });
        assert_eq!(merge_limits(&current, &LimitUpdate::Disk(DiskLimits { scope: 1, ..DiskLimits::default() })), current);
    }
}
