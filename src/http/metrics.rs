//! Server counters and latency histograms, and their OpenMetrics text form
//! for `GET /metrics` on the debug listener.
//!
//! The API handlers record every request here ([`Metrics::record_request`])
//! and the durations of create, run and destroy
//! ([`Metrics::record_operation`]). Gauges that describe the actors
//! (containers by state, pool usage) are computed from introspection
//! snapshots when the endpoint is scraped, so nothing has to keep them in
//! step.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The media type of OpenMetrics text, version 1.0.0.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A cumulative histogram with [`LATENCY_BUCKETS`].
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Observations at or below each bound, not yet cumulative.
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&mut self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        if let Some(index) = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[index] += 1;
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Counters of API requests, by route name and HTTP status code.
#[derive(Debug, Default)]
struct Requests {
    counts: BTreeMap<(&'static str, u16), u64>,
    latency: BTreeMap<&'static str, Histogram>,
}

/// An API operation whose duration is recorded separately from its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    /// Create, from request to response.
    Create,
    /// Run, from request until the process started.
    Run,
    /// Destroy, from request to response.
    Destroy,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Run => "run",
            Operation::Destroy => "destroy",
        }
    }
}

/// The counters of one server. Cheap to share: the API and debug listeners
/// hold the same `Arc<Metrics>`.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<Requests>,
    operations: Mutex<BTreeMap<Operation, Histogram>>,
    oom_events: Arc<AtomicU64>,
}

/// A copy of the request counters, for `/debug/vars`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestTotals {
    pub by_route: BTreeMap<&'static str, u64>,
    /// Responses with a status of 500 or more.
    pub server_errors: u64,
    /// Responses with a status from 400 to 499.
    pub client_errors: u64,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Counts one finished API request. For the process routes, whose
    /// connections stay open, `duration` ends when the response head was
    /// sent.
    pub fn record_request(&self, route: &'static str, status: u16, duration: Duration) {
        let mut requests = self.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *requests.counts.entry((route, status)).or_default() += 1;
        requests.latency.entry(route).or_default().observe(duration);
    }

    /// Records the duration of a successful operation.
    pub fn record_operation(&self, operation: Operation, duration: Duration) {
        let mut operations = self.operations.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        operations.entry(operation).or_default().observe(duration);
    }

    /// Returns the out-of-memory event counter. A watcher of container
    /// cgroups keeps a clone and adds one per kernel OOM event.
    pub fn oom_events(&self) -> Arc<AtomicU64> {
        self.oom_events.clone()
    }

    pub fn request_totals(&self) -> RequestTotals {
        let requests = self.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut totals = RequestTotals::default();
        for ((route, status), count) in &requests.counts {
            *totals.by_route.entry(route).or_default() += count;
            match status {
                500.. => totals.server_errors += count,
                400..=499 => totals.client_errors += count,
                _ => {}
            }
        }
        totals
    }

    /// Renders every metric as OpenMetrics text, ending with `# EOF`.
    /// `gauges` come from the actors at scrape time.
    pub fn render(&self, gauges: &ActorGauges) -> String {
        let mut text = String::new();
        let requests = self.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone_parts();

        family(&mut text, "trellis_http_requests", "counter", "Garden API requests served, by route and status code.", None);
        for ((route, status), count) in &requests.0 {
            let _ = writeln!(text, "trellis_http_requests_total{{route=\"{}\",code=\"{status}\"}} {count}", escape(route));
        }

        family(
            &mut text,
            "trellis_http_request_duration_seconds",
            "histogram",
            "Time to serve a Garden API request; for process routes, until the response head was sent.",
            Some("seconds"),
        );
        for (route, histogram) in &requests.1 {
            write_histogram(&mut text, "trellis_http_request_duration_seconds", &format!("route=\"{}\"", escape(route)), histogram);
        }

        let operations = self.operations.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        family(
            &mut text,
            "trellis_operation_duration_seconds",
            "histogram",
            "Duration of successful operations: create and destroy until the response, run until the process started.",
            Some("seconds"),
        );
        for (operation, histogram) in &operations {
            write_histogram(&mut text, "trellis_operation_duration_seconds", &format!("operation=\"{}\"", operation.name()), histogram);
        }

        family(&mut text, "trellis_containers", "gauge", "Containers by state.", None);
        for (state, count) in &gauges.containers_by_state {
            let _ = writeln!(text, "trellis_containers{{state=\"{}\"}} {count}", escape(state));
        }

        family(&mut text, "trellis_processes", "gauge", "Processes known to the server, finished ones included until they are forgotten.", None);
        let _ = writeln!(text, "trellis_processes {}", gauges.processes);
        family(&mut text, "trellis_processes_running", "gauge", "Processes that have not exited yet.", None);
        let _ = writeln!(text, "trellis_processes_running {}", gauges.running_processes);

        family(&mut text, "trellis_pool_size", "gauge", "Number of items a resource pool can hand out.", None);
        for (pool, usage) in &gauges.pools {
            if let Some(size) = usage.size {
                let _ = writeln!(text, "trellis_pool_size{{pool=\"{}\"}} {size}", escape(pool));
            }
        }
        family(&mut text, "trellis_pool_in_use", "gauge", "Number of items a resource pool has handed out.", None);
        for (pool, usage) in &gauges.pools {
            let _ = writeln!(text, "trellis_pool_in_use{{pool=\"{}\"}} {}", escape(pool), usage.in_use);
        }

        family(&mut text, "trellis_oom_events", "counter", "Out-of-memory events reported by the kernel for container cgroups.", None);
        let _ = writeln!(text, "trellis_oom_events_total {}", self.oom_events.load(Ordering::Relaxed));

        text.push_str("# EOF\n");
        text
    }
}

impl Requests {
    fn clone_parts(&self) -> (BTreeMap<(&'static str, u16), u64>, BTreeMap<&'static str, Histogram>) {
        (self.counts.clone(), self.latency.clone())
    }
}

/// Usage of one resource pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// `None` when the pool has no fixed size (the uid pool shares one
    /// mapping among all holders).
    pub size: Option<u64>,
    pub in_use: u64,
}

impl PoolUsage {
    /// Reads the usage from a pool's introspection snapshot. Pools name
    /// their numbers differently: `allocated` or `holders` for the items
    /// handed out, and `capacity`, `size` or `free` plus `allocated` for the
    /// size.
    pub fn from_snapshot(snapshot: &serde_json::Value) -> Option<PoolUsage> {
        let number = |key: &str| snapshot.get(key).and_then(serde_json::Value::as_u64);
        let in_use = number("allocated").or_else(|| number("holders"))?;
        let size = number("capacity")
            .or_else(|| number("size"))
            .or_else(|| number("free").map(|free| free + in_use));
        Some(PoolUsage { size, in_use })
    }
}

/// Gauges taken from the actors when the metrics are scraped.
#[derive(Debug, Clone, Default)]
pub struct ActorGauges {
    pub containers_by_state: BTreeMap<String, u64>,
    pub processes: u64,
    /// Processes that have not exited, those still starting included.
    pub running_processes: u64,
    pub pools: BTreeMap<String, PoolUsage>,
}

impl ActorGauges {
    /// Counts containers by state and processes in a registry snapshot
    /// (the registry's reply to `Introspect`).
    pub fn count_registry(&mut self, registry: &serde_json::Value) {
        for state in ["creating", "active", "stopped", "destroying"] {
            self.containers_by_state.entry(state.to_string()).or_default();
        }
        let containers = registry.get("containers").and_then(serde_json::Value::as_array);
        for entry in containers.into_iter().flatten() {
            let container = &entry["container"];
            let state = match entry["entry"].as_str() {
                Some("ready") => container["state"].as_str().unwrap_or("unknown"),
                Some(other) => other,
                None => "unknown",
            };
            *self.containers_by_state.entry(state.to_string()).or_default() += 1;
            let processes = container.get("processes").and_then(serde_json::Value::as_array);
            self.processes += processes.map_or(0, |list| list.len() as u64);
            self.running_processes += processes.map_or(0, |list| list.iter().filter(|process| process["exit"].is_null()).count() as u64);
        }
    }
}

/// Writes the `# TYPE`, `# UNIT` and `# HELP` lines of a metric family.
fn family(text: &mut String, name: &str, kind: &str, help: &str, unit: Option<&str>) {
    let _ = writeln!(text, "# TYPE {name} {kind}");
    if let Some(unit) = unit {
        let _ = writeln!(text, "# UNIT {name} {unit}");
    }
    let _ = writeln!(text, "# HELP {name} {}", escape(help));
}

fn write_histogram(text: &mut String, name: &str, labels: &str, histogram: &Histogram) {
    let mut cumulative = 0;
    for (bound, count) in LATENCY_BUCKETS.iter().zip(histogram.buckets) {
        cumulative += count;
        let _ = writeln!(text, "{name}_bucket{{{labels},le=\"{bound:?}\"}} {cumulative}");
    }
    let _ = writeln!(text, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", histogram.count);
    let _ = writeln!(text, "{name}_count{{{labels}}} {}", histogram.count);
    let _ = writeln!(text, "{name}_sum{{{labels}}} {:?}", histogram.sum_seconds);
}

/// Escapes a label value or help text as OpenMetrics requires.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let metrics = Metrics::default();
        metrics.record_request("Ping", 200, Duration::from_micros(500));
        metrics.record_request("Ping", 200, Duration::from_millis(20));
        metrics.record_request("Ping", 500, Duration::from_secs(100));
        let text = metrics.render(&ActorGauges::default());
        assert!(text.contains("trellis_http_requests_total{route=\"Ping\",code=\"200\"} 2\n"), "{text}");
        assert!(text.contains("trellis_http_requests_total{route=\"Ping\",code=\"500\"} 1\n"), "{text}");
        assert!(text.contains("_bucket{route=\"Ping\",le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("_bucket{route=\"Ping\",le=\"0.025\"} 2\n"), "{text}");
        assert!(text.contains("_bucket{route=\"Ping\",le=\"30.0\"} 2\n"), "{text}");
        assert!(text.contains("_bucket{route=\"Ping\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("trellis_http_request_duration_seconds_count{route=\"Ping\"} 3\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn totals_split_errors() {
        let metrics = Metrics::default();
        metrics.record_request("Info", 404, Duration::ZERO);
        metrics.record_request("Info", 200, Duration::ZERO);
        metrics.record_request("Create", 500, Duration::ZERO);
        let totals = metrics.request_totals();
        assert_eq!(totals.by_route["Info"], 2);
        assert_eq!(totals.by_route["Create"], 1);
        assert_eq!(totals.client_errors, 1);
        assert_eq!(totals.server_errors, 1);
    }

    #[test]
    fn pool_usage_reads_each_pool_shape() {
        let uid = serde_json::json!({ "holders": 2, "mappings": [] });
        assert_eq!(PoolUsage::from_snapshot(&uid), Some(PoolUsage { size: None, in_use: 2 }));
        let port = serde_json::json!({ "start": 1, "end": 10, "free": 7, "allocated": 3 });
        assert_eq!(PoolUsage::from_snapshot(&port), Some(PoolUsage { size: Some(10), in_use: 3 }));
        let subnet = serde_json::json!({ "pool": "10.0.0.0/24", "capacity": 64, "allocated": 1 });
        assert_eq!(PoolUsage::from_snapshot(&subnet), Some(PoolUsage { size: Some(64), in_use: 1 }));
        assert_eq!(PoolUsage::from_snapshot(&serde_json::json!({ "error": "x" })), None);
    }

    #[test]
    fn registry_snapshot_counts_states() {
        let registry = serde_json::json!({ "containers": [
            { "handle": "a", "entry": "ready", "container": { "state": "active", "processes": [{ "exit": null }, { "exit": { "exit_status": 0 } }] } },
            { "handle": "b", "entry": "creating", "container": null },
            { "handle": "c", "entry": "ready", "container": { "state": "stopped", "processes": [] } },
        ]});
        let mut gauges = ActorGauges::default();
        gauges.count_registry(&registry);
        assert_eq!(gauges.containers_by_state["active"], 1);
        assert_eq!(gauges.containers_by_state["creating"], 1);
        assert_eq!(gauges.containers_by_state["stopped"], 1);
        assert_eq!(gauges.containers_by_state["destroying"], 0);
        assert_eq!(gauges.processes, 2);
        assert_eq!(gauges.running_processes, 1);
    }
}
