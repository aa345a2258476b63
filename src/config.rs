//! The YAML config file: schema, defaults, and validation into a [`DesiredState`].
//!
//! Parsing has two steps, both reporting the key and the line: serde (`serde-saphyr` renders the
//! location of a syntax or type error), then [`Config::to_desired`], which checks what serde cannot
//! (duplicate published ports, routers naming unknown services) using the spans kept by
//! [`Spanned`]. A config that fails either step is rejected whole; the caller keeps the old table.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use crate::dns::DnsConfig;
use crate::model::{
    parse_duration, DesiredState, EndpointSpec, EntrypointSpec, HealthCheckSpec, HttpUpstream,
    Policy, PortSpec, Protocol, ProxyProtocol, RouterSpec, ServiceSpec, Timeouts, UdpSettings,
};
use crate::provider::docker::DockerConfig;

/// The embedded default config (`config/meshgate.yaml`): proxies :8080 to a demo backend.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/meshgate.yaml");

/// Why a config could not be loaded. The message names the key and the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("line {line}: {key}: {message}")]
    Invalid {
        line: u64,
        key: String,
        message: String,
    },
}

/// The whole config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Logging.
    pub log: LogConfig,
    /// Admin API and Prometheus metrics.
    pub admin: AdminConfig,
    /// In-process demo backends started with meshgate (for the embedded default and trials).
    pub demo: DemoConfig,
    /// How long a SIGTERM waits for in-flight connections before exiting.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// Services by name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// HTTP entrypoints by name.
    pub entrypoints: BTreeMap<String, EntrypointSpec>,
    /// HTTP routers by name.
    pub routers: BTreeMap<String, RouterSpec>,
    /// HTTP-wide settings: certificates, upstream CA, access log.
    pub http: crate::http::HttpConfig,
    /// Set SO_REUSEPORT on listeners, so a new meshgate can bind beside an old one during an
    /// upgrade. Off by default: with it on, a port held by another process is not reported.
    pub reuse_port: bool,
    /// How L4 TCP connections move a stream's bytes (read at start).
    pub l4_copy: crate::proxy::copy::CopyMode,
    /// TCP congestion control of the connections meshgate opens to endpoints (L4 and HTTP), for
    /// example `cubic`; unset: the kernel's default (`net.ipv4.tcp_congestion_control`). Read at
    /// start.
    pub upstream_congestion: Option<crate::tcpio::CongestionControl>,
    /// Dynamic providers.
    pub providers: ProvidersConfig,
    /// Embedded DNS server and service VIPs.
    pub dns: DnsConfig,
}

/// `log:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace` or a full filter (`meshgate=debug,info`).
    /// `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `admin:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin API at all.
    pub enabled: bool,
    /// Address of the admin API (`/metrics`, `/api/...`). Loopback unless you mean it.
    pub bind: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901),
        }
    }
}

/// `demo:` section: backends meshgate starts in-process, so the default config works alone.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// HTTP demo backends: each answers every request with its name.
    pub http: Vec<DemoBackend>,
    /// TCP echo demo backends.
    pub tcp: Vec<DemoBackend>,
    /// UDP echo demo backends.
    pub udp: Vec<DemoBackend>,
}

/// One demo backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoBackend {
    /// Name it answers with.
    #[serde(default)]
    pub name: String,
    /// Address to listen on.
    pub bind: SocketAddr,
}

/// `providers:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvidersConfig {
    /// The static file provider (this file).
    pub file: FileProviderConfig,
    /// Docker / Swarm discovery.
    pub docker: DockerConfig,
}

/// `providers.file:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileProviderConfig {
    /// Watch the config file and apply valid changes (invalid ones are rejected and logged).
    pub watch: bool,
}

impl Default for FileProviderConfig {
    fn default() -> Self {
        FileProviderConfig { watch: true }
    }
}

/// One service under `services:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Published ports: `"8080:80/tcp"`, `"9000"`, or `{published, target, protocol, bind}`.
    pub ports: Vec<Spanned<PortEntry>>,
    /// Endpoints: `"127.0.0.1:18081"` or `{address, weight, node}`.
    pub endpoints: Vec<EndpointEntry>,
    /// `round_robin` (default), `least_conn`, `p2c`, `consistent_hash`.
    pub policy: Policy,
    /// Timeouts (durations like `2s`, `250ms`; `0` = none where allowed).
    pub timeouts: TimeoutsConfig,
    /// Connect attempts after a failed one, each on a different endpoint (default 1).
    pub retries: Option<u32>,
    /// UDP flow settings.
    pub udp: UdpConfig,
    /// PROXY protocol header to the upstream: `none` (default), `v1`, `v2`.
    pub proxy_protocol: ProxyProtocol,
    /// Target port for HTTP routers (default: the first port's target).
    pub http_port: Option<u16>,
    /// HTTP sticky-session cookie name (unset = not sticky).
    pub sticky_cookie: Option<String>,
    /// Active health check (unset = passive only).
    pub health_check: Option<HealthCheckConfig>,
    /// Protocol HTTP routers speak to the endpoints: `http1` (default), `h2c`, `https`.
    pub http_upstream: HttpUpstream,
}

/// `services.<name>.timeouts:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Upstream connect timeout (default 2s).
    #[serde(deserialize_with = "de_opt_duration")]
    pub connect: Option<Duration>,
    /// L4 idle timeout; `0` or unset = none (no hidden 900 s cut).
    #[serde(deserialize_with = "de_opt_duration")]
    pub idle: Option<Duration>,
    /// How long established connections may finish after the port is removed (default 30s).
    #[serde(deserialize_with = "de_opt_duration")]
    pub drain: Option<Duration>,
    /// HTTP: time to response headers (default 60s, `0` = none).
    #[serde(deserialize_with = "de_opt_duration")]
    pub response: Option<Duration>,
}

/// `services.<name>.udp:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UdpConfig {
    /// Drop a client flow after this long without datagrams (default 30s).
    #[serde(deserialize_with = "de_opt_duration")]
    pub idle: Option<Duration>,
    /// Most concurrent client flows per listener (default 10000).
    pub max_flows: Option<usize>,
}

/// `services.<name>.health_check:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Time between checks (default 5s).
    #[serde(deserialize_with = "de_duration")]
    pub interval: Duration,
    /// Time a check may take (default 1s).
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Consecutive failures before marking down (default 3).
    pub fall: u32,
    /// Consecutive successes before marking up again (default 2).
    pub rise: u32,
    /// HTTP GET this path and expect 2xx/3xx; unset = TCP connect check.
    pub http_path: Option<String>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            fall: 3,
            rise: 2,
            http_path: None,
        }
    }
}

/// A published port, short (`"8080:80/tcp"`) or long form.
#[derive(Debug, Clone, PartialEq)]
pub struct PortEntry(pub PortSpec);

impl<'de> Deserialize<'de> for PortEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u16),
            Short(String),
            Long(LongPort),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct LongPort {
            published: u16,
            target: Option<u16>,
            #[serde(default)]
            protocol: Protocol,
            bind: Option<IpAddr>,
        }
        let spec = match Raw::deserialize(d)? {
            Raw::Num(p) => short_port(&p.to_string()),
            Raw::Short(s) => short_port(&s),
            Raw::Long(l) => Ok(PortSpec {
                published: l.published,
                target: l.target.unwrap_or(l.published),
                protocol: l.protocol,
                bind: l.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            }),
        }
        .map_err(serde::de::Error::custom)?;
        if spec.published == 0 {
            return Err(serde::de::Error::custom("published port must not be 0"));
        }
        Ok(PortEntry(spec))
    }
}

/// Parse `published[:target][/tcp|udp]`, optionally prefixed by a bind IP (`127.0.0.1:8080:80`).
pub fn short_port(text: &str) -> Result<PortSpec, String> {
    let (ports, protocol) = match text.rsplit_once('/') {
        Some((p, "tcp")) => (p, Protocol::Tcp),
        Some((p, "udp")) => (p, Protocol::Udp),
        Some((_, other)) => return Err(format!("unknown protocol {other:?} (tcp or udp)")),
        None => (text, Protocol::Tcp),
    };
    let parts: Vec<&str> = ports.split(':').collect();
    let num = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("bad port {s:?} in {text:?}"))
    };
    let (bind, published, target) = match parts.as_slice() {
        [p] => (None, num(p)?, num(p)?),
        [p, t] => (None, num(p)?, num(t)?),
        [ip, p, t] => (
            Some(
                ip.parse::<IpAddr>()
                    .map_err(|_| format!("bad bind address {ip:?} in {text:?}"))?,
            ),
            num(p)?,
            num(t)?,
        ),
        _ => {
            return Err(format!(
                "port {text:?} is not [ip:]published[:target][/proto]"
            ))
        }
    };
    Ok(PortSpec {
        published,
        target,
        protocol,
        bind: bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
    })
}

/// An endpoint, short (`"127.0.0.1:18081"`) or long form.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointEntry(pub EndpointSpec);

impl<'de> Deserialize<'de> for EndpointEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Short(String),
            Long(LongEndpoint),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct LongEndpoint {
            address: String,
            #[serde(default = "one")]
            weight: u32,
            node: Option<String>,
        }
        fn one() -> u32 {
            1
        }
        let (address, weight, node) = match Raw::deserialize(d)? {
            Raw::Short(s) => (s, 1, None),
            Raw::Long(l) => (l.address, l.weight, l.node),
        };
        let mut spec = if let Ok(addr) = address.parse::<SocketAddr>() {
            EndpointSpec::from_addr(addr)
        } else if let Ok(ip) = address.parse::<IpAddr>() {
            let mut e = EndpointSpec::from_addr(SocketAddr::new(ip, 0));
            e.port = None;
            e
        } else {
            return Err(serde::de::Error::custom(format!(
                "endpoint address {address:?} is not ip:port or ip"
            )));
        };
        spec.weight = weight;
        spec.node = node;
        Ok(EndpointEntry(spec))
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// The YAML parser's limits for a text of `len` bytes. serde-saphyr's default budget stops at
/// 250,000 nodes and 1,000,000 events, which refuses a static config of 10,000 services in
/// block style. A node written out takes at least one byte of input, so allowing one node per
/// byte (and two events: a collection's end takes none) admits every document without aliases,
/// while alias expansion (the "billion laughs") stays bounded by the input's size; the other
/// limits (depth, aliases, anchors, 64 MiB of scalars) stay as they are.
fn yaml_options(len: usize) -> serde_saphyr::Options {
    let mut budget = serde_saphyr::budget::Budget::default();
    budget.max_nodes = budget.max_nodes.max(len);
    budget.max_events = budget.max_events.max(len.saturating_mul(2));
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

impl Config {
    /// Parse YAML text (syntax and types only; see [`Config::to_desired`]).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = serde_saphyr::from_str_with_options(text, yaml_options(text.len()))
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        if cfg.shutdown_timeout.is_zero() {
            cfg.shutdown_timeout = Duration::from_secs(30);
        }
        Ok(cfg)
    }

    /// Read and parse a file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg = Config::parse(&text)?;
        cfg.to_desired()?;
        Ok(cfg)
    }

    /// Validate across keys and compile into the file provider's desired state.
    pub fn to_desired(&self) -> Result<DesiredState, ConfigError> {
        self.dns
            .validate()
            .map_err(|message| ConfigError::Invalid {
                line: 0,
                key: "dns.zone".into(),
                message,
            })?;
        let mut desired = DesiredState::default();
        let mut published: BTreeMap<(Protocol, IpAddr, u16), &str> = BTreeMap::new();
        for (name, svc) in &self.services {
            let mut spec = ServiceSpec::new(name.clone());
            for port in &svc.ports {
                let p = port.value.0;
                let key = (p.protocol, p.bind, p.published);
                if let Some(other) = published.insert(key, name) {
                    return Err(ConfigError::Invalid {
                        line: port.referenced.line(),
                        key: format!("services.{name}.ports"),
                        message: format!(
                            "{}/{} is already published by service {other}",
                            p.published, p.protocol
                        ),
                    });
                }
                spec.ports.push(p);
            }
            spec.endpoints = svc.endpoints.iter().map(|e| e.0.clone()).collect();
            spec.policy = svc.policy;
            let defaults = Timeouts::default();
            spec.timeouts = Timeouts {
                connect: svc.timeouts.connect.unwrap_or(defaults.connect),
                idle: svc.timeouts.idle.filter(|d| !d.is_zero()),
                drain: svc.timeouts.drain.unwrap_or(defaults.drain),
                response: match svc.timeouts.response {
                    Some(d) if d.is_zero() => None,
                    Some(d) => Some(d),
                    None => defaults.response,
                },
            };
            spec.retries = svc.retries.unwrap_or(1);
            let udp = UdpSettings::default();
            spec.udp = UdpSettings {
                idle: svc.udp.idle.unwrap_or(udp.idle),
                max_flows: svc.udp.max_flows.unwrap_or(udp.max_flows),
            };
            spec.proxy_protocol = svc.proxy_protocol;
            spec.http_port = svc.http_port.or(spec.ports.first().map(|p| p.target));
            spec.sticky_cookie = svc.sticky_cookie.clone();
            spec.health_check = svc.health_check.as_ref().map(|h| HealthCheckSpec {
                interval: h.interval,
                timeout: h.timeout,
                fall: h.fall.max(1),
                rise: h.rise.max(1),
                http_path: h.http_path.clone(),
            });
            spec.http_upstream = svc.http_upstream;
            desired.services.insert(name.clone(), spec);
        }
        for (name, ep) in &self.entrypoints {
            let mut ep = ep.clone();
            ep.name = name.clone();
            desired.entrypoints.insert(name.clone(), ep);
        }
        for (name, router) in &self.routers {
            let invalid = |message: String| ConfigError::Invalid {
                line: 0,
                key: format!("routers.{name}"),
                message,
            };
            if !self.services.contains_key(&router.service) && !self.providers.docker.enabled {
                return Err(invalid(format!("unknown service {:?}", router.service)));
            }
            // A rule that does not parse rejects the whole file, so the previous routes keep
            // serving (the table build would otherwise drop just this router).
            crate::http::rule::Rule::parse(&router.rule)
                .map_err(|e| invalid(format!("rule {:?}: {e}", router.rule)))?;
            for ep in &router.entrypoints {
                if !self.entrypoints.contains_key(ep) {
                    return Err(invalid(format!("unknown entrypoint {ep:?}")));
                }
            }
            let mut router = router.clone();
            router.name = name.clone();
            desired.routers.insert(name.clone(), router);
        }
        Ok(desired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let cfg = Config::parse(EMBEDDED_DEFAULT).unwrap();
        let desired = cfg.to_desired().unwrap();
        assert!(!desired.services.is_empty());
        assert!(!cfg.demo.http.is_empty());
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../config/example.yaml");
        let cfg = Config::parse(text).unwrap();
        cfg.to_desired().unwrap();
    }

    #[test]
    fn short_ports() {
        let p = short_port("8080:80/udp").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol),
            (8080, 80, Protocol::Udp)
        );
        let p = short_port("127.0.0.1:9000:90").unwrap();
        assert_eq!(p.bind, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert!(short_port("80/sctp").is_err());
        assert!(short_port("99999").is_err());
    }

    /// A static config of 10,000 services × 10 endpoints in block style, the way people write
    /// YAML, parses (serde-saphyr's default budget refused it); an alias bomb of a few hundred
    /// bytes is still refused.
    #[test]
    fn a_large_block_style_config_parses_and_an_alias_bomb_does_not() {
        let mut text = String::from("services:\n");
        for i in 0..10_000u32 {
            text += &format!(
                "  s{i}:\n    ports:\n      - \"{}:80/tcp\"\n    policy: round_robin\n    health_check:\n      interval: 1h\n      timeout: 1s\n    timeouts:\n      connect: 2s\n    endpoints:\n",
                20_000 + i
            );
            for e in 0..10u32 {
                text += &format!("      - \"10.{}.{}.{e}:80\"\n", i / 256, i % 256);
            }
        }
        assert!(
            serde_saphyr::from_str::<Config>(&text).is_err(),
            "the default budget refuses it (else this test proves nothing)"
        );
        let cfg = Config::parse(&text).expect("a large config parses");
        assert_eq!(cfg.services.len(), 10_000);
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..8 {
            let prev = (b'a' + level - 1) as char;
            let name = (b'a' + level) as char;
            bomb += &format!("{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n");
        }
        let err = Config::parse(&bomb).expect_err("an alias bomb is refused");
        assert!(matches!(err, ConfigError::Parse(_)), "{err}");
    }

    #[test]
    fn l4_copy_defaults_to_splice_and_names_a_bad_value() {
        use crate::proxy::copy::CopyMode;
        assert_eq!(Config::parse("{}").unwrap().l4_copy, CopyMode::Splice);
        assert_eq!(
            Config::parse("l4_copy: buffer\n").unwrap().l4_copy,
            CopyMode::Buffer
        );
        let msg = Config::parse("\nl4_copy: sendfile\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("sendfile") && msg.contains('2'), "{msg}");
    }

    #[test]
    fn upstream_congestion_is_unset_by_default_and_a_bad_name_is_refused() {
        assert_eq!(Config::parse("{}").unwrap().upstream_congestion, None);
        let cc = Config::parse("upstream_congestion: cubic\n")
            .unwrap()
            .upstream_congestion;
        assert_eq!(cc.as_ref().map(|c| c.as_str()), Some("cubic"));
        let msg = Config::parse("\n\nupstream_congestion: \"cu bic\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cu bic") && msg.contains('3'), "{msg}");
    }

    #[test]
    fn errors_name_key_and_line() {
        let text = "services:\n  a:\n    ports: [\"9000\"]\n  b:\n    ports:\n      - \"9000\"\n";
        let err = Config::parse(text).unwrap().to_desired().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 6"), "{msg}");
        assert!(msg.contains("services.b.ports"), "{msg}");

        let text = "services:\n  a:\n    policy: fastest\n";
        let msg = Config::parse(text).unwrap_err().to_string();
        assert!(msg.contains("fastest") && msg.contains('3'), "{msg}");

        let text = "services:\n  a:\n    timeouts:\n      idle: 5 parsecs\n";
        let msg = Config::parse(text).unwrap_err().to_string();
        assert!(msg.contains("parsecs") && msg.contains('4'), "{msg}");

        let text = "entrypoints:\n  web: { bind: \"127.0.0.1:1\" }\nservices:\n  a: { http_port: 80 }\nrouters:\n  r: { entrypoints: [web], rule: \"Host(`x`\", service: a }\n";
        let msg = Config::parse(text)
            .unwrap()
            .to_desired()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("routers.r") && msg.contains("rule"), "{msg}");

        let text = "services:\n  g: { http_port: 80, http_upstream: h2c }\n";
        let d = Config::parse(text).unwrap().to_desired().unwrap();
        assert_eq!(d.services["g"].http_upstream, HttpUpstream::H2c);

        let text = "servces: {}\n";
        let msg = Config::parse(text).unwrap_err().to_string();
        assert!(msg.contains("servces"), "{msg}");
    }
}
