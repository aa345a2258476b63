//! Tests of the Swarm state function on JSON captured from a real Engine 20.10 (API 1.41)
//! single-node swarm during a rolling update (`fixtures/`): services `web` (dnsrr, overlay
//! `fixnet`, 2 replicas, slot 2 being replaced), `hostp` (host-mode port 18083→80) and `badlbl`
//! (an invalid policy label).

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::Value;

use super::*;
use crate::model::Policy;

const WEB: &str = "lfxre5jxau2j41fld6t893rys";
const WEB_SLOT1: &str = "jc4sehdpz2pmj7x1zquiv9io1";
const WEB_OLD_SLOT2: &str = "iscxgxz3aq6keemcatlgqfrnn";
const HOSTP_TASK: &str = "ldlyv62ap0lyj6nhf16hhef11";

fn fixture(name: &str) -> Value {
    let text = match name {
        "services" => include_str!("fixtures/services.json"),
        "tasks" => include_str!("fixtures/tasks.json"),
        "nodes" => include_str!("fixtures/nodes.json"),
        "networks" => include_str!("fixtures/networks.json"),
        _ => unreachable!(),
    };
    serde_json::from_str(text).unwrap()
}

fn snapshot_from(services: Value, tasks: Value, nodes: Value) -> SwarmSnapshot {
    let mut snap = SwarmSnapshot::default();
    snap.set_services(serde_json::from_value(services).unwrap());
    snap.set_tasks(serde_json::from_value(tasks).unwrap());
    snap.nodes = serde_json::from_value(nodes).unwrap();
    snap.networks = serde_json::from_value(fixture("networks")).unwrap();
    snap
}

fn snapshot() -> SwarmSnapshot {
    snapshot_from(fixture("services"), fixture("tasks"), fixture("nodes"))
}

fn state(snap: &SwarmSnapshot) -> DesiredState {
    swarm_state(&LabelSettings::default(), snap, &HashSet::new())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn raw_tasks_keep_network_attachments() {
    let tasks: Vec<RawTask> = serde_json::from_value(fixture("tasks")).unwrap();
    let t = tasks.iter().find(|t| t.id == WEB_SLOT1).unwrap();
    assert_eq!(
        t.networks_attachments[0].addresses,
        vec!["10.0.1.2/24".to_string()]
    );
    assert_eq!(
        t.networks_attachments[0]
            .network
            .spec
            .as_ref()
            .unwrap()
            .name,
        "fixnet"
    );
}

#[test]
fn rolling_update_fixture() {
    let snap = snapshot();
    assert!(snap.any_updating(), "web was mid-update when captured");
    let st = state(&snap);
    assert_eq!(st.services.keys().collect::<Vec<_>>(), vec!["hostp", "web"]);

    let web = &st.services["web"];
    assert_eq!(web.ports.len(), 1);
    assert_eq!((web.ports[0].published, web.ports[0].target), (8080, 80));
    // Slot 1 serves; the old slot-2 task (DesiredState=shutdown, still running) drains; the new
    // slot-2 task (State=ready) is not an endpoint yet.
    let eps: Vec<(&str, IpAddr, bool, Option<u64>)> = web
        .endpoints
        .iter()
        .map(|e| (e.id.as_str(), e.ip, e.draining, e.slot))
        .collect();
    assert_eq!(
        eps,
        vec![
            (WEB_OLD_SLOT2, ip("10.0.1.3"), true, Some(2)),
            (WEB_SLOT1, ip("10.0.1.2"), false, Some(1)),
        ]
    );
    assert!(web
        .endpoints
        .iter()
        .all(|e| e.node.as_deref() == Some("zike1vpb9hpu1745ebe1aaeyn")));

    // Host-mode port: node address (the manager's ManagerStatus.Addr) + PortStatus mapping, and
    // the target of `meshgate.ports=9083` inferred from the single declared port.
    let hostp = &st.services["hostp"];
    assert_eq!(
        (hostp.ports[0].published, hostp.ports[0].target),
        (9083, 80)
    );
    assert_eq!(hostp.endpoints.len(), 1);
    let e = &hostp.endpoints[0];
    assert_eq!((e.id.as_str(), e.ip), (HOSTP_TASK, ip("192.0.2.2")));
    assert_eq!(e.port_for(80), 18083);

    // The bad label is a problem naming it; the other services are unaffected.
    assert_eq!(st.problems.len(), 1);
    assert_eq!(st.problems[0].object, "badlbl");
    assert_eq!(st.problems[0].provider, "swarm");
    assert!(
        st.problems[0].message.contains("meshgate.policy"),
        "{:?}",
        st.problems
    );
}

#[test]
fn named_network_wins_over_host_ports() {
    let snap = snapshot();
    let cfg = LabelSettings {
        network: Some("fixnet".into()),
        ..LabelSettings::default()
    };
    let st = swarm_state(&cfg, &snap, &HashSet::new());
    let e = &st.services["hostp"].endpoints[0];
    assert_eq!(e.ip, ip("10.0.1.4"));
    assert!(e.port_map.is_empty());
    // A network the tasks are not on: host-mode tasks fall back to the node, others to their
    // first overlay address.
    let cfg = LabelSettings {
        network: Some("elsewhere".into()),
        ..LabelSettings::default()
    };
    let st = swarm_state(&cfg, &snap, &HashSet::new());
    assert_eq!(st.services["hostp"].endpoints[0].ip, ip("192.0.2.2"));
    assert_eq!(st.services["web"].endpoints.len(), 2);
}

#[test]
fn sigterm_marks_drain() {
    let snap = snapshot();
    let sig: HashSet<String> = [WEB_SLOT1.to_string()].into();
    let st = swarm_state(&LabelSettings::default(), &snap, &sig);
    assert!(st.services["web"].endpoints.iter().all(|e| e.draining));
}

fn with_node(f: impl Fn(&mut Value)) -> SwarmSnapshot {
    let mut nodes = fixture("nodes");
    f(&mut nodes[0]);
    snapshot_from(fixture("services"), fixture("tasks"), nodes)
}

#[test]
fn node_drain_pause_and_down() {
    let drained = with_node(|n| n["Spec"]["Availability"] = "drain".into());
    let st = state(&drained);
    assert!(st.services["web"].endpoints.iter().all(|e| e.draining));
    assert!(st.services["hostp"].endpoints.iter().all(|e| e.draining));

    let paused = with_node(|n| n["Spec"]["Availability"] = "pause".into());
    assert_eq!(state(&paused), state(&snapshot()));

    let down = with_node(|n| n["Status"]["State"] = "down".into());
    let st = state(&down);
    assert!(st.services["web"].endpoints.is_empty());
    assert!(st.services["hostp"].endpoints.is_empty());

    // A task on a node the list does not know is not routable.
    let unknown = snapshot_from(fixture("services"), fixture("tasks"), Value::Array(vec![]));
    assert!(state(&unknown).services["web"].endpoints.is_empty());
}

#[test]
fn worker_address_and_unspecified_address() {
    let worker = with_node(|n| {
        n["Spec"]["Role"] = "worker".into();
        n["ManagerStatus"] = Value::Null;
        n["Status"]["Addr"] = "198.51.100.7".into();
    });
    assert_eq!(
        state(&worker).services["hostp"].endpoints[0].ip,
        ip("198.51.100.7")
    );
    let unspecified = with_node(|n| {
        n["Spec"]["Role"] = "worker".into();
        n["Status"]["Addr"] = "0.0.0.0".into();
    });
    assert_eq!(
        state(&unspecified).services["hostp"].endpoints[0].ip,
        ip("127.0.0.1")
    );
}

#[test]
fn removed_service_drains_until_its_tasks_stop() {
    let mut snap = snapshot();
    let services: Vec<Service> = serde_json::from_value(fixture("services")).unwrap();
    let without_web: Vec<Service> = services
        .into_iter()
        .filter(|s| s.id.as_deref() != Some(WEB))
        .collect();
    snap.set_services(without_web.clone());
    let st = state(&snap);
    let web = &st.services["web"];
    assert_eq!(web.endpoints.len(), 2);
    assert!(web.endpoints.iter().all(|e| e.draining));
    // Still remembered across another services relist while tasks run.
    snap.set_services(without_web);
    assert!(state(&snap).services.contains_key("web"));
    // Tasks stopped: the service disappears.
    let mut tasks: Vec<RawTask> = serde_json::from_value(fixture("tasks")).unwrap();
    for t in tasks.iter_mut().filter(|t| t.service_id == WEB) {
        t.status.state = "shutdown".into();
    }
    snap.set_tasks(tasks);
    assert!(!state(&snap).services.contains_key("web"));
    assert!(snap.removed.is_empty());
}

#[test]
fn scale_down_flip_drains_and_labels_apply() {
    let mut services = fixture("services");
    let web = services
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["ID"] == WEB)
        .unwrap();
    web["Spec"]["Labels"]["meshgate.policy"] = "p2c".into();
    web["Spec"]["Labels"]["meshgate.weight"] = "3".into();
    let mut tasks = fixture("tasks");
    let t = tasks
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["ID"] == WEB_SLOT1)
        .unwrap();
    t["DesiredState"] = "remove".into();
    let st = state(&snapshot_from(services, tasks, fixture("nodes")));
    let web = &st.services["web"];
    assert_eq!(web.policy, Policy::P2c);
    assert!(web.endpoints.iter().all(|e| e.draining && e.weight == 3));
}

#[test]
fn disabled_and_exposed_by_default() {
    let mut services = fixture("services");
    for s in services.as_array_mut().unwrap() {
        s["Spec"]["Labels"] = serde_json::json!({});
    }
    let snap = snapshot_from(services, fixture("tasks"), fixture("nodes"));
    assert!(state(&snap).services.is_empty());
    let cfg = LabelSettings {
        exposed_by_default: true,
        ..LabelSettings::default()
    };
    let st = swarm_state(&cfg, &snap, &HashSet::new());
    assert_eq!(st.services.len(), 3);
    assert!(st.problems.is_empty());
}

#[test]
fn update_events() {
    let attrs = |v: &str| [("updatestate.new".to_string(), v.to_string())].into();
    assert!(event_starts_update(&attrs("updating")));
    assert!(!event_starts_update(&attrs("completed")));
    assert!(!event_starts_update(&HashMap::new()));
}

#[test]
fn recreated_service_keeps_old_tasks_draining() {
    let mut snap = snapshot();
    let mut services = fixture("services");
    // `web` removed and created again under the same name (new ID, no tasks yet).
    let web = services
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["ID"] == WEB)
        .unwrap();
    web["ID"] = "newwebid".into();
    snap.set_services(serde_json::from_value(services).unwrap());
    let st = state(&snap);
    let web = &st.services["web"];
    assert_eq!(web.endpoints.len(), 2);
    assert!(web.endpoints.iter().all(|e| e.draining));
}
