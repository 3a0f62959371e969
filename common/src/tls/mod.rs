//! TLS identities: creating the CA and certificates (rcgen), loading them, and building
//! the mutually authenticated QUIC configs for both ends. [`endpoint`] holds the QUIC
//! transport settings and endpoints (with the receiver's restart-proof stateless
//! resets), [`handshake`] the one place that turns a failed handshake into advice.
//!
//! Trust model: one CA per deployment (kept by the receiver's operators). The receiver
//! accepts only client certificates that chain to it; the agent trusts only that CA (no
//! system roots), so a receiver is pinned by its CA. An agent's id is the DNS name in its
//! certificate, and the receiver checks the id the agent claims against it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::protocol::ALPN;

pub mod endpoint;
pub mod handshake;

pub use endpoint::{
    client_endpoint, receiver_transport, reset_key, server_endpoint, transport, Bound,
};
pub use handshake::{alert_name, handshake_failure, Viewpoint};

// Display carries the cause and no variant has a `source()`: printed with `{:#}` through
// anyhow, a cause that is both in the text and the source would be stated twice.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("tls setup failed: {0}")]
    Rustls(String),
    #[error("tls setup failed: {0}")]
    Verifier(String),
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
}

impl From<rcgen::Error> for TlsError {
    fn from(e: rcgen::Error) -> TlsError {
        TlsError::Generate(e.to_string())
    }
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> TlsError {
        TlsError::Rustls(e.to_string())
    }
}

/// Files written by [`init_ca`].
pub struct CaFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub receiver_cert: PathBuf,
    pub receiver_key: PathBuf,
}

/// Certificates are issued for ten years: these are private, pinned identities rotated by
/// operators (docs/operations.md), not public web certificates.
const VALIDITY_DAYS: i64 = 3650;

fn validity(params: &mut CertificateParams) {
    let start = time_now();
    params.not_before = start;
    params.not_after = start + time::Duration::days(VALIDITY_DAYS);
}

fn time_now() -> time::OffsetDateTime {
    // Back-date by a day so that small clock differences between hosts do not make a fresh
    // certificate "not yet valid".
    time::OffsetDateTime::now_utc() - time::Duration::days(1)
}

/// Creates a new CA and a receiver certificate for `names` (DNS names or IP addresses)
/// in `dir`. Refuses to overwrite an existing CA.
pub fn init_ca(dir: &Path, receiver_names: &[String]) -> Result<CaFiles, TlsError> {
    let files = CaFiles {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        receiver_cert: dir.join("receiver.pem"),
        receiver_key: dir.join("receiver.key"),
    };
    if files.ca_key.exists() {
        return Err(TlsError::Write {
            path: files.ca_key,
            error: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a CA already exists here; refusing to overwrite it (use another --out)",
            ),
        });
    }
    std::fs::create_dir_all(dir).map_err(|error| TlsError::Write {
        path: dir.to_owned(),
        error,
    })?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "skyferry CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_secret(&files.ca_key, &ca_key.serialize_pem())?;
    write_file(&files.ca_cert, &ca_cert.pem())?;

    let issuer = Issuer::new(ca_params, ca_key);
    let (cert, key) = leaf(&issuer, receiver_names, ExtendedKeyUsagePurpose::ServerAuth)?;
    write_secret(&files.receiver_key, &key)?;
    write_file(&files.receiver_cert, &cert)?;
    Ok(files)
}

/// Issues an agent certificate for `agent_id`, signed by the CA in `ca_dir`; writes
/// `<out>/<agent_id>.pem` and `.key` and returns their paths.
pub fn issue_agent(
    ca_dir: &Path,
    agent_id: &str,
    out: &Path,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let ca_cert_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca.key");
    let ca_pem = read_string(&ca_cert_path)?;
    let key_pem = read_string(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Invalid {
        path: ca_key_path,
        reason: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| TlsError::Invalid {
        path: ca_cert_path,
        reason: e.to_string(),
    })?;
    let (cert, key) = leaf(
        &issuer,
        &[agent_id.to_owned()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    std::fs::create_dir_all(out).map_err(|error| TlsError::Write {
        path: out.to_owned(),
        error,
    })?;
    let cert_path = out.join(format!("{agent_id}.pem"));
    let key_path = out.join(format!("{agent_id}.key"));
    write_secret(&key_path, &key)?;
    write_file(&cert_path, &cert)?;
    Ok((cert_path, key_path))
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String), TlsError> {
    let mut params = CertificateParams::new(names.to_vec())?;
    if let Some(first) = names.first() {
        params.distinguished_name.push(DnType::CommonName, first);
    }
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn read_string(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

fn write_file(path: &Path, text: &str) -> Result<(), TlsError> {
    std::fs::write(path, text).map_err(|error| TlsError::Write {
        path: path.to_owned(),
        error,
    })
}

/// Writes a private key readable by its owner only.
fn write_secret(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| TlsError::Write {
            path: path.to_owned(),
            error,
        })?;
    f.write_all(text.as_bytes())
        .map_err(|error| TlsError::Write {
            path: path.to_owned(),
            error,
        })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            reason: format!("not valid PEM ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            reason: format!("not valid PEM ({e})"),
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_owned(),
        })
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            path: ca.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Receiver side: requires a client certificate chaining to `ca`.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    heartbeat: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca)?),
        provider(),
    )
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport(heartbeat, crate::udp::MAX_UDP_PAYLOAD)));
    Ok(server)
}

/// Agent side: trusts only `ca` and presents the agent's certificate.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    heartbeat: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport(heartbeat, crate::udp::WAN_UDP_PAYLOAD)));
    Ok(client)
}

/// Whether the (already chain-verified) end-entity certificate names `agent_id`.
pub fn certificate_names(cert: &CertificateDer<'_>, agent_id: &str) -> bool {
    let Ok(name) = ServerName::try_from(agent_id) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .map(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
        .unwrap_or(false)
}

/// Which end a certificate identifies, for the extended key usage it must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Receiver,
}

/// What [`identity_problems`] checks: the CA file, a certificate, optionally its key, and
/// optionally a name the certificate must carry.
#[derive(Debug, Clone, Copy)]
pub struct IdentityCheck<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: Option<&'a Path>,
    pub role: Role,
    /// A DNS name the certificate must be valid for (`agent.id`, `receiver.server_name`)
    /// and the config key it comes from.
    pub name: Option<(&'a str, &'a str)>,
}

/// Every problem that would stop this identity from working, each naming its file: see
/// [`identity_findings`], both kinds together. Empty when all is well.
pub fn identity_problems(check: &IdentityCheck<'_>) -> Vec<String> {
    let found = identity_findings(check);
    found.unusable.into_iter().chain(found.refused).collect()
}

/// What is wrong with a TLS identity, in two kinds.
#[derive(Debug, Default)]
pub struct IdentityFindings {
    /// The identity cannot be loaded at all: a file is not PEM or unreadable, the CA is
    /// not a CA certificate, the key does not belong to the certificate.
    pub unusable: Vec<String>,
    /// It loads, but the other end will refuse it: the certificate does not chain to
    /// the CA, has expired, is not for this role, or does not carry the name.
    pub refused: Vec<String>,
}

/// Reads the files (no network) and reports, each problem naming its file, whether the
/// identity loads and whether the other end would accept it; see [`IdentityFindings`].
pub fn identity_findings(check: &IdentityCheck<'_>) -> IdentityFindings {
    let mut refused = Vec::new();
    let unusable = loadable(check, &mut refused);
    IdentityFindings { unusable, refused }
}

fn loadable(check: &IdentityCheck<'_>, refused: &mut Vec<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let ca_certs = load_certs(check.ca)
        .map_err(|e| problems.push(e.to_string()))
        .ok();
    let mut anchors = Vec::new();
    for (i, der) in ca_certs.iter().flatten().enumerate() {
        match webpki::anchor_from_trusted_cert(der) {
            Ok(a) => anchors.push(a),
            Err(e) => problems.push(format!(
                "{}: certificate {} is not a valid CA certificate ({e})",
                check.ca.display(),
                i + 1
            )),
        }
    }
    let chain = load_certs(check.cert)
        .map_err(|e| problems.push(e.to_string()))
        .ok();
    let key = check
        .key
        .and_then(|k| load_key(k).map_err(|e| problems.push(e.to_string())).ok());
    if let (Some(chain), Some(key), Some(key_path)) = (&chain, key, check.key) {
        if let Some(p) = key_mismatch(chain, key, check.cert, key_path) {
            problems.push(p);
        }
    }
    let Some(chain) = chain else {
        return problems;
    };
    let Some(leaf) = chain.first() else {
        return problems;
    };
    let ee = match webpki::EndEntityCert::try_from(leaf) {
        Ok(ee) => ee,
        Err(e) => {
            problems.push(format!(
                "{}: not a valid X.509 certificate ({e})",
                check.cert.display()
            ));
            return problems;
        }
    };
    if ca_certs.is_some() && !anchors.is_empty() {
        let algs = provider().signature_verification_algorithms.all;
        let now = rustls::pki_types::UnixTime::now();
        let usage = match check.role {
            Role::Agent => webpki::KeyUsage::client_auth(),
            Role::Receiver => webpki::KeyUsage::server_auth(),
        };
        if let Err(e) = ee.verify_for_usage(algs, &anchors, &chain[1..], now, usage, None, None) {
            refused.push(format!(
                "{} does not verify against the CA in {} ({e}); issue it from that CA \
                 (skyferry-receiver certs {})",
                check.cert.display(),
                check.ca.display(),
                match check.role {
                    Role::Agent => "issue-agent",
                    Role::Receiver => "init",
                }
            ));
        }
    }
    if let Some((name, key)) = check.name {
        let valid = ServerName::try_from(name)
            .ok()
            .is_some_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok());
        if !valid {
            let names: Vec<String> = ee.valid_dns_names().map(|n| format!("{n:?}")).collect();
            refused.push(format!(
                "{key} = {name:?} is not a name in the certificate {} (it names {})",
                check.cert.display(),
                if names.is_empty() {
                    "no DNS name".to_owned()
                } else {
                    names.join(", ")
                }
            ));
        }
    }
    problems
}

/// A problem when `key` is unusable or is not the private key of `chain`'s first
/// certificate.
fn key_mismatch(
    chain: &[CertificateDer<'static>],
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
) -> Option<String> {
    let signing = match provider().key_provider.load_private_key(key) {
        Ok(k) => k,
        Err(e) => {
            return Some(format!(
                "{}: unsupported private key ({e})",
                key_path.display()
            ))
        }
    };
    let certified = rustls::sign::CertifiedKey::new(chain.to_vec(), signing);
    match certified.keys_match() {
        Ok(()) => None,
        // The provider cannot tell for this key type: the handshake will.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => None,
        Err(_) => Some(format!(
            "{} is not the private key of {}: key and certificate do not match \
             (use the .key written together with that .pem by certs issue-agent/init)",
            key_path.display(),
            cert_path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_agent_certificate_names_its_id() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &["skyferry-receiver".into()]).unwrap();
        let (cert, _key) = issue_agent(dir.path(), "kiso-01", dir.path()).unwrap();
        let der = load_certs(&cert).unwrap().remove(0);
        assert!(certificate_names(&der, "kiso-01"));
        assert!(!certificate_names(&der, "kiso-02"));
        // Both configs build from the generated files.
        server_config(
            &dir.path().join("ca.pem"),
            &dir.path().join("receiver.pem"),
            &dir.path().join("receiver.key"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(
            init_ca(dir.path(), &[]).is_err(),
            "refuses to overwrite a CA"
        );
    }

    #[test]
    fn identity_problems_name_the_file_and_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_ca(d, &["archive.example.org".into()]).unwrap();
        let (cert, key) = issue_agent(d, "kiso-01", d).unwrap();
        let (_, other_key) = issue_agent(d, "kiso-02", d).unwrap();
        let ca = d.join("ca.pem");
        let agent = |cert: &Path, key: &Path, name: &str| {
            identity_problems(&IdentityCheck {
                ca: &ca,
                cert,
                key: Some(key),
                role: Role::Agent,
                name: Some((name, "agent.id")),
            })
        };
        assert!(agent(&cert, &key, "kiso-01").is_empty());
        let p = agent(&cert, &other_key, "kiso-01").join("\n");
        assert!(p.contains("kiso-02.key is not the private key of"), "{p}");
        let p = agent(&cert, &key, "kiso-03").join("\n");
        assert!(p.contains("agent.id = \"kiso-03\" is not a name in"), "{p}");
        assert!(p.contains("\"kiso-01\""), "lists the names it has: {p}");
        // The receiver's certificate is for servers, not for agents.
        let p = agent(
            &d.join("receiver.pem"),
            &d.join("receiver.key"),
            "archive.example.org",
        );
        assert!(
            p.join("").contains("does not verify against the CA"),
            "{p:?}"
        );
        // Signed by another CA.
        let other = tempfile::tempdir().unwrap();
        init_ca(other.path(), &[]).unwrap();
        let (foreign, foreign_key) = issue_agent(other.path(), "kiso-01", other.path()).unwrap();
        let p = agent(&foreign, &foreign_key, "kiso-01").join("\n");
        assert!(p.contains("does not verify against the CA"), "{p}");
        // Not PEM at all.
        let junk = d.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let p = identity_problems(&IdentityCheck {
            ca: &junk,
            cert: &cert,
            key: Some(&key),
            role: Role::Agent,
            name: None,
        });
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("junk.pem holds no PEM certificate"), "{p:?}");
        let receiver = identity_problems(&IdentityCheck {
            ca: &ca,
            cert: &d.join("receiver.pem"),
            key: Some(&d.join("receiver.key")),
            role: Role::Receiver,
            name: Some(("archive.example.org", "receiver.server_name")),
        });
        assert!(receiver.is_empty(), "{receiver:?}");
    }
}
