//! Raw-HTTP checks against an in-process server on the in-memory runtime.
//!
//! They cover the bulk routes, metrics, the limits routes (current and
//! 2015 PUT), capacity and the container maximum, the grace-time state
//! machine as clients see it, and concurrent creates and destroys.

#[path = "http_support.rs"]
mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{read_until, Harness};
use trellis::runtime::memory::ProcessScript;

/// The 32 keys of MemoryStat, in the modern order.
const MEMORY_STAT_KEYS: [&str; 32] = [
    "active_anon", "active_file", "cache", "hierarchical_memory_limit", "inactive_anon", "inactive_file",
    "mapped_file", "pgfault", "pgmajfault", "pgpgin", "pgpgout", "rss", "total_active_anon", "total_active_file",
    "total_cache", "total_inactive_anon", "total_inactive_file", "total_mapped_file", "total_pgfault",
    "total_pgmajfault", "total_pgpgin", "total_pgpgout", "total_rss", "total_unevictable", "unevictable", "swap",
    "hierarchical_memsw_limit", "total_swap", "TotalUsageTowardLimit", "anon", "file", "swapcached",
];

fn listed(harness: &Harness) -> Vec<String> {
    let response = harness.request("GET", "/containers", None);
    serde_json::from_value(response.json()["Handles"].clone()).unwrap()
}

/// Polls the unfiltered list until `handle` is gone; fails after 10 s.
fn wait_until_gone(harness: &Harness, handle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while listed(harness).iter().any(|found| found == handle) {
        assert!(Instant::now() < deadline, "{handle} was not reaped");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn bulk_info_entries_and_errors() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h1","properties":{"team":"red"}}"#);
    harness.create(r#"{"handle":"h2"}"#);

    // The comma is percent-encoded, as the Go client sends it.
    let response = harness.request("GET", "/containers/bulk_info?handles=h1%2Ch2", None);
    assert_eq!(response.status, 200);
    response.assert_json_convention();
    let body = response.json();
    assert_eq!(body.as_object().unwrap().keys().collect::<Vec<_>>(), vec!["h1", "h2"]);
    for handle in ["h1", "h2"] {
        assert_eq!(body[handle]["Err"], serde_json::Value::Null);
        assert_eq!(body[handle]["Info"]["State"], "active");
        assert_eq!(body[handle]["Info"].as_object().unwrap().len(), 10);
    }
    assert_eq!(body["h1"]["Info"]["Properties"]["team"], "red");

    // An unknown handle gets an untyped per-entry error.
    let body = harness.request("GET", "/containers/bulk_info?handles=h1%2Cmissing", None).json();
    assert_eq!(body["h1"]["Err"], serde_json::Value::Null);
    assert_eq!(
        body["missing"]["Err"],
        json!({"Type":"","Message":"unknown handle: missing","Handle":"","ProcessID":"","Binary":""})
    );
    assert_eq!(
        body["missing"]["Info"],
        json!({"State":"","Events":null,"HostIP":"","ContainerIP":"","ContainerIPv6":"","ExternalIP":"",
               "ContainerPath":"","ProcessIDs":null,"Properties":null,"MappedPorts":null})
    );

    // An empty or missing list means no handles, and a handle named
    // twice gets one entry.
    assert_eq!(harness.request("GET", "/containers/bulk_info?handles=", None).body, b"{}\n");
    assert_eq!(harness.request("GET", "/containers/bulk_info", None).body, b"{}\n");
    let body = harness.request("GET", "/containers/bulk_info?handles=h2,h2%2Ch2", None).json();
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
}

#[test]
fn bulk_metrics_and_metrics_shape() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h"}"#);

    let body = harness.request("GET", "/containers/bulk_metrics?handles=h%2Cgone", None).json();
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
    assert_eq!(body["h"]["Err"], serde_json::Value::Null);
    assert!(body["h"]["Metrics"]["MemoryStat"].is_object(), "{body}");
    assert_eq!(body["gone"]["Err"]["Message"], "unknown handle: gone");
    assert_eq!(body["gone"]["Err"]["Type"], "");

    // All seven keys, and all 32 MemoryStat keys in the modern order.
    let response = harness.request("GET", "/containers/h/metrics", None);
    assert_eq!(response.status, 200);
    response.assert_json_convention();
    let metrics = response.json();
    let mut keys: Vec<&str> = metrics.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["Age", "CPUEntitlement", "CPUStat", "DiskStat", "MemoryStat", "NetworkStat", "PidStat"]);
    let memory_keys: Vec<&str> = metrics["MemoryStat"].as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = MEMORY_STAT_KEYS.to_vec();
    expected.sort_unstable();
    let mut sorted = memory_keys.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, expected);
    let text = response.text();
    let positions: Vec<usize> = MEMORY_STAT_KEYS.iter().map(|key| text.find(&format!("\"{key}\":")).unwrap()).collect();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "MemoryStat keys out of order: {text}");
    for key in ["Usage", "User", "System"] {
        assert!(metrics["CPUStat"][key].is_u64(), "{metrics}");
    }

    // Age is an integer that grows with the time between calls.
    let first = metrics["Age"].as_u64().expect("Age is an unsigned integer");
    std::thread::sleep(Duration::from_secs(1));
    let second = harness.request("GET", "/containers/h/metrics", None).json()["Age"].as_u64().unwrap();
    assert!(second >= first + 1_000_000_000, "Age went from {first} to {second}");
    assert!(second < first + 60_000_000_000, "Age went from {first} to {second}");

    harness.request("GET", "/containers/gone/metrics", None).assert_envelope(404, "ContainerNotFoundError");
}

#[test]
fn current_limits_report_what_was_set() {
    let harness = Harness::start();
    // A 2015 create body with `rootfs` and four limit kinds.
    harness.create(
        r#"{"handle":"limited","rootfs":"/var/rootfs","limits":{"bandwidth_limits":{},"cpu_limits":{"weight":512},"disk_limits":{},
            "memory_limits":{"limit_in_bytes":268435456}}}"#,
    );
    let response = harness.request("GET", "/containers/limited/limits/memory", None);
    response.assert_json_convention();
    assert_eq!(response.body, b"{\"limit_in_bytes\":268435456}\n");
    // The in-memory runtime reports what was set; the Linux runtime's
    // shares are checked against a real server.
    assert_eq!(harness.request("GET", "/containers/limited/limits/cpu", None).json(), json!({"weight":512}));

    // Nothing set gives `{}` on all four.
    harness.create(r#"{"handle":"plain"}"#);
    for kind in ["bandwidth", "cpu", "disk", "memory"] {
        let response = harness.request("GET", &format!("/containers/plain/limits/{kind}"), None);
        assert_eq!(response.status, 200, "{kind}");
        assert_eq!(response.body, b"{}\n", "{kind}");
        harness
            .request("GET", &format!("/containers/nope/limits/{kind}"), None)
            .assert_envelope(404, "ContainerNotFoundError");
    }
}

#[test]
fn put_limits_merge_apply_and_persist() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h","limits":{"memory_limits":{"limit_in_bytes":67108864},"cpu_limits":{"limit_in_shares":100}}}"#);

    // Zero fields change nothing, and the response holds the current limits.
    let response = harness.request("PUT", "/containers/h/limits/memory", Some(r#"{"limit_in_bytes":0}"#));
    assert_eq!(response.status, 200);
    assert_eq!(response.json(), json!({"limit_in_bytes":67108864}));
    let response = harness.request("PUT", "/containers/h/limits/cpu", Some(r#"{"limit_in_shares":0}"#));
    assert_eq!(response.json(), json!({"limit_in_shares":100}));
    assert_eq!(harness.runtime.applied_limits("h"), None, "a zero update reached the runtime");

    let response = harness.request("PUT", "/containers/h/limits/bandwidth", Some(r#"{"rate":1000,"burst":2000}"#));
    assert_eq!(response.status, 200);
    response.assert_json_convention();
    assert_eq!(response.json(), json!({"rate":1000,"burst":2000}));
    assert_eq!(harness.request("GET", "/containers/h/limits/bandwidth", None).json(), json!({"rate":1000,"burst":2000}));

    // A real change reaches the runtime and the state file.
    let response = harness.request("PUT", "/containers/h/limits/memory", Some(r#"{"limit_in_bytes":134217728}"#));
    assert_eq!(response.json(), json!({"limit_in_bytes":134217728}));
    let applied = harness.runtime.applied_limits("h").expect("the runtime got the new limits");
    assert_eq!(applied.memory_limits.limit_in_bytes, 134217728);
    assert_eq!(applied.bandwidth_limits.rate, 1000);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(harness.depot.path().join("h/container.json")).unwrap()).unwrap();
    assert_eq!(state["spec"]["limits"]["memory_limits"]["limit_in_bytes"], 134217728);

    let response = harness.request("PUT", "/containers/h/limits/disk", Some(r#"{"byte_hard":1073741824,"scope":1}"#));
    assert_eq!(response.json(), json!({"byte_hard":1073741824,"scope":1}));
    assert_eq!(harness.request("GET", "/containers/h/limits/disk", None).json(), json!({"byte_hard":1073741824,"scope":1}));

    harness
        .request("PUT", "/containers/nope/limits/memory", Some(r#"{"limit_in_bytes":1}"#))
        .assert_envelope(404, "ContainerNotFoundError");
    harness.request("PUT", "/containers/h/limits/memory", Some(r#""lots""#)).assert_envelope(500, "");
}

#[test]
fn capacity_reports_the_pool_maximum() {
    // 10.200.0.0/22 holds 256 blocks of /30.
    let harness = Harness::start();
    let capacity = harness.request("GET", "/capacity", None);
    capacity.assert_json_convention();
    assert_eq!(capacity.json()["max_containers"], 256);
    // A smaller pool lowers it below the operator's maximum.
    let harness = Harness::start_with(|config| {
        config.network_pool = "10.201.0.0/28".parse().unwrap();
        config.max_containers = 10;
    });
    assert_eq!(harness.request("GET", "/capacity", None).json()["max_containers"], 4);
    for _ in 0..4 {
        harness.create("{}");
    }
    let response = harness.request("POST", "/containers", Some("{}"));
    assert_eq!(response.assert_envelope(500, "")["Message"], "max containers reached");
}

#[test]
fn creates_in_progress_count_against_the_maximum() {
    let harness = Harness::start_with(|config| config.max_containers = 1);
    harness.runtime.set_create_delay(Duration::from_millis(300));
    let responses: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..3)
            .map(|number| {
                let harness = &harness;
                scope.spawn(move || harness.request("POST", "/containers", Some(&format!(r#"{{"handle":"c{number}"}}"#))))
            })
            .collect();
        threads.into_iter().map(|thread| thread.join().unwrap()).collect()
    });
    let succeeded = responses.iter().filter(|response| response.status == 200).count();
    assert_eq!(succeeded, 1, "{:?}", responses.iter().map(|response| response.text()).collect::<Vec<_>>());
    for response in responses.iter().filter(|response| response.status != 200) {
        assert_eq!(response.assert_envelope(500, "")["Message"], "max containers reached");
    }
    // The losers left nothing: one container exists in the runtime.
    assert_eq!(harness.runtime.containers().len(), 1);
    assert_eq!(listed(&harness).len(), 1);
}

#[test]
fn concurrent_creates_of_one_handle() {
    let harness = Harness::start();
    harness.runtime.set_create_delay(Duration::from_millis(200));
    let responses: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let harness = &harness;
                scope.spawn(move || harness.request("POST", "/containers", Some(r#"{"handle":"same"}"#)))
            })
            .collect();
        threads.into_iter().map(|thread| thread.join().unwrap()).collect()
    });
    assert_eq!(responses.iter().filter(|response| response.status == 200).count(), 1);
    for response in responses.iter().filter(|response| response.status != 200) {
        assert_eq!(response.assert_envelope(500, "")["Message"], "Handle 'same' already in use");
    }
    let creates = harness.runtime.calls().iter().filter(|call| call.starts_with("create same ")).count();
    assert_eq!(creates, 1, "the runtime was asked to create the handle {creates} times");
    assert_eq!(harness.request("GET", "/containers/same/info", None).status, 200);
}

#[test]
fn grace_time_expiry_and_polling() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"set"}"#);
    let response = harness.request("PUT", "/containers/set/grace_time", Some("1000000000"));
    assert_eq!((response.status, response.body.as_slice()), (200, b"{}\n".as_slice()));
    // A duration string is not a number of nanoseconds.
    harness.request("PUT", "/containers/set/grace_time", Some("\"1s\"")).assert_envelope(500, "");

    // Idle, polled only through the bulk routes, or polled through Info.
    let started = Instant::now();
    harness.create(r#"{"handle":"idle","grace_time":1000000000}"#);
    harness.create(r#"{"handle":"bulk-polled","grace_time":1000000000}"#);
    harness.create(r#"{"handle":"info-polled","grace_time":1000000000}"#);
    let mut gone_at = None;
    while started.elapsed() < Duration::from_millis(2600) {
        harness.request("GET", "/containers/bulk_info?handles=bulk-polled", None);
        harness.request("GET", "/containers/bulk_metrics?handles=bulk-polled", None);
        assert_eq!(harness.request("GET", "/containers/info-polled/info", None).status, 200, "the polled container was reaped");
        let handles = listed(&harness);
        if gone_at.is_none() && !handles.contains(&"idle".to_string()) {
            gone_at = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let gone_at = gone_at.expect("the idle container was not reaped");
    assert!(gone_at >= Duration::from_secs(1), "reaped after {gone_at:?}, before its grace time");
    let handles = listed(&harness);
    assert!(!handles.contains(&"bulk-polled".to_string()), "bulk polling kept the container: {handles:?}");
    // Info polling every 200 ms kept it alive for 2.6 s.
    assert!(handles.contains(&"info-polled".to_string()), "{handles:?}");
    wait_until_gone(&harness, "info-polled");
    assert!(harness.runtime.calls().iter().any(|call| call == "destroy idle"));
}

#[test]
fn grace_time_reset_rules() {
    let harness = Harness::start();
    // A reset on an idle container restarts the countdown.
    harness.create(r#"{"handle":"reset"}"#);
    harness.request("PUT", "/containers/reset/grace_time", Some("500000000"));
    wait_until_gone(&harness, "reset");

    // Garden's quirk: zero on an idle container with a timer reaps it.
    harness.create(r#"{"handle":"zero","grace_time":3600000000000}"#);
    assert_eq!(harness.request("PUT", "/containers/zero/grace_time", Some("0")).status, 200);
    wait_until_gone(&harness, "zero");

    // An explicit destroy disarms the timer, so a new container
    // with the same handle does not inherit it.
    harness.create(r#"{"handle":"again","grace_time":300000000}"#);
    assert_eq!(harness.request("DELETE", "/containers/again", None).status, 200);
    harness.create(r#"{"handle":"again"}"#);
    std::thread::sleep(Duration::from_millis(800));
    assert!(listed(&harness).contains(&"again".to_string()), "the old timer reaped the new container");
    // The server default of 0 never reaps the new container.
    assert_eq!(harness.runtime.calls().iter().filter(|call| *call == "destroy again").count(), 1);
}

#[test]
fn open_run_connection_survives_short_grace_time() {
    let harness = Harness::start();
    harness.runtime.script_path("sleep", ProcessScript::sleeper());
    harness.create(r#"{"handle":"h","grace_time":1000000000}"#);
    let body = r#"{"path":"sleep","args":["1000"],"rlimits":{}}"#;
    let mut stream = harness.connect();
    let request = format!("POST /containers/h/processes HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).unwrap();
    let mut buffer = Vec::new();
    let head = read_until(&mut stream, &mut buffer, b"\r\n\r\n");
    assert!(head.starts_with(b"HTTP/1.1 201"), "{}", String::from_utf8_lossy(&head));
    read_until(&mut stream, &mut buffer, b"\n");
    // A reset while the connection is open starts no timer.
    assert_eq!(harness.request("PUT", "/containers/h/grace_time", Some("50000000")).status, 200);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(listed(&harness), vec!["h".to_string()]);
    // Closing the connection starts the countdown with the new value.
    drop(stream);
    wait_until_gone(&harness, "h");
}

#[test]
fn server_default_grace_time_applies() {
    let harness = Harness::start_with(|config| config.default_grace_time = Duration::from_secs(1));
    harness.create(r#"{"handle":"defaulted"}"#);
    let properties = harness.request("GET", "/containers/defaulted/properties", None).json();
    assert_eq!(properties["garden.grace-time"], "1000000000");
    wait_until_gone(&harness, "defaulted");
}

#[test]
fn destroy_during_a_reap_is_refused() {
    let harness = Harness::start();
    harness.runtime.set_destroy_delay(Duration::from_millis(800));
    harness.create(r#"{"handle":"h","grace_time":100000000}"#);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !harness.runtime.calls().iter().any(|call| call == "destroy h") {
        assert!(Instant::now() < deadline, "the reap did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let response = harness.request("DELETE", "/containers/h", None);
    let envelope = response.assert_envelope(500, "");
    assert_eq!(envelope["Message"], "container already being destroyed");
    wait_until_gone(&harness, "h");
    harness.request("DELETE", "/containers/h", None).assert_envelope(404, "ContainerNotFoundError");
    assert_eq!(harness.runtime.calls().iter().filter(|call| *call == "destroy h").count(), 1);
    assert!(harness.runtime.containers().is_empty());
}

#[test]
fn grace_time_store_failure_is_500() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h","grace_time":3600000000000}"#);
    // A directory where the state file's temporary copy goes makes the
    // atomic write fail.
    let blocker = harness.depot.path().join("h/.container.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let envelope = harness.request("PUT", "/containers/h/grace_time", Some("0")).assert_envelope(500, "");
    assert!(envelope["Message"].as_str().unwrap().contains("container.json"), "{envelope}");
    // Neither the value nor the timer changed: zero would have reaped the
    // idle container at once.
    let properties = harness.request("GET", "/containers/h/properties", None).json();
    assert_eq!(properties["garden.grace-time"], "3600000000000");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(listed(&harness), vec!["h".to_string()]);

    std::fs::remove_dir(&blocker).unwrap();
    assert_eq!(harness.request("PUT", "/containers/h/grace_time", Some("0")).status, 200);
    wait_until_gone(&harness, "h");
}
