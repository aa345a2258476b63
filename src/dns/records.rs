//! DNS answers precomputed at table build, served by hash lookup.
//!
//! [`DnsRecords::build`] turns a [`DesiredState`] into a map from lowercase wire-format name to
//! record sets whose records are already encoded. Every answer record's owner is the compression
//! pointer `0xC00C` (the question name, always at offset 12 of a response), so serving a query
//! is: parse the question, look its lowercase name up, copy header + question + record bytes.
//! No allocation per query beyond the caller's reusable buffer.
//!
//! What gets a name (see also the [module doc](super)):
//! - only live endpoints (not draining, weight > 0), i.e. exactly the endpoints the L4 pools of
//!   the same table route to, so DNS and traffic change in the same generation;
//! - `<task-id>.<svc>` only when the id is a valid DNS label; a 64-hex Docker container ID is
//!   shortened to its usual 12-character form;
//! - SRV targets: the VIP name `<svc>.<zone>` with the published port when the service has a
//!   VIP; otherwise one SRV per named endpoint (`<slot>.<svc>.<zone>`, else
//!   `<task-id>.<svc>.<zone>`) with the endpoint's actual port and weight;
//! - every name inside the zone is also registered without the zone (`web.`, `tasks.web.`),
//!   sharing the same record sets (and the same rotation counters).
//!
//! Multi-record sets rotate: an atomic counter per set picks the first record of each answer
//! (round robin across clients without reordering work or allocation).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::wire::{self, Question, Reject};
use super::DnsConfig;
use crate::model::{DesiredState, EndpointSpec};

/// What the server should do after [`DnsRecords::respond`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `out` holds the response: send it.
    Answered,
    /// Not our name and forwarding is on: relay the query upstream.
    Forward,
    /// Not a query (too short, or a response): send nothing.
    Drop,
}

/// The transport a query came on (decides the response size limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// One RRset, encoded.
#[derive(Debug)]
struct RrSet {
    rtype: u16,
    /// Records back to back, each `C0 0C type class ttl rdlen rdata`.
    bytes: Box<[u8]>,
    /// Start offset of each record in `bytes`.
    starts: Box<[u32]>,
    /// Rotation counter; Relaxed is enough: only the spread matters, not the order.
    rotate: AtomicUsize,
}

impl RrSet {
    fn record(&self, i: usize) -> &[u8] {
        let start = self.starts[i] as usize;
        let end = self
            .starts
            .get(i + 1)
            .map_or(self.bytes.len(), |e| *e as usize);
        &self.bytes[start..end]
    }

    /// Append records that fit under `limit`; returns (written, truncated).
    fn write(&self, out: &mut Vec<u8>, limit: usize) -> (u16, bool) {
        let n = self.starts.len();
        let first = if n > 1 {
            self.rotate.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        let mut written = 0;
        for k in 0..n {
            let rec = self.record((first + k) % n);
            if out.len() + rec.len() > limit {
                return (written, true);
            }
            out.extend_from_slice(rec);
            written += 1;
        }
        (written, false)
    }
}

/// DNS answers precomputed at table build; part of one [`RoutingTable`](crate::table::RoutingTable).
#[derive(Debug, Default)]
pub struct DnsRecords {
    /// The zone, lowercase wire format (empty: DNS off, nothing is local).
    zone: Box<[u8]>,
    /// The zone's SOA as a full record (owner spelled out), for negative answers.
    soa: Box<[u8]>,
    /// Lowercase wire name → index into `entries` (zone names and their bare aliases share one).
    names: HashMap<Box<[u8]>, u32>,
    entries: Vec<Box<[RrSet]>>,
}

impl DnsRecords {
    /// Build records for `desired`; `vips` maps service name → VIP. Empty when DNS is off.
    pub fn build(desired: &DesiredState, vips: &BTreeMap<String, IpAddr>, cfg: &DnsConfig) -> Self {
        if !cfg.enabled {
            return DnsRecords::default();
        }
        let Some(zone) = wire::name_to_wire(&cfg.zone) else {
            tracing::warn!(zone = %cfg.zone, "dns.zone is not a valid name; DNS answers nothing");
            return DnsRecords::default();
        };
        let mut b = Builder::new(&zone, cfg.ttl);
        for (name, spec) in &desired.services {
            let Some(svc) = b.relative(name) else {
                tracing::warn!(service = %name, "service name is not a valid DNS name; not in DNS");
                continue;
            };
            let live: Vec<&EndpointSpec> = spec
                .endpoints
                .iter()
                .filter(|e| !e.draining && e.weight > 0)
                .collect();
            let vip = vips.get(name).copied();
            b.touch(&svc);
            match vip {
                Some(ip) => b.addr(&svc, ip),
                None => live.iter().for_each(|e| b.addr(&svc, e.ip)),
            }
            let tasks = [b"\x05tasks".as_slice(), &svc].concat();
            b.touch(&tasks);
            live.iter().for_each(|e| b.addr(&tasks, e.ip));
            let mut named = Vec::new();
            for e in &live {
                let labels: Vec<String> = e
                    .slot
                    .map(|s| s.to_string())
                    .into_iter()
                    .chain(task_label(&e.id))
                    .collect();
                for label in &labels {
                    b.addr(&prefixed(label, &svc), e.ip);
                }
                if let Some(first) = labels.first() {
                    named.push((*e, prefixed(first, &svc)));
                }
            }
            for port in &spec.ports {
                let srv = prefixed(&format!("_{}", port.protocol), &svc);
                let srv = prefixed(&format!("_{}", port.published), &srv);
                b.touch(&srv);
                if vip.is_some() {
                    b.srv(&srv, 1, port.published, &svc);
                } else {
                    for (e, target) in &named {
                        let weight = e.weight.min(u16::MAX as u32) as u16;
                        b.srv(&srv, weight, e.port_for(port.target), target);
                    }
                }
            }
            if let Some(ip) = vip {
                b.ptr(ip, &svc);
            }
        }
        b.finish()
    }

    /// Number of names served (zone names, bare aliases, PTR names).
    pub fn name_count(&self) -> usize {
        self.names.len()
    }

    /// Answer `query` into `out` (cleared first). `forwarding`: whether names outside the zone
    /// may be relayed (else REFUSED); it is also the RA bit.
    pub fn respond(
        &self,
        query: &[u8],
        transport: Transport,
        forwarding: bool,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let mut lower = [0u8; 255];
        let (q, n) = match wire::parse_query(query, &mut lower) {
            Ok(parsed) => parsed,
            Err(Reject::Drop) => return Outcome::Drop,
            Err(Reject::Rcode(rcode)) => {
                wire::error_response(out, query, None, rcode, forwarding);
                return Outcome::Answered;
            }
        };
        let name = &lower[..n];
        let entry = self.names.get(name).map(|i| &*self.entries[*i as usize]);
        if entry.is_none() && !wire::in_zone(name, &self.zone) {
            if forwarding {
                return Outcome::Forward;
            }
            wire::error_response(out, query, Some(&q), wire::RCODE_REFUSED, false);
            return Outcome::Answered;
        }
        if q.qclass != wire::CLASS_IN && q.qclass != wire::TYPE_ANY {
            wire::error_response(out, query, Some(&q), wire::RCODE_REFUSED, forwarding);
            return Outcome::Answered;
        }
        self.answer(query, &q, entry, transport, forwarding, out);
        Outcome::Answered
    }

    fn answer(
        &self,
        query: &[u8],
        q: &Question<'_>,
        entry: Option<&[RrSet]>,
        transport: Transport,
        forwarding: bool,
        out: &mut Vec<u8>,
    ) {
        let opt_len = if q.edns.is_some() { 11 } else { 0 };
        let limit = match transport {
            Transport::Udp => wire::udp_limit(q.edns),
            Transport::Tcp => u16::MAX as usize,
        } - opt_len;
        wire::begin(out, query, Some(q), true, forwarding);
        let (mut an, mut ns, mut tc) = (0u16, 0u16, false);
        if let Some(sets) = entry {
            for set in sets
                .iter()
                .filter(|s| s.rtype == q.qtype || q.qtype == wire::TYPE_ANY)
            {
                let (written, truncated) = set.write(out, limit);
                an += written;
                tc |= truncated;
                if truncated {
                    break;
                }
            }
        }
        // NXDOMAIN or NODATA: the SOA in authority lets resolvers cache the negative answer.
        if an == 0 && !tc && out.len() + self.soa.len() <= limit {
            out.extend_from_slice(&self.soa);
            ns = 1;
        }
        let rcode = if entry.is_some() {
            wire::RCODE_NOERROR
        } else {
            wire::RCODE_NXDOMAIN
        };
        if q.edns.is_some() {
            wire::push_opt(out);
        }
        wire::finish(out, rcode, tc, an, ns, u16::from(q.edns.is_some()));
    }
}

/// The label for a task ID, if it can be one (see the module doc).
fn task_label(id: &str) -> Option<String> {
    let id = id.to_ascii_lowercase();
    let id = if id.len() == 64 && id.bytes().all(|c| c.is_ascii_hexdigit()) {
        id[..12].to_string()
    } else {
        id
    };
    let valid = !id.is_empty()
        && id.len() <= 63
        && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    valid.then_some(id)
}

/// `label` + `.` + `rest` (wire format, `rest` relative or absolute).
fn prefixed(label: &str, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len() + 1 + rest.len());
    out.push(label.len() as u8);
    out.extend(label.bytes().map(|c| c.to_ascii_lowercase()));
    out.extend_from_slice(rest);
    out
}

/// Collects rdata per (absolute name, type) in insertion order, then encodes.
struct Builder {
    zone: Vec<u8>,
    ttl: u32,
    /// Absolute names (in zone, or PTR names) → (type, rdata) in insertion order.
    names: BTreeMap<Vec<u8>, Vec<(u16, Vec<u8>)>>,
}

impl Builder {
    fn new(zone: &[u8], ttl: u32) -> Self {
        Builder {
            zone: zone.to_vec(),
            ttl,
            names: BTreeMap::new(),
        }
    }

    /// A service name as wire labels relative to the zone (no root byte).
    fn relative(&self, name: &str) -> Option<Vec<u8>> {
        let mut w = wire::name_to_wire(name.strip_suffix('.').unwrap_or(name))?;
        w.pop();
        // Room for `_65535._tcp.` / `tasks.` / a 63-byte task label in front, plus the zone.
        (!w.is_empty() && w.len() + self.zone.len() + 64 <= 255).then_some(w)
    }

    fn abs(&self, rel: &[u8]) -> Vec<u8> {
        [rel, &self.zone].concat()
    }

    /// Make the name exist (NODATA rather than NXDOMAIN for types it lacks).
    fn touch(&mut self, rel: &[u8]) {
        let abs = self.abs(rel);
        self.names.entry(abs).or_default();
    }

    fn add(&mut self, abs: Vec<u8>, rtype: u16, rdata: Vec<u8>) {
        let set = self.names.entry(abs).or_default();
        // Identical records in one RRset are not allowed (two endpoints on one IP).
        if !set.iter().any(|(t, d)| *t == rtype && *d == rdata) {
            set.push((rtype, rdata));
        }
    }

    fn addr(&mut self, rel: &[u8], ip: IpAddr) {
        let abs = self.abs(rel);
        match ip {
            IpAddr::V4(v4) => self.add(abs, wire::TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => self.add(abs, wire::TYPE_AAAA, v6.octets().to_vec()),
        }
    }

    fn srv(&mut self, rel: &[u8], weight: u16, port: u16, target_rel: &[u8]) {
        let mut rdata = Vec::with_capacity(6 + target_rel.len() + self.zone.len());
        rdata.extend_from_slice(&0u16.to_be_bytes()); // priority: all equal
        rdata.extend_from_slice(&weight.to_be_bytes());
        rdata.extend_from_slice(&port.to_be_bytes());
        rdata.extend_from_slice(&self.abs(target_rel));
        let abs = self.abs(rel);
        self.add(abs, wire::TYPE_SRV, rdata);
    }

    fn ptr(&mut self, ip: IpAddr, target_rel: &[u8]) {
        let text = match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
            }
            IpAddr::V6(v6) => {
                let mut s = String::with_capacity(73);
                for byte in v6.octets().iter().rev() {
                    s.push_str(&format!("{:x}.{:x}.", byte & 0x0f, byte >> 4));
                }
                s + "ip6.arpa."
            }
        };
        let name = wire::name_to_wire(&text).expect("reverse names are valid");
        let target = self.abs(target_rel);
        self.add(name, wire::TYPE_PTR, target);
    }

    fn soa_rdata(&self, serial: u32, ttl: u32) -> Vec<u8> {
        let mut rdata = self.zone.clone(); // MNAME: the zone itself (no zone transfers)
        rdata.extend_from_slice(&[b"\x0ahostmaster".as_slice(), &self.zone].concat());
        // serial, refresh, retry, expire, minimum (= negative-caching TTL = answer TTL).
        for v in [serial, 60, 10, 3600, ttl] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        rdata
    }

    fn finish(mut self) -> DnsRecords {
        // Empty non-terminals (`_tcp.web.`, the apex) exist: NODATA, not NXDOMAIN.
        let in_zone: Vec<Vec<u8>> = self
            .names
            .keys()
            .filter(|n| wire::in_zone(n, &self.zone))
            .cloned()
            .collect();
        for name in &in_zone {
            let mut pos = 0;
            while name.len() - pos > self.zone.len() {
                pos += name[pos] as usize + 1;
                self.names.entry(name[pos..].to_vec()).or_default();
            }
        }
        // The serial changes whenever the content does (clients never transfer the zone; this
        // only helps an operator see that two nodes serve the same data).
        let mut digest = Vec::new();
        for (name, sets) in &self.names {
            digest.extend_from_slice(name);
            for (t, d) in sets {
                digest.extend_from_slice(&t.to_be_bytes());
                digest.extend_from_slice(d);
            }
        }
        let serial = fnv32(&digest);
        let soa_rdata = self.soa_rdata(serial, self.ttl);
        let zone = self.zone.clone();
        self.add(zone.clone(), wire::TYPE_SOA, soa_rdata.clone());
        let mut soa = zone.clone();
        push_rr_tail(&mut soa, wire::TYPE_SOA, self.ttl, &soa_rdata);

        let mut names = HashMap::with_capacity(self.names.len() * 2);
        let mut entries = Vec::with_capacity(self.names.len());
        for (name, records) in std::mem::take(&mut self.names) {
            let index = entries.len() as u32;
            entries.push(encode_sets(records, self.ttl));
            if wire::in_zone(&name, &zone) && name.len() > zone.len() {
                let mut bare = name[..name.len() - zone.len()].to_vec();
                bare.push(0);
                // A real name always wins over another name's bare alias.
                names.entry(bare.into_boxed_slice()).or_insert(index);
            }
            names.insert(name.into_boxed_slice(), index);
        }
        DnsRecords {
            zone: zone.into_boxed_slice(),
            soa: soa.into_boxed_slice(),
            names,
            entries,
        }
    }
}

fn encode_sets(records: Vec<(u16, Vec<u8>)>, ttl: u32) -> Box<[RrSet]> {
    let mut by_type: BTreeMap<u16, RrSet> = BTreeMap::new();
    let mut building: BTreeMap<u16, (Vec<u8>, Vec<u32>)> = BTreeMap::new();
    for (rtype, rdata) in records {
        let (bytes, starts) = building.entry(rtype).or_default();
        starts.push(bytes.len() as u32);
        bytes.extend_from_slice(&[0xc0, 0x0c]);
        push_rr_tail(bytes, rtype, ttl, &rdata);
    }
    for (rtype, (bytes, starts)) in building {
        by_type.insert(
            rtype,
            RrSet {
                rtype,
                bytes: bytes.into_boxed_slice(),
                starts: starts.into_boxed_slice(),
                rotate: AtomicUsize::new(0),
            },
        );
    }
    by_type.into_values().collect()
}

/// type, class IN, ttl, rdlength, rdata (everything after the owner name).
fn push_rr_tail(out: &mut Vec<u8>, rtype: u16, ttl: u32, rdata: &[u8]) {
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&wire::CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
}

fn fnv32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}
