//! Shared helpers of the Docker provider tests (included with `#[path]` by `docker_*.rs`):
//! engine detection with loud skipping, the docker CLI, an offline test image, and a collector
//! that timestamps every provider update as it arrives.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use meshgate::model::DesiredState;
use meshgate::provider::{ProviderEvent, ProviderUpdate};
use tokio::sync::mpsc;

pub const SOCKET: &str = "/var/run/docker.sock";

/// True if a Docker engine answers. Otherwise prints a loud SKIPPED line and returns false, or
/// panics when `MESHGATE_REQUIRE_DOCKER=1`.
pub fn engine_available(test: &str) -> bool {
    let ok = Path::new(SOCKET).exists()
        && std::process::Command::new("docker")
            .args(["version", "--format", "{{.Server.APIVersion}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !ok {
        if std::env::var("MESHGATE_REQUIRE_DOCKER").as_deref() == Ok("1") {
            panic!("{test}: no Docker engine at {SOCKET} and MESHGATE_REQUIRE_DOCKER=1");
        }
        eprintln!("\n########\nSKIPPED: no Docker engine reachable at {SOCKET}: {test} did not run\n########\n");
    }
    ok
}

/// Run the docker CLI; panics with its stderr on failure. Returns trimmed stdout.
pub async fn docker(args: &[&str]) -> String {
    try_docker(args)
        .await
        .unwrap_or_else(|e| panic!("docker {}: {e}", args.join(" ")))
}

pub async fn try_docker(args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Blocking variant for drop guards.
pub fn docker_sync(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn find_busybox() -> Option<PathBuf> {
    ["/usr/bin/busybox", "/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The static `meshgate-echo` from `docker/build-image.sh`'s cargo command, if built.
fn find_static_echo() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/x86_64-unknown-linux-gnu/release/meshgate-echo");
    if !p.exists() {
        return None;
    }
    // Only a real echo backend (it documents `--http`), not a placeholder binary.
    // `timeout`: a binary that ignored --help and started serving must not hang the test.
    let help = std::process::Command::new("timeout")
        .arg("2")
        .arg(&p)
        .arg("--help")
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&help.stdout),
        String::from_utf8_lossy(&help.stderr)
    );
    text.contains("--http").then_some(p)
}

/// A short tag naming the image's content (backend file size and mtime), so that an image
/// already imported by an earlier run is reused instead of piling up dangling copies.
fn content_tag(files: &[&Path]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for f in files {
        let meta = std::fs::metadata(f).unwrap();
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for b in format!("{}:{}:{};", f.display(), meta.len(), mtime).bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

/// Build (once per process) a `FROM scratch`-like image offline with `docker import`: the static
/// `meshgate-echo` as the HTTP backend on port 80 when it was built, else busybox `httpd`.
/// busybox (static, Debian `busybox-static`) is also included when present so that tests can
/// use `sh` for health checks.
pub async fn test_image() -> String {
    static IMAGE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    IMAGE.get_or_init(build_test_image).await.clone()
}

async fn build_test_image() -> String {
    let busybox = find_busybox();
    let echo = find_static_echo();
    let sources: Vec<&Path> = busybox
        .iter()
        .chain(echo.iter())
        .map(PathBuf::as_path)
        .collect();
    let tag = format!("meshgate-test-backend:{}", content_tag(&sources));
    if try_docker(&["image", "inspect", &tag]).await.is_ok() {
        return tag;
    }
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(root.path().join("www")).unwrap();
    std::fs::create_dir_all(root.path().join("tmp")).unwrap();
    std::fs::write(root.path().join("www/index.html"), "meshgate-test\n").unwrap();
    if let Some(bb) = &busybox {
        std::fs::copy(bb, bin.join("busybox")).unwrap();
        for applet in ["sh", "httpd", "sleep", "touch", "test", "nc"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    let cmd = if let Some(echo) = &echo {
        std::fs::copy(echo, root.path().join("meshgate-echo")).unwrap();
        r#"CMD ["/meshgate-echo","--name","meshgate-test","--http","0.0.0.0:80"]"#
    } else if busybox.is_some() {
        r#"CMD ["/bin/httpd","-f","-p","80","-h","/www"]"#
    } else {
        panic!("no static backend: build meshgate-echo statically (docker/build-image.sh) or apt-get install busybox-static");
    };
    docker_import(root.path(), &[cmd, "EXPOSE 80"], &tag).await;
    tag
}

/// Every swarm test holds this lock: one machine has one swarm, so they run one at a time.
pub const SWARM_LOCK: &str = "/tmp/meshgate-swarm.lock";

/// Take the exclusive swarm lock (waits for another test holding it); released on drop.
pub async fn swarm_lock() -> std::fs::File {
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(SWARM_LOCK)
        .unwrap();
    tokio::task::spawn_blocking(move || {
        rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::LockExclusive).unwrap();
        lock_file
    })
    .await
    .unwrap()
}

/// `docker import` the directory `root` as image `tag`, with Dockerfile `changes`
/// (`CMD [...]`, `EXPOSE 80`, …); panics with docker's stderr on failure.
pub async fn docker_import(root: &Path, changes: &[&str], tag: &str) {
    let changes: String = changes.iter().map(|c| format!(" -c '{c}'")).collect();
    let script = format!(
        "tar -C {} -c . | docker import{changes} - {tag}",
        root.display()
    );
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A provider update stamped with its arrival time.
#[derive(Debug, Clone)]
pub struct Stamped {
    pub at: Instant,
    pub update: ProviderUpdate,
}

/// Receives provider updates in a background task (so arrival times are exact even while the
/// test awaits a CLI command) and lets the test wait for states matching a predicate.
pub struct Collector {
    rx: mpsc::UnboundedReceiver<Stamped>,
    /// Everything received so far, in order.
    pub log: Vec<Stamped>,
    /// Latest state received.
    pub last: Option<DesiredState>,
    /// Wall-clock anchor to turn arrival `Instant`s into times comparable with the engine's.
    base: (Instant, std::time::SystemTime),
}

impl Collector {
    pub fn new(mut from: mpsc::Receiver<ProviderUpdate>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(update) = from.recv().await {
                if tx
                    .send(Stamped {
                        at: Instant::now(),
                        update,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        Collector {
            rx,
            log: Vec::new(),
            last: None,
            base: (Instant::now(), std::time::SystemTime::now()),
        }
    }

    /// Unix time in nanoseconds of an arrival instant.
    pub fn unix_nanos(&self, at: Instant) -> i128 {
        let wall = self.base.1 + at.saturating_duration_since(self.base.0);
        wall.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128
    }

    /// Next update within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Stamped> {
        let s = tokio::time::timeout(timeout, self.rx.recv()).await.ok()??;
        if let ProviderEvent::State(st) = &s.update.event {
            self.last = Some(st.clone());
        }
        self.log.push(s.clone());
        Some(s)
    }

    /// Wait for a state satisfying `pred` (checking the latest state first); returns the state
    /// and its arrival time. Panics with the last state after `timeout`.
    pub async fn wait_state(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&DesiredState) -> bool,
    ) -> (DesiredState, Instant) {
        if let Some(last) = &self.last {
            if pred(last) {
                let at = self
                    .log
                    .iter()
                    .rev()
                    .find(|s| matches!(&s.update.event, ProviderEvent::State(_)))
                    .map(|s| s.at)
                    .unwrap_or_else(Instant::now);
                return (last.clone(), at);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(s) = self.next(left).await else {
                panic!(
                    "timed out after {timeout:?} waiting for: {what}\nlast state: {:#?}",
                    self.last
                );
            };
            if let ProviderEvent::State(st) = &s.update.event {
                if pred(st) {
                    return (st.clone(), s.at);
                }
            }
        }
    }

    /// Wait for an `Error` update; panics on a State in between if `no_state` is set.
    pub async fn wait_error(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(s) = self.next(left).await else {
                panic!("timed out after {timeout:?} waiting for a provider Error");
            };
            if let ProviderEvent::Error(e) = s.update.event {
                return e;
            }
        }
    }
}

/// Milliseconds from `from` to `to` (0 if the update came before the CLI returned).
pub fn ms_since(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

/// p50 and p99 (nearest rank) of samples in ms.
pub fn percentiles(samples: &[f64]) -> (f64, f64) {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    (rank(0.50), rank(0.99))
}

/// Print one convergence line (visible with `--nocapture`, and kept in the test output).
pub fn report(what: &str, samples: &[f64]) {
    let (p50, p99) = percentiles(samples);
    eprintln!(
        "CONVERGENCE {what:<34} n={:<3} p50={p50:>7.1} ms  p99={p99:>7.1} ms  all={samples:.0?}",
        samples.len()
    );
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
}

/// A socat relay of the Engine socket at `path`, in its own process group so that
/// [`stop_relay`] also ends the per-connection children (the event stream among them).
pub async fn start_relay(path: &Path) -> tokio::process::Child {
    let child = tokio::process::Command::new("socat")
        .arg(format!("UNIX-LISTEN:{},fork", path.display()))
        .arg(format!("UNIX-CONNECT:{SOCKET}"))
        .process_group(0)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("socat");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "socat did not create {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

/// Kill the relay and its children (the whole process group it leads): the Engine is gone.
pub async fn stop_relay(child: &mut tokio::process::Child, path: &Path) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
    }
    let _ = child.wait().await;
    let _ = std::fs::remove_file(path);
}
