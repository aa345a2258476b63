//! Active health checks (control path).
//!
//! One task checks every endpoint of every service that has a `health_check` (on the target
//! ports that take TCP: a UDP-only port is not checked), each on its own interval: a TCP
//! connect, or an HTTP/1.0 GET of `http_path` expecting a 2xx/3xx status.
//! `fall` consecutive failures mark the endpoint [`Health::Down`] (balancers skip it); `rise`
//! consecutive successes mark it up again. The result lands in the endpoint's
//! [`EndpointStats`], which survive table swaps, so a rebuild neither forgets a down endpoint nor
//! re-checks a known one from scratch.
//!
//! The task keeps a schedule (a min-heap of due times) and sleeps until the earliest check is
//! due or the control path publishes a new table generation; only then does it read the table's
//! endpoints again. An idle meshgate, or one whose services have no checks, never wakes for
//! them, and a table of 100,000 checked endpoints costs one walk per table change instead of one
//! every tick. Endpoints new to the schedule get their first check spread over their interval
//! (HAProxy spreads its checks the same way), so a big table does not open every check
//! connection in the same instant; a single new endpoint is checked at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::model::{HealthCheckSpec, Protocol};
use crate::stats::{EndpointStats, Health};
use crate::table::RoutingTable;

/// Shortest interval between two checks of one endpoint (a configured `interval` below this,
/// `0` included, is raised to it).
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// Bytes of the response read to find the status line.
const STATUS_LINE_MAX: usize = 256;

/// An endpoint of a service, as the stats key it.
type Key = (Arc<str>, SocketAddr);

/// Per-endpoint check state.
struct CheckState {
    spec: HealthCheckSpec,
    /// When the next check is due. Only the heap entry holding this exact instant is live;
    /// others are left over from rescheduling and skipped when they come up.
    next: Instant,
    ok_streak: u32,
    fail_streak: u32,
    running: bool,
}

/// Which endpoints are checked, and when each check is due.
#[derive(Default)]
struct Schedule {
    states: HashMap<Key, CheckState>,
    due: BinaryHeap<Reverse<(Instant, Key)>>,
}

fn interval(spec: &HealthCheckSpec) -> Duration {
    spec.interval.max(MIN_INTERVAL)
}

impl Schedule {
    /// Follow a new table: schedule endpoints that appeared, forget those that left, and take
    /// up changed settings. An endpoint still served whose service lost its check goes back to
    /// [`Health::Unknown`] (taken as up, as without checks): its last verdict, down perhaps,
    /// would otherwise stay in its stats, which outlive table swaps, with nothing to revise it.
    fn sync(&mut self, table: &RoutingTable, now: Instant) {
        let mut wanted: HashMap<Key, &HealthCheckSpec> = HashMap::new();
        for service in table.services.values() {
            let Some(spec) = &service.spec.health_check else {
                continue;
            };
            // A check connects over TCP: it judges the TCP pools (TCP ports, the HTTP port)
            // only. A UDP pool has its own endpoint stats, even on the same target, so a UDP
            // server that takes no TCP is not marked down by it.
            for pool in service.pools.iter().filter(|p| p.protocol == Protocol::Tcp) {
                for endpoint in pool.endpoints.iter() {
                    wanted.insert((Arc::clone(&service.name), endpoint.addr), spec);
                }
            }
        }
        self.states.retain(|key, _| {
            let keep = wanted.contains_key(key);
            if !keep {
                if let Some(stats) = endpoint_stats(table, key) {
                    set_health(stats, key, Health::Unknown);
                }
            }
            keep
        });
        let mut fresh = Vec::new();
        for (key, spec) in wanted {
            match self.states.get_mut(&key) {
                Some(state) if state.spec == *spec => {}
                Some(state) => {
                    // A shorter interval applies from now; a longer one from the next check.
                    let sooner = now + interval(spec);
                    state.spec = spec.clone();
                    if sooner < state.next {
                        state.next = sooner;
                        if !state.running {
                            self.due.push(Reverse((sooner, key)));
                        }
                    }
                }
                None => fresh.push((key, spec)),
            }
        }
        // Sorted, so that the spread is the same for the same table.
        fresh.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let n = fresh.len() as u32;
        for (i, (key, spec)) in (0u32..).zip(fresh) {
            let next = now + interval(spec) * i / n;
            self.due.push(Reverse((next, key.clone())));
            self.states.insert(
                key,
                CheckState {
                    spec: spec.clone(),
                    next,
                    ok_streak: 0,
                    fail_streak: 0,
                    running: false,
                },
            );
        }
        // Entries of forgotten endpoints would leave the heap only when due: rebuild it when
        // they outnumber the live ones.
        if self.due.len() > 2 * self.states.len() + 64 {
            self.due = self
                .states
                .iter()
                .filter(|(_, s)| !s.running)
                .map(|(k, s)| Reverse((s.next, k.clone())))
                .collect();
        }
    }

    /// When the task must wake next for a check (None: nothing scheduled).
    fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    /// Take the checks due at `now` off the schedule, marking them running.
    fn take_due(&mut self, now: Instant) -> Vec<(Key, HealthCheckSpec)> {
        let mut out = Vec::new();
        while let Some(Reverse((at, _))) = self.due.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.due.pop() else {
                break;
            };
            let Some(state) = self.states.get_mut(&key) else {
                continue;
            };
            if state.running || state.next != at {
                continue;
            }
            state.running = true;
            state.next = now + interval(&state.spec);
            out.push((key, state.spec.clone()));
        }
        out
    }

    /// Record a finished check and schedule the next one. Returns the health the endpoint
    /// should now have, or None if it is no longer checked.
    fn finish(&mut self, key: &Key, ok: bool, before: Health, now: Instant) -> Option<Health> {
        let state = self.states.get_mut(key)?;
        state.running = false;
        state.next = state.next.max(now);
        self.due.push(Reverse((state.next, key.clone())));
        if ok {
            state.ok_streak += 1;
            state.fail_streak = 0;
        } else {
            state.fail_streak += 1;
            state.ok_streak = 0;
        }
        Some(if state.fail_streak >= state.spec.fall {
            Health::Down
        } else if state.ok_streak >= state.spec.rise || (before == Health::Unknown && ok) {
            Health::Up
        } else {
            before
        })
    }
}

/// Run checks until `shutdown`. `generations` carries the control path's table generation: a
/// change makes the schedule follow the new table.
pub async fn run(
    table: Arc<ArcSwap<RoutingTable>>,
    mut generations: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let mut schedule = Schedule::default();
    let (tx, mut rx) = mpsc::channel::<(Key, bool)>(256);
    generations.borrow_and_update();
    schedule.sync(&table.load(), Instant::now());
    let mut control_open = true;
    loop {
        for (key, spec) in schedule.take_due(Instant::now()) {
            let tx = tx.clone();
            tokio::spawn(async move {
                let ok = check(key.1, &spec).await;
                let _ = tx.send((key, ok)).await;
            });
        }
        let wake = schedule.next_due();
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(
            wake.unwrap_or_else(Instant::now),
        ));
        tokio::select! {
            _ = sleep, if wake.is_some() => {}
            changed = generations.changed(), if control_open => match changed {
                Ok(()) => schedule.sync(&table.load(), Instant::now()),
                // The control task is gone (shutdown): keep checking the last table.
                Err(_) => control_open = false,
            },
            Some((key, ok)) = rx.recv() => {
                let current = table.load();
                let stats = endpoint_stats(&current, &key);
                let before = stats.map_or(Health::Unknown, |s| s.health());
                let after = schedule.finish(&key, ok, before, Instant::now());
                if let (Some(stats), Some(after)) = (stats, after) {
                    set_health(stats, &key, after);
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The stats of a service's TCP endpoint in `table`, if it serves it.
fn endpoint_stats<'t>(table: &'t RoutingTable, key: &Key) -> Option<&'t Arc<EndpointStats>> {
    let service = table.services.get(&key.0)?;
    let tcp = service.pools.iter().filter(|p| p.protocol == Protocol::Tcp);
    let mut endpoints = tcp.flat_map(|p| p.endpoints.iter());
    endpoints.find(|e| e.addr == key.1).map(|e| &e.stats)
}

fn set_health(stats: &EndpointStats, key: &Key, after: Health) {
    if after == stats.health() {
        return;
    }
    stats.set_health(after);
    match after {
        Health::Down => {
            tracing::warn!(service = %key.0, endpoint = %key.1, "health check: endpoint down")
        }
        Health::Up => {
            tracing::info!(service = %key.0, endpoint = %key.1, "health check: endpoint up")
        }
        Health::Unknown => {
            tracing::info!(service = %key.0, endpoint = %key.1, "health check removed: endpoint taken as up")
        }
    }
}

/// One check: TCP connect, then optionally an HTTP/1.0 GET expecting 2xx or 3xx.
pub async fn check(addr: SocketAddr, spec: &HealthCheckSpec) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let Some(path) = &spec.http_path else {
            return Some(true);
        };
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: meshgate-health\r\n\r\n",
            addr.ip()
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = vec![0u8; STATUS_LINE_MAX];
        let mut len = 0;
        while len < buf.len() && !buf[..len].contains(&b'\n') {
            let n = stream.read(&mut buf[len..]).await.ok()?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Some(status_ok(&buf[..len]))
    };
    matches!(
        tokio::time::timeout(spec.timeout, attempt).await,
        Ok(Some(true))
    )
}

/// Is this an HTTP status line with a 2xx or 3xx code?
fn status_ok(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let version_ok = parts.next().is_some_and(|v| v.starts_with(b"HTTP/1."));
    let code = parts.next().unwrap_or_default();
    version_ok && code.len() == 3 && (code[0] == b'2' || code[0] == b'3')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DesiredState, EndpointSpec, ServiceSpec};
    use crate::stats::StatsRegistry;
    use crate::table::BuildOptions;

    fn spec(interval: Duration) -> HealthCheckSpec {
        HealthCheckSpec {
            interval,
            timeout: Duration::from_millis(500),
            fall: 1,
            rise: 1,
            http_path: None,
        }
    }

    /// A table of services, each with its endpoints and check interval.
    fn table(services: &[(&str, &[SocketAddr], Duration)], stats: &StatsRegistry) -> RoutingTable {
        let mut d = DesiredState::default();
        for (name, addrs, every) in services {
            let mut s = ServiceSpec::new(*name);
            s.http_port = Some(80);
            s.endpoints = addrs.iter().map(|a| EndpointSpec::from_addr(*a)).collect();
            s.health_check = Some(spec(*every));
            d.services.insert((*name).into(), s);
        }
        RoutingTable::build(&d, &BuildOptions::default(), stats, 1)
    }

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 20_000 + i)))
            .collect()
    }

    /// A loopback address nothing listens on (checks against it fail at once).
    fn closed_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn health(t: &RoutingTable, service: &str, addr: SocketAddr) -> Health {
        let key = (Arc::from(service), addr);
        endpoint_stats(t, &key).expect("served").health()
    }

    #[test]
    fn new_endpoints_are_spread_over_their_interval() {
        let stats = StatsRegistry::default();
        let second = Duration::from_secs(1);
        let t = table(&[("a", &addrs(4), second)], &stats);
        let now = Instant::now();
        let mut s = Schedule::default();
        s.sync(&t, now);
        let mut due: Vec<Duration> = s.states.values().map(|c| c.next - now).collect();
        due.sort();
        let ms = |m| Duration::from_millis(m);
        assert_eq!(due, [ms(0), ms(250), ms(500), ms(750)]);
        assert_eq!(s.next_due(), Some(now));
        // Only the first is due now; it runs once, and its next check is an interval later.
        let taken = s.take_due(now);
        assert_eq!(taken.len(), 1);
        assert!(s.take_due(now).is_empty());
        let key = taken[0].0.clone();
        assert_eq!(
            s.finish(&key, false, Health::Unknown, now),
            Some(Health::Down)
        );
        assert_eq!(s.states[&key].next, now + second);
        assert_eq!(s.take_due(now + ms(800)).len(), 3);
        // A single endpoint added later is checked at once.
        let more: Vec<SocketAddr> = addrs(5);
        let t = table(&[("a", &more, second)], &stats);
        let later = now + ms(900);
        s.sync(&t, later);
        assert_eq!(s.take_due(later).len(), 1);
    }

    #[test]
    fn schedule_follows_the_table() {
        let stats = StatsRegistry::default();
        let now = Instant::now();
        let mut s = Schedule::default();
        s.sync(
            &table(&[("a", &addrs(100), Duration::from_secs(60))], &stats),
            now,
        );
        assert_eq!(s.states.len(), 100);
        // A shorter interval applies at once; endpoints that left are forgotten, and the heap's
        // stale entries do not pile up.
        for round in 0..10 {
            let t = table(&[("a", &addrs(10), Duration::from_secs(1))], &stats);
            s.sync(&t, now);
            assert_eq!(s.states.len(), 10, "round {round}");
            assert!(s
                .states
                .values()
                .all(|c| c.next <= now + Duration::from_secs(1)));
            s.sync(
                &table(&[("a", &addrs(100), Duration::from_secs(60))], &stats),
                now,
            );
        }
        assert!(s.due.len() <= 2 * s.states.len() + 64, "{}", s.due.len());
        // A service without a check is not scheduled.
        let mut d = DesiredState::default();
        let mut plain = ServiceSpec::new("plain");
        plain.http_port = Some(80);
        plain.endpoints = vec![EndpointSpec::from_addr(addrs(1)[0])];
        d.services.insert("plain".into(), plain);
        s.sync(
            &RoutingTable::build(&d, &BuildOptions::default(), &stats, 2),
            now,
        );
        assert!(s.states.is_empty());
        assert_eq!(s.next_due(), s.due.peek().map(|Reverse((at, _))| *at));
    }

    #[test]
    fn udp_only_targets_are_not_checked() {
        use crate::model::PortSpec;
        let port = |published, target, protocol| PortSpec {
            published,
            target,
            protocol,
            bind: "0.0.0.0".parse().unwrap(),
        };
        let mut s = ServiceSpec::new("dns");
        s.ports = vec![
            port(53, 53, Protocol::Udp),
            port(5353, 5353, Protocol::Udp),
            port(5353, 5353, Protocol::Tcp),
        ];
        s.http_port = None;
        s.endpoints = vec![EndpointSpec {
            port: None,
            ..EndpointSpec::from_addr("127.0.0.1:1".parse().unwrap())
        }];
        s.health_check = Some(spec(Duration::from_secs(1)));
        let mut d = DesiredState::default();
        d.services.insert("dns".into(), s);
        let t = RoutingTable::build(&d, &BuildOptions::default(), &StatsRegistry::default(), 1);
        // 53/udp, 5353/udp and 5353/tcp: the same target over both transports is two pools.
        assert_eq!(t.services["dns"].pools.len(), 3);
        let mut sched = Schedule::default();
        sched.sync(&t, Instant::now());
        let checked: Vec<u16> = sched.states.keys().map(|k| k.1.port()).collect();
        assert_eq!(checked, [5353]);
    }

    #[tokio::test]
    async fn checks_follow_new_generations_without_waiting_for_a_tick() {
        // Intervals of an hour: the only reasons to check are the start and the table change.
        let stats = StatsRegistry::default();
        let hour = Duration::from_secs(3600);
        let (a, b) = (closed_addr(), closed_addr());
        let current = Arc::new(ArcSwap::from_pointee(table(&[("a", &[a], hour)], &stats)));
        let (gen_tx, gen_rx) = watch::channel(1);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Arc::clone(&current), gen_rx, stop.clone()));
        let wait_down = |service: &'static str, addr: SocketAddr| {
            let current = Arc::clone(&current);
            async move {
                for _ in 0..200 {
                    if health(&current.load(), service, addr) == Health::Down {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("{service} {addr} not marked down within 2 s");
            }
        };
        wait_down("a", a).await;
        current.store(Arc::new(table(
            &[("a", &[a], hour), ("b", &[b], hour)],
            &stats,
        )));
        gen_tx.send_replace(2);
        wait_down("b", b).await;
        // "a" drops its check: its endpoint is no longer held down by the last verdict.
        let mut d = (*table(&[("a", &[a], hour), ("b", &[b], hour)], &stats).desired).clone();
        d.services.get_mut("a").unwrap().health_check = None;
        let without = RoutingTable::build(&d, &BuildOptions::default(), &stats, 3);
        current.store(Arc::new(without));
        gen_tx.send_replace(3);
        for _ in 0..200 {
            if health(&current.load(), "a", a) == Health::Unknown {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(health(&current.load(), "a", a), Health::Unknown);
        assert_eq!(health(&current.load(), "b", b), Health::Down);
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn status_lines() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_ok(b"HTTP/1.0 302 Found\r\n"));
        assert!(!status_ok(b"HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(!status_ok(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!status_ok(b""));
    }
}
