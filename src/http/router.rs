//! Garden's route table and the path matching of the Go server.
//!
//! A parameter matches up to the next `/`; it may be empty when more of the
//! path follows, but not at the very end (`DELETE /containers/` is 404).
//! There are no trailing-slash variants. A path that matches a route only
//! under another method gives 405 with the allowed methods. Parameters are
//! percent-decoded; `+` stays literal, so handles containing `+` can be
//! addressed (the Go server would turn it into a space).

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

/// Every Garden route. The names are the Go server's, used in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Ping,
    Capacity,
    List,
    Create,
    Info,
    BulkInfo,
    BulkMetrics,
    Destroy,
    Stop,
    StreamIn,
    StreamOut,
    CurrentBandwidthLimits,
    CurrentCpuLimits,
    CurrentDiskLimits,
    CurrentMemoryLimits,
    NetIn,
    NetOut,
    BulkNetOut,
    Stdout,
    Stderr,
    Run,
    Attach,
    SetGraceTime,
    Properties,
    Property,
    SetProperty,
    RemoveProperty,
    Metrics,
    LimitBandwidth,
    LimitCpu,
    LimitMemory,
    LimitDisk,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Ping => "Ping",
            Route::Capacity => "Capacity",
            Route::List => "List",
            Route::Create => "Create",
            Route::Info => "Info",
            Route::BulkInfo => "BulkInfo",
            Route::BulkMetrics => "BulkMetrics",
            Route::Destroy => "Destroy",
            Route::Stop => "Stop",
            Route::StreamIn => "StreamIn",
            Route::StreamOut => "StreamOut",
            Route::CurrentBandwidthLimits => "CurrentBandwidthLimits",
            Route::CurrentCpuLimits => "CurrentCPULimits",
            Route::CurrentDiskLimits => "CurrentDiskLimits",
            Route::CurrentMemoryLimits => "CurrentMemoryLimits",
            Route::NetIn => "NetIn",
            Route::NetOut => "NetOut",
            Route::BulkNetOut => "BulkNetOut",
            Route::Stdout => "Stdout",
            Route::Stderr => "Stderr",
            Route::Run => "Run",
            Route::Attach => "Attach",
            Route::SetGraceTime => "SetGraceTime",
            Route::Properties => "Properties",
            Route::Property => "Property",
            Route::SetProperty => "SetProperty",
            Route::RemoveProperty => "RemoveProperty",
            Route::Metrics => "Metrics",
            Route::LimitBandwidth => "LimitBandwidth",
            Route::LimitCpu => "LimitCPU",
            Route::LimitMemory => "LimitMemory",
            Route::LimitDisk => "LimitDisk",
        }
    }

    /// Returns whether the route is served on the raw connection.
    pub fn is_hijacked(self) -> bool {
        matches!(self, Route::Run | Route::Attach | Route::Stdout | Route::Stderr)
    }
}

/// The route table in the Go server's order. `:name` is a parameter.
const TABLE: &[(&str, &str, Route)] = &[
    ("GET", "/ping", Route::Ping),
    ("GET", "/capacity", Route::Capacity),
    ("GET", "/containers", Route::List),
    ("POST", "/containers", Route::Create),
    ("GET", "/containers/:handle/info", Route::Info),
    ("GET", "/containers/bulk_info", Route::BulkInfo),
    ("GET", "/containers/bulk_metrics", Route::BulkMetrics),
    ("DELETE", "/containers/:handle", Route::Destroy),
    ("PUT", "/containers/:handle/stop", Route::Stop),
    ("PUT", "/containers/:handle/files", Route::StreamIn),
    ("GET", "/containers/:handle/files", Route::StreamOut),
    ("GET", "/containers/:handle/limits/bandwidth", Route::CurrentBandwidthLimits),
    ("GET", "/containers/:handle/limits/cpu", Route::CurrentCpuLimits),
    ("GET", "/containers/:handle/limits/disk", Route::CurrentDiskLimits),
    ("GET", "/containers/:handle/limits/memory", Route::CurrentMemoryLimits),
    ("POST", "/containers/:handle/net/in", Route::NetIn),
    ("POST", "/containers/:handle/net/out", Route::NetOut),
    ("POST", "/containers/:handle/net/out/bulk", Route::BulkNetOut),
    ("GET", "/containers/:handle/processes/:pid/attaches/:streamid/stdout", Route::Stdout),
    ("GET", "/containers/:handle/processes/:pid/attaches/:streamid/stderr", Route::Stderr),
    ("POST", "/containers/:handle/processes", Route::Run),
    ("GET", "/containers/:handle/processes/:pid", Route::Attach),
    ("PUT", "/containers/:handle/grace_time", Route::SetGraceTime),
    ("GET", "/containers/:handle/properties", Route::Properties),
    ("GET", "/containers/:handle/properties/:key", Route::Property),
    ("PUT", "/containers/:handle/properties/:key", Route::SetProperty),
    ("DELETE", "/containers/:handle/properties/:key", Route::RemoveProperty),
    ("GET", "/containers/:handle/metrics", Route::Metrics),
    // Served for clients of the 2015 API, which set limits after create.
    ("PUT", "/containers/:handle/limits/bandwidth", Route::LimitBandwidth),
    ("PUT", "/containers/:handle/limits/cpu", Route::LimitCpu),
    ("PUT", "/containers/:handle/limits/memory", Route::LimitMemory),
    ("PUT", "/containers/:handle/limits/disk", Route::LimitDisk),
];

/// A matched route with its decoded parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    pub route: Route,
    /// Parameters in pattern order, decoded.
    pub params: Vec<(&'static str, String)>,
}

impl RouteMatch {
    /// Returns a parameter by name, or `""` when the route has none.
    pub fn param(&self, name: &str) -> &str {
        self.params.iter().find(|(key, _)| *key == name).map(|(_, value)| value.as_str()).unwrap_or("")
    }
}

/// Why no route matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    /// The path matches routes under these methods only.
    MethodNotAllowed { allow: Vec<&'static str> },
}

/// Matches `path` (without the query string) against one pattern.
fn match_pattern(pattern: &'static str, path: &str) -> Option<Vec<(&'static str, String)>> {
    let mut params = Vec::new();
    let mut rest = path;
    let mut pattern_rest = pattern;
    while !pattern_rest.is_empty() {
        if let Some(after_colon) = pattern_rest.strip_prefix(':') {
            let name_end = after_colon.find('/').unwrap_or(after_colon.len());
            let name = &after_colon[..name_end];
            pattern_rest = &after_colon[name_end..];
            let value_end = rest.find('/').unwrap_or(rest.len());
            let value = &rest[..value_end];
            rest = &rest[value_end..];
            // An empty parameter at the very end of the path does not match.
            if value.is_empty() && pattern_rest.is_empty() {
                return None;
            }
            params.push((name, decode_param(value)));
        } else {
            let literal_end = pattern_rest.find(':').unwrap_or(pattern_rest.len());
            let literal = &pattern_rest[..literal_end];
            rest = rest.strip_prefix(literal)?;
            pattern_rest = &pattern_rest[literal_end..];
        }
    }
    rest.is_empty().then_some(params)
}

fn decode_param(value: &str) -> String {
    match percent_decode_str(value).decode_utf8_lossy() {
        Cow::Borrowed(text) => text.to_string(),
        Cow::Owned(text) => text,
    }
}

/// Finds the route for a method and path.
pub fn match_route(method: &str, path: &str) -> Result<RouteMatch, RouteError> {
    let mut allow = Vec::new();
    for (route_method, pattern, route) in TABLE {
        if let Some(params) = match_pattern(pattern, path) {
            if *route_method == method {
                return Ok(RouteMatch { route: *route, params });
            }
            if !allow.contains(route_method) {
                allow.push(*route_method);
            }
        }
    }
    if allow.is_empty() {
        Err(RouteError::NotFound)
    } else {
        Err(RouteError::MethodNotAllowed { allow })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: &str) -> Option<Route> {
        match_route(method, path).ok().map(|found| found.route)
    }

    #[test]
    fn table_routes_match() {
        assert_eq!(route("GET", "/ping"), Some(Route::Ping));
        assert_eq!(route("GET", "/containers"), Some(Route::List));
        assert_eq!(route("POST", "/containers"), Some(Route::Create));
        assert_eq!(route("GET", "/containers/bulk_info"), Some(Route::BulkInfo));
        assert_eq!(route("GET", "/containers/bulk_info/info"), Some(Route::Info));
        assert_eq!(route("DELETE", "/containers/bulk_info"), Some(Route::Destroy));
        assert_eq!(route("POST", "/containers/h/processes"), Some(Route::Run));
        assert_eq!(route("GET", "/containers/h/processes/p"), Some(Route::Attach));
        assert_eq!(route("GET", "/containers/h/processes/p/attaches/3/stdout"), Some(Route::Stdout));
        assert_eq!(route("GET", "/containers/h/processes/p/attaches/3/stderr"), Some(Route::Stderr));
        assert_eq!(route("PUT", "/containers/h/limits/memory"), Some(Route::LimitMemory));
    }

    #[test]
    fn parameters_are_decoded() {
        let found = match_route("GET", "/containers/a%20b+c/properties/garden.state").unwrap();
        assert_eq!(found.param("handle"), "a b+c");
        assert_eq!(found.param("key"), "garden.state");
        let found = match_route("GET", "/containers/h/processes/p1/attaches/17/stdout").unwrap();
        assert_eq!((found.param("pid"), found.param("streamid")), ("p1", "17"));
    }

    #[test]
    fn empty_parameters() {
        assert_eq!(match_route("GET", "/containers//info").unwrap().param("handle"), "");
        assert_eq!(route("DELETE", "/containers/"), None);
        assert_eq!(match_route("GET", "/containers/h/properties/"), Err(RouteError::NotFound));
    }

    #[test]
    fn no_trailing_slash_variants() {
        assert_eq!(match_route("GET", "/ping/"), Err(RouteError::NotFound));
        assert_eq!(match_route("GET", "/containers/"), Err(RouteError::NotFound));
        assert_eq!(match_route("GET", "/containers/h/info/"), Err(RouteError::NotFound));
        assert_eq!(match_route("GET", "/nonexistent"), Err(RouteError::NotFound));
    }

    #[test]
    fn wrong_method_lists_allowed() {
        assert_eq!(match_route("POST", "/ping"), Err(RouteError::MethodNotAllowed { allow: vec!["GET"] }));
        assert_eq!(match_route("HEAD", "/containers"), Err(RouteError::MethodNotAllowed { allow: vec!["GET", "POST"] }));
        assert_eq!(
            match_route("POST", "/containers/h/properties/k"),
            Err(RouteError::MethodNotAllowed { allow: vec!["GET", "PUT", "DELETE"] })
        );
    }
}
