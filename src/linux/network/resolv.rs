//! Contents of each container's `/etc/hosts` and `/etc/resolv.conf`.

use std::net::Ipv4Addr;

use super::{NetworkError, NetworkSettings};

/// The host's resolver file.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// The upstream servers systemd-resolved publishes behind its stub.
const SYSTEMD_RESOLV_CONF: &str = "/run/systemd/resolve/resolv.conf";
/// The address of systemd-resolved's stub listener.
const SYSTEMD_STUB: &str = "127.0.0.53";

/// Returns `/etc/hosts`: localhost, the container's address with its
/// hostname, then the operator's lines, each ending in a newline.
pub fn hosts_file(container_ip: Ipv4Addr, hostname: &str, extra: &[String]) -> String {
    let mut text = format!("127.0.0.1 localhost\n{container_ip} {hostname}\n");
    for line in extra {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// The source of a container's name servers, chosen at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvSource {
    /// Fixed text (the operator's servers, or the host's usable lines).
    Fixed(String),
    /// The host only has a loopback resolver: containers use their gateway.
    Gateway,
}

impl ResolvSource {
    pub fn from_settings(settings: &NetworkSettings) -> Result<ResolvSource, NetworkError> {
        if !settings.dns_servers.is_empty() {
            let text: String = settings.dns_servers.iter().map(|server| format!("nameserver {server}\n")).collect();
            return Ok(ResolvSource::Fixed(text));
        }
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|error| NetworkError::Host { operation: format!("read {path}"), reason: error.to_string() })
        };
        let host = read(HOST_RESOLV_CONF)?;
        let uses_stub = host.lines().any(|line| nameserver(line) == Some(SYSTEMD_STUB));
        if uses_stub {
            if let Ok(upstream) = std::fs::read_to_string(SYSTEMD_RESOLV_CONF) {
                return Ok(ResolvSource::derive(&upstream));
            }
        }
        Ok(ResolvSource::derive(&host))
    }

    /// Derives the container's file from a host resolver file. A host
    /// file with nothing but one `nameserver 127.0.0.x` line makes
    /// containers use their gateway. Otherwise every other line is kept and
    /// `127.*` name servers are dropped.
    pub fn derive(host: &str) -> ResolvSource {
        let meaningful: Vec<&str> = host.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with(';')).collect();
        if let [only] = meaningful.as_slice() {
            if nameserver(only).is_some_and(|server| server.starts_with("127.0.0.")) {
                return ResolvSource::Gateway;
            }
        }
        let mut text = String::new();
        for line in meaningful {
            if nameserver(line).is_some_and(|server| server.starts_with("127.")) {
                continue;
            }
            text.push_str(line);
            text.push('\n');
        }
        ResolvSource::Fixed(text)
    }

    pub fn uses_gateway(&self) -> bool {
        *self == ResolvSource::Gateway
    }

    /// Renders the file of a container whose gateway is `gateway`.
    pub fn render(&self, gateway: Ipv4Addr, additional: &[Ipv4Addr]) -> String {
        let mut text = match self {
            ResolvSource::Fixed(text) => text.clone(),
            ResolvSource::Gateway => format!("nameserver {gateway}\n"),
        };
        for server in additional {
            text.push_str(&format!("nameserver {server}\n"));
        }
        text
    }
}

/// Returns the server of a `nameserver` line.
fn nameserver(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("nameserver"), Some(server)) => Some(server),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines_in_order() {
        let text = hosts_file(Ipv4Addr::new(10, 254, 0, 2), "web-1", &["192.0.2.9 db".to_string()]);
        assert_eq!(text, "127.0.0.1 localhost\n10.254.0.2 web-1\n192.0.2.9 db\n");
    }

    #[test]
    fn loopback_only_host_uses_gateway() {
        let source = ResolvSource::derive("# generated\nnameserver 127.0.0.1\n");
        assert_eq!(source, ResolvSource::Gateway);
        let gateway = Ipv4Addr::new(10, 254, 0, 1);
        assert_eq!(source.render(gateway, &[Ipv4Addr::new(192, 0, 2, 53)]), "nameserver 10.254.0.1\nnameserver 192.0.2.53\n");
    }

    #[test]
    fn host_lines_kept_without_loopback_servers() {
        let source = ResolvSource::derive("search example.test\nnameserver 127.0.0.1\nnameserver 192.0.2.53\noptions ndots:2\n");
        assert_eq!(source.render(Ipv4Addr::new(10, 254, 0, 1), &[]), "search example.test\nnameserver 192.0.2.53\noptions ndots:2\n");
    }

    #[test]
    fn operator_servers_replace_host_file() {
        let settings = NetworkSettings { dns_servers: vec![Ipv4Addr::new(192, 0, 2, 53)], ..NetworkSettings::default() };
        let source = ResolvSource::from_settings(&settings).unwrap();
        assert_eq!(source.render(Ipv4Addr::new(10, 254, 0, 1), &[Ipv4Addr::new(198, 51, 100, 53)]), "nameserver 192.0.2.53\nnameserver 198.51.100.53\n");
    }
}
