//! The web configuration file (`--web-config`, config key `web_config`): TLS, client
//! certificates and basic auth in the format of Prometheus' exporter-toolkit (node_exporter's
//! `--web.config.file`), so one file and one set of habits serve every exporter of a node.
//!
//! Supported: `tls_server_config` (`cert_file`/`cert`, `key_file`/`key`, `client_ca_file`/
//! `client_ca`, `client_auth_type` `NoClientCert`, `VerifyClientCertIfGiven` or
//! `RequireAndVerifyClientCert`, `min_version`/`max_version` `TLS12`/`TLS13`,
//! `prefer_server_cipher_suites`), `http_server_config` (`headers`, and `http2`, accepted but
//! moot: the agent speaks HTTP/1.1) and `basic_auth_users` (bcrypt hashes). Keys of that format
//! that would change what is accepted here but are not implemented (`client_allowed_sans`,
//! `cipher_suites`, `curve_preferences`, `rate_limit`) are refused, never ignored. As in
//! exporter-toolkit, relative paths are relative to the file's directory, and the file (with the
//! certificates it names) is read again when it changes: new connections use the new version.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use axum::http::{HeaderName, HeaderValue};
use base64::Engine as _;
use rustls::{
    ServerConfig,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
    version::{TLS12, TLS13},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("reading web config {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("web config {path}")]
    Parse {
        path: PathBuf,
        source: yaml_serde::Error,
    },
    #[error("web config {path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("web config {path}: tls_server_config.{key} {file}")]
    File {
        path: PathBuf,
        key: &'static str,
        file: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("web config {path}: {key}")]
    Tls {
        path: PathBuf,
        key: &'static str,
        source: rustls::Error,
    },
}

/// The file as written. Unknown keys are errors, as with exporter-toolkit's strict parsing.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileText {
    tls_server_config: Option<TlsText>,
    http_server_config: HttpText,
    basic_auth_users: BTreeMap<String, String>,
    rate_limit: Option<yaml_serde::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TlsText {
    cert: String,
    key: String,
    client_ca: String,
    cert_file: String,
    key_file: String,
    client_auth_type: String,
    client_ca_file: String,
    client_allowed_sans: Option<yaml_serde::Value>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<yaml_serde::Value>,
    prefer_server_cipher_suites: Option<bool>,
    curve_preferences: Option<yaml_serde::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct HttpText {
    /// Accepted for compatibility; the agent serves HTTP/1.1 only.
    http2: Option<bool>,
    headers: BTreeMap<String, String>,
}

/// Response headers the file may set, with their allowed values (none: any value), as in
/// exporter-toolkit.
const EXTRA_HEADERS: &[(&str, &[&str])] = &[
    ("Strict-Transport-Security", &[]),
    ("X-Content-Type-Options", &["nosniff"]),
    ("X-Frame-Options", &["deny", "sameorigin"]),
    ("X-XSS-Protection", &[]),
    ("Content-Security-Policy", &[]),
];

/// How clients must identify themselves with a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    /// Verified against `client_ca_file` when the client sends one.
    VerifyIfGiven,
    /// Required and verified against `client_ca_file` (mTLS).
    Require,
}

/// A loaded, validated web config.
pub struct WebConfig {
    /// `None`: plain HTTP.
    pub tls: Option<Arc<ServerConfig>>,
    pub client_auth: ClientAuth,
    /// User → bcrypt hash; empty: no basic auth.
    users: BTreeMap<String, String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// SHA-256 of (user, hash, password) of credentials that passed bcrypt, so a scraper's
    /// repeated requests cost a hash lookup, not a bcrypt run (~100 ms at cost 10). Only
    /// successes are kept: wrong guesses can neither grow it nor evict a scraper's entry.
    verified: Mutex<HashSet<[u8; 32]>>,
    /// One bcrypt at a time (each is CPU-bound for tens of ms; exporter-toolkit does the same).
    bcrypt: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("client_auth", &self.client_auth)
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl WebConfig {
    /// Reads and validates `path`, and the certificate files it names.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        Ok(Self::load_with_files(path)?.0)
    }

    /// Also returns the files read (their changes trigger a reload).
    fn load_with_files(path: &Path) -> Result<(WebConfig, Vec<PathBuf>), WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: FileText = if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---"
        }) {
            // An empty file is valid (plain HTTP, no auth), as in exporter-toolkit.
            FileText::default()
        } else {
            yaml_serde::from_str(&text).map_err(|source| WebConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let invalid = |key: &str, reason: String| WebConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        if file.rate_limit.is_some() {
            return Err(invalid(
                "rate_limit",
                "not supported by allocwatch (the connection limits of its [http] config apply)"
                    .to_string(),
            ));
        }
        for (user, hash) in &file.basic_auth_users {
            let parts: bcrypt::HashParts = hash.parse().map_err(|e: bcrypt::BcryptError| {
                invalid(
                    &format!("basic_auth_users.{user}"),
                    format!("not a bcrypt hash ({e})"),
                )
            })?;
            if !(4..=31).contains(&parts.get_cost()) {
                return Err(invalid(
                    &format!("basic_auth_users.{user}"),
                    format!("bcrypt cost {} is outside 4..=31", parts.get_cost()),
                ));
            }
        }
        let mut headers = Vec::new();
        for (name, value) in &file.http_server_config.headers {
            let key = format!("http_server_config.headers.{name}");
            let Some((canonical, allowed)) = EXTRA_HEADERS
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
            else {
                let names: Vec<&str> = EXTRA_HEADERS.iter().map(|(n, _)| *n).collect();
                return Err(invalid(
                    &key,
                    format!("this header cannot be set (allowed: {})", names.join(", ")),
                ));
            };
            if !allowed.is_empty() && !allowed.contains(&value.as_str()) {
                return Err(invalid(
                    &key,
                    format!("{value:?} is not one of {}", allowed.join(", ")),
                ));
            }
            let value = HeaderValue::from_str(value)
                .map_err(|_| invalid(&key, format!("{value:?} is not a valid header value")))?;
            // From the table, so always a valid name (lower-cased by `from_bytes`).
            let name = HeaderName::from_bytes(canonical.as_bytes())
                .map_err(|_| invalid(&key, "not a header name".to_string()))?;
            headers.push((name, value));
        }
        let mut files = vec![path.to_path_buf()];
        let (tls, client_auth) = match &file.tls_server_config {
            Some(t) if t.is_enabled() => {
                let (tls, auth) = tls_config(path, dir, t, &mut files)?;
                (Some(Arc::new(tls)), auth)
            }
            _ => (None, ClientAuth::None),
        };
        Ok((
            WebConfig {
                tls,
                client_auth,
                users: file.basic_auth_users,
                headers,
                verified: Mutex::default(),
                bcrypt: tokio::sync::Mutex::default(),
            },
            files,
        ))
    }

    /// One line for the log: what this config turns on.
    pub fn summary(&self) -> String {
        let tls = match (&self.tls, self.client_auth) {
            (None, _) => "TLS off",
            (Some(_), ClientAuth::None) => "TLS on",
            (Some(_), ClientAuth::VerifyIfGiven) => "TLS on, client certificates verified if given",
            (Some(_), ClientAuth::Require) => "TLS on, client certificates required",
        };
        match self.users.len() {
            0 => format!("{tls}, no basic auth"),
            1 => format!("{tls}, basic auth (1 user)"),
            n => format!("{tls}, basic auth ({n} users)"),
        }
    }

    #[cfg(test)]
    pub fn needs_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Whether an `Authorization` header value carries valid basic-auth credentials (always
    /// true without `basic_auth_users`).
    pub async fn authorized(&self, header: Option<&HeaderValue>) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some((user, password)) = header.and_then(basic_credentials) else {
            return false;
        };
        let known = self.users.get(&user);
        // An unknown user is checked against some user's hash (and refused whatever the
        // result): the time of the answer does not tell which user names exist.
        let Some(hash) = known.or_else(|| self.users.values().next()).cloned() else {
            return false;
        };
        let key = cache_key(&user, &hash, &password);
        if known.is_some() && self.cached(&key) {
            return true;
        }
        let _one_at_a_time = self.bcrypt.lock().await;
        // Another request may have verified the same credentials meanwhile.
        if known.is_some() && self.cached(&key) {
            return true;
        }
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .is_ok_and(|r| r.unwrap_or(false))
            && known.is_some();
        if ok {
            self.verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key);
        }
        ok
    }

    fn cached(&self, key: &[u8; 32]) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }
}

impl TlsText {
    /// exporter-toolkit's rule: any TLS key turns TLS on (and then cert and key are required).
    fn is_enabled(&self) -> bool {
        [
            &self.cert,
            &self.key,
            &self.client_ca,
            &self.cert_file,
            &self.key_file,
            &self.client_auth_type,
            &self.client_ca_file,
        ]
        .iter()
        .any(|s| !s.is_empty())
    }
}

fn tls_config(
    path: &Path,
    dir: &Path,
    t: &TlsText,
    files: &mut Vec<PathBuf>,
) -> Result<(ServerConfig, ClientAuth), WebConfigError> {
    let invalid = |key: &str, reason: &str| WebConfigError::Invalid {
        path: path.to_path_buf(),
        key: format!("tls_server_config.{key}"),
        reason: reason.to_string(),
    };
    for (key, set, why) in [
        (
            "client_allowed_sans",
            t.client_allowed_sans.is_some(),
            "not supported by allocwatch: give the allowed clients a CA of their own",
        ),
        (
            "cipher_suites",
            t.cipher_suites.is_some(),
            "not supported by allocwatch (rustls offers only ECDHE with AEAD ciphers)",
        ),
        (
            "curve_preferences",
            t.curve_preferences.is_some(),
            "not supported by allocwatch (rustls' defaults: X25519, P-256, P-384)",
        ),
    ] {
        if set {
            return Err(invalid(key, why));
        }
    }
    let version = |key: &str, v: &Option<String>, default: u8| match v.as_deref() {
        None | Some("") => Ok(default),
        Some("TLS12") => Ok(12),
        Some("TLS13") => Ok(13),
        Some("TLS10" | "TLS11") => Err(invalid(key, "only TLS12 and TLS13 are supported")),
        Some(other) => Err(invalid(
            key,
            &format!("unknown TLS version {other:?} (expected TLS12 or TLS13)"),
        )),
    };
    let min = version("min_version", &t.min_version, 12)?;
    let max = version("max_version", &t.max_version, 13)?;
    if min > max {
        return Err(invalid("min_version", "is above max_version"));
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [(12, &TLS12), (13, &TLS13)]
        .into_iter()
        .filter(|(v, _)| (min..=max).contains(v))
        .map(|(_, p)| p)
        .collect();

    // The file or the inline PEM, never both (one of them would be silently ignored).
    let pem = |file_key: &'static str,
               file: &str,
               inline_key: &str,
               inline: &str,
               files: &mut Vec<PathBuf>|
     -> Result<Option<Pem>, WebConfigError> {
        match (file.is_empty(), inline.is_empty()) {
            (false, false) => Err(invalid(
                file_key,
                &format!("give {file_key} or {inline_key}, not both"),
            )),
            (false, true) => {
                let file = dir.join(file);
                files.push(file.clone());
                Ok(Some(Pem::File(file_key, file)))
            }
            (true, false) => Ok(Some(Pem::Inline(inline.to_string()))),
            (true, true) => Ok(None),
        }
    };
    let pem_error = |key: &'static str, file: PathBuf| {
        move |source| WebConfigError::File {
            path: path.to_path_buf(),
            key,
            file,
            source,
        }
    };
    let certs =
        |p: &Pem, key: &'static str| -> Result<Vec<CertificateDer<'static>>, WebConfigError> {
            let (certs, empty) = match p {
                Pem::File(k, f) => (
                    CertificateDer::pem_file_iter(f)
                        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                        .map_err(pem_error(k, f.clone()))?,
                    invalid(k, &format!("{} holds no PEM certificate", f.display())),
                ),
                Pem::Inline(text) => (
                    CertificateDer::pem_slice_iter(text.as_bytes())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| invalid(key, &format!("not a PEM certificate ({e})")))?,
                    invalid(key, "holds no PEM certificate"),
                ),
            };
            if certs.is_empty() {
                return Err(empty);
            }
            Ok(certs)
        };

    let cert = pem("cert_file", &t.cert_file, "cert", &t.cert, files)?
        .ok_or_else(|| invalid("cert_file", "missing (or cert): TLS needs a certificate"))?;
    let key = pem("key_file", &t.key_file, "key", &t.key, files)?
        .ok_or_else(|| invalid("key_file", "missing (or key): TLS needs a private key"))?;
    let ca = pem(
        "client_ca_file",
        &t.client_ca_file,
        "client_ca",
        &t.client_ca,
        files,
    )?;
    let chain = certs(&cert, "cert")?;
    let no_key = "holds no PEM private key";
    let key: PrivateKeyDer<'static> = match &key {
        Pem::File(k, f) => PrivateKeyDer::from_pem_file(f).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                invalid(k, &format!("{} {no_key}", f.display()))
            }
            e => pem_error(k, f.clone())(e),
        })?,
        Pem::Inline(text) => PrivateKeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| invalid("key", &format!("{no_key} ({e})")))?,
    };

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_auth = match t.client_auth_type.as_str() {
        "" | "NoClientCert" => ClientAuth::None,
        "VerifyClientCertIfGiven" => ClientAuth::VerifyIfGiven,
        "RequireAndVerifyClientCert" => ClientAuth::Require,
        "RequestClientCert" | "RequireAnyClientCert" | "RequireClientCert" => {
            return Err(invalid(
                "client_auth_type",
                &format!(
                    "{} accepts certificates without verifying them: not supported by \
                     allocwatch, use RequireAndVerifyClientCert",
                    t.client_auth_type
                ),
            ));
        }
        other => {
            return Err(invalid(
                "client_auth_type",
                &format!(
                    "unknown value {other:?} (expected NoClientCert, VerifyClientCertIfGiven \
                     or RequireAndVerifyClientCert)"
                ),
            ));
        }
    };
    let verifier: Option<Arc<dyn ClientCertVerifier>> = match (client_auth, &ca) {
        (ClientAuth::None, None) => None,
        (ClientAuth::None, Some(_)) => {
            return Err(invalid(
                "client_auth_type",
                "a client CA is configured without a client auth type (use \
                 RequireAndVerifyClientCert)",
            ));
        }
        (_, None) => {
            return Err(invalid(
                "client_ca_file",
                &format!("{} needs client_ca_file (or client_ca)", t.client_auth_type),
            ));
        }
        (auth, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca, "client_ca")? {
                roots.add(c).map_err(|source| WebConfigError::Tls {
                    path: path.to_path_buf(),
                    key: "tls_server_config.client_ca_file",
                    source,
                })?;
            }
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = if auth == ClientAuth::VerifyIfGiven {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            Some(builder.build().map_err(|e| {
                invalid(
                    "client_ca_file",
                    &format!("cannot verify clients with it ({e})"),
                )
            })?)
        }
    };
    let tls_error = |key: &'static str| {
        move |source| WebConfigError::Tls {
            path: path.to_path_buf(),
            key,
            source,
        }
    };
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(tls_error("tls_server_config.min_version"))?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(tls_error("tls_server_config.key_file"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.ignore_client_order = t.prefer_server_cipher_suites.unwrap_or(true);
    Ok((cfg, client_auth))
}

enum Pem {
    /// Key name and path.
    File(&'static str, PathBuf),
    Inline(String),
}

/// `Basic base64(user:password)` → (user, password); the scheme is case-insensitive.
fn basic_credentials(v: &HeaderValue) -> Option<(String, Vec<u8>)> {
    let v = v.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let colon = raw.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(raw[..colon].to_vec()).ok()?;
    Some((user, raw[colon + 1..].to_vec()))
}

fn cache_key(user: &str, hash: &str, password: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user.as_bytes(), hash.as_bytes(), password] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part);
    }
    let mut key = [0; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// What identifies a version of a file: a change of any of these means it was rewritten (or a
/// Kubernetes Secret volume swapped its symlink).
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The web config in force, read again when the file or a certificate it names changes.
pub struct WebConfigWatch {
    path: PathBuf,
    state: Mutex<Watched>,
}

struct Watched {
    current: Arc<WebConfig>,
    stamps: Vec<(PathBuf, Stamp)>,
}

impl WebConfigWatch {
    pub fn load(path: &Path) -> Result<WebConfigWatch, WebConfigError> {
        let (cfg, files) = WebConfig::load_with_files(path)?;
        Ok(WebConfigWatch {
            path: path.to_path_buf(),
            state: Mutex::new(Watched {
                current: Arc::new(cfg),
                stamps: stamps(files),
            }),
        })
    }

    /// The config for a new connection. A few `stat` calls; a changed file is read again, and
    /// if it is no longer valid the previous config stays in force (with a warning).
    pub fn current(&self) -> Arc<WebConfig> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.stamps.iter().all(|(p, s)| stamp(p) == *s) {
            return Arc::clone(&state.current);
        }
        match WebConfig::load_with_files(&self.path) {
            Ok((cfg, files)) => {
                crate::say!(
                    "allocwatch: web config {} reloaded: {}",
                    self.path.display(),
                    cfg.summary()
                );
                state.current = Arc::new(cfg);
                state.stamps = stamps(files);
            }
            Err(e) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                crate::say!("allocwatch: warning: {msg}; keeping the previous web config");
                // Not read again until it changes again.
                let files: Vec<PathBuf> = state.stamps.iter().map(|(p, _)| p.clone()).collect();
                state.stamps = stamps(files);
            }
        }
        Arc::clone(&state.current)
    }
}

fn stamps(files: Vec<PathBuf>) -> Vec<(PathBuf, Stamp)> {
    files
        .into_iter()
        .map(|f| {
            let s = stamp(&f);
            (f, s)
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests;
