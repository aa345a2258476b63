//! End to end on a standalone Docker Engine: the real `meshgate` binary on the host discovers
//! labelled `meshgate-echo` containers on a user bridge network (reached by container IP) and
//! routes to them through an L4 port and an HTTP router.
//!
//! Checked: every container answers through both paths; `docker stop` of one and `docker run`
//! of another under continuous requests → zero failed requests (SIGTERM drains at once through
//! the `kill` event) and the new container answers within about a second; a container with a
//! bad label is a problem in `GET /api/status` while the others keep being served.
//! Convergence (CLI → routed change seen in `/api/table`) is printed with `--nocapture`.
//! `MESHGATE_REQUIRE_DOCKER=1` turns a missing engine into a failure.

#[path = "support_e2e/mod.rs"]
mod e2e;
#[path = "docker_support.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::*;
use support::{docker, docker_sync, engine_available, report};

const WAIT: Duration = Duration::from_secs(20);

/// Removes the run's containers and network, and stops meshgate, even when the test fails.
struct Cleanup {
    run: String,
    network: String,
    meshgate: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.meshgate.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(ids) = docker_sync(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=meshgate-e2e-run={}", self.run),
        ]) {
            for id in ids.split_whitespace() {
                let _ = docker_sync(&["rm", "-f", id]);
            }
        }
        let _ = docker_sync(&["network", "rm", &self.network]);
    }
}

struct Env {
    run: String,
    prefix: String,
    network: String,
    image: String,
    l4_port: u16,
}

impl Env {
    /// `docker run -d` one echo container answering with `name`; returns its full ID.
    async fn start(&self, name: &str, service: &str, extra_labels: &[String]) -> String {
        let p = &self.prefix;
        let mut labels = vec![
            format!("meshgate-e2e-run={}", self.run),
            format!("{p}.enable=true"),
            format!("com.docker.compose.service={service}"),
        ];
        if service == "web" {
            labels.extend([
                format!("{p}.ports={}:80/tcp", self.l4_port),
                format!("{p}.http.port=80"),
                format!("{p}.http.routers.web{}.rule=Host(`web.test`)", self.run),
                format!("{p}.http.routers.web{}.entrypoints=web", self.run),
            ]);
        }
        labels.extend(extra_labels.iter().cloned());
        let cname = format!("{}-{name}", self.prefix);
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &cname,
            "--network",
            &self.network,
            "--entrypoint",
            "/meshgate-echo",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for l in labels {
            args.push("--label".into());
            args.push(l);
        }
        args.extend([
            self.image.clone(),
            "--name".into(),
            name.into(),
            "--http".into(),
            "0.0.0.0:80".into(),
            // Like a production backend, keep serving briefly after SIGTERM: meshgate drains
            // the container within this time (measured below), and an L4 connection the
            // backend closed unanswered could not be replayed by any proxy.
            "--drain-delay-ms".into(),
            "500".into(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&refs).await
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_meshgate(dir: &std::path::Path, config: &str) -> Child {
    let path = dir.join("meshgate.yaml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join("meshgate.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "meshgate=debug,info")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn meshgate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_standalone_docker() {
    if !engine_available("e2e_standalone_docker") {
        return;
    }
    let pid = std::process::id();
    let env = Env {
        run: pid.to_string(),
        prefix: format!("mge{pid}"),
        network: format!("mge{pid}-net"),
        image: e2e_image().await,
        l4_port: free_port(),
    };
    let mut guard = Cleanup {
        run: env.run.clone(),
        network: env.network.clone(),
        meshgate: None,
    };
    docker(&["network", "create", &env.network]).await;

    let mut ids = std::collections::BTreeMap::new();
    for n in ["a", "b", "c"] {
        ids.insert(n.to_string(), env.start(n, "web", &[]).await);
    }

    let (admin_port, http_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "admin:\n  bind: 127.0.0.1:{admin_port}\nshutdown_timeout: 5s\n\
         entrypoints:\n  web:\n    bind: 127.0.0.1:{http_port}\n\
         providers:\n  file:\n    watch: false\n  docker:\n    enabled: true\n    \
         mode: standalone\n    label_prefix: {}\n    debounce: 100ms\n",
        env.prefix
    );
    guard.meshgate = Some(spawn_meshgate(dir.path(), &config));
    let admin = Admin(SocketAddr::from(([127, 0, 0, 1], admin_port)));
    let log = || std::fs::read_to_string(dir.path().join("meshgate.log")).unwrap_or_default();
    if let Err(e) = admin.wait_healthy(WAIT).await {
        panic!("{e}\n{}", log());
    }
    let all: BTreeSet<String> = ids.values().cloned().collect();
    admin
        .wait("3 containers routed", WAIT, |t| t.live("web") == all)
        .await;

    let l4 = Target {
        addr: SocketAddr::from(([127, 0, 0, 1], env.l4_port)),
        host: "l4.test".into(),
    };
    let http = Target {
        addr: SocketAddr::from(([127, 0, 0, 1], http_port)),
        host: "web.test".into(),
    };
    let abc: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    for t in [&l4, &http] {
        let seen = names_reached(t, &abc, Duration::from_secs(10)).await;
        assert_eq!(seen, abc, "every container answers through {t:?}");
    }
    // The HTTP router matches on Host: another host gets meshgate's 404, not a backend.
    let other = Target {
        addr: http.addr,
        host: "nope.test".into(),
    };
    assert!(get_name(other.addr, &other.host).await.is_err());

    // Continuous requests over both paths while containers stop and start.
    let load = Load::start(vec![l4.clone(), http.clone()], 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut stop_drain, mut stop_return, mut start_routed, mut start_answer) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut names: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
    for rep in 0..3 {
        // Stop the oldest: SIGTERM → `kill` event → drained before it exits.
        let victim = names.remove(0);
        let victim_id = ids[&victim].clone();
        let cname = format!("{}-{victim}", env.prefix);
        let t0 = Instant::now();
        let stop = tokio::spawn(async move { docker(&["stop", &cname]).await });
        let (_, at) = admin
            .wait("stopped container drained", WAIT, |t| {
                !t.live("web").contains(&victim_id)
            })
            .await;
        stop_drain.push(ms(t0, at));
        stop.await.unwrap();
        stop_return.push(ms(t0, Instant::now()));
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Start a new one: routed once running (`start` event), answering within ~1 s.
        let fresh = format!("n{rep}");
        let t0 = Instant::now();
        let id = env.start(&fresh, "web", &[]).await;
        let t1 = Instant::now();
        let (_, at) = admin
            .wait("new container routed", WAIT, |t| {
                t.live("web").contains(&id)
            })
            .await;
        start_routed.push(ms(t1, at));
        let want: BTreeSet<String> = [fresh.clone()].into();
        let seen = names_reached(&http, &want, Duration::from_secs(5)).await;
        assert!(seen.contains(&fresh), "{fresh} never answered");
        start_answer.push(ms(t1, Instant::now()));
        eprintln!(
            "rep {rep}: docker run took {:.0} ms, routed {:.0} ms after it returned",
            ms(t0, t1),
            ms(t1, at)
        );
        ids.insert(fresh.clone(), id);
        names.push(fresh);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let result = load.stop().await;
    eprintln!(
        "LOAD standalone stop/start x3: sent={} failed={} names={:?} errors={:?}",
        result.sent, result.failed, result.names, result.errors
    );
    assert!(result.sent > 100, "the load ran: {result:?}");
    assert_eq!(result.failed, 0, "failed requests: {:?}", result.errors);
    let now: BTreeSet<String> = names.iter().cloned().collect();
    let seen = names_reached(&l4, &now, Duration::from_secs(10)).await;
    assert_eq!(seen, now, "only the running containers answer");

    // A bad label: that service is a problem and left out, the others are still served.
    let bad_id = env
        .start("bad", "bad", &[format!("{}.polcy=fastest", env.prefix)])
        .await;
    let t0 = Instant::now();
    let (table, at) = admin
        .wait("bad label reported", WAIT, |t| {
            t.problems().iter().any(|p| p.contains("polcy"))
        })
        .await;
    eprintln!("bad label → problem in the table: {:.0} ms", ms(t0, at));
    assert!(
        !table.has("bad"),
        "the service with a bad label is left out"
    );
    assert_eq!(table.live("web").len(), 3);
    let status = admin.json("/api/status").await.unwrap();
    let text = status["problems"].to_string();
    assert!(
        text.contains("polcy") && text.contains("bad"),
        "problem visible in /api/status naming the label and the service: {status:#}"
    );
    let seen = names_seen(&http, 6).await.expect("web still served");
    assert!(seen.is_subset(&now));
    // Removing the bad container clears the problem.
    docker(&["rm", "-f", &bad_id]).await;
    admin
        .wait("problem cleared", WAIT, |t| t.problems().is_empty())
        .await;

    report("standalone docker stop → drained", &stop_drain);
    report("standalone docker stop (CLI time)", &stop_return);
    report("standalone docker run → routed", &start_routed);
    report("standalone docker run → answers", &start_answer);
    let p99 = support::percentiles(&start_routed).1;
    assert!(
        p99 < 1500.0,
        "new container routed in {p99:.0} ms (> 1.5 s)"
    );

    let mut child = guard.meshgate.take().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            Instant::now() < deadline,
            "meshgate did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0), "meshgate exit code\n{}", log());
    drop(guard);
}
