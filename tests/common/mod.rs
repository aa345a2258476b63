//! Shared helpers for black-box tests: run the real `meshgate` binary on loopback with a config
//! file in a temp dir, start the project's own echo backends, and talk to them with real sockets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// A free TCP port on 127.0.0.1 (bound then released; fine for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port for both TCP and UDP.
pub fn free_udp_port() -> u16 {
    loop {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A running meshgate process, killed on drop.
pub struct Meshgate {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Meshgate {
    /// Start meshgate with `services_yaml` (the part after the admin section).
    pub async fn start(body: &str) -> Meshgate {
        let dir = tempfile::tempdir().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("meshgate.yaml");
        std::fs::write(&config, Self::full_config(admin, body)).unwrap();
        let log = dir.path().join("meshgate.log");
        let child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "meshgate=debug,info")
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .expect("spawn meshgate");
        let mg = Meshgate {
            child,
            dir,
            config,
            admin,
            log,
        };
        mg.wait_healthy().await;
        mg
    }

    pub fn full_config(admin: SocketAddr, body: &str) -> String {
        format!("admin:\n  bind: {admin}\nshutdown_timeout: 10s\n{body}")
    }

    /// Replace the config file the way an editor does (write a temp file, rename over).
    pub fn rewrite(&self, body: &str) {
        let tmp = self.dir.path().join(".meshgate.yaml.tmp");
        std::fs::write(&tmp, Self::full_config(self.admin, body)).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(body) = self.get("/healthz").await {
                if body.starts_with("ok") {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("meshgate did not become healthy:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path on the admin API (HTTP/1.0, raw socket).
    pub async fn get(&self, path: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(self.admin).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    }

    /// The current table generation from the admin API.
    pub async fn generation(&self) -> u64 {
        let body = self.get("/api/status").await.unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["generation"].as_u64().unwrap_or(0)
    }

    /// Wait until the generation is above `gen`.
    pub async fn wait_generation_above(&self, gen: u64, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let g = self.generation().await;
            if g > gen {
                return g;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("generation did not pass {gen}:\n{}", self.log_text());
    }

    /// A metric's value from /metrics (first sample whose line starts with `name`).
    pub async fn metric(&self, name: &str) -> f64 {
        let body = self.get("/metrics").await.unwrap_or_default();
        body.lines()
            .find(|l| {
                // The exact name: `meshgate_udp_flows` is also a prefix of `..._dropped_total`.
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Wait for the process to exit (bounded); returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Meshgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend started in this test process: one of the project's echo servers.
pub struct Backend {
    pub addr: SocketAddr,
    pub stop: CancellationToken,
}

impl Backend {
    pub async fn http(name: &str) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(meshgate::echo::http(l, name.to_owned(), stop.clone()));
        Backend { addr, stop }
    }

    pub async fn tcp_echo() -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(meshgate::echo::tcp_echo(l, stop.clone()));
        Backend { addr, stop }
    }

    pub async fn udp_echo() -> Backend {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(meshgate::echo::udp_echo(s, stop.clone()));
        Backend { addr, stop }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One HTTP/1.0 GET through `addr` from `source` (a 127.x address, for client-IP hashing);
/// returns the backend's name (the body, trimmed).
pub async fn ask_name_from(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<String> {
    let mut s = match source {
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => Ok(body.trim().to_owned()),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("no HTTP response: {out:?}"),
        )),
    }
}

pub async fn ask_name(addr: SocketAddr) -> std::io::Result<String> {
    ask_name_from(addr, None).await
}

/// Retry `ask_name` until it succeeds (listener opening) or the deadline.
pub async fn ask_name_eventually(addr: SocketAddr, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        match ask_name(addr).await {
            Ok(n) => return n,
            Err(e) if Instant::now() > deadline => panic!("no answer from {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
