//! Router rules: the Traefik-style rule language, parsed once on the control path into a [`Rule`]
//! tree that matches a request without allocating.
//!
//! Grammar (whitespace between tokens is free; strings in backticks or double quotes):
//! ```text
//! expr    := and ( "||" and )*
//! and     := unary ( "&&" unary )*
//! unary   := "!" unary | "(" expr ")" | matcher
//! matcher := Host(s, ...) | HostSNI(s, ...) | Path(s, ...) | PathPrefix(s, ...)
//!          | Method(s, ...) | Header(name, value)
//! ```
//! `Host` and `HostSNI` compare case-insensitively and accept `*.example.com` (exactly one more
//! label, as in certificates); `HostSNI(`*`)` matches any name. `PathPrefix` is a plain string
//! prefix (Traefik's semantics: `/api` matches `/api`, `/api/x` and `/apix`).

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// A host pattern of `Host` / `HostSNI`, lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(Box<str>),
    /// `*.parent`: stores `parent`.
    Wildcard(Box<str>),
    /// `HostSNI(`*`)`.
    Any,
}

impl HostPattern {
    fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase();
        if t == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(parent) = t.strip_prefix("*.") {
            if parent.is_empty() || parent.contains('*') {
                return Err(format!("bad wildcard host {text:?}"));
            }
            return Ok(HostPattern::Wildcard(parent.into()));
        }
        if t.is_empty() || t.contains('*') || t.contains('/') {
            return Err(format!(
                "bad host {text:?} (wildcards only as a leading `*.`)"
            ));
        }
        Ok(HostPattern::Exact(t.into()))
    }

    /// `host` must already be lowercase and without a port.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => **h == *host,
            HostPattern::Wildcard(parent) => parent_domain(host) == Some(&**parent),
            HostPattern::Any => true,
        }
    }
}

/// `a.b.c` → `b.c`; `None` for a single label.
pub fn parent_domain(host: &str) -> Option<&str> {
    let dot = host.find('.')?;
    if dot == 0 {
        return None;
    }
    Some(&host[dot + 1..])
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub enum Rule {
    And(Box<Rule>, Box<Rule>),
    Or(Box<Rule>, Box<Rule>),
    Not(Box<Rule>),
    Host(Box<[HostPattern]>),
    HostSni(Box<[HostPattern]>),
    Path(Box<[Box<str>]>),
    PathPrefix(Box<[Box<str>]>),
    Method(Box<[Method]>),
    Header(HeaderName, HeaderValue),
}

/// What a rule sees of a request. `host` is lowercase without port (or the SNI name).
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: Option<&'a HeaderMap>,
}

impl Rule {
    pub fn parse(text: &str) -> Result<Rule, String> {
        let mut p = Parser { s: text, pos: 0 };
        let rule = p.or()?;
        p.skip_ws();
        if p.pos != p.s.len() {
            return Err(format!(
                "unexpected {:?} at offset {}",
                &p.s[p.pos..],
                p.pos
            ));
        }
        Ok(rule)
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        match self {
            Rule::And(a, b) => a.matches(req) && b.matches(req),
            Rule::Or(a, b) => a.matches(req) || b.matches(req),
            Rule::Not(a) => !a.matches(req),
            Rule::Host(hosts) | Rule::HostSni(hosts) => hosts.iter().any(|h| h.matches(req.host)),
            Rule::Path(paths) => paths.iter().any(|p| **p == *req.path),
            Rule::PathPrefix(paths) => paths.iter().any(|p| req.path.starts_with(&**p)),
            Rule::Method(methods) => methods.contains(req.method),
            Rule::Header(name, value) => req
                .headers
                .is_some_and(|h| h.get_all(name).iter().any(|v| v == value)),
        }
    }

    /// Does matching look at request headers (other than the host)?
    pub fn uses_headers(&self) -> bool {
        match self {
            Rule::And(a, b) | Rule::Or(a, b) => a.uses_headers() || b.uses_headers(),
            Rule::Not(a) => a.uses_headers(),
            Rule::Header(..) => true,
            _ => false,
        }
    }

    /// The hosts a request MUST have for this rule to match, or `None` if any host may match.
    /// Used to index routers by host; the full rule is still evaluated on every candidate.
    pub fn required_hosts(&self) -> Option<Vec<HostPattern>> {
        match self {
            Rule::Host(h) | Rule::HostSni(h) => {
                if h.contains(&HostPattern::Any) {
                    None
                } else {
                    Some(h.to_vec())
                }
            }
            // Either side's hosts are a necessary condition; the narrower one indexes best.
            Rule::And(a, b) => match (a.required_hosts(), b.required_hosts()) {
                (Some(x), Some(y)) => Some(if x.len() <= y.len() { x } else { y }),
                (x, y) => x.or(y),
            },
            Rule::Or(a, b) => {
                let mut x = a.required_hosts()?;
                x.extend(b.required_hosts()?);
                Some(x)
            }
            _ => None,
        }
    }

    /// Is this rule only `HostSNI(...)` joined by `||` (what a passthrough entrypoint can see)?
    pub fn is_sni_only(&self) -> bool {
        match self {
            Rule::HostSni(_) => true,
            Rule::Or(a, b) => a.is_sni_only() && b.is_sni_only(),
            _ => false,
        }
    }

    /// Does the rule use `HostSNI` anywhere (invalid on HTTP entrypoints)?
    pub fn uses_sni(&self) -> bool {
        match self {
            Rule::HostSni(_) => true,
            Rule::And(a, b) | Rule::Or(a, b) => a.uses_sni() || b.uses_sni(),
            Rule::Not(a) => a.uses_sni(),
            _ => false,
        }
    }
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.s[self.pos..].starts_with(char::is_whitespace) {
            self.pos += self.s[self.pos..].chars().next().map_or(1, char::len_utf8);
        }
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.skip_ws();
        if self.s[self.pos..].starts_with(tok) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Rule, String> {
        let mut left = self.and()?;
        while self.eat("||") {
            let right = self.and()?;
            left = Rule::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Rule, String> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            let right = self.unary()?;
            left = Rule::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Rule, String> {
        if self.eat("!") {
            return Ok(Rule::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let inner = self.or()?;
            if !self.eat(")") {
                return Err(format!("missing `)` at offset {}", self.pos));
            }
            return Ok(inner);
        }
        self.matcher()
    }

    fn matcher(&mut self) -> Result<Rule, String> {
        self.skip_ws();
        let start = self.pos;
        let len = self.s[start..]
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(self.s.len() - start);
        let name = &self.s[start..start + len];
        if name.is_empty() {
            return Err(format!("expected a matcher at offset {start}"));
        }
        self.pos += len;
        if !self.eat("(") {
            return Err(format!("expected `(` after {name}"));
        }
        let mut args = Vec::new();
        loop {
            args.push(self.string()?);
            if self.eat(",") {
                continue;
            }
            if self.eat(")") {
                break;
            }
            return Err(format!(
                "expected `,` or `)` in {name}(...) at offset {}",
                self.pos
            ));
        }
        let strings = |args: Vec<String>| -> Box<[Box<str>]> {
            args.into_iter().map(String::into_boxed_str).collect()
        };
        let hosts = |args: &[String]| -> Result<Box<[HostPattern]>, String> {
            args.iter().map(|a| HostPattern::parse(a)).collect()
        };
        Ok(match name {
            "Host" => Rule::Host(hosts(&args)?),
            "HostSNI" => Rule::HostSni(hosts(&args)?),
            "Path" | "PathPrefix" => {
                if let Some(bad) = args.iter().find(|a| !a.starts_with('/')) {
                    return Err(format!("{name} argument {bad:?} must start with `/`"));
                }
                if name == "Path" {
                    Rule::Path(strings(args))
                } else {
                    Rule::PathPrefix(strings(args))
                }
            }
            "Method" => Rule::Method(
                args.iter()
                    .map(|m| {
                        Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                            .map_err(|_| format!("bad method {m:?}"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            "Header" => {
                let [n, v] = args.as_slice() else {
                    return Err("Header takes two arguments: name and value".into());
                };
                Rule::Header(
                    HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| format!("bad header name {n:?}"))?,
                    HeaderValue::from_str(v).map_err(|_| format!("bad header value {v:?}"))?,
                )
            }
            other => {
                return Err(format!(
                    "unknown matcher {other:?} (Host, HostSNI, Path, PathPrefix, Method, Header)"
                ))
            }
        })
    }

    fn string(&mut self) -> Result<String, String> {
        self.skip_ws();
        let rest = &self.s[self.pos..];
        let quote = match rest.chars().next() {
            Some(q @ ('`' | '"')) => q,
            _ => return Err(format!("expected a `quoted` string at offset {}", self.pos)),
        };
        let end = rest[1..]
            .find(quote)
            .ok_or_else(|| format!("unterminated string at offset {}", self.pos))?;
        let value = rest[1..1 + end].to_string();
        self.pos += end + 2;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(host: &'a str, path: &'a str, method: &'a Method) -> RequestView<'a> {
        RequestView {
            host,
            path,
            method,
            headers: None,
        }
    }

    #[test]
    fn parses_and_matches() {
        let r = Rule::parse("Host(`a.example`) && (PathPrefix(`/api`) || Method(`POST`))").unwrap();
        assert!(r.matches(&view("a.example", "/api/x", &Method::GET)));
        assert!(r.matches(&view("a.example", "/", &Method::POST)));
        assert!(!r.matches(&view("a.example", "/", &Method::GET)));
        assert!(!r.matches(&view("b.example", "/api", &Method::GET)));
        let n = Rule::parse("!PathPrefix(`/admin`)").unwrap();
        assert!(!n.matches(&view("x", "/admin/1", &Method::GET)));
        assert!(n.matches(&view("x", "/", &Method::GET)));
    }

    #[test]
    fn wildcard_hosts_take_one_label() {
        let r = Rule::parse("Host(`*.Example.com`)").unwrap();
        assert!(r.matches(&view("a.example.com", "/", &Method::GET)));
        assert!(!r.matches(&view("example.com", "/", &Method::GET)));
        assert!(!r.matches(&view("a.b.example.com", "/", &Method::GET)));
    }

    #[test]
    fn header_matcher() {
        let r = Rule::parse("Header(`X-Env`, `canary`)").unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-env", HeaderValue::from_static("canary"));
        let mut v = view("x", "/", &Method::GET);
        assert!(!r.matches(&v));
        v.headers = Some(&h);
        assert!(r.matches(&v));
    }

    #[test]
    fn required_hosts() {
        let r = Rule::parse("Host(`a`) && PathPrefix(`/x`)").unwrap();
        assert_eq!(r.required_hosts().unwrap().len(), 1);
        let r = Rule::parse("Host(`a`) || PathPrefix(`/x`)").unwrap();
        assert!(r.required_hosts().is_none());
        let r = Rule::parse("Host(`a`) || Host(`*.b`)").unwrap();
        assert_eq!(r.required_hosts().unwrap().len(), 2);
        let r = Rule::parse("!Host(`a`)").unwrap();
        assert!(r.required_hosts().is_none());
    }

    #[test]
    fn errors_name_the_problem() {
        for bad in [
            "Host(`a`",
            "Hots(`a`)",
            "Path(`x`)",
            "Host(`a`) &&",
            "Header(`a`)",
            "Host(`a.*.b`)",
            "Host(`a`) Host(`b`)",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad} should fail");
        }
    }

    proptest::proptest! {
        /// The parser never panics, whatever the input.
        #[test]
        fn parser_total(s in ".{0,64}") {
            let _ = Rule::parse(&s);
        }

        /// `required_hosts` is a necessary condition: if a rule matches, the host is in the set.
        #[test]
        fn index_is_sound(host in "[a-c]{1,2}(\\.[a-c]{1,2}){0,2}", path in "/[a-c]{0,3}") {
            let rules = [
                "Host(`a`) && PathPrefix(`/a`)",
                "Host(`*.a`) || Host(`b.b`)",
                "(Host(`a.a`) || Host(`c`)) && !Path(`/b`)",
                "PathPrefix(`/`) && Host(`*.b.c`)",
            ];
            for text in rules {
                let r = Rule::parse(text).unwrap();
                let v = view(&host, &path, &Method::GET);
                if r.matches(&v) {
                    let hosts = r.required_hosts().unwrap();
                    proptest::prop_assert!(hosts.iter().any(|h| h.matches(&host)));
                }
            }
        }
    }
}
