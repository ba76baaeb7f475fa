//! Raw-HTTP checks of the plain routes against an in-process server on the
//! in-memory runtime: transport, router, error envelope, create, list,
//! info, stop, destroy and properties, and bad input that must leave the
//! server serving.

#[path = "http_support.rs"]
mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::{Harness, Response};

const EMPTY_SPEC: &str = r#"{"image":{},"limits":{"bandwidth_limits":{},"cpu_limits":{},"disk_limits":{},"memory_limits":{},"pid_limits":{}}}"#;

#[test]
fn unix_socket_replaces_stale_file() {
    let socket_dir = tempfile::Builder::new().prefix("trellis-test-sock").tempdir().unwrap();
    let path = socket_dir.path().join("garden.sock");
    // A socket file left behind by an earlier server.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let harness = Harness::start_with(|config| config.bind_socket = Some(path.clone()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o777);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    stream.set_read_timeout(Some(support::READ_TIMEOUT)).unwrap();
    stream.write_all(b"GET /ping HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").unwrap();
    let mut received = Vec::new();
    stream.read_to_end(&mut received).unwrap();
    let response = Response::parse(&received).unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"{}\n");
    drop(harness);
    assert!(!path.exists(), "the socket file is removed at stop");
}

#[test]
fn ping_answers_and_closes() {
    let harness = Harness::start();
    let response = harness.request("GET", "/ping", None);
    assert_eq!(response.status_line, "HTTP/1.1 200 OK");
    response.assert_json_convention();
    assert_eq!(response.body, b"{}\n");
    assert_eq!(response.header("connection").map(str::to_ascii_lowercase).as_deref(), Some("close"));
}

#[test]
fn router_404_405_and_trailing_slash() {
    let harness = Harness::start();
    for target in ["/nonexistent", "/ping/", "/containers/", "/containers/h/info/"] {
        let response = harness.request("GET", target, None);
        assert_eq!(response.status, 404, "{target}");
        assert_eq!(response.header("content-type"), Some("text/plain; charset=utf-8"), "{target}");
        assert_eq!(response.body, b"404 page not found\n", "{target}");
    }
    let response = harness.request("DELETE", "/containers/", None);
    assert_eq!(response.status, 404);
    let response = harness.request("POST", "/ping", Some("{}"));
    assert_eq!(response.status, 405);
    assert_eq!(response.header("allow"), Some("GET"));
    assert_eq!(response.body, b"Method Not Allowed\n");
    let response = harness.request("HEAD", "/containers", None);
    assert_eq!(response.status, 405);
    assert_eq!(response.header("allow"), Some("GET, POST"));
}

#[test]
fn create_accepts_go_client_bodies() {
    let harness = Harness::start();
    let handle = harness.create(EMPTY_SPEC);
    assert_eq!(handle.len(), 36, "generated handle {handle} is a UUID");
    assert!(uuid::Uuid::parse_str(&handle).is_ok());
    harness.create("{}");
    harness.create(r#"{"future_field":1}"#);
    harness.create(r#"{"limits":null,"image":null,"properties":null,"handle":null}"#);
    // No Content-Type header at all.
    let body = r#"{"handle":"no-type"}"#;
    let response = harness.raw(
        format!("POST /containers HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), serde_json::json!({"Handle": "no-type"}));
}

#[test]
fn create_duplicate_and_invalid_handles() {
    let harness = Harness::start();
    let response = harness.request("POST", "/containers", Some(r#"{"handle":"alpha"}"#));
    assert_eq!(response.status, 200);
    response.assert_json_convention();
    assert_eq!(response.json(), serde_json::json!({"Handle": "alpha"}));
    let response = harness.request("POST", "/containers", Some(r#"{"handle":"alpha"}"#));
    let envelope = response.assert_envelope(500, "");
    assert_eq!(envelope["Message"], "Handle 'alpha' already in use");
    for bad in ["a/b", "a,b", "..", "sp ace"] {
        let body = serde_json::json!({ "handle": bad }).to_string();
        let response = harness.request("POST", "/containers", Some(&body));
        let envelope = response.assert_envelope(500, "");
        assert!(envelope["Message"].as_str().unwrap().starts_with("invalid handle"), "{bad}: {envelope}");
    }
    let response = harness.request("POST", "/containers", Some(r#"{"handle":"x","rootfs":"/a","image":{"uri":"/b"}}"#));
    assert_eq!(response.assert_envelope(500, "")["Message"], "Cannot provide both Image.URI and RootFSPath");
}

#[test]
fn create_body_errors() {
    let harness = Harness::start();
    let response = harness.request("POST", "/containers", Some(""));
    assert_eq!(response.assert_envelope(500, "")["Message"], "EOF");
    let response = harness.request("POST", "/containers", Some("{\"handle\":"));
    assert_eq!(response.assert_envelope(500, "")["Message"], "unexpected EOF");
    let response = harness.request("POST", "/containers", Some("xyz"));
    response.assert_envelope(500, "");
    let response = harness.request("POST", "/containers", Some(r#"{"handle":5}"#));
    response.assert_envelope(500, "");
    let response = harness.request("POST", "/containers", Some(r#"{"grace_time":1.5}"#));
    response.assert_envelope(500, "");
    // Over the body limit: an envelope, and the server keeps serving.
    let big = format!("{{\"handle\":\"{}\"}}", "a".repeat(trellis::config::MAX_JSON_BODY_BYTES));
    let response = harness.request("POST", "/containers", Some(&big));
    let envelope = response.assert_envelope(413, "");
    assert!(envelope["Message"].as_str().unwrap().contains("1048576"), "{envelope}");
    assert_eq!(harness.request("GET", "/ping", None).status, 200);
    assert_eq!(harness.request("GET", "/containers", None).json(), serde_json::json!({"Handles": []}));
}

#[test]
fn max_containers_counts() {
    let harness = Harness::start_with(|config| config.max_containers = 2);
    harness.create("{}");
    harness.create("{}");
    let response = harness.request("POST", "/containers", Some("{}"));
    assert_eq!(response.assert_envelope(500, "")["Message"], "max containers reached");
    let capacity = harness.request("GET", "/capacity", None);
    capacity.assert_json_convention();
    assert_eq!(capacity.json()["max_containers"], 2);
}

#[test]
fn list_filters_properties() {
    let harness = Harness::start();
    assert_eq!(harness.request("GET", "/containers", None).json(), serde_json::json!({"Handles": []}));
    harness.create(r#"{"handle":"red-web","properties":{"team":"red","tier":"web","k":"a b/c"}}"#);
    harness.create(r#"{"handle":"red-db","properties":{"team":"red","tier":"db"}}"#);
    harness.create(r#"{"handle":"blue-web","properties":{"team":"blue","tier":"web"}}"#);
    let list = |query: &str| -> Vec<String> {
        let response = harness.request("GET", &format!("/containers{query}"), None);
        response.assert_json_convention();
        serde_json::from_value(response.json()["Handles"].clone()).unwrap()
    };
    assert_eq!(list(""), vec!["blue-web", "red-db", "red-web"]);
    assert_eq!(list("?team=red"), vec!["red-db", "red-web"]);
    assert_eq!(list("?team=green"), Vec::<String>::new());
    assert_eq!(list("?team=red&tier=web"), vec!["red-web"]);
    assert_eq!(list("?k=a+b%2Fc"), vec!["red-web"]);
    // The first value of a repeated key is used.
    assert_eq!(list("?team=blue&team=red"), vec!["blue-web"]);
    assert_eq!(list("?garden.state=created&team=blue"), vec!["blue-web"]);
}

#[test]
fn info_stop_and_destroy() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h","properties":{"team":"red"}}"#);
    let response = harness.request("GET", "/containers/h/info", None);
    assert_eq!(response.status, 200);
    response.assert_json_convention();
    let info = response.json();
    let keys: Vec<&String> = info.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 10, "{info}");
    for key in ["State", "Events", "HostIP", "ContainerIP", "ContainerIPv6", "ExternalIP", "ContainerPath", "ProcessIDs", "Properties", "MappedPorts"] {
        assert!(info.get(key).is_some(), "{key} missing from {info}");
    }
    assert_eq!(info["State"], "active");
    assert_eq!(info["Properties"]["team"], "red");
    assert_eq!(info["Properties"]["garden.state"], "created");
    assert_eq!(info["MappedPorts"], serde_json::json!([]));
    assert!(info["ContainerPath"].as_str().unwrap().ends_with("/h"));
    let state_file = harness.depot.path().join("h").join("container.json");
    assert!(state_file.exists(), "state file {} written", state_file.display());

    // Keys are matched case-insensitively.
    let response = harness.request("PUT", "/containers/h/stop", Some(r#"{"Kill":true}"#));
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"{}\n");
    assert!(harness.runtime.calls().iter().any(|call| call == "stop h kill=true"), "{:?}", harness.runtime.calls());
    assert_eq!(harness.request("GET", "/containers/h/info", None).json()["State"], "stopped");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(state["state"], "stopped");

    let response = harness.request("DELETE", "/containers/h", None);
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"{}\n");
    assert_eq!(harness.request("GET", "/containers", None).json(), serde_json::json!({"Handles": []}));
    harness.request("GET", "/containers/h/info", None).assert_envelope(404, "ContainerNotFoundError");
    assert!(!harness.depot.path().join("h").exists(), "container directory removed");
}

#[test]
fn unknown_handle_is_404_everywhere() {
    let harness = Harness::start();
    let response = harness.request("GET", "/containers/nope/info", None);
    assert_eq!(response.status, 404);
    assert_eq!(
        response.text(),
        "{\"Type\":\"ContainerNotFoundError\",\"Message\":\"unknown handle: nope\",\"Handle\":\"nope\",\"ProcessID\":\"\",\"Binary\":\"\"}\n"
    );
    let routes: &[(&str, &str, Option<&str>)] = &[
        ("DELETE", "/containers/nope", None),
        ("PUT", "/containers/nope/stop", Some(r#"{"kill":true}"#)),
        ("GET", "/containers/nope/metrics", None),
        ("GET", "/containers/nope/limits/bandwidth", None),
        ("GET", "/containers/nope/limits/cpu", None),
        ("GET", "/containers/nope/limits/disk", None),
        ("GET", "/containers/nope/limits/memory", None),
        ("PUT", "/containers/nope/files?destination=%2Ftmp&user=", Some("")),
        ("GET", "/containers/nope/files?source=%2Ftmp&user=", None),
        ("POST", "/containers/nope/net/in", Some(r#"{"handle":"nope","container_port":8080}"#)),
        ("POST", "/containers/nope/net/out", Some("{}")),
        ("POST", "/containers/nope/net/out/bulk", Some("[]")),
        ("PUT", "/containers/nope/grace_time", Some("1000000000")),
        ("GET", "/containers/nope/properties", None),
        ("GET", "/containers/nope/properties/k", None),
        ("PUT", "/containers/nope/properties/k", Some(r#"{"value":"v"}"#)),
        ("DELETE", "/containers/nope/properties/k", None),
    ];
    for (method, target, body) in routes {
        let envelope = harness.request(method, target, *body).assert_envelope(404, "ContainerNotFoundError");
        assert_eq!(envelope["Handle"], "nope", "{method} {target}");
        assert_eq!(envelope["Message"], "unknown handle: nope", "{method} {target}");
    }
}

#[test]
fn net_routes_answer_garden_shapes() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h"}"#);
    let body = r#"{"handle":"h","container_port":8080}"#;
    let response = harness.request("POST", "/containers/h/net/in", Some(body));
    assert_eq!(response.status, 200);
    assert_eq!(response.json(), serde_json::json!({"host_port": 61001, "container_port": 8080}));
    let response = harness.request("POST", "/containers/h/net/in", Some(r#"{"host_port":70000}"#));
    let envelope = response.assert_envelope(500, "");
    assert!(envelope["Message"].as_str().unwrap().contains("invalid host port 70000"), "{envelope}");

    let response = harness.request("POST", "/containers/h/net/out", Some("{}"));
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"{}\n");
    // A Go client with a nil slice sends null to the bulk route.
    let response = harness.request("POST", "/containers/h/net/out/bulk", Some("null"));
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"{}\n");

    let info = harness.request("GET", "/containers/h/info", None).json();
    assert_eq!(info["MappedPorts"], serde_json::json!([{"HostPort": 61001, "ContainerPort": 8080}]));
    assert_eq!(info["ContainerIP"], "10.200.0.2");
    assert_eq!(info["HostIP"], "10.200.0.1");
    assert_eq!(harness.request("POST", "/containers/missing/net/out", Some("{}")).status, 404);
}

#[test]
fn properties_round_trip() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h","properties":{"team":"red"}}"#);
    let response = harness.request("PUT", "/containers/h/properties/color", Some(r#"{"value":"teal"}"#));
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"{}\n");
    let response = harness.request("GET", "/containers/h/properties/color", None);
    response.assert_json_convention();
    assert_eq!(response.json(), serde_json::json!({"value": "teal"}));
    let all = harness.request("GET", "/containers/h/properties", None);
    all.assert_json_convention();
    assert_eq!(all.json()["color"], "teal");
    assert_eq!(all.json()["team"], "red");
    // Keys may contain dots and be overwritten.
    harness.request("PUT", "/containers/h/properties/a.b", Some(r#"{"value":"1"}"#));
    harness.request("PUT", "/containers/h/properties/a.b", Some(r#"{"value":"2"}"#));
    assert_eq!(harness.request("GET", "/containers/h/properties/a.b", None).json()["value"], "2");

    let response = harness.request("DELETE", "/containers/h/properties/color", None);
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"{}\n");
    let envelope = harness.request("GET", "/containers/h/properties/color", None).assert_envelope(500, "");
    assert_eq!(envelope["Message"], "property does not exist: color");
    // Removing a missing key succeeds.
    assert_eq!(harness.request("DELETE", "/containers/h/properties/color", None).status, 200);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(harness.depot.path().join("h/container.json")).unwrap()).unwrap();
    assert_eq!(state["properties"]["a.b"], "2");
    assert!(state["properties"].get("color").is_none());
    // A missing body is an error.
    harness.request("PUT", "/containers/h/properties/x", Some("")).assert_envelope(500, "");
}

#[test]
fn concurrent_destroys_one_wins() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h"}"#);
    harness.runtime.set_destroy_delay(Duration::from_millis(500));
    let first = std::thread::scope(|scope| {
        let first = scope.spawn(|| harness.request("DELETE", "/containers/h", None));
        // Give the first destroy time to reach the runtime.
        std::thread::sleep(Duration::from_millis(150));
        let second = harness.request("DELETE", "/containers/h", None);
        let envelope = second.assert_envelope(500, "");
        assert_eq!(envelope["Message"], "container already being destroyed");
        first.join().unwrap()
    });
    assert_eq!(first.status, 200);
    harness.request("DELETE", "/containers/h", None).assert_envelope(404, "ContainerNotFoundError");
}

#[test]
fn ping_reports_unavailable_runtime() {
    let harness = Harness::start();
    harness
        .runtime
        .set_ping_error(Some(trellis::runtime::RuntimeError::Unavailable { message: "not ready".into() }));
    let envelope = harness.request("GET", "/ping", None).assert_envelope(500, "ServiceUnavailableError");
    assert_eq!(envelope["Message"], "not ready");
}

#[test]
fn runtime_create_failure_rolls_back() {
    let harness = Harness::start();
    harness.runtime.fail_create("h", trellis::runtime::RuntimeError::invalid("bad rootfs"));
    let envelope = harness.request("POST", "/containers", Some(r#"{"handle":"h"}"#)).assert_envelope(500, "");
    assert_eq!(envelope["Message"], "bad rootfs");
    assert!(!harness.depot.path().join("h").exists());
    // The handle is free again.
    harness.create(r#"{"handle":"h"}"#);
}

/// Polls the unfiltered list until `handle` is gone; fails after 10 s.
fn wait_until_gone(harness: &Harness, handle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let handles = harness.request("GET", "/containers", None).json()["Handles"].clone();
        if !handles.as_array().unwrap().iter().any(|found| found == handle) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{handle} was not reaped");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn idle_container_is_reaped() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"short","grace_time":200000000}"#);
    harness.create(r#"{"handle":"kept"}"#);
    wait_until_gone(&harness, "short");
    assert!(harness.runtime.calls().iter().any(|call| call == "destroy short"));
    harness.request("GET", "/containers/kept/info", None);
    assert_eq!(harness.request("GET", "/containers/kept/info", None).status, 200);
}

#[test]
fn set_grace_time_is_stored_and_reaps() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h"}"#);
    harness.request("PUT", "/containers/h/grace_time", Some("\"1s\"")).assert_envelope(500, "");
    let response = harness.request("PUT", "/containers/h/grace_time", Some("3600000000000"));
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"{}\n");
    let properties = harness.request("GET", "/containers/h/properties", None).json();
    assert_eq!(properties["garden.grace-time"], "3600000000000");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(harness.depot.path().join("h/container.json")).unwrap()).unwrap();
    assert_eq!(state["grace_time"], 3600000000000i64);
    harness.request("PUT", "/containers/h/grace_time", Some("100000000"));
    wait_until_gone(&harness, "h");
}

#[test]
fn open_process_connection_keeps_container() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"h","grace_time":300000000}"#);
    harness.runtime.script_path("sleep", trellis::runtime::memory::ProcessScript::sleeper());
    let body = r#"{"path":"sleep","rlimits":{},"image":{}}"#;
    let mut stream = harness.connect();
    stream
        .write_all(format!("POST /containers/h/processes HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .unwrap();
    let mut buffer = Vec::new();
    support::read_until(&mut stream, &mut buffer, b"\n");
    std::thread::sleep(Duration::from_millis(1000));
    let handles = harness.request("GET", "/containers", None).json()["Handles"].clone();
    assert_eq!(handles, serde_json::json!(["h"]), "container reaped while a process connection was open");
    drop(stream);
    wait_until_gone(&harness, "h");
}

#[test]
fn unprivileged_create_gets_id_mapping() {
    let harness = Harness::start();
    harness.create(r#"{"handle":"unpriv"}"#);
    harness.create(r#"{"handle":"priv","privileged":true}"#);
    let calls = harness.runtime.calls();
    assert!(calls.iter().any(|call| call == "create unpriv grace_time=0 privileged=false mapped_root=Some(4294967294)"), "{calls:?}");
    assert!(calls.iter().any(|call| call == "create priv grace_time=0 privileged=true mapped_root=None"), "{calls:?}");
    let snapshot = harness.introspect();
    assert_eq!(snapshot["pools"]["uid"]["holders"], 1, "{snapshot}");
    harness.request("DELETE", "/containers/unpriv", None);
    assert_eq!(harness.introspect()["pools"]["uid"]["holders"], 0);
}
