//! The standalone Docker provider against the real Engine: labelled containers become
//! endpoints, SIGTERM drains at once, stopped containers go, health gates, label errors are
//! problems, and losing the Engine socket sends `Error` (never an empty state) then resyncs.
//!
//! Labels use a per-run prefix so that other containers on the engine never count.

#[path = "docker_support.rs"]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use meshgate::model::DesiredState;
use meshgate::provider::docker::{run, DockerConfig, DockerMode};
use meshgate::provider::ProviderEvent;
use support::*;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// Removes every container of this run, even when the test fails.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(ids) = docker_sync(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=meshgate-test-run={}", self.0),
        ]) {
            for id in ids.split_whitespace() {
                let _ = docker_sync(&["rm", "-f", id]);
            }
        }
    }
}

struct Run {
    prefix: String,
    run_label: String,
    image: String,
}

impl Run {
    /// `docker run -d` a labelled container; returns its ID.
    async fn start(&self, name: &str, service: &str, extra: &[&str]) -> String {
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.into()];
        for l in [
            format!("meshgate-test-run={}", self.run_label),
            format!("{}.enable=true", self.prefix),
            format!("{}.ports=18080", self.prefix),
            format!("com.docker.compose.service={service}"),
        ] {
            args.push("--label".into());
            args.push(l);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.image.clone());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&refs).await
    }
}

fn config(prefix: &str, endpoint: &str) -> DockerConfig {
    DockerConfig {
        enabled: true,
        endpoint: endpoint.into(),
        mode: DockerMode::Standalone,
        label_prefix: prefix.into(),
        debounce: Duration::from_millis(100),
        ..DockerConfig::default()
    }
}

fn endpoints(st: &DesiredState, service: &str) -> Vec<(String, bool)> {
    st.services
        .get(service)
        .map(|s| {
            s.endpoints
                .iter()
                .map(|e| (e.id.clone(), e.draining))
                .collect()
        })
        .unwrap_or_default()
}

fn has(st: &DesiredState, service: &str, id: &str, draining: bool) -> bool {
    endpoints(st, service).contains(&(id.to_string(), draining))
}

fn absent(st: &DesiredState, service: &str, id: &str) -> bool {
    !endpoints(st, service).iter().any(|(e, _)| e == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_provider_end_to_end() {
    if !engine_available("standalone_provider_end_to_end") {
        return;
    }
    let pid = std::process::id().to_string();
    let _cleanup = Cleanup(pid.clone());
    let t = Run {
        prefix: format!("mgt{pid}"),
        run_label: pid.clone(),
        image: test_image().await,
    };
    let svc = format!("web{pid}");
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let shutdown = CancellationToken::new();
    let provider = tokio::spawn(run(config(&t.prefix, SOCKET), tx, shutdown.clone()));
    let mut c = Collector::new(rx);
    c.wait_state("initial state", WAIT, |_| true).await;

    // Start → endpoint appears with the container's bridge IP and the label's port.
    let mut appear = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = t.start(&format!("mgt{pid}-web-{i}"), &svc, &[]).await;
        let returned = Instant::now();
        let (st, at) = c
            .wait_state("container endpoint", WAIT, |st| has(st, &svc, &id, false))
            .await;
        appear.push(ms_since(returned, at));
        let ip = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &id,
        ])
        .await;
        let ep = st.services[&svc]
            .endpoints
            .iter()
            .find(|e| e.id == id)
            .unwrap();
        assert_eq!(ep.ip.to_string(), ip);
        assert_eq!(st.services[&svc].ports[0].published, 18080);
        assert_eq!(
            st.services[&svc].ports[0].target, 80,
            "target inferred from EXPOSE 80"
        );
        ids.push(id);
    }
    assert_eq!(
        endpoints(c.last.as_ref().unwrap(), &svc).len(),
        3,
        "grouped by compose service"
    );

    // `docker kill -s TERM`: busybox/echo as PID 1 may ignore it; the endpoint drains at once.
    let returned = {
        docker(&["kill", "-s", "TERM", &ids[0]]).await;
        Instant::now()
    };
    let (_, at) = c
        .wait_state("SIGTERM drain", WAIT, |st| has(st, &svc, &ids[0], true))
        .await;
    let drain_ms = ms_since(returned, at);
    // meshgate-echo exits on SIGTERM by itself (busybox as PID 1 ignores it): kill only what is
    // still running.
    if let Err(e) = try_docker(&["kill", &ids[0]]).await {
        assert!(e.contains("is not running"), "docker kill: {e}");
    }
    c.wait_state("killed container gone", WAIT, |st| {
        absent(st, &svc, &ids[0])
    })
    .await;

    // `docker stop`: drained first (kill 15), then gone after it exits; the CLI blocks until the
    // container stopped, so run it in the background and watch the states.
    let stop = tokio::process::Command::new("docker")
        .args(["stop", "-t", "2", &ids[1]])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (_, drained_at) = c
        .wait_state("stop drains", WAIT, |st| has(st, &svc, &ids[1], true))
        .await;
    let (st, gone_at) = c
        .wait_state("stopped gone", WAIT, |st| absent(st, &svc, &ids[1]))
        .await;
    assert!(drained_at <= gone_at);
    assert!(
        has(&st, &svc, &ids[2], false),
        "the other container keeps serving"
    );
    stop.wait_with_output().await.unwrap();

    // Health gating: an unhealthy-until-told container is not an endpoint until healthy.
    let hid = t
        .start(
            &format!("mgt{pid}-health"),
            &svc,
            &[
                "--health-cmd",
                "test -f /tmp/ok",
                "--health-interval",
                "500ms",
                "--health-retries",
                "1",
            ],
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while c.next(Duration::from_millis(10)).await.is_some() {}
    assert!(
        absent(c.last.as_ref().unwrap(), &svc, &hid),
        "unhealthy container must not be an endpoint"
    );
    docker(&["exec", &hid, "touch", "/tmp/ok"]).await;
    let returned = Instant::now();
    let (_, at) = c
        .wait_state("healthy endpoint", WAIT, |st| has(st, &svc, &hid, false))
        .await;
    eprintln!(
        "health: endpoint {:.0} ms after the check file appeared",
        ms_since(returned, at)
    );

    // A label error is a problem naming the label; everything else is still published.
    let bad = format!("bad{pid}");
    t.start(
        &format!("mgt{pid}-bad"),
        &bad,
        &["--label", &format!("{}.policy=random", t.prefix)],
    )
    .await;
    let (st, _) = c
        .wait_state("label problem", WAIT, |st| {
            st.problems.iter().any(|p| p.object == bad)
        })
        .await;
    assert!(st
        .problems
        .iter()
        .any(|p| p.message.contains(&format!("{}.policy", t.prefix))));
    assert!(!st.services.contains_key(&bad));
    assert!(has(&st, &svc, &ids[2], false));

    report("standalone: start → endpoint", &appear);
    report("standalone: kill -s TERM → draining", &[drain_ms]);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), provider)
        .await
        .unwrap()
        .unwrap();
}

/// Kill a socat relay of the Engine socket: the provider reports `Error` and publishes no state
/// (in particular no empty one) while it is down; restart it: the provider resyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_provider_survives_socket_loss() {
    if !engine_available("standalone_provider_survives_socket_loss") {
        return;
    }
    if which("socat").is_none() {
        if std::env::var("MESHGATE_REQUIRE_DOCKER").as_deref() == Ok("1") {
            panic!("socat is required (apt-get install -y socat)");
        }
        eprintln!(
            "\n########\nSKIPPED: socat not installed: socket-loss test did not run\n########\n"
        );
        return;
    }
    let pid = format!("{}s", std::process::id());
    let _cleanup = Cleanup(pid.clone());
    let t = Run {
        prefix: format!("mgt{pid}"),
        run_label: pid.clone(),
        image: test_image().await,
    };
    let svc = format!("relay{pid}");
    let dir = tempfile::tempdir().unwrap();
    let relay = dir.path().join("docker.sock");
    let relay_str = relay.to_str().unwrap().to_string();
    let mut socat = start_relay(&relay).await;

    let first = t.start(&format!("mgt{pid}-1"), &svc, &[]).await;
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let shutdown = CancellationToken::new();
    let provider = tokio::spawn(run(config(&t.prefix, &relay_str), tx, shutdown.clone()));
    let mut c = Collector::new(rx);
    c.wait_state("first container", WAIT, |st| has(st, &svc, &first, false))
        .await;

    // Engine unreachable.
    stop_relay(&mut socat, &relay).await;
    let err = c.wait_error(WAIT).await;
    eprintln!("provider error after socket loss: {err}");
    // While it is down: start another container; the provider must stay silent or send errors.
    let second = t.start(&format!("mgt{pid}-2"), &svc, &[]).await;
    let until = Instant::now() + Duration::from_secs(2);
    let mut errors = 1;
    while let Some(s) = c
        .next(until.saturating_duration_since(Instant::now()))
        .await
    {
        match s.update.event {
            ProviderEvent::Error(_) => errors += 1,
            ProviderEvent::State(st) => {
                panic!("state published while the engine was unreachable: {st:#?}")
            }
        }
    }
    assert!(errors <= 5, "backoff: {errors} errors in ~2 s");

    // Back: resubscribe + relist brings the second container.
    let mut socat = start_relay(&relay).await;
    let back = Instant::now();
    let (st, at) = c
        .wait_state("resync after reconnect", Duration::from_secs(15), |st| {
            has(st, &svc, &second, false)
        })
        .await;
    assert!(has(&st, &svc, &first, false));
    eprintln!(
        "resync {:.0} ms after the socket came back",
        ms_since(back, at)
    );
    for s in &c.log {
        if let ProviderEvent::State(st) = &s.update.event {
            assert!(
                st.services.contains_key(&svc),
                "an empty/partial state was published: {st:#?}"
            );
        }
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), provider)
        .await
        .unwrap()
        .unwrap();
    stop_relay(&mut socat, &relay).await;
}
