//! The debug listener of a real `trellis server`: the actor snapshot, Go
//! expvar shape, OpenMetrics text, the live log level, bad routes, and the
//! HTML page rendered by headless Chromium.
//!
//! The server listens for debug requests on 127.0.0.1:17013 inside its own
//! network namespace, so each request runs on a thread that entered that
//! namespace.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{command_spec, TestServer};
use trellis::client::ProcessIo;

/// The debug listener's default address, inside the server's namespace.
const DEBUG_ADDRESS: &str = "127.0.0.1:17013";

/// A response read from the debug listener.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|error| panic!("invalid JSON ({error}): {}", self.body))
    }
}

/// Runs `work` on a thread inside the server's network namespace.
fn in_namespace<T: Send>(server: &TestServer, work: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{}", server.name);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let namespace = std::fs::File::open(&path).unwrap_or_else(|error| panic!("opening {path}: {error}"));
                nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the server's network namespace");
                work()
            })
            .join()
            .expect("the request thread panicked")
    })
}

/// Sends one HTTP/1.1 request to the debug listener and reads the whole reply.
fn request(server: &TestServer, method: &str, path: &str, body: &str) -> Reply {
    let raw = in_namespace(server, || {
        let mut stream = TcpStream::connect(DEBUG_ADDRESS).expect("connecting to the debug listener");
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {DEBUG_ADDRESS}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("reading the reply");
        raw
    });
    let text = String::from_utf8(raw).expect("the reply is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("the reply has a head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect();
    Reply { status, headers, body: body.to_string() }
}

fn get(server: &TestServer, path: &str) -> Reply {
    request(server, "GET", path, "")
}

/// Returns the registry entry of `handle` in an actor snapshot.
fn container_entry<'a>(snapshot: &'a serde_json::Value, handle: &str) -> &'a serde_json::Value {
    snapshot["registry"]["containers"]
        .as_array()
        .expect("registry.containers is an array")
        .iter()
        .find(|entry| entry["handle"] == handle)
        .unwrap_or_else(|| panic!("{handle} missing from {snapshot}"))
}

fn assert_mailbox(snapshot: &serde_json::Value, actor: &str) {
    let mailbox = &snapshot["mailbox"];
    assert!(mailbox["messages_handled"].as_u64().is_some_and(|count| count >= 1), "{actor}: {mailbox}");
    assert!(mailbox["mailbox_depth"].is_u64(), "{actor}: {mailbox}");
}

#[test]
fn actors_show_new_container_and_process() {
    let Some(server) = TestServer::start("actors_show_new_container_and_process") else { return };
    let handle = server.create("actors");
    server.block_on(server.client.set_property(&handle, "team", "blue")).unwrap();
    let mut finished_spec = command_spec("sh", &["-c", "echo done"]);
    finished_spec.id = "finished-echo".into();
    let finished = server.run(&handle, &finished_spec, None).unwrap();
    assert_eq!(finished.status, 0);
    let spec = command_spec("sleep", &["60"]);
    let running = server.block_on(server.client.run(&handle, &spec, ProcessIo::default())).unwrap();

    let reply = get(&server, "/debug/actors");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let snapshot = reply.json();
    assert_eq!(snapshot["registry"]["count"], 1, "{snapshot}");
    assert_mailbox(&snapshot["registry"], "registry");
    assert_mailbox(&snapshot["reaper"], "reaper");
    assert!(snapshot["pools"]["uid"]["holders"].is_u64(), "{snapshot}");

    let entry = container_entry(&snapshot, &handle);
    assert_eq!(entry["entry"], "ready");
    let container = &entry["container"];
    assert_eq!(container["state"], "active");
    assert_eq!(container["properties"]["team"], "blue");
    assert_mailbox(container, "container");
    let processes = container["processes"].as_array().expect("processes is an array");
    assert_eq!(processes.len(), 2, "{container}");
    let done = processes.iter().find(|process| process["process_id"] == "finished-echo").expect("the finished process");
    assert_eq!(done["exit"]["exit_status"], 0, "{done}");
    let sleeper = processes.iter().find(|process| process["process_id"] == running.id()).expect("the running process");
    assert!(sleeper["exit"].is_null(), "{sleeper}");
    assert!(sleeper["pid"].as_u64().is_some_and(|pid| pid > 0), "{sleeper}");
    assert_mailbox(sleeper, "process");

    let one = get(&server, &format!("/debug/actors/{handle}"));
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.json()["registry_entry"]["container"]["handle"], handle.as_str());
    assert_eq!(one.json()["reaper_record"]["handle"], handle.as_str());

    let missing = get(&server, "/debug/actors/no-such-container");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "container not found: no-such-container");
}

#[test]
fn actor_shows_grace_deadline() {
    let Some(server) = TestServer::start("actor_shows_grace_deadline") else { return };
    let spec = trellis::api::ContainerSpec {
        handle: server.unique_handle("grace"),
        grace_time: 3_600_000_000_000,
        ..Default::default()
    };
    let handle = server.block_on(server.client.create(&spec)).unwrap();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;

    let reply = get(&server, &format!("/debug/actors/{handle}"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let record = &reply.json()["reaper_record"];
    assert_eq!(record["grace_time_ns"], 3_600_000_000_000u64, "{record}");
    assert_eq!(record["timer_running"], true, "{record}");
    let deadline = record["deadline_unix_ms"].as_u64().unwrap_or_else(|| panic!("no deadline: {record}"));
    // The timer restarted when the create request ended, an hour ahead.
    assert!(deadline > now_ms + 3_500_000, "{deadline} is not about an hour after {now_ms}");
    assert!(deadline < now_ms + 3_700_000, "{deadline} is not about an hour after {now_ms}");
}

/// Go's JSON type of each `runtime.MemStats` field, as `encoding/json`
/// writes it (Go 1.22 `runtime/mstats.go`).
fn go_memstats_types() -> BTreeMap<&'static str, &'static str> {
    let mut types = BTreeMap::new();
    for name in [
        "Alloc", "TotalAlloc", "Sys", "Lookups", "Mallocs", "Frees", "HeapAlloc", "HeapSys", "HeapIdle", "HeapInuse",
        "HeapReleased", "HeapObjects", "StackInuse", "StackSys", "MSpanInuse", "MSpanSys", "MCacheInuse", "MCacheSys",
        "BuckHashSys", "GCSys", "OtherSys", "NextGC", "LastGC", "PauseTotalNs",
    ] {
        types.insert(name, "uint64");
    }
    types.insert("NumGC", "uint32");
    types.insert("NumForcedGC", "uint32");
    types.insert("GCCPUFraction", "float64");
    types.insert("EnableGC", "bool");
    types.insert("DebugGC", "bool");
    types.insert("PauseNs", "[256]uint64");
    types.insert("PauseEnd", "[256]uint64");
    types.insert("BySize", "[61]struct");
    types
}

/// Checks that `value` decodes into Go's `kind`, as `encoding/json` would.
fn check_go_type(field: &str, value: &serde_json::Value, kind: &str) {
    let unsigned = |value: &serde_json::Value, max: u64| value.as_u64().is_some_and(|number| number <= max);
    match kind {
        "uint64" => assert!(unsigned(value, u64::MAX), "{field}: {value} is not a uint64"),
        "uint32" => assert!(unsigned(value, u64::from(u32::MAX)), "{field}: {value} is not a uint32"),
        "float64" => assert!(value.is_number(), "{field}: {value} is not a float64"),
        "bool" => assert!(value.is_boolean(), "{field}: {value} is not a bool"),
        "[256]uint64" => {
            let items = value.as_array().unwrap_or_else(|| panic!("{field}: {value} is not an array"));
            assert_eq!(items.len(), 256, "{field}");
            assert!(items.iter().all(|item| item.is_u64()), "{field}: not all uint64");
        }
        "[61]struct" => {
            let items = value.as_array().unwrap_or_else(|| panic!("{field}: {value} is not an array"));
            assert_eq!(items.len(), 61, "{field}");
            for item in items {
                let object = item.as_object().unwrap_or_else(|| panic!("{field}: {item} is not an object"));
                let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
                assert_eq!(keys, BTreeSet::from(["Frees", "Mallocs", "Size"]), "{field}");
                assert!(unsigned(&item["Size"], u64::from(u32::MAX)), "{field}.Size");
                assert!(item["Mallocs"].is_u64(), "{field}: {item}");
                assert!(item["Frees"].is_u64(), "{field}: {item}");
            }
        }
        other => panic!("unknown Go type {other}"),
    }
}

#[test]
fn debug_vars_match_go_expvar_types() {
    let Some(server) = TestServer::start("debug_vars_match_go_expvar_types") else { return };
    let handle = server.create("vars");
    server.run_command(&handle, "true", &[]);
    server.block_on(server.client.ping()).unwrap();

    let reply = get(&server, "/debug/vars");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let vars = reply.json();

    let memstats = vars["memstats"].as_object().expect("memstats is an object");
    let types = go_memstats_types();
    for (field, kind) in &types {
        let value = memstats.get(*field).unwrap_or_else(|| panic!("memstats lacks {field}"));
        check_go_type(field, value, kind);
    }
    for field in memstats.keys() {
        assert!(types.contains_key(field.as_str()), "memstats has {field}, which runtime.MemStats lacks");
    }
    assert!(memstats["Alloc"].as_u64().unwrap() > 0, "Alloc is zero");
    assert!(memstats["Sys"].as_u64().unwrap() >= memstats["HeapSys"].as_u64().unwrap());

    let cmdline: Vec<&str> = vars["cmdline"].as_array().expect("cmdline is an array").iter().map(|arg| arg.as_str().expect("cmdline contains strings")).collect();
    assert_eq!(cmdline.get(1), Some(&"server"), "{cmdline:?}");
    assert!(vars["numCPUS"].as_u64().is_some_and(|count| count >= 1));
    assert!(vars["numGoRoutines"].as_u64().is_some_and(|count| count >= 2));
    assert_eq!(vars["depotDirs"], 1, "one container, one state directory");
    assert_eq!(vars["loopDevices"], 0);
    assert_eq!(vars["backingStores"], 0);
    assert_eq!(vars["containers"], 1);
    assert_eq!(vars["processes"], 1);
    assert!(vars["requests"]["Ping"].as_u64().is_some_and(|count| count >= 1), "{}", vars["requests"]);
    assert!(vars["requests"]["Run"].as_u64().is_some_and(|count| count >= 1), "{}", vars["requests"]);
}

/// One sample line of OpenMetrics text.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed metric family.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    unit: Option<String>,
    help: Option<String>,
    samples: Vec<Sample>,
}

/// Parses OpenMetrics 1.0 text strictly: metadata before samples, no
/// interleaved or repeated families, sample names with the suffixes their
/// type allows, escaped label values, `# EOF` last, and cumulative
/// histogram buckets ending in `+Inf` equal to `_count`.
fn parse_openmetrics(text: &str) -> Result<BTreeMap<String, Family>, String> {
    let body = text.strip_suffix("# EOF\n").ok_or("the text does not end with `# EOF` and a newline")?;
    if body.contains("# EOF") {
        return Err("`# EOF` appears before the end".into());
    }
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (number, line) in body.lines().enumerate() {
        let at = |message: String| format!("line {}: {message}: {line:?}", number + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let keyword = parts.next().unwrap_or_default();
            let name = parts.next().ok_or_else(|| at("metadata without a name".into()))?.to_string();
            let value = parts.next().ok_or_else(|| at("metadata without a value".into()))?.to_string();
            if current.as_deref() != Some(name.as_str()) {
                if families.contains_key(&name) {
                    return Err(at(format!("family {name} appears twice")));
                }
                families.insert(name.clone(), Family::default());
                current = Some(name.clone());
            }
            let family = families.get_mut(&name).unwrap();
            if !family.samples.is_empty() {
                return Err(at("metadata after samples".into()));
            }
            match keyword {
                "TYPE" => {
                    if !["counter", "gauge", "histogram", "summary", "info", "stateset", "gaugehistogram", "unknown"].contains(&value.as_str()) {
                        return Err(at(format!("unknown type {value}")));
                    }
                    family.kind = value;
                }
                "UNIT" => {
                    if !name.ends_with(&format!("_{value}")) {
                        return Err(at(format!("family {name} does not end with its unit {value}")));
                    }
                    family.unit = Some(value);
                }
                "HELP" => family.help = Some(value),
                other => return Err(at(format!("unknown metadata {other}"))),
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(at("a comment or blank line is not allowed".into()));
        }
        let sample = parse_sample(line).map_err(at)?;
        let family_name = current.clone().ok_or_else(|| at("sample before any family".into()))?;
        let family = families.get_mut(&family_name).unwrap();
        let suffixes: &[&str] = match family.kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "gauge" => &[""],
            other => return Err(at(format!("unexpected family type {other}"))),
        };
        let suffix = sample.name.strip_prefix(family_name.as_str()).ok_or_else(|| at(format!("sample outside family {family_name}")))?;
        if !suffixes.contains(&suffix) {
            return Err(at(format!("suffix {suffix:?} not allowed for a {}", family.kind)));
        }
        if family.kind == "counter" && suffix == "_total" && sample.value < 0.0 {
            return Err(at("negative counter".into()));
        }
        family.samples.push(sample);
    }
    for (name, family) in &families {
        if family.kind.is_empty() {
            return Err(format!("family {name} has no TYPE"));
        }
        if family.kind == "histogram" {
            check_histogram(name, family)?;
        }
    }
    Ok(families)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    let valid_name = name.chars().enumerate().all(|(index, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (index > 0 && c.is_ascii_digit()));
    if name.is_empty() || !valid_name {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end;
        loop {
            let (start, first) = chars.next().ok_or("unterminated label set")?;
            if first == '}' {
                end = Some(start);
                break;
            }
            let equals = after[start..].find('=').ok_or("a label without =")? + start;
            let label = &after[start..equals];
            if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid label name {label:?}"));
            }
            while chars.peek().is_some_and(|(index, _)| *index <= equals) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("a label value must be quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("unterminated escape")?.1 {
                        'n' => value.push('\n'),
                        '"' => value.push('"'),
                        '\\' => value.push('\\'),
                        other => return Err(format!("invalid escape \\{other}")),
                    },
                    '\n' => return Err("raw newline in a label value".into()),
                    other => value.push(other),
                }
            }
            if labels.insert(label.to_string(), value).is_some() {
                return Err(format!("label {label} repeated"));
            }
            match chars.next().map(|(index, c)| (index, c)) {
                Some((_, ',')) => continue,
                Some((index, '}')) => {
                    end = Some(index);
                    break;
                }
                _ => return Err("expected , or } after a label".into()),
            }
        }
        rest = &after[end.unwrap() + 1..];
    }
    let value_text = rest.strip_prefix(' ').ok_or("expected one space before the value")?;
    if value_text.contains(' ') {
        return Err("timestamps and exemplars are not expected".into());
    }
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number => number.parse::<f64>().map_err(|_| format!("invalid value {number:?}"))?,
    };
    Ok(Sample { name: name.to_string(), labels, value })
}

/// Checks each label set of a histogram: `le` buckets in increasing order,
/// cumulative counts, a `+Inf` bucket equal to `_count`, and a `_sum`.
fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    let mut series: BTreeMap<Vec<(String, String)>, (Vec<(f64, f64)>, Option<f64>, Option<f64>)> = BTreeMap::new();
    for sample in &family.samples {
        let mut key: Vec<(String, String)> = sample.labels.clone().into_iter().filter(|(label, _)| label != "le").collect();
        key.sort();
        let entry = series.entry(key).or_default();
        match &sample.name[name.len()..] {
            "_bucket" => {
                let bound = sample.labels.get("le").ok_or(format!("{name}: bucket without le"))?;
                let bound = if bound == "+Inf" { f64::INFINITY } else { bound.parse().map_err(|_| format!("{name}: bad le {bound}"))? };
                entry.0.push((bound, sample.value));
            }
            "_count" => entry.1 = Some(sample.value),
            "_sum" => entry.2 = Some(sample.value),
            _ => {}
        }
    }
    for (labels, (buckets, count, sum)) in series {
        let context = format!("{name}{labels:?}");
        if buckets.windows(2).any(|pair| pair[0].0 >= pair[1].0 || pair[0].1 > pair[1].1) {
            return Err(format!("{context}: buckets not increasing and cumulative"));
        }
        let last = buckets.last().ok_or(format!("{context}: no buckets"))?;
        if last.0 != f64::INFINITY {
            return Err(format!("{context}: no +Inf bucket"));
        }
        if count != Some(last.1) {
            return Err(format!("{context}: _count {count:?} differs from the +Inf bucket {}", last.1));
        }
        if sum.is_none() {
            return Err(format!("{context}: no _sum"));
        }
    }
    Ok(())
}

/// Returns the value of the sample `name` whose labels include `labels`.
fn sample_value(families: &BTreeMap<String, Family>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    families.values().flat_map(|family| &family.samples).find(|sample| {
        sample.name == name && labels.iter().all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
    }).map(|sample| sample.value)
}

fn scrape(server: &TestServer) -> BTreeMap<String, Family> {
    let reply = get(server, "/metrics");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    parse_openmetrics(&reply.body).unwrap_or_else(|error| panic!("invalid OpenMetrics: {error}\n{}", reply.body))
}

#[test]
fn openmetrics_parser_rejects_bad_text() {
    let good = "# TYPE a counter\n# HELP a Help.\na_total{x=\"1\"} 2\n# EOF\n";
    assert!(parse_openmetrics(good).is_ok());
    for bad in [
        "# TYPE a counter\na_total 1\n",
        "# TYPE a counter\na 1\n# EOF\n",
        "# TYPE a counter\na_total{x=1} 1\n# EOF\n",
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\n# EOF\n",
        "# TYPE h histogram\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n# EOF\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 3\nh_count 2\nh_sum 0\n# EOF\n",
        "# TYPE h_seconds histogram\n# UNIT h_seconds bytes\n# EOF\n",
        "# TYPE a gauge\na 1 2 3\n# EOF\n",
    ] {
        assert!(parse_openmetrics(bad).is_err(), "accepted: {bad:?}");
    }
}

#[test]
fn metrics_parse_and_counters_move() {
    let Some(server) = TestServer::start("metrics_parse_and_counters_move") else { return };
    let before = scrape(&server);
    let pings = |families: &BTreeMap<String, Family>| sample_value(families, "trellis_http_requests_total", &[("route", "Ping"), ("code", "200")]).unwrap_or(0.0);
    let creates = |families: &BTreeMap<String, Family>| {
        sample_value(families, "trellis_operation_duration_seconds_count", &[("operation", "create")]).unwrap_or(0.0)
    };
    assert_eq!(sample_value(&before, "trellis_containers", &[("state", "active")]), Some(0.0));
    assert_eq!(sample_value(&before, "trellis_oom_events_total", &[]), Some(0.0));
    assert!(before["trellis_http_request_duration_seconds"].unit.as_deref() == Some("seconds"));

    for _ in 0..3 {
        server.block_on(server.client.ping()).unwrap();
    }
    let handle = server.create("metrics");
    server.run_command(&handle, "true", &[]);
    let missing = server.block_on(server.client.info("no-such-container"));
    assert!(missing.is_err());
    let mut unmatched = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    unmatched.write_all(b"GET /nowhere HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    unmatched.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");

    let after = scrape(&server);
    assert_eq!(pings(&after) - pings(&before), 3.0);
    assert_eq!(creates(&after) - creates(&before), 1.0);
    assert_eq!(sample_value(&after, "trellis_operation_duration_seconds_count", &[("operation", "run")]), Some(1.0));
    assert_eq!(sample_value(&after, "trellis_containers", &[("state", "active")]), Some(1.0));
    assert_eq!(sample_value(&after, "trellis_processes", &[]), Some(1.0));
    assert_eq!(sample_value(&after, "trellis_http_requests_total", &[("route", "Info"), ("code", "404")]), Some(1.0));
    assert_eq!(sample_value(&after, "trellis_http_request_duration_seconds_count", &[("route", "Create")]), Some(1.0));
    assert_eq!(sample_value(&after, "trellis_http_requests_total", &[("route", "unmatched"), ("code", "404")]), Some(1.0));
    assert!(sample_value(&after, "trellis_pool_in_use", &[("pool", "uid")]).is_some_and(|count| count >= 1.0));
}

/// Counts the log lines of the Ping route.
fn ping_log_lines(server: &TestServer) -> usize {
    server.log_text().lines().filter(|line| line.contains("\"route\":\"Ping\"")).count()
}

/// Polls until the log contains at least `count` ping lines; the logger
/// writes from a background thread.
fn wait_for_ping_lines(server: &TestServer, count: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = ping_log_lines(server);
        if lines >= count || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn log_level_changes_live() {
    let Some(server) = TestServer::start("log_level_changes_live") else { return };
    // The harness starts the server at debug, so pings are logged at info.
    server.block_on(server.client.ping()).unwrap();
    let logged = wait_for_ping_lines(&server, 2);
    assert!(logged >= 2, "no start and finish lines for a ping:\n{}", server.log_text());

    let raised = request(&server, "POST", "/log-level", "error");
    assert_eq!(raised.status, 204, "{}", raised.body);
    // The log drain writes in order, so once the change is in the file
    // every earlier ping line is too.
    assert!(wait_for_log(&server, "log level changed", 1), "the change was not logged");
    let logged = ping_log_lines(&server);
    server.block_on(server.client.ping()).unwrap();
    let lowered = request(&server, "PUT", "/log-level", "1");
    assert_eq!(lowered.status, 204, "{}", lowered.body);
    assert!(wait_for_log(&server, "log level changed", 2), "the second change was not logged");
    assert_eq!(ping_log_lines(&server), logged, "a ping was logged while the level was error");

    server.block_on(server.client.ping()).unwrap();
    assert!(wait_for_ping_lines(&server, logged + 2) >= logged + 2, "pings are not logged again at info");

    let invalid = request(&server, "POST", "/log-level", "loud");
    assert_eq!(invalid.status, 400);
    assert!(invalid.json()["error"].as_str().unwrap().contains("invalid log level \"loud\""), "{}", invalid.body);
    let long = request(&server, "POST", "/log-level", &"a".repeat(100));
    assert_eq!(long.status, 400);
    assert_eq!(long.json()["error"], "invalid log level: the body is longer than 64 bytes");
    let wrong_method = get(&server, "/log-level");
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow"), Some("POST, PUT"));
}

/// Polls until the log contains `needle` at least `count` times.
fn wait_for_log(server: &TestServer, needle: &str, count: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if server.log_text().matches(needle).count() >= count {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn unknown_debug_routes_are_404() {
    let Some(server) = TestServer::start("unknown_debug_routes_are_404") else { return };
    for path in ["/debug/nothing", "/debug/pprof/", "/debug/pprof/heap", "/", "/debug/actors/a/b"] {
        let reply = get(&server, path);
        assert_eq!(reply.status, 404, "{path}: {}", reply.body);
        let message = reply.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(message.starts_with(&format!("unknown debug route: GET {path}")), "{path}: {message}");
        assert!(message.contains("GET /debug/actors"), "{path}: {message}");
    }
}

/// Runs Chromium headless in the server's network namespace and returns its
/// stdout. Chromium runs as root here, which needs `--no-sandbox`.
fn chromium(server: &TestServer, profile: &Path, args: &[&str]) -> String {
    let netns_path = format!("/run/netns/{}", server.name);
    let namespace = std::fs::File::open(&netns_path).unwrap();
    let mut command = Command::new("chromium");
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: the closure only calls setns on a descriptor opened before the fork.
    unsafe {
        command.pre_exec(move || nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
    }
    let mut child = command.spawn().expect("starting chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 120 seconds");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

#[test]
fn debug_page_renders_actor_tree() {
    if Command::new("chromium").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        support::skip("debug_page_renders_actor_tree", "chromium is not installed (scripts/install-deps installs it)");
        return;
    }
    let Some(server) = TestServer::start("debug_page_renders_actor_tree") else { return };
    let handle = server.create("page");
    let mut spec = command_spec("true", &[]);
    spec.id = "page-true".into();
    server.run(&handle, &spec, None).unwrap();
    let profile = tempfile::Builder::new().prefix("trellis-test-chromium").tempdir().unwrap();
    let url = format!("http://{DEBUG_ADDRESS}/debug/");

    // The virtual time budget lets the page's fetch and render finish
    // before the DOM is dumped.
    let dom = chromium(&server, profile.path(), &["--virtual-time-budget=5000", "--dump-dom", &url]);
    assert!(dom.contains("<h1>Trellis actors</h1>"), "{dom}");
    assert!(dom.contains("updated "), "the page did not finish a refresh: {dom}");
    assert!(dom.contains(r#"data-kind="registry""#), "{dom}");
    assert!(dom.contains(&format!(r#"data-kind="container" data-name="{handle}""#)), "{dom}");
    assert!(dom.contains(r#"data-kind="process" data-name="page-true""#), "{dom}");
    assert!(dom.contains(r#"data-kind="pool" data-name="uid""#), "{dom}");
    assert!(dom.contains("mailbox 0, handled "), "{dom}");

    let screenshot = profile.path().join("actors.png");
    chromium(
        &server,
        profile.path(),
        &["--virtual-time-budget=5000", "--window-size=1000,700", &format!("--screenshot={}", screenshot.display()), &url],
    );
    let png = std::fs::read(&screenshot).expect("chromium wrote no screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is not a PNG");
    // Width and height sit in the IHDR chunk at bytes 16 to 23.
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1000, 700));
}
