//! The Container actor: one per container handle.
//!
//! It owns the container's spec, state, properties and process table. Runtime
//! calls run in `spawn_blocking`; handlers that change what the state file
//! records are atomic (no other message interleaves) so the file always
//! matches the actor.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use actix::prelude::*;
use bytes::BytesMut;
use slog::{debug, info, o, warn, Logger};

use super::process::{Process, ProcessStart};
use super::{ContainerError, Introspect, StreamTable};
use crate::api::{
    BandwidthLimits, ContainerInfo, ContainerSpec, CpuLimits, DiskLimits, Limits, MemoryLimits, Metrics, NetInResponse,
    NetOutRule, PortMapping, ProcessSpec, Properties,
};
use crate::pools::port::{AllocatePort, ClaimPort, ReleasePort};
use crate::pools::subnet::{NetworkAllocation, ReleaseNetwork};
use crate::pools::NetworkPools;
use crate::runtime::{ContainerRuntime, RuntimeError, StartedProcess, StdioConnection};

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

/// Name of the state file inside the container's directory.
pub const STATE_FILE: &str = "container.json";

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

// NOTE: a finished process keeps its slot (a small actor and its state
// directory) until the container is destroyed, unless the operator enables
// cleanup-process-dirs-on-wait, so a container that runs a health check
// every few seconds grows the server slowly but without a cap.
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
    stream_table: StreamTable,
    logger: Logger,
    /// The container's subnet and addresses, returned to the pool by
    /// destroy.
    network: Option<NetworkAllocation>,
    /// Net-in mappings, whose host ports destroy returns to the pool.
    mapped_ports: Vec<PortMapping>,
    external_ip: String,
    pools: NetworkPools,
}

/// The on-disk record of a container, written atomically.
#[derive(serde::Serialize)]
struct StateRecord<'a> {
    handle: &'a str,
    state: ContainerState,
    grace_time: i64,
    properties: &'a Properties,
    created_at_unix_ns: u128,
    spec: &'a ContainerSpec,
    network: Option<&'a NetworkAllocation>,
    mapped_ports: &'a [PortMapping],
}

impl Container {
    /// Builds the actor for a container the runtime has created.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        handle: String,
        spec: ContainerSpec,
        runtime: Arc<dyn ContainerRuntime>,
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
            stream_table,
            network,
            mapped_ports: Vec::new(),
            external_ip,
            pools,
        }
    }

    /// Serialises the state record for [`write_atomically`].
    pub fn state_record(&self) -> Vec<u8> {
        let record = StateRecord {
            handle: &self.handle,
            state: self.state,
            grace_time: self.grace_time,
            properties: &self.properties,
            created_at_unix_ns: self
                .created_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|age| age.as_nanos())
                .unwrap_or(0),
            spec: &self.spec,
            network: self.network.as_ref(),
            mapped_ports: &self.mapped_ports,
        };
        let mut bytes = serde_json::to_vec_pretty(&record).expect("state record serialises");
        bytes.push(b'\n');
        bytes
    }

    /// Returns a future that writes the current state file off the actor
    /// thread.
    fn persist(&self) -> impl std::future::Future<Output = Result<(), ContainerError>> + 'static {
        let path = self.dir.join(STATE_FILE);
        let bytes = self.state_record();
        async move {
            let target = path.clone();
            tokio::task::spawn_blocking(move || write_atomically(&target, &bytes))
                .await
                .map_err(|error| ContainerError::StateFile { path: path.display().to_string(), reason: error.to_string() })?
                .map_err(|error| ContainerError::StateFile { path: path.display().to_string(), reason: error.to_string() })
        }
    }

    fn info(&self) -> ContainerInfo {
        ContainerInfo {
            state: self.state.as_info().into(),
            // No out-of-memory event has been recorded, and Garden reports
            // none as null.
            events: None,
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
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new
/// file: a temporary file in the same directory, fsync, rename, then fsync
/// of the directory so the rename itself is durable.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().and_then(|name| name.to_str()).unwrap_or("state");
    let temporary = directory.join(format!(".{file_name}.tmp"));
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(directory)?.sync_all()
}

/// Returns the container's Info.
#[derive(Message)]
#[rtype(result = "Result<ContainerInfo, ContainerError>")]
pub struct GetInfo;

impl Handler<GetInfo> for Container {
    type Result = Result<ContainerInfo, ContainerError>;

    fn handle(&mut self, _message: GetInfo, _ctx: &mut Context<Self>) -> Self::Result {
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
        if !self.state.can_destroy() {
            return Box::pin(fut::ready(Err(ContainerError::AlreadyDestroying { handle: self.handle.clone() })));
        }
        let previous = self.state;
        self.state = ContainerState::Destroying;
        let runtime = self.runtime.clone();
        let destroy = async move { blocking(move || runtime.destroy()).await };
        Box::pin(destroy.into_actor(self).map(move |result, container, ctx| {
            match &result {
                Ok(()) => {
                    info!(container.logger, "container destroyed");
                    container.processes.clear();
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
    type Result = ResponseFuture<Result<(), ContainerError>>;

    fn handle(&mut self, message: NetOut, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(error) = self.check_not_destroying() {
            return Box::pin(std::future::ready(Err(error)));
        }
        // NOTE: net-out rules are applied but not written to the state
        // file, so a server that restores containers cannot replay them.
        let runtime = self.runtime.clone();
        Box::pin(async move { blocking(move || runtime.net_out(&message.rules)).await })
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

    fn handle(&mut self, message: RunProcess, _ctx: &mut Context<Self>) -> Self::Result {
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

        let runtime = self.runtime.clone();
        let logger = self.logger.clone();
        let stream_table = self.stream_table.clone();
        let tty = message.spec.tty.is_some();
        let id = process_id.clone();
        let started_at = Instant::now();
        let start = async move {
            let spec = message.spec;
            let run_id = id.clone();
            let started = blocking(move || runtime.run(&run_id, &spec)).await?;
            let (pid, leftover, reader, writer) = split_stdio(started)?;
            info!(logger, "process started"; "process_id" => &id, "pid" => pid,
                "duration_ms" => started_at.elapsed().as_millis() as u64);
            Ok(Process::start_with(ProcessStart { process_id: id, pid, tty, logger, stream_table, leftover, reader, writer }))
        };
        Box::pin(start.into_actor(self).map(move |result: Result<Addr<Process>, ContainerError>, container, _| {
            match &result {
                Ok(addr) => {
                    container.processes.insert(process_id, ProcessSlot::Running(addr.clone()));
                }
                Err(_) => {
                    container.processes.remove(&process_id);
                }
            }
            result
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
}

impl Handler<ForgetProcess> for Container {
    type Result = ();

    fn handle(&mut self, message: ForgetProcess, ctx: &mut Context<Self>) {
        if !matches!(self.processes.get(&message.process_id), Some(ProcessSlot::Running(_))) {
            return;
        }
        self.processes.remove(&message.process_id);
        debug!(self.logger, "finished process forgotten"; "process_id" => &message.process_id);
        let runtime = self.runtime.clone();
        let logger = self.logger.clone();
        let process_id = message.process_id;
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
}

/// Writes the container's state file; used once after create.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct PersistState;

impl Handler<PersistState> for Container {
    type Result = AtomicResponse<Self, Result<(), ContainerError>>;

    fn handle(&mut self, _message: PersistState, _ctx: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(Box::pin(self.persist().into_actor(self)))
    }
}

impl Handler<Introspect> for Container {
    type Result = ResponseFuture<serde_json::Value>;

    fn handle(&mut self, _message: Introspect, _ctx: &mut Context<Self>) -> Self::Result {
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
            "container_path": self.dir,
            "runtime": self.runtime.describe(),
        });
        Box::pin(async move {
            let mut list = Vec::new();
            for (id, addr) in processes {
                let value = match addr {
                    None => serde_json::json!({ "process_id": id, "starting": true }),
                    Some(addr) => addr.send(Introspect).await.unwrap_or(serde_json::Value::Null),
                };
                list.push(value);
            }
            snapshot["processes"] = serde_json::Value::Array(list);
            snapshot
        })
    }
}

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
);

/// Splits a started process's stdio connection into its two halves. The
/// runtime has already consumed the start frame.
fn split_stdio(started: StartedProcess) -> Result<ShimHalves, ContainerError> {
    let (reader, writer): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Box<dyn tokio::io::AsyncWrite + Send + Unpin>) =
        match started.stdio {
            StdioConnection::Memory(stream) => {
                let (reader, writer) = tokio::io::split(stream);
                (Box::new(reader), Box::new(writer))
            }
            StdioConnection::Unix(stream) => {
                let io_error = |error: std::io::Error| {
                    ContainerError::from(RuntimeError::failed(format!("cannot use the process shim socket: {error}")))
                };
                stream.set_nonblocking(true).map_err(io_error)?;
                let stream = tokio::net::UnixStream::from_std(stream).map_err(io_error)?;
                let (reader, writer) = stream.into_split();
                (Box::new(reader), Box::new(writer))
            }
        };
    Ok((started.pid, BytesMut::new(), reader, writer))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn atomic_write_replaces_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }
}
