//! The compiled router table of one [`RoutingTable`](crate::table::RoutingTable) generation:
//! per entrypoint, routers in priority order plus a host index, and per service the upstream
//! target (endpoint authorities, sticky cookie values) the proxy needs.
//!
//! Order (documented, deterministic): explicit `priority` if non-zero, else the rule text's
//! length (Traefik's default: longer rules are usually more specific); higher first; ties go to
//! the router name that sorts first. The host index only narrows candidates: exact host →
//! list, else parent domain (for `*.parent` rules) → list, else the catch-all list; each list
//! already holds, in order, every router that can match such a host. Lookup allocates nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::HeaderValue;
use rustls::server::danger::ClientCertVerifier;

use super::headers::Cidr;
use super::rule::{parent_domain, HostPattern, RequestView, Rule};
use crate::model::{DesiredState, EntrypointKind, EntrypointSpec, HttpUpstream, Problem, Protocol};
use crate::table::{Pool, ServiceRoute};

/// Default time allowed for a request head (and keep-alive idle between requests).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest request head. hyper's HTTP/1 buffer cannot go below 8 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default most header fields per request.
pub const DEFAULT_MAX_HEADERS: usize = 100;

/// Entrypoint settings, resolved and validated once per table generation.
pub struct EntrypointSettings {
    pub name: Arc<str>,
    pub kind: EntrypointKind,
    pub redirect_to_https: bool,
    pub redirect_port: Option<u16>,
    pub trusted_proxies: Box<[Cidr]>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// rustls config, built on the first TLS connection of this generation (it needs the
    /// context's certificate store, which table builds do not see).
    pub tls_config: OnceLock<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for EntrypointSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntrypointSettings")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("mtls", &self.client_verifier.is_some())
            .finish_non_exhaustive()
    }
}

impl EntrypointSettings {
    fn build(spec: &EntrypointSpec, problems: &mut Vec<Problem>) -> EntrypointSettings {
        let mut problem = |message: String| {
            problems.push(Problem {
                provider: "http".into(),
                object: format!("entrypoint {}", spec.name),
                message,
            })
        };
        let trusted_proxies = spec
            .trusted_proxies
            .iter()
            .filter_map(|c| {
                c.parse()
                    .map_err(|e| problem(format!("trusted_proxies: {e}")))
                    .ok()
            })
            .collect();
        let client_verifier = match (&spec.client_ca, spec.kind) {
            (Some(ca), EntrypointKind::Https) => match super::tls::client_verifier(ca) {
                Ok(v) => Some(v),
                Err(e) => {
                    // Failing closed: an entrypoint that asked for mTLS must not accept anyone.
                    problem(format!(
                        "client_ca: {e}; every TLS handshake will be refused"
                    ));
                    Some(Arc::new(RejectAll) as Arc<dyn ClientCertVerifier>)
                }
            },
            (Some(_), _) => {
                problem("client_ca only applies to https entrypoints; ignored".into());
                None
            }
            (None, _) => None,
        };
        EntrypointSettings {
            name: Arc::from(spec.name.as_str()),
            kind: spec.kind,
            redirect_to_https: spec.redirect_to_https,
            redirect_port: spec.redirect_port,
            trusted_proxies,
            header_read_timeout: spec
                .header_read_timeout
                .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT),
            max_header_bytes: spec.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES),
            max_headers: spec.max_headers.unwrap_or(DEFAULT_MAX_HEADERS),
            client_verifier,
            tls_config: OnceLock::new(),
        }
    }

    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }
}

/// Where a router sends requests: a service's HTTP pool and what the proxy precomputes for it.
#[derive(Debug)]
pub struct Target {
    pub service: Arc<ServiceRoute>,
    /// Index into `service.pools`.
    pool: usize,
    /// `ip:port` of each pool endpoint, as URI authorities (same order as the pool).
    pub authorities: Box<[Authority]>,
    /// Sticky cookie: name and, per endpoint, the value hash and the `Set-Cookie` value.
    pub sticky: Option<Sticky>,
    pub protocol: HttpUpstream,
}

#[derive(Debug)]
pub struct Sticky {
    pub cookie: Box<str>,
    pub hashes: Box<[u64]>,
    pub set_cookie: Box<[HeaderValue]>,
}

impl Target {
    pub fn pool(&self) -> &Pool {
        &self.service.pools[self.pool]
    }
}

/// FNV-1a of an endpoint id: the sticky cookie value (does not reveal the endpoint address).
pub fn endpoint_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn build_target(service: &Arc<ServiceRoute>) -> Result<Target, String> {
    let spec = &service.spec;
    let port = spec
        .http_port
        .or_else(|| {
            let first_tcp = spec.ports.iter().find(|p| p.protocol == Protocol::Tcp);
            first_tcp.map(|p| p.target)
        })
        .ok_or_else(|| format!("service {} has no http_port", spec.name))?;
    let pool = service
        .pool_index(port, Protocol::Tcp)
        .ok_or_else(|| format!("service {} has no pool for port {port}", spec.name))?;
    let endpoints = &service.pools[pool].endpoints;
    let authorities = endpoints
        .iter()
        .map(|e| Authority::from_maybe_shared(Bytes::from(e.addr.to_string())))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("endpoint address: {e}"))?;
    let sticky = match &spec.sticky_cookie {
        Some(name) => {
            let hashes: Box<[u64]> = endpoints.iter().map(|e| endpoint_hash(&e.id)).collect();
            let set_cookie = hashes
                .iter()
                .map(|h| {
                    HeaderValue::from_str(&format!(
                        "{name}={h:016x}; Path=/; HttpOnly; SameSite=Lax"
                    ))
                    .map_err(|_| format!("bad sticky cookie name {name:?}"))
                })
                .collect::<Result<_, _>>()?;
            Some(Sticky {
                cookie: name.as_str().into(),
                hashes,
                set_cookie,
            })
        }
        None => None,
    };
    Ok(Target {
        service: Arc::clone(service),
        pool,
        authorities,
        sticky,
        protocol: spec.http_upstream,
    })
}

/// One compiled router.
#[derive(Debug)]
pub struct CompiledRouter {
    pub name: Arc<str>,
    pub rule: Rule,
    pub priority: i64,
    pub target: Arc<Target>,
}

/// The routers of one entrypoint.
#[derive(Debug)]
pub struct EntrypointTable {
    pub settings: Arc<EntrypointSettings>,
    /// Some router's rule matches on request headers (the HTTP/1 fast path then hands the
    /// request to hyper, which parses them into a map).
    pub uses_headers: bool,
    routers: Box<[CompiledRouter]>,
    exact: HashMap<Box<str>, Box<[u32]>>,
    wildcard: HashMap<Box<str>, Box<[u32]>>,
    catch_all: Box<[u32]>,
}

impl EntrypointTable {
    fn build(settings: EntrypointSettings, mut routers: Vec<CompiledRouter>) -> EntrypointTable {
        routers.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        let required: Vec<Option<Vec<HostPattern>>> =
            routers.iter().map(|r| r.rule.required_hosts()).collect();
        let mut exact_hosts = Vec::new();
        let mut parents = Vec::new();
        for pats in required.iter().flatten() {
            for p in pats {
                match p {
                    HostPattern::Exact(h) => exact_hosts.push(h.clone()),
                    HostPattern::Wildcard(p) => parents.push(p.clone()),
                    HostPattern::Any => {}
                }
            }
        }
        let candidates = |fits: &dyn Fn(&[HostPattern]) -> bool| -> Box<[u32]> {
            (0..routers.len() as u32)
                .filter(|&i| required[i as usize].as_deref().is_none_or(fits))
                .collect()
        };
        let exact = exact_hosts
            .into_iter()
            .map(|h| {
                let list = candidates(&|pats| pats.iter().any(|p| p.matches(&h)));
                (h, list)
            })
            .collect();
        let wildcard = parents
            .into_iter()
            .map(|parent| {
                let list =
                    candidates(&|pats| pats.contains(&HostPattern::Wildcard(parent.clone())));
                (parent, list)
            })
            .collect();
        let catch_all = candidates(&|_| false);
        EntrypointTable {
            settings: Arc::new(settings),
            uses_headers: routers.iter().any(|r| r.rule.uses_headers()),
            routers: routers.into_boxed_slice(),
            exact,
            wildcard,
            catch_all,
        }
    }

    /// The first router (in priority order) whose rule matches. `req.host` must be lowercase.
    pub fn lookup(&self, req: &RequestView<'_>) -> Option<&CompiledRouter> {
        let list = self
            .exact
            .get(req.host)
            .or_else(|| parent_domain(req.host).and_then(|p| self.wildcard.get(p)))
            .unwrap_or(&self.catch_all);
        list.iter()
            .map(|&i| &self.routers[i as usize])
            .find(|r| r.rule.matches(req))
    }

    pub fn routers(&self) -> &[CompiledRouter] {
        &self.routers
    }
}

/// Compiled routers per entrypoint; part of one [`RoutingTable`](crate::table::RoutingTable).
#[derive(Debug, Default)]
pub struct HttpTable {
    /// Sorted by name: every request looks its entrypoint up, and a binary search over a few
    /// names costs a handful of comparisons where hashing the name cost ~160 instructions.
    entrypoints: Vec<(Arc<str>, Arc<EntrypointTable>)>,
}

impl HttpTable {
    /// Compile `desired.routers` against the compiled services; problems are pushed, not fatal:
    /// a router with a bad rule, an unknown entrypoint or an unknown service is left out.
    pub fn build(
        desired: &DesiredState,
        services: &BTreeMap<Arc<str>, Arc<ServiceRoute>>,
        problems: &mut Vec<Problem>,
    ) -> HttpTable {
        let mut per_ep: BTreeMap<&str, Vec<CompiledRouter>> = desired
            .entrypoints
            .keys()
            .map(|k| (k.as_str(), Vec::new()))
            .collect();
        let mut targets: HashMap<&str, Arc<Target>> = HashMap::new();
        for (name, spec) in &desired.routers {
            let mut problem = |message: String| {
                problems.push(Problem {
                    provider: "http".into(),
                    object: format!("router {name}"),
                    message,
                })
            };
            let rule = match Rule::parse(&spec.rule) {
                Ok(r) => r,
                Err(e) => {
                    problem(format!("rule {:?}: {e}", spec.rule));
                    continue;
                }
            };
            let Some(service) = services.get(spec.service.as_str()) else {
                problem(format!("unknown service {:?}", spec.service));
                continue;
            };
            let target = match targets.get(spec.service.as_str()) {
                Some(t) => Arc::clone(t),
                None => match build_target(service) {
                    Ok(t) => {
                        let t = Arc::new(t);
                        targets.insert(spec.service.as_str(), Arc::clone(&t));
                        t
                    }
                    Err(e) => {
                        problem(e);
                        continue;
                    }
                },
            };
            let priority = if spec.priority != 0 {
                spec.priority
            } else {
                spec.rule.len() as i64
            };
            for ep in &spec.entrypoints {
                let Some((ep_spec, list)) =
                    desired.entrypoints.get(ep).zip(per_ep.get_mut(ep.as_str()))
                else {
                    problem(format!("unknown entrypoint {ep:?}"));
                    continue;
                };
                let passthrough = ep_spec.kind == EntrypointKind::TlsPassthrough;
                if passthrough && !rule.is_sni_only() {
                    problem(format!(
                        "entrypoint {ep} is tls_passthrough: the rule must be HostSNI(...) only"
                    ));
                    continue;
                }
                if !passthrough && rule.uses_sni() {
                    problem(format!(
                        "HostSNI only applies to tls_passthrough entrypoints, not {ep}"
                    ));
                    continue;
                }
                list.push(CompiledRouter {
                    name: Arc::from(name.as_str()),
                    rule: rule.clone(),
                    priority,
                    target: Arc::clone(&target),
                });
            }
        }
        // `per_ep` is a BTreeMap: its order is the sorted order `entrypoint` searches.
        let entrypoints = per_ep
            .into_iter()
            .map(|(name, routers)| {
                let settings = EntrypointSettings::build(&desired.entrypoints[name], problems);
                (
                    Arc::from(name),
                    Arc::new(EntrypointTable::build(settings, routers)),
                )
            })
            .collect();
        HttpTable { entrypoints }
    }

    pub fn entrypoint(&self, name: &str) -> Option<&Arc<EntrypointTable>> {
        let i = self
            .entrypoints
            .binary_search_by(|(k, _)| (**k).cmp(name))
            .ok()?;
        Some(&self.entrypoints[i].1)
    }
}

/// Client verifier used when the configured CA cannot be read: refuses every certificate.
#[derive(Debug)]
struct RejectAll;

impl ClientCertVerifier for RejectAll {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Err(rustls::Error::General("client CA unavailable".into()))
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("client CA unavailable".into()))
    }
    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("client CA unavailable".into()))
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        super::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointSpec, RouterSpec, ServiceSpec};
    use crate::stats::StatsRegistry;
    use crate::table::{BuildOptions, RoutingTable};
    use http::Method;

    fn desired(routers: &[(&str, &str, i64, &str)]) -> DesiredState {
        let mut d = DesiredState::default();
        for svc in ["a", "b", "c"] {
            let mut s = ServiceSpec::new(svc);
            s.http_port = Some(80);
            s.endpoints
                .push(EndpointSpec::from_addr("127.0.0.1:1".parse().unwrap()));
            d.services.insert(svc.into(), s);
        }
        d.entrypoints.insert(
            "web".into(),
            EntrypointSpec::new("web", "127.0.0.1:0".parse().unwrap(), EntrypointKind::Http),
        );
        for (name, rule, priority, service) in routers {
            d.routers.insert(
                name.to_string(),
                RouterSpec {
                    name: name.to_string(),
                    entrypoints: vec!["web".into()],
                    rule: rule.to_string(),
                    service: service.to_string(),
                    priority: *priority,
                },
            );
        }
        d
    }

    /// Without `http_port`, HTTP goes to the first TCP port's target, over that TCP pool: a UDP
    /// port listed first (DNS beside a web UI) is not it.
    #[test]
    fn http_defaults_to_the_first_tcp_port() {
        let mut d = desired(&[]);
        let s = d.services.get_mut("a").unwrap();
        s.http_port = None;
        let port = |published, target, protocol| crate::model::PortSpec {
            published,
            target,
            protocol,
            bind: "0.0.0.0".parse().unwrap(),
        };
        s.ports = vec![port(53, 53, Protocol::Udp), port(8080, 80, Protocol::Tcp)];
        let t = RoutingTable::build(&d, &BuildOptions::default(), &StatsRegistry::default(), 1);
        let target = build_target(&t.services["a"]).unwrap();
        assert_eq!(
            (target.pool().target, target.pool().protocol),
            (80, Protocol::Tcp)
        );
    }

    fn route(t: &RoutingTable, host: &str, path: &str) -> Option<String> {
        let view = RequestView {
            host,
            path,
            method: &Method::GET,
            headers: None,
        };
        t.http
            .entrypoint("web")
            .unwrap()
            .lookup(&view)
            .map(|r| r.name.to_string())
    }

    #[test]
    fn specificity_and_priority() {
        let d = desired(&[
            ("any", "PathPrefix(`/`)", 0, "a"),
            ("host", "Host(`x.example`)", 0, "a"),
            (
                "host-api",
                "Host(`x.example`) && PathPrefix(`/api`)",
                0,
                "b",
            ),
            ("wild", "Host(`*.example`)", 0, "c"),
            ("forced", "PathPrefix(`/forced`)", 1000, "c"),
            ("bad", "Host(`x`", 0, "a"),
            ("nosvc", "Host(`y`)", 0, "zzz"),
        ]);
        let t = RoutingTable::build(&d, &BuildOptions::default(), &StatsRegistry::default(), 1);
        assert_eq!(
            route(&t, "x.example", "/api/1").as_deref(),
            Some("host-api")
        );
        assert_eq!(route(&t, "x.example", "/").as_deref(), Some("host"));
        assert_eq!(route(&t, "y.example", "/").as_deref(), Some("wild"));
        assert_eq!(route(&t, "other", "/").as_deref(), Some("any"));
        assert_eq!(route(&t, "x.example", "/forced").as_deref(), Some("forced"));
        let objects: Vec<_> = t.problems.iter().map(|p| p.object.as_str()).collect();
        assert!(objects.contains(&"router bad"));
        assert!(objects.contains(&"router nosvc"));
    }

    /// Each entrypoint's own routers, whatever the order the names were declared in.
    #[test]
    fn entrypoints_are_found_by_name() {
        let mut d = desired(&[("any", "PathPrefix(`/`)", 0, "a")]);
        for name in ["zeta", "alpha", "mid"] {
            let addr = "127.0.0.1:0".parse().unwrap();
            let ep = EntrypointSpec::new(name, addr, EntrypointKind::Http);
            d.entrypoints.insert(name.into(), ep);
            d.routers.insert(
                format!("r-{name}"),
                RouterSpec {
                    name: format!("r-{name}"),
                    entrypoints: vec![name.into()],
                    rule: "PathPrefix(`/`)".into(),
                    service: "b".into(),
                    priority: 0,
                },
            );
        }
        let t = RoutingTable::build(&d, &BuildOptions::default(), &StatsRegistry::default(), 1);
        for name in ["alpha", "mid", "web", "zeta"] {
            let ep = t.http.entrypoint(name).expect(name);
            let names: Vec<_> = ep.routers().iter().map(|r| r.name.to_string()).collect();
            let want = if name == "web" {
                "any".to_string()
            } else {
                format!("r-{name}")
            };
            assert_eq!(names, [want], "{name}");
        }
        assert!(t.http.entrypoint("nope").is_none());
        assert!(t.http.entrypoint("").is_none());
    }

    #[test]
    fn no_route() {
        let d = desired(&[("host", "Host(`x.example`)", 0, "a")]);
        let t = RoutingTable::build(&d, &BuildOptions::default(), &StatsRegistry::default(), 1);
        assert_eq!(route(&t, "y.example", "/"), None);
    }
}
