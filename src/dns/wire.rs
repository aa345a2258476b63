//! DNS wire format pieces the hot path needs: parse a query's header and question, and write
//! a response around precomputed records.
//!
//! Why by hand and not through `hickory_proto::op::Message`: a query is answered by copying its
//! question and splicing in record bytes built at table-build time, so per query there is no
//! `Message`, no `Record`, no allocation and no name compression pass. hickory-proto is still
//! what the tests and the benchmark decode responses with.

/// Header length.
pub const HEADER: usize = 12;
pub const TYPE_A: u16 = 1;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;

/// UDP payload size without EDNS (RFC 1035).
pub const UDP_CLASSIC: usize = 512;
/// Largest UDP payload we send even if the client offers more: the DNS flag day 2020 value,
/// which avoids IP fragmentation on common paths.
pub const UDP_EDNS_MAX: usize = 1232;

/// A name as DNS wire labels (`\x03web\x08meshgate\x00`), lowercased. None if a label is empty
/// or longer than 63 bytes, or the name is longer than 255 bytes. `""` and `"."` are the root.
pub fn name_to_wire(name: &str) -> Option<Vec<u8>> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let mut out = Vec::with_capacity(trimmed.len() + 2);
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() || label.len() > 63 || !label.is_ascii() {
                return None;
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= 255).then_some(out)
}

/// The parsed parts of a query that decide its answer.
#[derive(Debug, Clone, Copy)]
pub struct Question<'q> {
    /// The question bytes as received (name, type, class): copied into the response so the
    /// client's letter case (0x20 randomisation) survives.
    pub raw: &'q [u8],
    pub qtype: u16,
    pub qclass: u16,
    /// Client's EDNS payload size, if it sent an OPT record.
    pub edns: Option<u16>,
}

/// Why a query could not be answered normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Shorter than a header, or a response: drop silently (answering could start a loop).
    Drop,
    /// Header readable, rest not: answer with this rcode.
    Rcode(u8),
}

/// Parse header + question; write the lowercased name into `lower` and return its length.
pub fn parse_query<'q>(
    q: &'q [u8],
    lower: &mut [u8; 255],
) -> Result<(Question<'q>, usize), Reject> {
    if q.len() < HEADER || q[2] & 0x80 != 0 {
        return Err(Reject::Drop);
    }
    let opcode = (q[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Err(Reject::Rcode(RCODE_NOTIMP));
    }
    let count = |i: usize| u16::from_be_bytes([q[i], q[i + 1]]);
    if count(4) != 1 {
        return Err(Reject::Rcode(RCODE_FORMERR));
    }
    let formerr = Reject::Rcode(RCODE_FORMERR);
    let mut pos = HEADER;
    let mut n = 0usize;
    loop {
        let len = *q.get(pos).ok_or(formerr)? as usize;
        // Compression pointers and extended label types have no place in a question.
        if len & 0xc0 != 0 {
            return Err(formerr);
        }
        if n + len + 1 > 255 {
            return Err(formerr);
        }
        let label = q.get(pos..pos + 1 + len).ok_or(formerr)?;
        lower[n] = len as u8;
        for (dst, src) in lower[n + 1..n + 1 + len].iter_mut().zip(&label[1..]) {
            *dst = src.to_ascii_lowercase();
        }
        n += len + 1;
        pos += len + 1;
        if len == 0 {
            break;
        }
    }
    let tail = q.get(pos..pos + 4).ok_or(formerr)?;
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let qclass = u16::from_be_bytes([tail[2], tail[3]]);
    let raw = &q[HEADER..pos + 4];
    pos += 4;
    // EDNS: only the common shape (no answer/authority records, OPT first in additional).
    let mut edns = None;
    if count(6) == 0 && count(8) == 0 && count(10) >= 1 {
        let opt = q.get(pos..pos + 11).ok_or(formerr)?;
        if opt[0] == 0 && u16::from_be_bytes([opt[1], opt[2]]) == TYPE_OPT {
            edns = Some(u16::from_be_bytes([opt[3], opt[4]]));
        }
    }
    Ok((
        Question {
            raw,
            qtype,
            qclass,
            edns,
        },
        n,
    ))
}

/// Largest response for a query over UDP.
pub fn udp_limit(edns: Option<u16>) -> usize {
    match edns {
        Some(size) => (size as usize).clamp(UDP_CLASSIC, UDP_EDNS_MAX),
        None => UDP_CLASSIC,
    }
}

/// Start a response in `out`: header (counts zero, filled by [`finish`]) and the question.
pub fn begin(out: &mut Vec<u8>, query: &[u8], question: Option<&Question<'_>>, aa: bool, ra: bool) {
    out.clear();
    out.extend_from_slice(&query[0..2]);
    // QR, opcode copied, AA, RD copied.
    out.push(0x80 | (query[2] & 0x78) | if aa { 0x04 } else { 0 } | (query[2] & 0x01));
    out.push(if ra { 0x80 } else { 0 });
    out.extend_from_slice(&[0; 8]);
    if let Some(q) = question {
        out[5] = 1;
        out.extend_from_slice(q.raw);
    }
}

/// Set rcode, TC and section counts.
pub fn finish(out: &mut [u8], rcode: u8, tc: bool, an: u16, ns: u16, ar: u16) {
    if tc {
        out[2] |= 0x02;
    }
    out[3] = (out[3] & 0xf0) | (rcode & 0x0f);
    out[6..8].copy_from_slice(&an.to_be_bytes());
    out[8..10].copy_from_slice(&ns.to_be_bytes());
    out[10..12].copy_from_slice(&ar.to_be_bytes());
}

/// Our OPT record: root owner, our payload size, version 0, no options.
pub fn push_opt(out: &mut Vec<u8>) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&(UDP_EDNS_MAX as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
}

/// A bare error response (rcode only), echoing the question when there is one.
pub fn error_response(
    out: &mut Vec<u8>,
    query: &[u8],
    question: Option<&Question<'_>>,
    rcode: u8,
    ra: bool,
) {
    begin(out, query, question, false, ra);
    let opt = question.is_some_and(|q| q.edns.is_some());
    if opt {
        push_opt(out);
    }
    finish(out, rcode, false, 0, 0, u16::from(opt));
}

/// Whether `name` (lowercase wire) is `zone` or below it, on a label boundary.
pub fn in_zone(name: &[u8], zone: &[u8]) -> bool {
    let mut pos = 0;
    while pos < name.len() {
        if name.len() - pos == zone.len() {
            return &name[pos..] == zone;
        }
        if name.len() - pos < zone.len() {
            return false;
        }
        pos += name[pos] as usize + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            name_to_wire("Web.Meshgate.").unwrap(),
            b"\x03web\x08meshgate\x00"
        );
        assert_eq!(name_to_wire("meshgate").unwrap(), b"\x08meshgate\x00");
        assert_eq!(name_to_wire(".").unwrap(), b"\x00");
        assert!(name_to_wire("a..b").is_none());
        assert!(name_to_wire(&"x".repeat(64)).is_none());
    }

    #[test]
    fn zone_membership() {
        let zone = name_to_wire("meshgate.").unwrap();
        assert!(in_zone(&name_to_wire("web.meshgate").unwrap(), &zone));
        assert!(in_zone(&zone, &zone));
        assert!(!in_zone(&name_to_wire("xmeshgate").unwrap(), &zone));
        assert!(!in_zone(&name_to_wire("meshgate.com").unwrap(), &zone));
        assert!(!in_zone(&name_to_wire(".").unwrap(), &zone));
    }
}
