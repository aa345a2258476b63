//! HTTP/1.1 message framing shared by meshgate's own HTTP/1 code ([`super::fast1`], the
//! byte-level proxy, and [`super::h1client`], the upstream client of hyper-served requests):
//! how a body is delimited, a chunked-coding scanner that can also decode, and small
//! header-token helpers over raw bytes.

use std::mem::MaybeUninit;

use bytes::BytesMut;

/// Largest chunk-size line extension or trailer section accepted.
pub(crate) const MAX_CHUNK_META: usize = 8 * 1024;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Follows chunked framing (RFC 9112 §7.1) over bytes passed through unchanged, to find where
/// the message ends.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
    meta: usize,
    done: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    EndLf,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadChunk;

/// What [`Chunked::decode`] took out of a chunked body.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub data: BytesMut,
    /// The raw trailer section (`name: value\r\n` lines), empty when there is none.
    pub trailers: Vec<u8>,
}

impl Chunked {
    /// Scan the next bytes of the body: `Some(n)` when the message ends after `n` of them,
    /// `None` when all belong to it and more are needed.
    pub(crate) fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, BadChunk> {
        self.scan_into(data, None)
    }

    /// [`Chunked::scan`] that also decodes: chunk data is appended to `out.data`, trailer
    /// lines (with their CRLFs) to `out.trailers`.
    pub(crate) fn decode(
        &mut self,
        data: &[u8],
        out: &mut Decoded,
    ) -> Result<Option<usize>, BadChunk> {
        self.scan_into(data, Some(out))
    }

    #[inline]
    fn scan_into(
        &mut self,
        data: &[u8],
        mut out: Option<&mut Decoded>,
    ) -> Result<Option<usize>, BadChunk> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                Size => match (b as char).to_digit(16) {
                    Some(v) => {
                        if self.digits >= 15 {
                            return Err(BadChunk);
                        }
                        self.size = self.size * 16 + u64::from(v);
                        self.digits += 1;
                    }
                    None if self.digits == 0 => return Err(BadChunk),
                    None => match b {
                        b';' | b' ' | b'\t' => self.state = Ext,
                        b'\r' => self.state = SizeLf,
                        _ => return Err(BadChunk),
                    },
                },
                Ext => match b {
                    b'\r' => self.state = SizeLf,
                    b'\n' => return Err(BadChunk),
                    _ => self.meta_byte()?,
                },
                SizeLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                Data => {
                    let take = self.size.min((data.len() - i) as u64);
                    if let Some(o) = out.as_deref_mut() {
                        o.data.extend_from_slice(&data[i..i + take as usize]);
                    }
                    self.size -= take;
                    i += take as usize;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(BadChunk);
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.state = Size;
                    self.digits = 0;
                }
                TrailerStart => {
                    if b == b'\r' {
                        self.state = EndLf;
                    } else {
                        self.meta_byte()?;
                        if let Some(o) = out.as_deref_mut() {
                            o.trailers.push(b);
                        }
                        self.state = TrailerLine;
                    }
                }
                TrailerLine => {
                    self.meta_byte()?;
                    if let Some(o) = out.as_deref_mut() {
                        o.trailers.push(b);
                    }
                    if b == b'\n' {
                        self.state = TrailerStart;
                    }
                }
                EndLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.done = true;
                    return Ok(Some(i + 1));
                }
            }
            i += 1;
        }
        Ok(None)
    }

    /// The last chunk and the trailer section have been seen.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    fn meta_byte(&mut self) -> Result<(), BadChunk> {
        self.meta += 1;
        if self.meta > MAX_CHUNK_META {
            return Err(BadChunk);
        }
        Ok(())
    }
}

/// The framing headers of a response head (`Content-Length`, `Transfer-Encoding`), noted one
/// header at a time, and the framing they give (RFC 9112 §6.3).
#[derive(Debug, Default)]
pub(crate) struct ResponseFraming {
    length: Option<u64>,
    chunked: bool,
    coded: bool,
}

impl ResponseFraming {
    /// Note one header; `Err` when it makes the head invalid (a bad or conflicting length).
    /// `Ok(true)` for a framing header.
    pub(crate) fn note(&mut self, name: &str, value: &[u8]) -> Result<bool, BadFraming> {
        match name.len() {
            14 if eq(name, "content-length") => match (parse_len(value), self.length) {
                (Some(n), None) => self.length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Err(BadFraming),
            },
            17 if eq(name, "transfer-encoding") => {
                self.coded = true;
                self.chunked = tokens(value)
                    .last()
                    .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Both a length and a transfer coding: the coding wins, the length must not be passed on.
    pub(crate) fn length_overridden(&self) -> bool {
        self.coded && self.length.is_some()
    }

    /// How the body of a response with `status` to a (HEAD or other) request is delimited.
    pub(crate) fn framing(&self, status: u16, head_request: bool) -> Framing {
        if (100..200).contains(&status) || head_request || status == 204 || status == 304 {
            Framing::Empty
        } else if self.chunked {
            Framing::Chunked
        } else if self.coded {
            Framing::UntilClose
        } else {
            self.length.map_or(Framing::UntilClose, Framing::Length)
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadFraming;

/// Tracks how much of a body has passed.
#[derive(Debug)]
pub(crate) enum BodyLeft {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl BodyLeft {
    pub(crate) fn new(f: Framing) -> Option<BodyLeft> {
        match f {
            Framing::Empty | Framing::Length(0) => None,
            Framing::Length(n) => Some(BodyLeft::Length(n)),
            Framing::Chunked => Some(BodyLeft::Chunked(Chunked::default())),
            Framing::UntilClose => Some(BodyLeft::UntilClose),
        }
    }

    /// How many of `data`'s bytes belong to the body, and whether the body ends there.
    pub(crate) fn take(&mut self, data: &[u8]) -> Result<(usize, bool), BadChunk> {
        match self {
            BodyLeft::Length(left) => {
                let n = (*left).min(data.len() as u64);
                *left -= n;
                Ok((n as usize, *left == 0))
            }
            BodyLeft::Chunked(c) => Ok(match c.scan(data)? {
                Some(n) => (n, true),
                None => (data.len(), false),
            }),
            BodyLeft::UntilClose => Ok((data.len(), false)),
        }
    }
}

/// Whether the header name `a` (an HTTP token: httparse checked it) is `b`, a lower-case name
/// (`a`-`z`, `0`-`9`, `-`), in any case.
///
/// Compared a word at a time with 0x20 set in every byte of `a`: that folds `A`-`Z` onto
/// `a`-`z` and leaves digits and `-` as they are; the only other bytes it turns into one of
/// `b`'s are control characters, which no token has. `eq_ignore_ascii_case` goes byte by byte
/// (~10 instructions a byte; callgrind h2: ~300 instructions per response head).
#[inline]
pub(crate) fn eq(a: &str, b: &str) -> bool {
    const F8: u64 = u64::from_le_bytes([0x20; 8]);
    const F4: u32 = u32::from_le_bytes([0x20; 4]);
    fn w8(s: &[u8], i: usize) -> u64 {
        u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"))
    }
    fn w4(s: &[u8], i: usize) -> u32 {
        u32::from_le_bytes(s[i..i + 4].try_into().expect("4 bytes"))
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    debug_assert!(b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-'));
    let n = b.len();
    if a.len() != n {
        return false;
    }
    match n {
        0..=3 => a.iter().zip(b).all(|(x, y)| x | 0x20 == *y),
        4..=7 => w4(a, 0) | F4 == w4(b, 0) && w4(a, n - 4) | F4 == w4(b, n - 4),
        _ => {
            let mut i = 0;
            while i + 8 < n {
                if w8(a, i) | F8 != w8(b, i) {
                    return false;
                }
                i += 8;
            }
            w8(a, n - 8) | F8 == w8(b, n - 8)
        }
    }
}

pub(crate) fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

pub(crate) fn parse_len(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Header slots for httparse, left uninitialized: it writes only the slots it fills (zeroing
/// 128 of them was 4 KiB of stores per head).
pub(crate) fn header_slots<'b, const N: usize>() -> [MaybeUninit<httparse::Header<'b>>; N] {
    [const { MaybeUninit::uninit() }; N]
}

/// Parse a response head at the start of `data` into uninitialized `slots`.
pub(crate) fn parse_response_head<'h, 'b>(
    data: &'b [u8],
    slots: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> (httparse::Result<usize>, httparse::Response<'h, 'b>) {
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, data, slots);
    (parsed, resp)
}

/// Append `name: value\r\n`.
pub(crate) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `eq` against the byte-by-byte definition, for every token character at every position
    /// of names of each length class (2, 4–7, 8–16, longer).
    #[test]
    fn eq_is_case_insensitive_token_equality() {
        let token_chars: Vec<u8> = (0x21u8..0x7f)
            .filter(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c))
            .collect();
        for name in [
            "te",
            "date",
            "host",
            "server",
            "trailer",
            "connection",
            "content-type",
            "content-length",
            "proxy-connection",
            "x-forwarded-proto",
            "transfer-encoding",
            "access-control-allow-credentials",
            "x-b3-traceid",
        ] {
            let upper = name.to_ascii_uppercase();
            assert!(eq(name, name) && eq(&upper, name), "{name}");
            for at in 0..name.len() {
                for &c in &token_chars {
                    let mut a = name.as_bytes().to_vec();
                    a[at] = c;
                    let a = String::from_utf8(a).unwrap();
                    assert_eq!(eq(&a, name), a.eq_ignore_ascii_case(name), "{a} vs {name}");
                }
            }
            assert!(!eq(&name[1..], name) && !eq(&format!("{name}x"), name));
        }
    }

    const BODY: &[u8] =
        b"5;ext=\"x\"\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-t: 1\r\ny: 2\r\n\r\n";

    #[test]
    fn chunked_end_is_found_at_every_split() {
        for split in 0..=BODY.len() {
            let mut c = Chunked::default();
            let mut data = BODY.to_vec();
            data.extend_from_slice(b"NEXT");
            let first = c.scan(&data[..split]).unwrap();
            let end = match first {
                Some(n) => n,
                None => split + c.scan(&data[split..]).unwrap().expect("ends"),
            };
            assert_eq!(end, BODY.len(), "split at {split}");
        }
    }

    #[test]
    fn chunked_without_trailers_and_bad_input() {
        let mut c = Chunked::default();
        assert_eq!(c.scan(b"0\r\n\r\n"), Ok(Some(5)));
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello",
            b"fffffffffffffffff\r\n",
            b"\r\n",
        ] {
            assert_eq!(Chunked::default().scan(bad), Err(BadChunk), "{bad:?}");
        }
        let mut long = b"0\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_CHUNK_META + 1));
        assert_eq!(Chunked::default().scan(&long), Err(BadChunk));
    }

    #[test]
    fn chunked_decodes_data_and_trailers_at_every_split() {
        for split in 0..=BODY.len() {
            let mut c = Chunked::default();
            let mut out = Decoded::default();
            let end = match c.decode(&BODY[..split], &mut out).unwrap() {
                Some(n) => n,
                None => split + c.decode(&BODY[split..], &mut out).unwrap().expect("ends"),
            };
            assert_eq!(end, BODY.len());
            assert_eq!(&out.data[..], b"hello0123456789abcdef", "split at {split}");
            assert_eq!(&out.trailers[..], b"x-t: 1\r\ny: 2\r\n", "split at {split}");
        }
    }

    #[test]
    fn length_bodies_stop_at_their_end() {
        let mut b = BodyLeft::new(Framing::Length(5)).unwrap();
        assert_eq!(b.take(b"abc"), Ok((3, false)));
        assert_eq!(b.take(b"defGET"), Ok((2, true)));
        assert!(BodyLeft::new(Framing::Length(0)).is_none());
        assert!(BodyLeft::new(Framing::Empty).is_none());
    }
}
