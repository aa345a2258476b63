//! Tests of the standalone state function on `GET /containers/json` shapes (API 1.41 and the
//! newer `Health` field).

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::{json, Value};

use super::*;

fn container(
    id: &str,
    name: &str,
    labels: Value,
    status: &str,
    nets: Value,
    ports: Value,
) -> ContainerSummary {
    serde_json::from_value(json!({
        "Id": id,
        "Names": [format!("/{name}")],
        "Image": "bb:1",
        "Labels": labels,
        "State": "running",
        "Status": status,
        "Ports": ports,
        "NetworkSettings": { "Networks": nets },
    }))
    .unwrap()
}

fn bridge(ip: &str) -> Value {
    json!({ "bridge": { "NetworkID": "n1", "IPAddress": ip } })
}

fn port80() -> Value {
    json!([{ "PrivatePort": 80, "Type": "tcp" }])
}

fn enabled() -> Value {
    json!({ "meshgate.enable": "true", "meshgate.ports": "8080" })
}

fn state(cs: &[ContainerSummary]) -> DesiredState {
    standalone_state(&LabelSettings::default(), cs, &HashSet::new())
}

#[test]
fn groups_by_compose_service_and_reads_labels() {
    let mut compose = enabled();
    compose["com.docker.compose.service"] = "api".into();
    let cs = [
        container(
            "b2",
            "proj-api-2",
            compose.clone(),
            "Up 1 second",
            bridge("172.17.0.3"),
            port80(),
        ),
        container(
            "a1",
            "proj-api-1",
            compose,
            "Up 2 seconds",
            bridge("172.17.0.2"),
            port80(),
        ),
        container(
            "c3",
            "plain",
            json!({}),
            "Up",
            bridge("172.17.0.4"),
            port80(),
        ),
    ];
    let st = state(&cs);
    assert_eq!(st.services.keys().collect::<Vec<_>>(), vec!["api"]);
    let api = &st.services["api"];
    assert_eq!((api.ports[0].published, api.ports[0].target), (8080, 80));
    let eps: Vec<(&str, IpAddr)> = api
        .endpoints
        .iter()
        .map(|e| (e.id.as_str(), e.ip))
        .collect();
    assert_eq!(
        eps,
        vec![
            ("a1", "172.17.0.2".parse().unwrap()),
            ("b2", "172.17.0.3".parse().unwrap())
        ]
    );
    assert!(api
        .endpoints
        .iter()
        .all(|e| !e.draining && e.weight == 1 && e.port.is_none()));
}

#[test]
fn health_gating() {
    let cases = [
        ("Up 5 seconds (healthy)", true),
        ("Up 5 seconds (health: starting)", false),
        ("Up 5 seconds (unhealthy)", false),
        ("Up 5 seconds (Paused)", false),
        ("Up 5 seconds", true),
    ];
    for (status, serving) in cases {
        let c = container(
            "a1",
            "web",
            enabled(),
            status,
            bridge("172.17.0.2"),
            port80(),
        );
        assert_eq!(is_serving(&c), serving, "{status}");
        assert_eq!(
            state(&[c]).services.contains_key("web"),
            serving,
            "{status}"
        );
    }
    let mut v = serde_json::to_value(container(
        "a1",
        "web",
        enabled(),
        "Up",
        bridge("172.17.0.2"),
        port80(),
    ))
    .unwrap();
    v["Health"] = json!({ "Status": "starting" });
    assert!(!is_serving(&serde_json::from_value(v.clone()).unwrap()));
    v["State"] = "exited".into();
    v["Health"] = json!({ "Status": "healthy" });
    assert!(!is_serving(&serde_json::from_value(v).unwrap()));
}

#[test]
fn sigterm_drains_and_weight_label() {
    let mut labels = enabled();
    labels["meshgate.weight"] = "4".into();
    let c = container("a1", "web", labels, "Up", bridge("172.17.0.2"), port80());
    let sig: HashSet<String> = ["a1".to_string()].into();
    let st = standalone_state(&LabelSettings::default(), &[c], &sig);
    let e = &st.services["web"].endpoints[0];
    assert!(e.draining);
    assert_eq!(e.weight, 4);
}

#[test]
fn network_choice() {
    let nets = json!({
        "zeta": { "IPAddress": "10.9.0.2" },
        "alpha": { "IPAddress": "10.1.0.2" },
    });
    let c = container("a1", "web", enabled(), "Up", nets.clone(), port80());
    assert_eq!(
        state(std::slice::from_ref(&c)).services["web"].endpoints[0].ip,
        "10.1.0.2".parse::<IpAddr>().unwrap()
    );
    let cfg = LabelSettings {
        network: Some("zeta".into()),
        ..LabelSettings::default()
    };
    let st = standalone_state(&cfg, &[c], &HashSet::new());
    assert_eq!(
        st.services["web"].endpoints[0].ip,
        "10.9.0.2".parse::<IpAddr>().unwrap()
    );
    // The label overrides the config; a network the container is not on is a problem.
    let mut labels = enabled();
    labels["meshgate.network"] = "missing".into();
    let c = container("a1", "web", labels, "Up", nets, port80());
    let st = standalone_state(&cfg, &[c], &HashSet::new());
    assert!(st.services.is_empty());
    assert!(
        st.problems[0].message.contains("missing"),
        "{:?}",
        st.problems
    );
    // Host network: loopback.
    let host = container(
        "h1",
        "hostnet",
        enabled(),
        "Up",
        json!({ "host": { "IPAddress": "" } }),
        port80(),
    );
    assert_eq!(
        state(&[host]).services["hostnet"].endpoints[0].ip,
        "127.0.0.1".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn label_error_leaves_only_that_service_out() {
    let mut bad = enabled();
    bad["meshgate.timeouts.connect"] = "fast".into();
    let cs = [
        container("a1", "bad", bad, "Up", bridge("172.17.0.2"), port80()),
        container(
            "b1",
            "good",
            enabled(),
            "Up",
            bridge("172.17.0.3"),
            port80(),
        ),
    ];
    let st = state(&cs);
    assert_eq!(st.services.keys().collect::<Vec<_>>(), vec!["good"]);
    assert_eq!(st.problems.len(), 1);
    assert_eq!(st.problems[0].object, "bad");
    assert_eq!(st.problems[0].provider, "docker");
    assert!(st.problems[0].message.contains("meshgate.timeouts.connect"));
}

#[test]
fn ports_inference_uses_deduplicated_exposed_ports() {
    // Published on IPv4 and IPv6: listed twice, still one exposed port.
    let ports = json!([
        { "IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 8000, "Type": "tcp" },
        { "IP": "::", "PrivatePort": 80, "PublicPort": 8000, "Type": "tcp" },
    ]);
    let c = container("a1", "web", enabled(), "Up", bridge("172.17.0.2"), ports);
    assert_eq!(state(&[c]).services["web"].ports[0].target, 80);
    let two = json!([{ "PrivatePort": 80, "Type": "tcp" }, { "PrivatePort": 443, "Type": "tcp" }]);
    let c = container("a1", "web", enabled(), "Up", bridge("172.17.0.2"), two);
    let st = state(&[c]);
    assert!(st.services.is_empty());
    assert!(st.problems[0].message.contains("meshgate.ports"));
}

#[test]
fn router_names_are_unique_across_services() {
    let mut a = enabled();
    a["meshgate.http.routers.r.rule"] = "Host(`a`)".into();
    let mut b = enabled();
    b["meshgate.http.routers.r.rule"] = "Host(`b`)".into();
    let cs = [
        container("a1", "alpha", a, "Up", bridge("172.17.0.2"), port80()),
        container("b1", "beta", b, "Up", bridge("172.17.0.3"), port80()),
    ];
    let st = state(&cs);
    assert_eq!(st.services.len(), 2);
    assert_eq!(st.routers["r"].service, "alpha");
    assert_eq!(st.problems.len(), 1);
    assert_eq!(st.problems[0].object, "beta");
}
