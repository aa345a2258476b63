//! Unit tests of the label parser: every label, inference rules and every error path.

use std::time::Duration;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn tcp(port: u16) -> ExposedPort {
    ExposedPort {
        port,
        protocol: Protocol::Tcp,
    }
}

fn parse(
    pairs: &[(&str, &str)],
    exposed: &[ExposedPort],
) -> Result<Option<ServiceLabels>, LabelError> {
    parse_labels("meshgate", "web", &labels(pairs), exposed, false)
}

fn ok(pairs: &[(&str, &str)], exposed: &[ExposedPort]) -> ServiceLabels {
    parse(pairs, exposed).unwrap().expect("enabled")
}

fn bad(pairs: &[(&str, &str)], exposed: &[ExposedPort]) -> LabelError {
    parse(pairs, exposed).unwrap_err()
}

#[test]
fn not_enabled_unless_labelled_or_exposed_by_default() {
    assert_eq!(parse(&[], &[tcp(80)]).unwrap(), None);
    assert_eq!(
        parse(
            &[("meshgate.enable", "false"), ("meshgate.policy", "bogus")],
            &[]
        )
        .unwrap(),
        None
    );
    let by_default = parse_labels("meshgate", "web", &labels(&[]), &[tcp(80)], true)
        .unwrap()
        .unwrap();
    assert_eq!(by_default.spec.name, "web");
    assert_eq!(by_default.spec.http_port, Some(80));
    // exposed_by_default still honours an explicit opt-out.
    let off = parse_labels(
        "meshgate",
        "web",
        &labels(&[("meshgate.enable", "false")]),
        &[],
        true,
    )
    .unwrap();
    assert_eq!(off, None);
    // Other prefixes' labels are not ours.
    assert_eq!(parse(&[("traefik.enable", "true")], &[]).unwrap(), None);
}

#[test]
fn full_schema() {
    let got = ok(
        &[
            ("meshgate.enable", "true"),
            ("meshgate.ports", "8080:80/tcp, 5353:53/udp"),
            ("meshgate.http.port", "80"),
            ("meshgate.policy", "least_conn"),
            ("meshgate.sticky.cookie", "mg"),
            ("meshgate.retries", "3"),
            ("meshgate.timeouts.connect", "500ms"),
            ("meshgate.timeouts.idle", "5m"),
            ("meshgate.timeouts.response", "none"),
            ("meshgate.timeouts.drain", "10s"),
            ("meshgate.proxy_protocol", "v2"),
            ("meshgate.weight", "5"),
            ("meshgate.network", "app"),
            (
                "meshgate.http.routers.api.rule",
                "Host(`a.example`) && PathPrefix(`/api`)",
            ),
            ("meshgate.http.routers.api.entrypoints", "web, websecure"),
            ("meshgate.http.routers.api.priority", "10"),
            ("com.docker.compose.service", "web"),
        ],
        &[
            tcp(80),
            ExposedPort {
                port: 53,
                protocol: Protocol::Udp,
            },
        ],
    );
    let s = &got.spec;
    assert_eq!(s.ports.len(), 2);
    assert_eq!(
        (s.ports[0].published, s.ports[0].target, s.ports[0].protocol),
        (5353, 53, Protocol::Udp)
    );
    assert_eq!(
        (s.ports[1].published, s.ports[1].target, s.ports[1].protocol),
        (8080, 80, Protocol::Tcp)
    );
    assert_eq!(s.http_port, Some(80));
    assert_eq!(s.policy, Policy::LeastConn);
    assert_eq!(s.sticky_cookie.as_deref(), Some("mg"));
    assert_eq!(s.retries, 3);
    assert_eq!(s.timeouts.connect, Duration::from_millis(500));
    assert_eq!(s.timeouts.idle, Some(Duration::from_secs(300)));
    assert_eq!(s.timeouts.response, None);
    assert_eq!(s.timeouts.drain, Duration::from_secs(10));
    assert_eq!(s.proxy_protocol, ProxyProtocol::V2);
    assert!(s.endpoints.is_empty());
    assert_eq!(got.weight, 5);
    assert_eq!(got.network.as_deref(), Some("app"));
    assert_eq!(
        got.routers,
        vec![RouterSpec {
            name: "api".into(),
            entrypoints: vec!["web".into(), "websecure".into()],
            rule: "Host(`a.example`) && PathPrefix(`/api`)".into(),
            service: "web".into(),
            priority: 10,
        }]
    );
}

#[test]
fn defaults_when_only_enabled() {
    let got = ok(&[("meshgate.enable", "true")], &[]);
    assert_eq!(got.spec, ServiceSpec::new("web"));
    assert_eq!(got.weight, 1);
    assert!(got.routers.is_empty());
    assert_eq!(got.network, None);
}

#[test]
fn target_and_http_port_inferred_from_single_exposed_port() {
    let got = ok(
        &[("meshgate.enable", "true"), ("meshgate.ports", "9000")],
        &[tcp(8080)],
    );
    assert_eq!(
        (got.spec.ports[0].published, got.spec.ports[0].target),
        (9000, 8080)
    );
    assert_eq!(got.spec.http_port, Some(8080));
    let router = ok(
        &[
            ("meshgate.enable", "true"),
            ("meshgate.http.routers.r.rule", "Host(`x`)"),
        ],
        &[tcp(8080)],
    );
    assert_eq!(router.spec.http_port, Some(8080));
    assert_eq!(router.routers[0].entrypoints, Vec::<String>::new());
}

#[test]
fn inference_fails_with_several_or_no_exposed_ports() {
    for exposed in [&[][..], &[tcp(80), tcp(443)][..]] {
        let e = bad(
            &[("meshgate.enable", "true"), ("meshgate.ports", "9000")],
            exposed,
        );
        assert_eq!(e.label, "meshgate.ports");
        assert!(e.message.contains("cannot be inferred"), "{e}");
        let e = bad(
            &[
                ("meshgate.enable", "true"),
                ("meshgate.http.routers.r.rule", "Host(`x`)"),
            ],
            exposed,
        );
        assert_eq!(e.label, "meshgate.http.port");
    }
    // Explicit http.port makes a router valid whatever is exposed.
    let got = ok(
        &[
            ("meshgate.enable", "true"),
            ("meshgate.http.port", "443"),
            ("meshgate.http.routers.r.rule", "Host(`x`)"),
        ],
        &[tcp(80), tcp(443)],
    );
    assert_eq!(got.spec.http_port, Some(443));
    // A router to another service needs no local HTTP port.
    let other = ok(
        &[
            ("meshgate.enable", "true"),
            ("meshgate.http.routers.r.rule", "Host(`x`)"),
            ("meshgate.http.routers.r.service", "api"),
        ],
        &[],
    );
    assert_eq!(other.routers[0].service, "api");
}

type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);

#[test]
fn errors_name_the_label() {
    // (labels, label named by the error, message fragment)
    let cases: &[Case] = &[
        (
            &[("meshgate.enable", "maybe")],
            "meshgate.enable",
            "true or false",
        ),
        (
            &[("meshgate.ports", "80:x")],
            "meshgate.ports",
            "invalid port",
        ),
        (
            &[("meshgate.ports", "0:80")],
            "meshgate.ports",
            "invalid port",
        ),
        (
            &[("meshgate.ports", "70000:80")],
            "meshgate.ports",
            "invalid port",
        ),
        (
            &[("meshgate.ports", "80:80/sctp")],
            "meshgate.ports",
            "unknown protocol",
        ),
        (
            &[("meshgate.ports", "80:80,80:81")],
            "meshgate.ports",
            "twice",
        ),
        (&[("meshgate.ports", " , ")], "meshgate.ports", "no ports"),
        (
            &[("meshgate.policy", "random")],
            "meshgate.policy",
            "unknown policy",
        ),
        (&[("meshgate.retries", "-1")], "meshgate.retries", "count"),
        (
            &[("meshgate.timeouts.connect", "5")],
            "meshgate.timeouts.connect",
            "unit",
        ),
        (
            &[("meshgate.timeouts.idle", "soon")],
            "meshgate.timeouts.idle",
            "duration",
        ),
        (
            &[("meshgate.proxy_protocol", "v3")],
            "meshgate.proxy_protocol",
            "v1, v2",
        ),
        (&[("meshgate.weight", "heavy")], "meshgate.weight", "weight"),
        (
            &[("meshgate.sticky.cookie", "a;b")],
            "meshgate.sticky.cookie",
            "cookie",
        ),
        (
            &[("meshgate.http.port", "http")],
            "meshgate.http.port",
            "invalid port",
        ),
        (&[("meshgate.network", "")], "meshgate.network", "empty"),
        (
            &[("meshgate.polcy", "p2c")],
            "meshgate.polcy",
            "unknown label",
        ),
        (
            &[("meshgate.http.routers.r.priority", "high")],
            "meshgate.http.routers.r.priority",
            "integer",
        ),
        (
            &[("meshgate.http.routers.r.rul", "x")],
            "meshgate.http.routers.r.rul",
            "unknown router field",
        ),
        (
            &[("meshgate.http.routers.r.entrypoints", "web")],
            "meshgate.http.routers.r.rule",
            "no rule",
        ),
        (
            &[("meshgate.http.routers.rule", "x")],
            "meshgate.http.routers.rule",
            "http.routers.<name>",
        ),
    ];
    for (pairs, label, fragment) in cases {
        let mut all = vec![("meshgate.enable", "true")];
        all.extend_from_slice(pairs);
        if pairs[0].0 == "meshgate.enable" {
            all.remove(0);
        }
        let e = bad(&all, &[tcp(80)]);
        assert_eq!(e.label, *label, "{pairs:?}: {e}");
        assert!(e.message.contains(fragment), "{pairs:?}: {e}");
    }
}

#[test]
fn prefix_is_configurable() {
    let l = labels(&[
        ("lb.enable", "true"),
        ("lb.policy", "p2c"),
        ("meshgate.policy", "nonsense"),
    ]);
    let got = parse_labels("lb", "svc", &l, &[], false).unwrap().unwrap();
    assert_eq!(got.spec.policy, Policy::P2c);
    assert_eq!(got.spec.name, "svc");
}

#[test]
fn zero_timeouts_mean_none() {
    let got = ok(
        &[
            ("meshgate.enable", "true"),
            ("meshgate.timeouts.idle", "0"),
            ("meshgate.timeouts.response", "0s"),
        ],
        &[],
    );
    assert_eq!(got.spec.timeouts.idle, None);
    assert_eq!(got.spec.timeouts.response, None);
}
