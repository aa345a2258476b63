//! TLS termination: the certificate store chosen by SNI, its reload, and the rustls configs
//! (ring provider only).
//!
//! Certificates come from PEM file pairs ([`CertFiles`]); the names each one serves are read
//! from its SAN DNS names. The resolver reads an `ArcSwap` snapshot per handshake (no lock);
//! a poll task compares file mtimes and sizes and swaps in a new snapshot. A file that fails to
//! load keeps the previous certificate and logs a warning.

use std::collections::HashMap;
use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

/// A certificate chain and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The ring crypto provider, the only one meshgate builds with.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate snapshot a handshake reads.
#[derive(Debug, Default)]
struct CertMap {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.parent` certificates by `parent`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For clients without SNI or with an unknown name: the configured default, else the first.
    default: Option<Arc<CertifiedKey>>,
}

/// One loaded file pair and the file stamps it was loaded from.
#[derive(Debug)]
struct Loaded {
    files: CertFiles,
    stamp: Option<(FileStamp, FileStamp)>,
    key: Option<(Arc<CertifiedKey>, Vec<String>)>,
}

type FileStamp = (SystemTime, u64);

/// SNI certificate store: a [`ResolvesServerCert`] over a reloadable snapshot.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertMap>,
    /// Control side only (load and reload), never touched by a handshake.
    loaded: Mutex<(Vec<Loaded>, Option<usize>)>,
}

impl CertStore {
    /// A store over `files`; `default` names the entry served without SNI (index into `files`).
    pub fn new(files: Vec<CertFiles>, default: Option<usize>) -> CertStore {
        let store = CertStore {
            current: ArcSwap::from_pointee(CertMap::default()),
            loaded: Mutex::new((
                files
                    .into_iter()
                    .map(|files| Loaded {
                        files,
                        stamp: None,
                        key: None,
                    })
                    .collect(),
                default,
            )),
        };
        store.reload();
        store
    }

    /// Reload changed files; returns whether the snapshot changed.
    pub fn reload(&self) -> bool {
        let mut guard = self.loaded.lock().expect("cert store poisoned");
        let (entries, default) = &mut *guard;
        let mut changed = false;
        for entry in entries.iter_mut() {
            let stamp = stamp(&entry.files.cert).zip(stamp(&entry.files.key));
            if stamp.is_some() && stamp == entry.stamp {
                continue;
            }
            match load(&entry.files) {
                Ok(loaded) => {
                    tracing::info!(cert = %entry.files.cert.display(), names = ?loaded.1, "certificate loaded");
                    entry.key = Some(loaded);
                    entry.stamp = stamp;
                    changed = true;
                }
                Err(e) => {
                    // Remember the stamp so a bad file is reported once, not on every poll.
                    if entry.stamp != stamp {
                        tracing::warn!(cert = %entry.files.cert.display(), error = %e, "certificate not loaded; keeping the previous one");
                    }
                    entry.stamp = stamp;
                }
            }
        }
        if changed {
            let mut map = CertMap::default();
            for entry in entries.iter() {
                let Some((key, names)) = &entry.key else {
                    continue;
                };
                for name in names {
                    let name = name.to_ascii_lowercase();
                    match name.strip_prefix("*.") {
                        Some(parent) => map.wildcard.entry(parent.to_string()),
                        None => map.exact.entry(name),
                    }
                    .or_insert_with(|| Arc::clone(key));
                }
                if map.default.is_none() {
                    map.default = Some(Arc::clone(key));
                }
            }
            if let Some((key, _)) = default.and_then(|i| entries.get(i)?.key.as_ref()) {
                map.default = Some(Arc::clone(key));
            }
            self.current.store(Arc::new(map));
        }
        changed
    }

    fn lookup(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let map = self.current.load();
        if let Some(name) = name {
            let mut buf = [0u8; 256];
            if let Some(lower) = super::lowercase(name, &mut buf) {
                if let Some(k) = map.exact.get(lower) {
                    return Some(Arc::clone(k));
                }
                if let Some(k) = super::rule::parent_domain(lower).and_then(|p| map.wildcard.get(p))
                {
                    return Some(Arc::clone(k));
                }
            }
        }
        map.default.clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name())
    }
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn load(files: &CertFiles) -> Result<(Arc<CertifiedKey>, Vec<String>), String> {
    let chain = read_certs(&files.cert)?;
    let key_file =
        fs::File::open(&files.key).map_err(|e| format!("{}: {e}", files.key.display()))?;
    let key = rustls_pemfile::private_key(&mut BufReader::new(key_file))
        .map_err(|e| format!("{}: {e}", files.key.display()))?
        .ok_or_else(|| format!("{}: no PEM private key", files.key.display()))?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: {e}", files.key.display()))?;
    let names = {
        let ee = webpki::EndEntityCert::try_from(&chain[0])
            .map_err(|e| format!("{}: {e:?}", files.cert.display()))?;
        ee.valid_dns_names().map(str::to_string).collect::<Vec<_>>()
    };
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not match {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    Ok((Arc::new(certified), names))
}

/// Server config for an `https` entrypoint: TLS 1.3 and 1.2, ALPN h2 then http/1.1.
pub fn server_config(
    certs: Arc<CertStore>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// mTLS: client certificates must chain to a CA in `ca_file`.
pub fn client_verifier(ca_file: &Path) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("{}: {e}", ca_file.display()))
}

/// Client config towards `https` upstreams: the system CA bundle (if present) plus `extra_ca`.
pub fn upstream_client_config(
    extra_ca: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for bundle in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ] {
        if let Ok(certs) = read_certs(Path::new(bundle)) {
            roots.add_parsable_certificates(certs);
            break;
        }
    }
    if let Some(ca) = extra_ca {
        for cert in read_certs(ca)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
