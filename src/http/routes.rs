//! The plain (not hijacked) routes, served by actix-web.
//!
//! One default service routes every request with [`super::router`], so the
//! Go server's matching rules apply: 404 `404 page not found\n`, 405 with
//! `Allow`, empty parameters and no trailing-slash variants.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use slog::{info, o, warn, Logger};

use super::error::ApiError;
use super::metrics::Operation;
use super::router::{match_route, Route, RouteError, RouteMatch};
use super::{AppState, PauseGuard};
use crate::actors::container::{
    blocking, GetInfo, GetLimits, GetMetrics, GetProperties, GetProperty, LimitUpdate, NetIn, NetOut, RemoveProperty,
    SetGraceTime, SetProperty, StopContainer, UpdateLimits,
};
use crate::actors::reaper::Reset;
use crate::actors::registry::{CreateContainer, DestroyByHandle, ListContainers, LookupContainer};
use crate::actors::{Container, ContainerError};
use crate::api::{
    self, ContainerInfoEntry, ContainerMetricsEntry, ContainerSpec, CreateResponse, ErrorEnvelope, ListResponse,
    PropertyValue, StopRequest,
};

/// Builds a `text/plain` response as the Go router sends it.
fn plain_text(status: StatusCode, text: &'static str) -> HttpResponse {
    HttpResponse::build(status).content_type("text/plain; charset=utf-8").body(text)
}

/// Builds a 200 JSON response: one value followed by `\n`.
fn json_ok<T: serde::Serialize>(value: &T) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(api::encode(value))
}

/// Builds the error response with the envelope.
pub fn error_response(error: &ApiError) -> HttpResponse {
    let (status, body) = error.body();
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status).content_type("application/json").body(body)
}

/// Routes and serves every plain request (the app's default service).
pub async fn dispatch(request: HttpRequest, payload: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    let found = match match_route(request.method().as_str(), request.path()) {
        Ok(found) => found,
        Err(RouteError::NotFound) => {
            state.metrics.record_request(UNMATCHED_ROUTE, 404, std::time::Duration::ZERO);
            return plain_text(StatusCode::NOT_FOUND, "404 page not found\n");
        }
        Err(RouteError::MethodNotAllowed { allow }) => {
            state.metrics.record_request(UNMATCHED_ROUTE, 405, std::time::Duration::ZERO);
            return HttpResponse::build(StatusCode::METHOD_NOT_ALLOWED)
                .content_type("text/plain; charset=utf-8")
                .insert_header(("Allow", allow.join(", ")))
                .body("Method Not Allowed\n");
        }
    };
    let state = state.into_inner();
    let logger = state.request_logger(found.route, &found);
    let started = Instant::now();
    info!(logger, "started");
    let result = serve(&request, payload, &state, &found, &logger).await;
    record_metrics(&state, found.route, &result, started.elapsed());
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(response) => {
            info!(logger, "finished"; "status" => response.status().as_u16(), "duration_ms" => duration_ms);
            response
        }
        Err(error) => {
            let response = error_response(&error);
            if error.is_client_error() {
                info!(logger, "failed"; "status" => response.status().as_u16(), "duration_ms" => duration_ms, "error" => %error);
            } else {
                warn!(logger, "failed"; "status" => response.status().as_u16(), "duration_ms" => duration_ms, "error" => %error);
            }
            response
        }
    }
}

/// Route label of requests that match no Garden route, in the metrics.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Counts the request, and the operation latency of a successful create
/// or destroy.
fn record_metrics(state: &AppState, route: Route, result: &Result<HttpResponse, ApiError>, duration: std::time::Duration) {
    let status = match result {
        Ok(response) => response.status().as_u16(),
        Err(error) => error.to_envelope().0,
    };
    state.metrics.record_request(route.name(), status, duration);
    let operation = match route {
        Route::Create => Operation::Create,
        Route::Destroy => Operation::Destroy,
        _ => return,
    };
    if result.is_ok() {
        state.metrics.record_operation(operation, duration);
    }
}

/// Reads the whole body, up to `limit` bytes.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|error| ApiError::BodyRead { reason: error.to_string() })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::BodyTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Decodes a JSON request body with Go's rules.
async fn decode_body<T: serde::de::DeserializeOwned>(payload: web::Payload, state: &AppState) -> Result<T, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    Ok(api::decode(&body)?)
}

/// Parses the query string with form decoding (`+` is a space), keeping
/// the first value of a repeated key.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if !pairs.iter().any(|(existing, _)| *existing == key) {
            pairs.push((key.into_owned(), value.into_owned()));
        }
    }
    pairs
}

pub(super) async fn lookup(state: &AppState, handle: &str) -> Result<actix::Addr<Container>, ApiError> {
    state
        .registry
        .send(LookupContainer { handle: handle.to_string() })
        .await
        .map_err(|_| ContainerError::Mailbox { operation: "looking up the container" })?
        .map_err(ApiError::from)
}

/// Sends a message to a container actor and flattens both error layers.
async fn ask<M, T>(addr: &actix::Addr<Container>, message: M, operation: &'static str) -> Result<T, ApiError>
where
    M: actix::Message<Result = Result<T, ContainerError>> + Send + 'static,
    T: Send + 'static,
    Container: actix::Handler<M>,
{
    addr.send(message)
        .await
        .map_err(|_| ContainerError::Mailbox { operation })?
        .map_err(ApiError::from)
}

/// Sends one message to each container a bulk query names, in the order
/// named. An unknown handle or a failed request becomes that handle's error.
async fn ask_each<M, T>(
    state: &AppState,
    query: &str,
    message: impl Fn() -> M,
    operation: &'static str,
) -> Vec<(String, Result<T, ApiError>)>
where
    M: actix::Message<Result = Result<T, ContainerError>> + Send + 'static,
    T: Send + 'static,
    Container: actix::Handler<M>,
{
    let mut results = Vec::new();
    for handle in bulk_handles(query) {
        let result = match lookup(state, &handle).await {
            Ok(addr) => ask(&addr, message(), operation).await,
            Err(error) => Err(error),
        };
        results.push((handle, result));
    }
    results
}

async fn serve(
    request: &HttpRequest,
    payload: web::Payload,
    state: &Arc<AppState>,
    found: &RouteMatch,
    logger: &Logger,
) -> Result<HttpResponse, ApiError> {
    let handle = found.param("handle");
    match found.route {
        Route::Ping => {
            let runtime = state.runtime.clone();
            blocking(move || runtime.ping()).await?;
            Ok(json_ok(&serde_json::json!({})))
        }
        Route::Capacity => {
            let runtime = state.runtime.clone();
            let mut capacity = blocking(move || runtime.capacity()).await?;
            capacity.max_containers = state.max_containers;
            Ok(json_ok(&capacity))
        }
        Route::List => {
            let filters = query_pairs(request.query_string());
            let handles = state
                .registry
                .send(ListContainers { filters })
                .await
                .map_err(|_| ContainerError::Mailbox { operation: "listing containers" })?;
            Ok(json_ok(&ListResponse { handles }))
        }
        Route::Create => {
            let spec: ContainerSpec = decode_body(payload, state).await?;
            let handle = state
                .registry
                .send(CreateContainer { spec })
                .await
                .map_err(|_| ContainerError::Mailbox { operation: "creating the container" })??;
            Ok(json_ok(&CreateResponse { handle }))
        }
        Route::Destroy => {
            state
                .registry
                .send(DestroyByHandle { handle: handle.to_string() })
                .await
                .map_err(|_| ContainerError::Mailbox { operation: "destroying the container" })??;
            Ok(json_ok(&serde_json::json!({})))
        }
        Route::Info => {
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            Ok(json_ok(&ask(&addr, GetInfo, "reading container info").await?))
        }
        Route::Stop => {
            // Like the Go server, the body is decoded before the lookup.
            let stop: StopRequest = decode_body(payload, state).await?;
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            ask(&addr, StopContainer { kill: stop.kill }, "stopping the container").await?;
            Ok(json_ok(&serde_json::json!({})))
        }
        Route::Properties => {
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            Ok(json_ok(&ask(&addr, GetProperties, "reading properties").await?))
        }
        Route::Property => {
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            let value = ask(&addr, GetProperty { key: found.param("key").to_string() }, "reading a property").await?;
            Ok(json_ok(&PropertyValue { value }))
        }
        Route::SetProperty => {
            let body: PropertyValue = decode_body(payload, state).await?;
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            let message = SetProperty { key: found.param("key").to_string(), value: body.value };
            ask(&addr, message, "setting a property").await?;
            Ok(json_ok(&serde_json::json!({})))
        }
        Route::RemoveProperty => {
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            ask(&addr, RemoveProperty { key: found.param("key").to_string() }, "removing a property").await?;
            Ok(json_ok(&serde_json::json!({})))
        }
        Route::SetGraceTime => {
            // The body is a bare integer of nanoseconds; this route resets
            // the timer instead of pausing it.
            let grace_time: i64 = decode_body(payload, state).await?;
            let addr = lookup(state, handle).await?;
            ask(&addr, SetGraceTime { grace_time }, "setting the grace time").await?;
            state.reaper.do_send(Reset { handle: handle.to_string(), grace_time });
            Ok(json_ok(&serde_json::json!({})))
        }
        Route::Run | Route::Attach | Route::Stdout | Route::Stderr => {
            Err(ApiError::HijackNotFirst { route: found.route.name() })
        }
        Route::StreamIn => super::files::stream_in(request, payload, state, handle).await,
        Route::StreamOut => super::files::stream_out(request, state, handle, logger).await,
        Route::BulkInfo => {
            // Bulk routes do not pause grace timers: polling them must not
            // keep a container alive.
            let mut entries = BTreeMap::new();
            for (handle, result) in ask_each(state, request.query_string(), || GetInfo, "reading container info").await {
                let entry = match result {
                    Ok(info) => ContainerInfoEntry { info, err: None },
                    Err(error) => ContainerInfoEntry { err: Some(untyped(&error)), ..ContainerInfoEntry::default() },
                };
                entries.insert(handle, entry);
            }
            Ok(json_ok(&entries))
        }
        Route::BulkMetrics => {
            let mut entries = BTreeMap::new();
            for (handle, result) in ask_each(state, request.query_string(), || GetMetrics, "reading metrics").await {
                let entry = match result {
                    Ok(metrics) => ContainerMetricsEntry { metrics, err: None },
                    Err(error) => ContainerMetricsEntry { err: Some(untyped(&error)), ..ContainerMetricsEntry::default() },
                };
                entries.insert(handle, entry);
            }
            Ok(json_ok(&entries))
        }
        Route::Metrics => {
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            Ok(json_ok(&ask(&addr, GetMetrics, "reading metrics").await?))
        }
        Route::CurrentBandwidthLimits | Route::CurrentCpuLimits | Route::CurrentDiskLimits | Route::CurrentMemoryLimits => {
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            let limits = ask(&addr, GetLimits, "reading limits").await?;
            Ok(limits_response(found.route, &limits))
        }
        Route::LimitBandwidth | Route::LimitCpu | Route::LimitDisk | Route::LimitMemory => {
            // Like the Go server, the body is decoded before the lookup.
            let body = read_body(payload, state.max_body_bytes).await?;
            let update = match found.route {
                Route::LimitBandwidth => LimitUpdate::Bandwidth(api::decode(&body)?),
                Route::LimitCpu => LimitUpdate::Cpu(api::decode(&body)?),
                Route::LimitDisk => LimitUpdate::Disk(api::decode(&body)?),
                _ => LimitUpdate::Memory(api::decode(&body)?),
            };
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            let limits = ask(&addr, UpdateLimits { update }, "changing limits").await?;
            Ok(limits_response(found.route, &limits))
        }
        Route::NetIn => {
            let body = read_body(payload, state.max_body_bytes).await?;
            let request: api::NetInRequest = api::decode(&body)?;
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            let message = NetIn { host_port: request.host_port, container_port: request.container_port };
            Ok(json_ok(&ask(&addr, message, "mapping a port").await?))
        }
        Route::NetOut | Route::BulkNetOut => {
            let body = read_body(payload, state.max_body_bytes).await?;
            let rules = if found.route == Route::NetOut {
                vec![api::decode::<api::NetOutRule>(&body)?]
            } else {
                // A Go client with a nil slice sends `null`.
                api::decode::<Option<Vec<api::NetOutRule>>>(&body)?.unwrap_or_default()
            };
            let addr = lookup(state, handle).await?;
            let _pause = PauseGuard::new(state, handle);
            ask(&addr, NetOut { rules }, "adding net-out rules").await?;
            Ok(json_ok(&serde_json::json!({})))
        }
    }
}

/// Returns the handles of a bulk route's `handles` parameter: decoded
/// first, then split on commas, each handle once. A missing or empty
/// parameter means no handles (the Go server drops the connection when it
/// is missing).
pub fn bulk_handles(query: &str) -> Vec<String> {
    let Some((_, value)) = query_pairs(query).into_iter().find(|(key, _)| key == "handles") else {
        return Vec::new();
    };
    if value.is_empty() {
        return Vec::new();
    }
    let mut handles: Vec<String> = Vec::new();
    for handle in value.split(',') {
        if !handles.iter().any(|seen| seen == handle) {
            handles.push(handle.to_string());
        }
    }
    handles
}

/// Returns the envelope of a bulk entry's error. The reference backend's
/// per-entry errors are untyped, so `Type` and `Handle` stay empty.
fn untyped(error: &ApiError) -> ErrorEnvelope {
    ErrorEnvelope { message: error.to_string(), ..ErrorEnvelope::default() }
}

/// Builds the response of a limits route: the one limit kind it names.
fn limits_response(route: Route, limits: &api::Limits) -> HttpResponse {
    match route {
        Route::CurrentBandwidthLimits | Route::LimitBandwidth => json_ok(&limits.bandwidth_limits),
        Route::CurrentCpuLimits | Route::LimitCpu => json_ok(&limits.cpu_limits),
        Route::CurrentDiskLimits | Route::LimitDisk => json_ok(&limits.disk_limits),
        _ => json_ok(&limits.memory_limits),
    }
}

/// Returns a child logger for one request.
pub fn route_logger(base: &Logger, request_id: u64, route: Route, found: &RouteMatch) -> Logger {
    let logger = base.new(o!("request_id" => request_id, "route" => route.name()));
    match found.params.iter().find(|(name, _)| *name == "handle") {
        Some((_, handle)) => logger.new(o!("handle" => handle.clone())),
        None => logger,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_first_value_wins_and_decodes() {
        let pairs = query_pairs("team=red&k=a+b%2Fc&team=blue");
        assert_eq!(pairs, vec![("team".to_string(), "red".to_string()), ("k".to_string(), "a b/c".to_string())]);
        assert!(query_pairs("").is_empty());
    }

    #[test]
    fn bulk_handles_decode_then_split() {
        assert_eq!(bulk_handles("handles=web-1%2Cmissing-9"), vec!["web-1", "missing-9"]);
        assert_eq!(bulk_handles("handles=a,b,a"), vec!["a", "b"]);
        assert!(bulk_handles("handles=").is_empty());
        assert!(bulk_handles("").is_empty());
        assert!(bulk_handles("other=x").is_empty());
    }
}
