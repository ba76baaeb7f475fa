//! The debug listener, on its own address (`debug-bind-ip`,
//! `debug-bind-port`) apart from the Garden API so operators can keep it
//! private.
//!
//! - `GET /debug/actors` (also `/debug/introspect`): an owned snapshot of
//!   every actor as JSON, with each actor's mailbox depth and messages handled.
//! - `GET /debug/actors/<handle>`: the same for one container.
//! - `GET /debug/`: an HTML page that shows the actor tree and refreshes itself.
//! - `GET /debug/vars`: Go expvar shape, see [`super::vars`].
//! - `GET /metrics`: OpenMetrics text, see [`super::metrics`].
//! - `POST /log-level` (or `PUT`): sets the log level from the body.
//!
//! Any other path returns 404 with the list of routes, so Go's
//! `/debug/pprof/` profiling routes return 404 too.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::{Addr, Recipient};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};
use slog::{info, warn, Logger};

use super::metrics::{ActorGauges, Metrics, PoolUsage, OPENMETRICS_CONTENT_TYPE};
use super::vars;
use crate::actors::reaper::Reaper;
use crate::actors::registry::Registry;
use crate::actors::Introspect;
use crate::logging::LevelSwitch;

/// Maximum wait for the actors' snapshots. An actor busy for longer (one
/// blocked in a long operation) makes the endpoint return 503.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);

/// Maximum `/log-level` body size, in bytes.
const MAX_LEVEL_BODY_BYTES: usize = 64;

/// The routes listed in the 404 response.
const ROUTES: &str = "GET /debug/, GET /debug/actors, GET /debug/actors/<handle>, GET /debug/vars, GET /metrics, POST or PUT /log-level";

/// Shared state of the debug handlers: the actors, the counters and the log level.
#[derive(Clone)]
pub struct DebugState {
    pub registry: Addr<Registry>,
    pub reaper: Addr<Reaper>,
    /// Resource pools by name (`uid`, `subnet`, `port`). Any actor that
    /// handles [`Introspect`] can be added; its snapshot is shown under
    /// `pools`, and `/metrics` reads its usage with [`PoolUsage::from_snapshot`].
    pub pools: BTreeMap<String, Recipient<Introspect>>,
    pub metrics: Arc<Metrics>,
    pub level: LevelSwitch,
    /// Depot directory, for `depotDirs` in `/debug/vars`.
    pub depot: PathBuf,
    pub logger: Logger,
}

/// A snapshot that could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the {actor} actor did not answer within {seconds} seconds")]
    Timeout { actor: String, seconds: u64 },
    #[error("the {actor} actor has stopped")]
    Stopped { actor: String },
}

async fn ask<F>(actor: String, request: F) -> Result<Value, SnapshotError>
where
    F: std::future::Future<Output = Result<Value, actix::MailboxError>>,
{
    match tokio::time::timeout(SNAPSHOT_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(SnapshotError::Stopped { actor }),
        Err(_) => Err(SnapshotError::Timeout { actor, seconds: SNAPSHOT_TIMEOUT.as_secs() }),
    }
}

/// Gathers the snapshot of every actor.
pub async fn snapshot(state: &DebugState) -> Result<Value, SnapshotError> {
    let registry = ask("registry".into(), state.registry.send(Introspect)).await?;
    let reaper = ask("reaper".into(), state.reaper.send(Introspect)).await?;
    let mut pools = serde_json::Map::new();
    for (name, pool) in &state.pools {
        pools.insert(name.clone(), ask(format!("{name} pool"), pool.send(Introspect)).await?);
    }
    // Each container's actor queries its own watcher, so the list is
    // gathered from the containers' entries.
    let oom_watchers: Vec<Value> = registry["containers"]
        .as_array()
        .map(|containers| containers.iter().map(|entry| entry["container"]["oom_watcher"].clone()).filter(|watcher| !watcher.is_null()).collect())
        .unwrap_or_default();
    Ok(json!({ "registry": registry, "reaper": reaper, "pools": pools, "oom_watchers": oom_watchers }))
}

fn json_response(status: StatusCode, value: &Value) -> HttpResponse {
    HttpResponse::build(status).content_type("application/json").body(crate::api::encode(value))
}

fn error_response(status: StatusCode, message: &str) -> HttpResponse {
    json_response(status, &json!({ "error": message }))
}

fn snapshot_failed(state: &DebugState, error: &SnapshotError) -> HttpResponse {
    warn!(state.logger, "debug snapshot failed"; "error" => %error);
    error_response(StatusCode::SERVICE_UNAVAILABLE, &error.to_string())
}

async fn actors(state: web::Data<DebugState>) -> HttpResponse {
    match snapshot(&state).await {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(error) => snapshot_failed(&state, &error),
    }
}

async fn actor(state: web::Data<DebugState>, handle: web::Path<String>) -> HttpResponse {
    let handle = handle.into_inner();
    let snapshot = match snapshot(&state).await {
        Ok(value) => value,
        Err(error) => return snapshot_failed(&state, &error),
    };
    let containers = snapshot["registry"]["containers"].as_array().cloned().unwrap_or_default();
    let Some(entry) = containers.into_iter().find(|entry| entry["handle"] == handle.as_str()) else {
        return error_response(StatusCode::NOT_FOUND, &format!("container not found: {handle}"));
    };
    let records = snapshot["reaper"]["records"].as_array().cloned().unwrap_or_default();
    let grace = records.into_iter().find(|record| record["handle"] == handle.as_str()).unwrap_or(Value::Null);
    json_response(StatusCode::OK, &json!({ "registry_entry": entry, "reaper_record": grace }))
}

async fn page() -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(PAGE)
}

async fn debug_vars(state: web::Data<DebugState>) -> HttpResponse {
    let snapshot = match snapshot(&state).await {
        Ok(value) => value,
        Err(error) => return snapshot_failed(&state, &error),
    };
    let mut gauges = ActorGauges::default();
    gauges.count_registry(&snapshot["registry"]);
    let memory = vars::ProcessMemory::read();
    let totals = state.metrics.request_totals();
    let depot = state.depot.clone();
    let depot_dirs = web::block(move || vars::depot_dirs(&depot)).await.unwrap_or(-1);
    let body = json!({
        "cmdline": std::env::args().collect::<Vec<_>>(),
        "memstats": vars::memstats(&memory),
        "numCPUS": std::thread::available_parallelism().map_or(1, |count| count.get()),
        // Go reports goroutines; the closest figure here is the thread count.
        "numGoRoutines": memory.threads,
        "depotDirs": depot_dirs,
        "loopDevices": 0,
        "backingStores": 0,
        "containers": gauges.containers_by_state.values().sum::<u64>(),
        "processes": gauges.processes,
        "runningProcesses": gauges.running_processes,
        "requests": totals.by_route,
        "clientErrors": totals.client_errors,
        "serverErrors": totals.server_errors,
        "oomEvents": state.metrics.oom_events().load(std::sync::atomic::Ordering::Relaxed),
        "pageFaults": memory.page_faults,
    });
    json_response(StatusCode::OK, &body)
}

async fn metrics(state: web::Data<DebugState>) -> HttpResponse {
    let snapshot = match snapshot(&state).await {
        Ok(value) => value,
        Err(error) => return snapshot_failed(&state, &error),
    };
    let mut gauges = ActorGauges::default();
    gauges.count_registry(&snapshot["registry"]);
    if let Some(pools) = snapshot["pools"].as_object() {
        for (name, pool) in pools {
            if let Some(usage) = PoolUsage::from_snapshot(pool) {
                gauges.pools.insert(name.clone(), usage);
            }
        }
    }
    HttpResponse::Ok().content_type(OPENMETRICS_CONTENT_TYPE).body(state.metrics.render(&gauges))
}

async fn log_level(state: web::Data<DebugState>, body: web::Bytes) -> HttpResponse {
    if body.len() > MAX_LEVEL_BODY_BYTES {
        return error_response(StatusCode::BAD_REQUEST, "invalid log level: the body is longer than 64 bytes");
    }
    let text = String::from_utf8_lossy(&body);
    match crate::logging::parse_level(&text) {
        Ok(level) => {
            let previous = state.level.level();
            // Logged at warn under whichever of the two levels lets more
            // through, so the change shows in both directions.
            if previous.is_at_least(level) {
                state.level.set(level);
                warn!(state.logger, "log level changed"; "from" => previous.as_str(), "to" => level.as_str());
            } else {
                warn!(state.logger, "log level changed"; "from" => previous.as_str(), "to" => level.as_str());
                state.level.set(level);
            }
            HttpResponse::NoContent().finish()
        }
        Err(message) => {
            info!(state.logger, "log level change rejected"; "error" => %message);
            error_response(StatusCode::BAD_REQUEST, &message)
        }
    }
}

async fn log_level_method(request: HttpRequest) -> HttpResponse {
    HttpResponse::build(StatusCode::METHOD_NOT_ALLOWED)
        .insert_header(("Allow", "POST, PUT"))
        .content_type("application/json")
        .body(crate::api::encode(&json!({ "error": format!("method {} not allowed on /log-level: use POST or PUT", request.method()) })))
}

async fn not_found(request: HttpRequest) -> HttpResponse {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("unknown debug route: {} {}; routes: {ROUTES}", request.method(), request.path()),
    )
}

/// Starts the debug listener in the current actix system and returns its
/// handle and bound address.
pub fn start(
    listener: std::net::TcpListener,
    state: DebugState,
) -> std::io::Result<(actix_web::dev::ServerHandle, std::net::SocketAddr)> {
    let addr = listener.local_addr()?;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .route("/debug/", web::get().to(page))
            .route("/debug/actors", web::get().to(actors))
            .route("/debug/introspect", web::get().to(actors))
            .route("/debug/actors/{handle}", web::get().to(actor))
            .route("/debug/vars", web::get().to(debug_vars))
            .route("/metrics", web::get().to(metrics))
            .service(
                web::resource("/log-level")
                    .route(web::post().to(log_level))
                    .route(web::put().to(log_level))
                    .default_service(web::to(log_level_method)),
            )
            .default_service(web::to(not_found))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok((handle, addr))
}

/// The page at `/debug/`: fetches `/debug/actors` every two seconds and
/// draws the actor tree. Each actor is a `<details>` element with the class
/// `actor` and its kind in `data-kind`.
const PAGE: &str = include_str!("debug_page.html");
