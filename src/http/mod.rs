//! The HTTP front end.
//!
//! Garden's four process routes (Run, Attach and the stdout and stderr
//! attaches) send an HTTP head and then use the raw connection, which
//! actix-web cannot do. So every connection goes through a demux first
//! ([`demux`]): it reads the first request head, serves a process route on
//! the socket itself ([`hijack`]), and hands any other connection, with the
//! bytes already read, to actix-http's HTTP/1 service running the actix-web
//! app of [`routes`]. The two tar routes, stream in and stream out, live in
//! [`files`].

pub mod debug;
pub mod demux;
pub mod error;
pub mod files;
pub mod hijack;
pub mod metrics;
pub mod router;
pub mod routes;
pub mod vars;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::{info, o, Logger};
use tokio_util::sync::CancellationToken;

use crate::actors::reaper::{Reaper, SetDestroyer};
use crate::actors::registry::{Registry, RegistrySettings};
use crate::actors::{Introspect, StreamIds, StreamTable};
use crate::config::{Config, MAX_JSON_BODY_BYTES};
use crate::logging::LevelSwitch;
use crate::pools::uid::{IdRange, UidPool};
use crate::runtime::Runtime;

pub use error::ApiError;

/// Shared state of every request handler.
pub struct AppState {
    pub registry: Addr<Registry>,
    pub reaper: Addr<Reaper>,
    pub runtime: Arc<dyn Runtime>,
    pub stream_table: StreamTable,
    pub stream_ids: StreamIds,
    /// `max_containers` reported by Capacity.
    pub max_containers: u64,
    /// Largest JSON request body read.
    pub max_body_bytes: usize,
    /// Forget a finished process once its exit status was sent.
    pub cleanup_process_dirs_on_wait: bool,
    pub logger: Logger,
    /// Cancelled when the server stops, which ends every hijacked connection.
    pub shutdown: CancellationToken,
    /// Request counters and latencies, shown on the debug listener.
    pub metrics: Arc<metrics::Metrics>,
    request_ids: AtomicU64,
}

impl AppState {
    /// Returns a child logger for a new request.
    pub fn request_logger(&self, route: router::Route, found: &router::RouteMatch) -> Logger {
        let request_id = self.request_ids.fetch_add(1, Ordering::Relaxed) + 1;
        routes::route_logger(&self.logger, request_id, route, found)
    }
}

/// Pauses a container's grace timer while alive; dropping it ends the
/// request for the timer.
pub struct PauseGuard {
    reaper: Addr<Reaper>,
    handle: String,
}

impl PauseGuard {
    pub fn new(state: &AppState, handle: &str) -> PauseGuard {
        state.reaper.do_send(crate::actors::reaper::Pause { handle: handle.to_string() });
        PauseGuard { reaper: state.reaper.clone(), handle: handle.to_string() }
    }
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.reaper.do_send(crate::actors::reaper::Unpause { handle: std::mem::take(&mut self.handle) });
    }
}

/// The address of the API listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(formatter, "tcp://{addr}"),
            ListenAddr::Unix(path) => write!(formatter, "unix://{}", path.display()),
        }
    }
}

/// How long a graceful stop waits for plain requests in flight.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server inside the current actix system.
pub struct Server {
    handle: actix_server::ServerHandle,
    debug: actix_web::dev::ServerHandle,
    debug_addr: SocketAddr,
    shutdown: CancellationToken,
    addr: ListenAddr,
    /// Identity of the socket file this server bound, so that a stop
    /// removes it only while it is still this server's.
    socket_file: Option<FileId>,
    registry: Addr<Registry>,
    metrics: Arc<metrics::Metrics>,
    logger: Logger,
}

impl Server {
    /// Starts the actors and the API listener of `config` with `runtime`.
    /// Must be called inside an actix system. The debug listener's
    /// `/log-level` changes a switch that `logger` does not read; use
    /// [`Server::start_with_level`] to connect them.
    pub fn start(config: &Config, runtime: Arc<dyn Runtime>, logger: Logger) -> std::io::Result<Server> {
        Server::start_with_level(config, runtime, logger, LevelSwitch::new(config.log_level))
    }

    /// Starts the server like [`Server::start`], with `level` as the switch
    /// that `/log-level` sets (the one `logger` filters with).
    pub fn start_with_level(
        config: &Config,
        runtime: Arc<dyn Runtime>,
        logger: Logger,
        level: LevelSwitch,
    ) -> std::io::Result<Server> {
        let uid_pool = UidPool::from_proc(
            IdRange { start: config.uid_map_start, length: config.uid_map_length },
            IdRange { start: config.gid_map_start, length: config.gid_map_length },
        )
        .start();
        let mut debug_pools: BTreeMap<String, Recipient<Introspect>> = BTreeMap::new();
        debug_pools.insert("uid".into(), uid_pool.clone().recipient());
        let network_pools = crate::pools::NetworkPools {
            subnets: crate::pools::subnet::SubnetPool::new(config.network_pool).start(),
            ports: crate::pools::port::PortPool::new(config.port_pool_start, config.port_pool_size).start(),
        };
        debug_pools.insert("subnet".into(), network_pools.subnets.clone().recipient());
        debug_pools.insert("port".into(), network_pools.ports.clone().recipient());
        let stream_table = StreamTable::default();
        let reaper = Reaper::new(logger.clone()).start();
        let metrics = metrics::Metrics::new();
        let mut registry = Registry::new(
            runtime.clone(),
            uid_pool,
            network_pools.clone(),
            reaper.clone(),
            RegistrySettings {
                depot: config.depot.clone(),
                default_grace_time: config.default_grace_time,
                // The smaller of the subnet pool's /30 blocks and the
                // operator's limit: every container needs a subnet.
                max_containers: config.effective_max_containers(),
                oom_events: metrics.oom_events(),
                max_finished_processes: config.max_finished_processes,
            },
            stream_table.clone(),
            logger.clone(),
        );
        // Restore finishes before the listener is bound, so no request
        // reaches a half-restored server.
        registry.restore_from_depot(config.destroy_containers_on_startup);
        let registry = registry.start();
        let stream_ids = StreamIds::starting_after(crate::state::reserve_stream_ids(&config.depot, &logger));
        reaper.do_send(SetDestroyer(registry.clone().recipient()));
        let debug_listener = std::net::TcpListener::bind((config.debug_bind_ip, config.debug_bind_port))?;
        let (debug, debug_addr) = debug::start(
            debug_listener,
            debug::DebugState {
                registry: registry.clone(),
                reaper: reaper.clone(),
                pools: debug_pools,
                metrics: metrics.clone(),
                level,
                depot: config.depot.clone(),
                logger: logger.new(o!("listener" => "debug")),
            },
        )?;
        let shutdown = CancellationToken::new();
        let state = Arc::new(AppState {
            registry: registry.clone(),
            reaper,
            runtime,
            stream_table,
            stream_ids,
            max_containers: config.effective_max_containers(),
            max_body_bytes: MAX_JSON_BODY_BYTES,
            cleanup_process_dirs_on_wait: config.cleanup_process_dirs_on_wait,
            logger: logger.clone(),
            shutdown: shutdown.clone(),
            metrics,
            request_ids: AtomicU64::new(0),
        });

        let builder = actix_server::Server::build()
            .workers(2)
            .shutdown_timeout(SHUTDOWN_TIMEOUT.as_secs())
            .disable_signals();
        let mut socket_file = None;
        let (builder, addr) = match &config.bind_socket {
            Some(path) => {
                let listener = bind_unix(path)?;
                socket_file = file_id(path);
                let factory_state = state.clone();
                let builder = builder.listen_uds("garden-api", listener, move || demux::factory(factory_state.clone()))?;
                (builder, ListenAddr::Unix(path.clone()))
            }
            None => {
                let listener = std::net::TcpListener::bind((config.bind_ip, config.bind_port))?;
                let local = listener.local_addr()?;
                let factory_state = state.clone();
                let builder = builder.listen("garden-api", listener, move || demux::factory(factory_state.clone()))?;
                (builder, ListenAddr::Tcp(local))
            }
        };
        let server = builder.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        info!(logger, "server listening"; "address" => %addr, "debug_address" => %debug_addr);
        Ok(Server { handle, debug, debug_addr, shutdown, addr, socket_file, registry, metrics: state.metrics.clone(), logger })
    }

    /// Returns the address the API listens on (with the real port when the
    /// configuration asked for port 0).
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// Returns the address of the debug listener.
    pub fn debug_addr(&self) -> SocketAddr {
        self.debug_addr
    }

    /// Returns the server's counters, for components started next to it,
    /// such as an out-of-memory watcher that adds to
    /// [`metrics::Metrics::oom_events`].
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        self.metrics.clone()
    }

    pub fn registry(&self) -> &Addr<Registry> {
        &self.registry
    }

    /// Stops accepting, ends every hijacked connection without an exit
    /// message, and waits for plain requests in flight. Containers and their
    /// processes are left running.
    pub async fn stop(self) {
        info!(self.logger, "server stopping");
        self.shutdown.cancel();
        self.handle.stop(true).await;
        self.debug.stop(true).await;
        // A server started on the same path meanwhile has replaced the
        // file with its own, which stays.
        if let (ListenAddr::Unix(path), Some(bound)) = (&self.addr, self.socket_file) {
            if file_id(path) == Some(bound) {
                let _ = std::fs::remove_file(path);
            }
        }
        info!(self.logger, "server stopped");
    }
}

/// Device, inode and change time of a file. The change time distinguishes
/// a new file from an old one whose inode number it reused.
type FileId = (u64, u64, i64, i64);

/// Returns the identity of the file at `path`.
fn file_id(path: &std::path::Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|metadata| (metadata.dev(), metadata.ino(), metadata.ctime(), metadata.ctime_nsec()))
}

/// Binds a Unix socket, replacing a stale socket file, with mode 0777 so
/// clients running as other users can connect.
fn bind_unix(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; refusing to replace it", path.display()),
            ))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

/// A server on its own thread and actix system, for tests and tools that
/// are not themselves actix programs.
pub struct TestServer {
    addr: ListenAddr,
    debug_addr: SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server with `config` and `runtime`. Set both `bind_port`
    /// and `debug_bind_port` to 0 to get free ports, so parallel servers do
    /// not collide; [`TestServer::addr`] and [`TestServer::debug_addr`]
    /// report them.
    pub fn start(config: Config, runtime: Arc<dyn Runtime>, logger: Logger) -> std::io::Result<TestServer> {
        let (started_sender, started) = std::sync::mpsc::channel();
        let (stop, stop_receiver) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("trellis-test-server".into()).spawn(move || {
            let system = actix_rt::System::new();
            system.block_on(async move {
                let server = match Server::start(&config, runtime, logger) {
                    Ok(server) => server,
                    Err(error) => {
                        let _ = started_sender.send(Err(error));
                        return;
                    }
                };
                let _ = started_sender.send(Ok((server.addr().clone(), server.debug_addr())));
                // Wait for the stop request without blocking the system's thread.
                let (wake, woken) = tokio::sync::oneshot::channel();
                std::thread::spawn(move || {
                    let _ = stop_receiver.recv();
                    let _ = wake.send(());
                });
                let _ = woken.await;
                server.stop().await;
            });
        })?;
        let (addr, debug_addr) = started
            .recv()
            .map_err(|_| std::io::Error::other("the server thread ended during start-up"))??;
        Ok(TestServer { addr, debug_addr, stop: Some(stop), thread: Some(thread) })
    }

    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    pub fn debug_addr(&self) -> SocketAddr {
        self.debug_addr
    }

    /// Returns the TCP address; panics for a Unix socket server.
    pub fn tcp_addr(&self) -> SocketAddr {
        match &self.addr {
            ListenAddr::Tcp(addr) => *addr,
            ListenAddr::Unix(path) => panic!("server listens on {}", path.display()),
        }
    }

    /// Stops the server and waits for its thread.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}
