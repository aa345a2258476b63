//! Access log: one line per request, JSON or Common Log Format, off by default.
//!
//! The data path only does a `try_send` on a bounded channel; a writer task formats and writes.
//! When the channel is full the record is dropped and counted ([`AccessLog::dropped`]): a slow
//! disk must never slow the proxy down.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::Method;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Access log settings (`http.access_log` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Write one line per request.
    pub enabled: bool,
    /// `json` or `common`.
    pub format: LogFormat,
    /// File to append to; unset = standard output.
    pub path: Option<PathBuf>,
    /// Records queued for the writer; more are dropped and counted.
    pub buffer: usize,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: false,
            format: LogFormat::Json,
            path: None,
            buffer: 8192,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Common,
}

/// One request, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct AccessRecord {
    /// Unix time of the request start, milliseconds.
    pub time_ms: u64,
    pub client: IpAddr,
    #[serde(serialize_with = "arc_str")]
    pub entrypoint: Arc<str>,
    #[serde(serialize_with = "method_str")]
    pub method: Method,
    pub host: String,
    pub path: String,
    pub protocol: &'static str,
    pub status: u16,
    /// Response body bytes sent downstream.
    pub bytes: u64,
    #[serde(serialize_with = "opt_arc_str")]
    pub router: Option<Arc<str>>,
    #[serde(serialize_with = "opt_arc_str")]
    pub service: Option<Arc<str>>,
    pub endpoint: Option<SocketAddr>,
    /// Request start to the end of the response body.
    pub duration_us: u64,
    /// Request start to upstream response head (0 when no upstream answered).
    pub upstream_us: u64,
    /// Attempts made (1 + retries).
    pub attempts: u32,
}

// serde's `rc` feature is not enabled crate-wide; these two keep it that way.
fn arc_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

fn opt_arc_str<S: serde::Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&**v),
        None => s.serialize_none(),
    }
}

fn method_str<S: serde::Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

/// The running access log.
#[derive(Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<AccessRecord>,
    dropped: AtomicU64,
}

impl AccessLog {
    /// Start the writer task. Must be called inside a tokio runtime.
    pub fn start(config: &AccessLogConfig) -> std::io::Result<Arc<AccessLog>> {
        let mut out: Box<dyn std::io::Write + Send> = match &config.path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let (tx, mut rx) = mpsc::channel::<AccessRecord>(config.buffer.max(1));
        let format = config.format;
        // Blocking writes belong on a blocking thread; the task exits when every sender is gone.
        tokio::task::spawn_blocking(move || {
            let mut line = Vec::with_capacity(512);
            while let Some(rec) = rx.blocking_recv() {
                line.clear();
                match format {
                    LogFormat::Json => {
                        let _ = serde_json::to_writer(&mut line, &rec);
                    }
                    LogFormat::Common => write_common(&mut line, &rec),
                }
                line.push(b'\n');
                if out.write_all(&line).is_err() {
                    continue;
                }
                if rx.is_empty() {
                    let _ = out.flush();
                }
            }
            let _ = out.flush();
        });
        Ok(Arc::new(AccessLog {
            tx,
            dropped: AtomicU64::new(0),
        }))
    }

    /// Queue a record without waiting.
    pub fn log(&self, rec: AccessRecord) {
        if self.tx.try_send(rec).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `client - - [10/Oct/2000:13:55:36 +0000] "GET /path HTTP/1.1" 200 2326`
fn write_common(out: &mut Vec<u8>, rec: &AccessRecord) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = rec.time_ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let tod = secs % 86_400;
    let _ = write!(
        out,
        "{} - - [{:02}/{}/{}:{:02}:{:02}:{:02} +0000] \"{} {} {}\" {} {}",
        rec.client,
        d,
        MONTHS[(m - 1) as usize],
        y,
        tod / 3600,
        tod / 60 % 60,
        tod % 60,
        rec.method,
        rec.path,
        rec.protocol,
        rec.status,
        rec.bytes
    );
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_format() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let rec = AccessRecord {
            time_ms: 971_186_136_000,
            client: "127.0.0.1".parse().unwrap(),
            entrypoint: "web".into(),
            method: Method::GET,
            host: "a".into(),
            path: "/x".into(),
            protocol: "HTTP/1.1",
            status: 200,
            bytes: 12,
            router: None,
            service: None,
            endpoint: None,
            duration_us: 1,
            upstream_us: 1,
            attempts: 1,
        };
        let mut out = Vec::new();
        write_common(&mut out, &rec);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "127.0.0.1 - - [10/Oct/2000:13:55:36 +0000] \"GET /x HTTP/1.1\" 200 12"
        );
    }
}
