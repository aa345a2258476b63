//! Shared helpers of the end-to-end Docker tests (`tests/e2e_*.rs`): the static meshgate image
//! (built offline, once), a raw HTTP client that names the backend answering, a continuous load
//! generator that counts failures, and readers of meshgate's admin API (`/api/table`,
//! `/api/status`) that wait for the routed state and time the wait.
//!
//! Included with `#[path]` next to `tests/docker_support.rs` (declared as `mod support`).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::try_docker;

/// Target of the static build (`docker/build-image.sh` uses the same).
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Directory of the statically linked `meshgate` and `meshgate-echo`.
///
/// Runs the same cargo command as `docker/build-image.sh` (a no-op when up to date, a few
/// minutes on a cold cache) so the image never holds a stale binary.
/// `MESHGATE_E2E_NO_BUILD=1` skips cargo and uses what is there.
pub async fn static_binaries() -> PathBuf {
    static DIR: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    DIR.get_or_init(|| async {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = repo.join("target").join(TARGET).join("release");
        let skip = std::env::var("MESHGATE_E2E_NO_BUILD").as_deref() == Ok("1")
            || binaries_newer_than_sources(repo, &out);
        if !skip {
            let started = Instant::now();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = tokio::process::Command::new(cargo);
            // The test process carries cargo's per-package variables (CARGO_MANIFEST_DIR, …);
            // passed on, they change dependency fingerprints (ring tracks CARGO_MANIFEST_DIR)
            // and force a full rebuild. Give cargo the environment of a shell instead.
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy().into_owned();
                if (k.starts_with("CARGO_") && k != "CARGO_HOME")
                    || k.starts_with("RUSTC")
                    || k == "RUSTFLAGS"
                    || k == "CARGO_ENCODED_RUSTFLAGS"
                    || k == "OUT_DIR"
                {
                    cmd.env_remove(&k);
                }
            }
            let status = cmd
                .current_dir(repo)
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .args(["build", "--release", "--target", TARGET])
                .args(["--bin", "meshgate", "--bin", "meshgate-echo"])
                .status()
                .await
                .expect("run cargo");
            assert!(status.success(), "static release build failed");
            eprintln!("static build: {:.1} s", started.elapsed().as_secs_f64());
        }
        for bin in ["meshgate", "meshgate-echo"] {
            let p = out.join(bin);
            let file = std::process::Command::new("file").arg(&p).output();
            let text = file
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            assert!(
                text.contains("statically linked") || text.contains("static-pie"),
                "{} is not a static binary (a FROM scratch image cannot run it): {text}",
                p.display()
            );
        }
        out
    })
    .await
    .clone()
}

/// True if both static binaries exist and are newer than every file under `src/`,
/// `Cargo.toml` and `Cargo.lock`: then cargo is not even asked.
fn binaries_newer_than_sources(repo: &Path, out: &Path) -> bool {
    fn newest(p: &Path) -> std::time::SystemTime {
        let meta = std::fs::metadata(p).unwrap();
        let mut t = meta.modified().unwrap();
        if meta.is_dir() {
            for e in std::fs::read_dir(p).unwrap().flatten() {
                t = t.max(newest(&e.path()));
            }
        }
        t
    }
    let sources = [
        repo.join("src"),
        repo.join("Cargo.toml"),
        repo.join("Cargo.lock"),
    ]
    .iter()
    .filter(|p| p.exists())
    .map(|p| newest(p))
    .max()
    .unwrap();
    ["meshgate", "meshgate-echo"].iter().all(|b| {
        std::fs::metadata(out.join(b))
            .and_then(|m| m.modified())
            .map(|t| t > sources)
            .unwrap_or(false)
    })
}

/// FNV-1a over the files' bytes: the tag names the content, so a rebuilt binary gets a new
/// image and an unchanged one reuses the image from an earlier run.
fn content_tag(files: &[&Path]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for f in files {
        for b in std::fs::read(f).unwrap() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

/// The e2e image: the `FROM scratch` layout of `docker/build-image.sh` (`/meshgate`,
/// `/meshgate-echo`, `/etc/meshgate/meshgate.yaml`, entrypoint `/meshgate`) plus static busybox
/// (`/bin/sh`), so that a Swarm task can pass its templated name (`--env NAME={{.Task.Name}}`)
/// to `meshgate-echo --name`. Built with `docker import`: nothing is pulled.
pub async fn e2e_image() -> String {
    static IMAGE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            let bins = static_binaries().await;
            let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
            let busybox = ["/usr/bin/busybox", "/bin/busybox"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .expect("static busybox (Debian busybox-static) is needed for the e2e image");
            let (mg, echo) = (bins.join("meshgate"), bins.join("meshgate-echo"));
            let yaml = repo.join("docker/meshgate.yaml");
            let tag = format!(
                "meshgate-e2e:{}",
                content_tag(&[&mg, &echo, &busybox, &yaml])
            );
            if try_docker(&["image", "inspect", &tag]).await.is_ok() {
                return tag;
            }
            let root = tempfile::tempdir().unwrap();
            let r = root.path();
            std::fs::create_dir_all(r.join("bin")).unwrap();
            std::fs::create_dir_all(r.join("etc/meshgate")).unwrap();
            std::fs::create_dir_all(r.join("tmp")).unwrap();
            std::fs::copy(&mg, r.join("meshgate")).unwrap();
            std::fs::copy(&echo, r.join("meshgate-echo")).unwrap();
            std::fs::copy(&yaml, r.join("etc/meshgate/meshgate.yaml")).unwrap();
            std::fs::copy(&busybox, r.join("bin/busybox")).unwrap();
            std::os::unix::fs::symlink("busybox", r.join("bin/sh")).unwrap();
            let changes = [
                r#"ENTRYPOINT ["/meshgate"]"#,
                r#"CMD ["run","--config","/etc/meshgate/meshgate.yaml"]"#,
            ];
            crate::support::docker_import(r, &changes, &tag).await;
            tag
        })
        .await
        .clone()
}

/// One HTTP/1.0 `GET /` to `addr` with `Host: host`; the echo backend's name (the body).
/// Any non-200 answer is an error (meshgate's 502/503 included).
pub async fn get_name(addr: SocketAddr, host: &str) -> Result<String, String> {
    let fut = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&out);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(format!(
                "status: {}",
                head.lines().next().unwrap_or_default()
            ));
        }
        Ok(body.trim().to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| Err("timed out after 5 s".into()))
}

/// A request target for the load: an address and the Host header to send.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub sent: u64,
    pub failed: u64,
    /// Answers per backend name.
    pub names: BTreeMap<String, u64>,
    /// The first failures, with the time since the load started.
    pub errors: Vec<(Duration, String)>,
}

/// Continuous requests from `workers` tasks, each cycling over `targets`, until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    names: Arc<Mutex<BTreeMap<String, u64>>>,
    errors: Arc<Mutex<Vec<(Duration, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(targets: Vec<Target>, workers: usize) -> Load {
        let load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            sent: Arc::default(),
            failed: Arc::default(),
            names: Arc::default(),
            errors: Arc::default(),
            tasks: Vec::new(),
        };
        let started = Instant::now();
        let tasks = (0..workers)
            .map(|w| {
                let (stop, sent, failed) = (
                    Arc::clone(&load.stop),
                    Arc::clone(&load.sent),
                    Arc::clone(&load.failed),
                );
                let (names, errors) = (Arc::clone(&load.names), Arc::clone(&load.errors));
                let targets = targets.clone();
                tokio::spawn(async move {
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let t = &targets[i % targets.len()];
                        i += 1;
                        sent.fetch_add(1, Ordering::Relaxed);
                        match get_name(t.addr, &t.host).await {
                            Ok(n) => *names.lock().unwrap().entry(n).or_default() += 1,
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let mut errs = errors.lock().unwrap();
                                if errs.len() < 20 {
                                    errs.push((started.elapsed(), format!("{} {e}", t.addr)));
                                }
                            }
                        }
                        // A short pause keeps the 2-core machine usable for the engine.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Load { tasks, ..load }
    }

    /// Snapshot of the counters so far.
    pub fn snapshot(&self) -> LoadResult {
        LoadResult {
            sent: self.sent.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            names: self.names.lock().unwrap().clone(),
            errors: self.errors.lock().unwrap().clone(),
        }
    }

    /// Forget the names seen so far (to see who answers from now on).
    pub fn reset_names(&self) {
        self.names.lock().unwrap().clear();
    }

    pub async fn stop(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        for t in self.tasks {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(left, t).await;
        }
        LoadResult {
            sent: self.sent.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            names: self.names.lock().unwrap().clone(),
            errors: self.errors.lock().unwrap().clone(),
        }
    }
}

/// Send requests until every name in `want` answered (bounded); returns the names seen.
pub async fn names_reached(
    target: &Target,
    want: &BTreeSet<String>,
    within: Duration,
) -> BTreeSet<String> {
    let deadline = Instant::now() + within;
    let mut seen = BTreeSet::new();
    while Instant::now() < deadline && !want.is_subset(&seen) {
        if let Ok(n) = get_name(target.addr, &target.host).await {
            seen.insert(n);
        }
    }
    seen
}

/// Names answering `n` requests in a row.
pub async fn names_seen(target: &Target, n: usize) -> Result<BTreeSet<String>, String> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        seen.insert(get_name(target.addr, &target.host).await?);
    }
    Ok(seen)
}

/// The admin API of one meshgate (host-side address).
#[derive(Debug, Clone, Copy)]
pub struct Admin(pub SocketAddr);

impl Admin {
    /// GET a path; the body.
    pub async fn get(&self, path: &str) -> Result<String, String> {
        let fut = async {
            let mut s = TcpStream::connect(self.0)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut out = String::new();
            s.read_to_string(&mut out)
                .await
                .map_err(|e| e.to_string())?;
            out.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .ok_or_else(|| format!("no HTTP response: {out:?}"))
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .unwrap_or_else(|_| Err("admin timed out".into()))
    }

    pub async fn json(&self, path: &str) -> Result<serde_json::Value, String> {
        let body = self.get(path).await?;
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    }

    pub async fn table(&self) -> Result<Table, String> {
        self.json("/api/table").await.map(Table)
    }

    /// Poll `/api/table` every 5 ms until `pred` holds; the table and when it was first seen.
    /// Panics (with the last table) after `within`.
    pub async fn wait(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Table) -> bool,
    ) -> (Table, Instant) {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            if let Ok(t) = self.table().await {
                if pred(&t) {
                    return (t, Instant::now());
                }
                last = Some(t);
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {within:?} waiting for: {what}\nlast table: {:#}",
                    last.map(|t| t.0).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Wait until `/healthz` answers ok (bounded).
    pub async fn wait_healthy(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            match self.get("/healthz").await {
                Ok(b) if b.starts_with("ok") => return Ok(()),
                r if Instant::now() > deadline => {
                    return Err(format!("not healthy after {within:?}: {r:?}"))
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// A `GET /api/table` answer.
#[derive(Debug, Clone)]
pub struct Table(pub serde_json::Value);

impl Table {
    pub fn generation(&self) -> u64 {
        self.0["generation"].as_u64().unwrap_or(0)
    }

    fn service(&self, name: &str) -> Option<&serde_json::Value> {
        self.0["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
    }

    pub fn has(&self, name: &str) -> bool {
        self.service(name).is_some()
    }

    /// Endpoint IDs taking new connections (the pools leave draining ones out).
    pub fn live(&self, name: &str) -> BTreeSet<String> {
        let Some(s) = self.service(name) else {
            return BTreeSet::new();
        };
        s["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["endpoints"].as_array().into_iter().flatten())
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect()
    }

    /// Endpoint IDs published draining.
    pub fn draining(&self, name: &str) -> BTreeSet<String> {
        let Some(s) = self.service(name) else {
            return BTreeSet::new();
        };
        s["draining"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str().map(str::to_owned))
            .collect()
    }

    /// Problems (provider, object, message) as one text per problem.
    pub fn problems(&self) -> Vec<String> {
        self.0["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p.to_string())
            .collect()
    }
}

/// ms from `from` to `to` (0 if `to` came first).
pub fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}
