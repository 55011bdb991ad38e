//! Tests of `serve::web_config`: the file format, its errors, basic auth and reloading. Also the
//! test PKI (a CA, a server and client certificates made with rcgen) used by `serve::http`'s
//! TLS tests.

use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::*;

/// A directory of its own under the system temp dir, removed at drop.
pub(crate) struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(what: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "allocwatch-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Scratch { path }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A test CA with a server certificate (localhost, 127.0.0.1) and a client certificate, plus
/// a client certificate of another CA, written as PEM files into a scratch directory.
pub(crate) struct Pki {
    pub dir: Scratch,
    pub ca: CertificateDer<'static>,
    pub client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    pub stranger: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

fn ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, Issuer::new(params, key))
}

fn leaf(
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'static, KeyPair>,
) -> (rcgen::Certificate, KeyPair) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    (params.signed_by(&key, issuer).unwrap(), key)
}

fn der_pair(
    cert: &rcgen::Certificate,
    key: &KeyPair,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        vec![cert.der().clone()],
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
    )
}

impl Pki {
    pub fn new() -> Pki {
        let dir = Scratch::new("pki");
        let (ca_cert, issuer) = ca("allocwatch test CA");
        let (server, server_key) = leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let (client, client_key) = leaf(&["scraper"], ExtendedKeyUsagePurpose::ClientAuth, &issuer);
        let (_, other_issuer) = ca("another CA");
        let (stranger, stranger_key) = leaf(
            &["stranger"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &other_issuer,
        );
        dir.write("ca.pem", &ca_cert.pem());
        dir.write("server.pem", &server.pem());
        dir.write("server.key", &server_key.serialize_pem());
        Pki {
            ca: ca_cert.der().clone(),
            client: der_pair(&client, &client_key),
            stranger: der_pair(&stranger, &stranger_key),
            dir,
        }
    }

    /// A web config in the scratch directory (relative paths resolve there).
    pub fn web_config(&self, text: &str) -> PathBuf {
        self.dir.write("web.yml", text)
    }
}

/// The error and its sources on one line, as `main` prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

#[test]
fn empty_file_is_plain_http() {
    let dir = Scratch::new("web");
    for text in ["", "# nothing\n", "---\n"] {
        let cfg = WebConfig::load(&dir.write("web.yml", text)).unwrap();
        assert!(cfg.tls.is_none() && !cfg.needs_auth(), "{text:?}");
        assert_eq!(cfg.summary(), "TLS off, no basic auth");
    }
}

#[test]
fn tls_with_client_certificates() {
    let pki = Pki::new();
    let cfg = WebConfig::load(&pki.web_config(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  \
         client_ca_file: ca.pem\n  client_auth_type: RequireAndVerifyClientCert\n\
         http_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n    \
         strict-transport-security: max-age=31536000\n",
    ))
    .unwrap();
    let tls = cfg.tls.as_ref().expect("TLS on");
    assert_eq!(tls.alpn_protocols, [b"http/1.1".to_vec()]);
    assert_eq!(cfg.client_auth, ClientAuth::Require);
    assert_eq!(
        cfg.summary(),
        "TLS on, client certificates required, no basic auth"
    );
    let headers: Vec<(&str, &str)> = cfg
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
        .collect();
    assert_eq!(
        headers,
        [
            ("x-frame-options", "deny"),
            ("strict-transport-security", "max-age=31536000")
        ]
    );

    // Inline PEM works too; TLS 1.3 only.
    let inline = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    let read = |name: &str| std::fs::read_to_string(pki.dir.path.join(name)).unwrap();
    let cfg = WebConfig::load(&pki.web_config(&format!(
        "tls_server_config:\n  cert: |\n{}  key: |\n{}  min_version: TLS13\n",
        inline(&read("server.pem")),
        inline(&read("server.key"))
    )))
    .unwrap();
    assert_eq!(cfg.summary(), "TLS on, no basic auth");
}

#[test]
fn bad_files_are_one_precise_error() {
    let pki = Pki::new();
    let tls = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n";
    let cases: Vec<(String, &str)> = vec![
        ("basic_auth_users: {alice\n".into(), "web.yml: "),
        ("tls_config: {}\n".into(), "unknown field `tls_config`"),
        (
            "tls_server_config:\n  cert_file: missing.pem\n  key_file: server.key\n".into(),
            "tls_server_config.cert_file",
        ),
        (
            "tls_server_config:\n  cert_file: server.pem\n".into(),
            "tls_server_config.key_file: missing (or key)",
        ),
        (
            "tls_server_config:\n  client_auth_type: RequireAndVerifyClientCert\n".into(),
            "tls_server_config.cert_file: missing",
        ),
        (
            "tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n".into(),
            "server.key holds no PEM certificate",
        ),
        (
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.pem\n".into(),
            "server.pem holds no PEM private key",
        ),
        (
            format!("{tls}  client_auth_type: RequireAndVerifyClientCert\n"),
            "RequireAndVerifyClientCert needs client_ca_file",
        ),
        (
            format!("{tls}  client_ca_file: ca.pem\n"),
            "a client CA is configured without a client auth type",
        ),
        (
            format!("{tls}  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.pem\n"),
            "RequireAnyClientCert accepts certificates without verifying them",
        ),
        (
            format!("{tls}  client_auth_type: Always\n"),
            "unknown value \"Always\"",
        ),
        (
            format!("{tls}  min_version: TLS11\n"),
            "tls_server_config.min_version: only TLS12 and TLS13",
        ),
        (
            format!("{tls}  min_version: TLS13\n  max_version: TLS12\n"),
            "min_version: is above max_version",
        ),
        (
            format!("{tls}  cipher_suites: [TLS_AES_128_GCM_SHA256]\n"),
            "tls_server_config.cipher_suites: not supported",
        ),
        (
            format!("{tls}  client_allowed_sans: [scraper]\n"),
            "tls_server_config.client_allowed_sans: not supported",
        ),
        (
            "basic_auth_users:\n  alice: hunter2\n".into(),
            "basic_auth_users.alice: not a bcrypt hash",
        ),
        (
            "rate_limit:\n  interval: 1s\n  burst: 5\n".into(),
            "rate_limit: not supported",
        ),
        (
            "http_server_config:\n  headers:\n    Server: allocwatch\n".into(),
            "http_server_config.headers.Server: this header cannot be set",
        ),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: allow\n".into(),
            "\"allow\" is not one of deny, sameorigin",
        ),
    ];
    let mut failures = Vec::new();
    for (text, want) in &cases {
        match WebConfig::load(&pki.web_config(text)) {
            Ok(_) => failures.push(format!("{text:?}: accepted")),
            Err(e) => {
                let msg = chain(&e);
                if !msg.contains(want) || !msg.starts_with("web config ") || msg.contains('\n') {
                    failures.push(format!("{text:?}: {msg:?} does not say {want:?}"));
                }
            }
        }
    }
    let missing = pki.dir.path.join("nope.yml");
    let msg = chain(&WebConfig::load(&missing).unwrap_err());
    assert!(
        msg.contains("reading web config") && msg.contains("No such file"),
        "{msg}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn basic(user: &str, password: &str) -> HeaderValue {
    let raw = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    HeaderValue::from_str(&format!("Basic {raw}")).unwrap()
}

#[tokio::test]
async fn basic_auth_checks_bcrypt_hashes() {
    let dir = Scratch::new("web");
    // A `$2y$` hash as htpasswd and Go write them (exporter-toolkit's of "fakepassword"), and
    // one of this crate's `$2b$`.
    const GO_HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";
    let ours = bcrypt::hash("s3cret:with colon", 4).unwrap();
    let cfg = WebConfig::load(&dir.write(
        "web.yml",
        &format!("basic_auth_users:\n  go: '{GO_HASH}'\n  alice: '{ours}'\n"),
    ))
    .unwrap();
    assert_eq!(cfg.summary(), "TLS off, basic auth (2 users)");
    assert!(cfg.authorized(Some(&basic("go", "fakepassword"))).await);
    assert!(
        cfg.authorized(Some(&basic("alice", "s3cret:with colon")))
            .await
    );
    // Cached now: a second check needs no bcrypt run, and gives the same answer.
    assert_eq!(cfg.verified.lock().unwrap().len(), 2);
    assert!(
        cfg.authorized(Some(&basic("alice", "s3cret:with colon")))
            .await
    );
    assert_eq!(cfg.verified.lock().unwrap().len(), 2);

    for header in [
        None,
        Some(basic("alice", "s3cret")),
        Some(basic("alice", "")),
        Some(basic("go", "s3cret:with colon")),
        // Unknown users, also with a password that some user's hash verifies.
        Some(basic("mallory", "fakepassword")),
        Some(basic("mallory", "s3cret:with colon")),
        Some(HeaderValue::from_static("Bearer abc")),
        Some(HeaderValue::from_static("Basic !!!")),
        // No colon.
        Some(HeaderValue::from_static("Basic YWxpY2U=")),
    ] {
        assert!(!cfg.authorized(header.as_ref()).await, "{header:?}");
    }
    // Failures are not cached.
    assert_eq!(cfg.verified.lock().unwrap().len(), 2);
    // The scheme is case-insensitive.
    let lower = basic("go", "fakepassword")
        .to_str()
        .unwrap()
        .replace("Basic", "basic");
    assert!(
        cfg.authorized(Some(&HeaderValue::from_str(&lower).unwrap()))
            .await
    );
}

#[test]
fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_last() {
    let dir = Scratch::new("web");
    let path = dir.write("web.yml", "");
    let watch = WebConfigWatch::load(&path).unwrap();
    let first = watch.current();
    assert!(!first.needs_auth());
    assert!(
        Arc::ptr_eq(&first, &watch.current()),
        "unchanged: same config"
    );

    let hash = bcrypt::hash("pw", 4).unwrap();
    std::fs::write(&path, format!("basic_auth_users:\n  bob: '{hash}'\n")).unwrap();
    let second = watch.current();
    assert!(second.needs_auth(), "the new file is in force");

    std::fs::write(&path, "basic_auth_users: [\n").unwrap();
    let third = watch.current();
    assert!(
        Arc::ptr_eq(&second, &third),
        "a broken file keeps the last good config"
    );
    std::fs::remove_file(&path).unwrap();
    assert!(Arc::ptr_eq(&second, &watch.current()));
}

/// The example in deploy/README.md is a valid file, and its hash (libxcrypt's, cost 10)
/// verifies the password it names.
#[tokio::test]
async fn the_readme_example_loads() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/README.md"))
            .unwrap();
    let section = &readme[readme.find("### TLS and authentication").unwrap()..];
    let start = section.find("```yaml\n").unwrap() + "```yaml\n".len();
    let yaml = &section[start..start + section[start..].find("```").unwrap()];
    let password = yaml
        .split("(this one: \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the example names its password");
    let pki = Pki::new();
    let cfg = WebConfig::load(&pki.web_config(yaml)).unwrap();
    assert_eq!(
        cfg.summary(),
        "TLS on, client certificates required, basic auth (1 user)"
    );
    assert!(cfg.authorized(Some(&basic("prometheus", password))).await);
    assert!(!cfg.authorized(Some(&basic("prometheus", "wrong"))).await);
}
