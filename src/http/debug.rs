//! The debug listener: `GET /debug/introspect` returns an owned snapshot of
//! every actor (registry, containers, processes, reaper, uid pool) as JSON.
//!
//! It listens on its own address (`debug-bind-ip`, `debug-bind-port`), apart
//! from the Garden API, so operators can keep it private.

use actix::Addr;
use actix_web::{web, App, HttpResponse, HttpServer};

use crate::actors::reaper::Reaper;
use crate::actors::registry::Registry;
use crate::actors::Introspect;
use crate::pools::uid::UidPool;

/// The actors the snapshot is gathered from.
#[derive(Clone)]
pub struct DebugState {
    pub registry: Addr<Registry>,
    pub reaper: Addr<Reaper>,
    pub uid_pool: Addr<UidPool>,
    pub network_pools: crate::pools::NetworkPools,
}

async fn introspect(state: web::Data<DebugState>) -> HttpResponse {
    let registry = state.registry.send(Introspect).await.unwrap_or(serde_json::Value::Null);
    let reaper = state.reaper.send(Introspect).await.unwrap_or(serde_json::Value::Null);
    let uid_pool = state.uid_pool.send(Introspect).await.unwrap_or(serde_json::Value::Null);
    let subnet_pool = state.network_pools.subnets.send(Introspect).await.unwrap_or(serde_json::Value::Null);
    let port_pool = state.network_pools.ports.send(Introspect).await.unwrap_or(serde_json::Value::Null);
    let snapshot = serde_json::json!({
        "registry": registry,
        "reaper": reaper,
        "uid_pool": uid_pool,
        "subnet_pool": subnet_pool,
        "port_pool": port_pool,
    });
    HttpResponse::Ok().content_type("application/json").body(crate::api::encode(&snapshot))
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
            .route("/debug/introspect", web::get().to(introspect))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok((handle, addr))
}
