//! TLS identities: creating the CA and certificates (rcgen), loading them, and building
//! the mutually authenticated QUIC configs for both ends.
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

use crate::config::PeerLimits;
use crate::protocol::ALPN;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("tls setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls setup failed: {0}")]
    Verifier(String),
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
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a CA already exists here; refusing to overwrite it (use another --out)",
            ),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
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
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.to_owned(),
        source,
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
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write_file(path: &Path, text: &str) -> Result<(), TlsError> {
    std::fs::write(path, text).map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
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
        .map_err(|source| TlsError::Write {
            path: path.to_owned(),
            source,
        })?;
    f.write_all(text.as_bytes())
        .map_err(|source| TlsError::Write {
            path: path.to_owned(),
            source,
        })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
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

/// QUIC transport tuned for a long fat pipe (10 Gbit/s × 15 ms ≈ 19 MB in flight): the
/// connection window covers the bandwidth-delay product with headroom, and each stream's
/// window is large enough that a few parallel files can fill the link.
pub fn transport(heartbeat: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW as u32));
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    // Three missed heartbeats close the connection at the QUIC level too.
    let idle = heartbeat * 3;
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some(heartbeat));
    // Probe for jumbo frames (research networks such as SINET carry 9000-byte MTUs); a
    // path that does not carry them stays at what it does carry.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// The receiver's transport: [`transport`] with the windows and stream limit sized from
/// `limits`, so that what peers can make the receiver buffer is bounded by configuration
/// whatever they send: at most `limits.receive_window` of unread data per connection
/// (each stream at most 16 MiB of it) and `limits.max_streams_per_connection` streams.
/// The receiver only sends small frames (acknowledgements, `Resume`, heartbeats), so its
/// send window is small too. docs/protocol.md ("Limits and timeouts") gives the bound.
pub fn receiver_transport(heartbeat: Duration, limits: &PeerLimits) -> quinn::TransportConfig {
    let mut t = transport(heartbeat);
    let window = limits.receive_window.min(u64::from(u32::MAX));
    t.max_concurrent_bidi_streams(limits.max_streams_per_connection.into());
    t.receive_window(quinn::VarInt::from_u32(window as u32));
    t.stream_receive_window(quinn::VarInt::from_u32(window.min(STREAM_WINDOW) as u32));
    t.send_window(RECEIVER_SEND_WINDOW);
    // No unreliable datagrams are used: accept none rather than buffer them.
    t.datagram_receive_buffer_size(None);
    t
}

/// Largest stream receive window (either side): one stream cannot hold a whole
/// connection's window.
const STREAM_WINDOW: u64 = 16 << 20;

/// Receiver's send window per connection (bytes sent and not yet acknowledged).
const RECEIVER_SEND_WINDOW: u64 = 2 << 20;

/// Largest UDP payload sent or accepted: a 9000-byte MTU less IPv6 and UDP headers.
pub const MAX_UDP_PAYLOAD: u16 = 8952;

/// Socket buffers asked of the kernel: a burst at 10 Gbit/s is a few MB, far more than
/// the usual 208 KiB default. The kernel caps the request at `net.core.rmem_max` /
/// `wmem_max` (docs/operations.md says how to raise them).
const SOCKET_BUFFER: usize = 16 << 20;

/// A QUIC endpoint on `addr` with large socket buffers and jumbo-capable payload size;
/// a server when `server` is given.
pub fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers too on a wildcard IPv6 socket.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(config, server, socket.into(), runtime)
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
    server.transport_config(Arc::new(transport(heartbeat)));
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
    client.transport_config(Arc::new(transport(heartbeat)));
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
}
