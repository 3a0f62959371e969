//! Why a QUIC handshake failed, in words an operator can act on.
//!
//! quinn reports a TLS failure as the QUIC error code `0x100 + alert` (RFC 9001 §4.8)
//! with rustls's text of the error, in one of two shapes: raised here
//! (`ConnectionError::TransportError`: *this* end refused the peer's certificate) or sent
//! by the peer (`ConnectionError::ConnectionClosed`: the peer refused *ours*). Which end
//! refused, and the TLS alert (a standard number), say what is wrong; rustls's text adds
//! only the names a certificate carries. With TLS 1.3 the receiver checks the agent's
//! certificate after the agent considers the handshake done, so the agent meets the
//! receiver's refusal of its certificate on its first stream, not while connecting:
//! callers pass whatever `ConnectionError` ended the connection.
//!
//! Everything the peer controls (its close reason, the names in its certificate) is
//! quoted with `{:?}`, so that it cannot forge log lines.

use std::path::Path;

use quinn::ConnectionError;

use crate::protocol::ALPN;

/// The end explaining the failure, with the settings its advice names.
#[derive(Debug, Clone, Copy)]
pub enum Viewpoint<'a> {
    /// The agent, which checks the receiver's certificate against `server_name` and `ca`.
    Agent { server_name: &'a str, ca: &'a Path },
    /// The receiver, which accepts agent certificates issued by `ca`.
    Receiver { ca: &'a Path },
}

/// The TLS alert's name as RFC 8446 §6 spells it, for the alerts a handshake can end
/// with; `None` for a number this table does not know.
pub fn alert_name(alert: u8) -> Option<&'static str> {
    Some(match alert {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        22 => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        90 => "user_canceled",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        113 => "bad_certificate_status_response",
        115 => "unknown_psk_identity",
        116 => "certificate_required",
        120 => "no_application_protocol",
        _ => return None,
    })
}

/// `bad_certificate`, or `42` for an alert [`alert_name`] does not know.
fn alert_text(alert: u8) -> String {
    alert_name(alert).map_or_else(|| alert.to_string(), str::to_owned)
}

/// The TLS alert a QUIC error code carries, if it is a TLS failure.
fn crypto_alert(code: u64) -> Option<u8> {
    (0x100..=0x1ff)
        .contains(&code)
        .then_some((code & 0xff) as u8)
}

/// What went wrong in a handshake (or right after it, see the module docs), from
/// `view`'s end: which certificate was refused by whom and why, and the setting to
/// check. TLS failures start with "TLS handshake failed: ". Any other end of a
/// connection is described too (a stateless reset, a timeout, the peer's close with its
/// code and quoted reason), so this also says why an established connection ended.
pub fn handshake_failure(error: &ConnectionError, view: &Viewpoint<'_>) -> String {
    let peer = match view {
        Viewpoint::Agent { .. } => "receiver",
        Viewpoint::Receiver { .. } => "agent",
    };
    match error {
        ConnectionError::TransportError(e) => match crypto_alert(e.code.into()) {
            Some(alert) => format!(
                "TLS handshake failed: {}",
                we_refused(view, alert, &e.reason)
            ),
            None => format!("QUIC handshake failed: {e}"),
        },
        ConnectionError::ConnectionClosed(c) => {
            let said = String::from_utf8_lossy(&c.reason);
            match crypto_alert(c.error_code.into()) {
                Some(alert) => {
                    format!("TLS handshake failed: {}", peer_refused(view, alert, &said))
                }
                None => format!(
                    "the {peer}'s QUIC stack aborted the connection (error {}, reason {said:?})",
                    u64::from(c.error_code)
                ),
            }
        }
        ConnectionError::ApplicationClosed(c) => format!(
            "the {peer} closed the connection (code {}, reason {:?})",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        ),
        ConnectionError::TimedOut => match view {
            Viewpoint::Agent { .. } => {
                "no answer from the receiver: is it running and reachable over UDP?".to_owned()
            }
            Viewpoint::Receiver { .. } => {
                "the agent went silent during the handshake (link lost, or it gave up)".to_owned()
            }
        },
        ConnectionError::Reset => format!(
            "the {peer} answered with a stateless reset: it restarted and no longer knows \
             this connection"
        ),
        ConnectionError::VersionMismatch => {
            format!("the {peer} supports no QUIC version this build speaks")
        }
        ConnectionError::LocallyClosed => "the connection was closed by this process".to_owned(),
        ConnectionError::CidsExhausted => {
            "no connection id available for a new connection; try again".to_owned()
        }
    }
}

/// This end's TLS refused the handshake: `alert` is what it sent, `reason` rustls's text.
fn we_refused(view: &Viewpoint<'_>, alert: u8, reason: &str) -> String {
    match (view, alert) {
        (_, 120) => format!(
            "the peer does not speak {} (ALPN): both ends must run skyferry with the same \
             protocol version",
            String::from_utf8_lossy(ALPN)
        ),
        (Viewpoint::Agent { server_name, .. }, 42) if reason.contains("not valid for name") => {
            format!(
                "the receiver's certificate is not valid for server_name {server_name:?} \
                 (it names {}): set receiver.server_name to one of those names, or issue the \
                 receiver a certificate for {server_name:?} (skyferry-receiver certs init --san)",
                presented_names(reason)
            )
        }
        (Viewpoint::Agent { ca, .. }, 48) => format!(
            "the receiver's certificate is not signed by the configured CA {}: receiver.ca \
             must be the ca.pem of the receiver's CA",
            ca.display()
        ),
        // Every skyferry CA has the same name: a certificate of another one finds "its"
        // issuer, whose key then does not verify the signature.
        (Viewpoint::Agent { ca, .. }, 51) if reason.contains("BadSignature") => format!(
            "the receiver's certificate is not signed by the configured CA {} (it is signed \
             by another CA of the same name): receiver.ca must be the ca.pem of the \
             receiver's CA",
            ca.display()
        ),
        (Viewpoint::Agent { .. }, 45) => format!(
            "the receiver's certificate is expired or not yet valid ({reason:?}): check both \
             hosts' clocks, or reissue it"
        ),
        (Viewpoint::Agent { .. }, 43) => format!(
            "the receiver's certificate is not a server certificate ({reason:?}): use the \
             receiver.pem written by skyferry-receiver certs init"
        ),
        (Viewpoint::Receiver { ca }, 48) => format!(
            "the agent's certificate is not signed by this receiver's CA {}: issue it from \
             that CA (skyferry-receiver certs issue-agent)",
            ca.display()
        ),
        (Viewpoint::Receiver { ca }, 51) if reason.contains("BadSignature") => format!(
            "the agent's certificate is not signed by this receiver's CA {} (it is signed by \
             another CA of the same name): issue it from that CA (skyferry-receiver certs \
             issue-agent)",
            ca.display()
        ),
        (Viewpoint::Receiver { .. }, 116) => {
            "the agent presented no certificate: set cert and key in its [receiver] section"
                .to_owned()
        }
        (Viewpoint::Receiver { .. }, 45) => format!(
            "the agent's certificate is expired or not yet valid ({reason:?}): check both \
             hosts' clocks, or reissue it (skyferry-receiver certs issue-agent)"
        ),
        (Viewpoint::Receiver { .. }, 43) => format!(
            "the agent's certificate is not a client certificate ({reason:?}): issue it with \
             skyferry-receiver certs issue-agent"
        ),
        (Viewpoint::Agent { .. }, _) => format!(
            "this agent refused the receiver's certificate (alert {}: {reason:?})",
            alert_text(alert)
        ),
        (Viewpoint::Receiver { .. }, _) => format!(
            "this receiver refused the agent's certificate (alert {}: {reason:?})",
            alert_text(alert)
        ),
    }
}

/// The peer's TLS refused the handshake with `alert` and said `said` (its text, quoted).
fn peer_refused(view: &Viewpoint<'_>, alert: u8, said: &str) -> String {
    let name = alert_text(alert);
    match (view, alert) {
        (_, 120) => format!(
            "the peer does not speak {} (ALPN; it says {said:?}): both ends must run skyferry \
             with the same protocol version",
            String::from_utf8_lossy(ALPN)
        ),
        (Viewpoint::Agent { .. }, 48) | (Viewpoint::Agent { .. }, 51) => format!(
            "the receiver refused this agent's certificate (alert {name}): it is not signed by \
             the receiver's CA; issue it from that CA (skyferry-receiver certs issue-agent) \
             (receiver says {said:?})"
        ),
        (Viewpoint::Agent { .. }, 116) => format!(
            "the receiver requires a client certificate and got none (alert {name}): set cert \
             and key in [receiver] (receiver says {said:?})"
        ),
        (Viewpoint::Agent { .. }, _) => format!(
            "the receiver refused this agent's certificate (alert {name}): check cert, key and \
             ca in [receiver] against the receiver's CA (receiver says {said:?})"
        ),
        (Viewpoint::Receiver { .. }, _) => format!(
            "the agent rejected our certificate (alert {name}): check receiver.server_name / \
             ca on the agent (agent says {said:?})"
        ),
    }
}

/// The names rustls found in a certificate that is not valid for the expected name, from
/// its text `... is only valid for DnsName("a"), DnsName("b") or IpAddress(10.0.0.1)`,
/// each quoted: `"a", "b", "10.0.0.1"`; "no name" when it lists none.
fn presented_names(reason: &str) -> String {
    let Some((_, list)) = reason.split_once("is only valid for ") else {
        return "no name".to_owned();
    };
    let mut names = Vec::new();
    let mut rest = list;
    while let Some(open) = rest.find('(') {
        let Some(close) = rest[open..].find(')') else {
            break;
        };
        let inner = &rest[open + 1..open + close];
        names.push(format!("{:?}", inner.trim_matches('"')));
        rest = &rest[open + close + 1..];
    }
    if names.is_empty() {
        "no name".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_have_their_rfc_names() {
        assert_eq!(alert_name(42), Some("bad_certificate"));
        assert_eq!(alert_name(48), Some("unknown_ca"));
        assert_eq!(alert_name(116), Some("certificate_required"));
        assert_eq!(alert_name(200), None);
        assert_eq!(alert_text(200), "200");
        assert_eq!(crypto_alert(0x12a), Some(42));
        assert_eq!(crypto_alert(0x0a), None);
    }

    #[test]
    fn presented_names_are_taken_from_rustls_text_and_quoted() {
        let reason = "invalid peer certificate: certificate not valid for name \"wrong\"; \
                      certificate is only valid for DnsName(\"skyferry-receiver\"), \
                      DnsName(\"localhost\") or IpAddress(10.0.0.1)";
        assert_eq!(
            presented_names(reason),
            r#""skyferry-receiver", "localhost", "10.0.0.1""#
        );
        assert_eq!(
            presented_names("certificate is not valid for any names"),
            "no name"
        );
        // A peer-chosen name cannot break out of its quotes.
        let hostile = "is only valid for DnsName(\"a\nWARN forged\")";
        assert_eq!(presented_names(hostile), r#""a\nWARN forged""#);
    }

    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use crate::tls::{
        client_config, client_endpoint, init_ca, issue_agent, server_config, server_endpoint,
    };

    /// A CA with a receiver (names "skyferry-receiver", "localhost") and agent "kiso-01".
    struct Ca {
        _dir: tempfile::TempDir,
        ca: PathBuf,
        receiver: (PathBuf, PathBuf),
        agent: (PathBuf, PathBuf),
    }

    fn ca() -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(
            dir.path(),
            &["skyferry-receiver".into(), "localhost".into()],
        )
        .unwrap();
        let agent = issue_agent(dir.path(), "kiso-01", dir.path()).unwrap();
        Ca {
            ca: files.ca_cert,
            receiver: (files.receiver_cert, files.receiver_key),
            agent,
            _dir: dir,
        }
    }

    /// One real handshake on 127.0.0.1 between a receiver of `server` and an agent with
    /// identity `agent` trusting `agent_ca`, asking for `server_name`; returns the errors
    /// each end saw (the connection, or its end when the handshake itself succeeded).
    async fn handshake(
        server: &Ca,
        agent: &(PathBuf, PathBuf),
        agent_ca: &Path,
        server_name: &str,
    ) -> (ConnectionError, ConnectionError) {
        let beat = Duration::from_secs(5);
        let (cert, key) = &server.receiver;
        let config = server_config(&server.ca, cert, key, beat).unwrap();
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let receiver = server_endpoint(listen, config, key).unwrap().endpoint;
        let addr = receiver.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            let incoming = receiver.accept().await.unwrap();
            match incoming.await {
                Ok(conn) => conn.closed().await,
                Err(e) => e,
            }
        });
        let mut client = client_endpoint(listen, crate::udp::MAX_UDP_PAYLOAD)
            .unwrap()
            .endpoint;
        client
            .set_default_client_config(client_config(agent_ca, &agent.0, &agent.1, beat).unwrap());
        let agent_side = match client.connect(addr, server_name).unwrap().await {
            Ok(conn) => conn.closed().await,
            Err(e) => e,
        };
        let limit = Duration::from_secs(10);
        let receiver_side = tokio::time::timeout(limit, accepted)
            .await
            .unwrap()
            .unwrap();
        (agent_side, receiver_side)
    }

    #[tokio::test]
    async fn a_wrong_server_name_is_named_on_both_ends() {
        let ca = ca();
        let (agent, receiver) = handshake(&ca, &ca.agent, &ca.ca, "archive.example.org").await;
        let agent = handshake_failure(
            &agent,
            &Viewpoint::Agent {
                server_name: "archive.example.org",
                ca: &ca.ca,
            },
        );
        assert!(
            agent.contains(
                "the receiver's certificate is not valid for server_name \"archive.example.org\" \
                 (it names \"skyferry-receiver\", \"localhost\")"
            ),
            "{agent}"
        );
        let receiver = handshake_failure(&receiver, &Viewpoint::Receiver { ca: &ca.ca });
        assert!(
            receiver.contains(
                "the agent rejected our certificate (alert bad_certificate): check \
                 receiver.server_name / ca on the agent"
            ),
            "{receiver}"
        );
    }

    #[tokio::test]
    async fn an_agent_of_another_ca_is_told_so_and_the_receiver_names_its_ca() {
        let ca = ca();
        let other = self::ca();
        let (agent, receiver) = handshake(&ca, &other.agent, &ca.ca, "skyferry-receiver").await;
        let agent = handshake_failure(
            &agent,
            &Viewpoint::Agent {
                server_name: "skyferry-receiver",
                ca: &ca.ca,
            },
        );
        assert!(
            agent.starts_with(
                "TLS handshake failed: the receiver refused this agent's certificate (alert \
                 decrypt_error): it is not signed by the receiver's CA"
            ),
            "{agent}"
        );
        let receiver = handshake_failure(&receiver, &Viewpoint::Receiver { ca: &ca.ca });
        let expected = format!(
            "the agent's certificate is not signed by this receiver's CA {}",
            ca.ca.display()
        );
        assert!(receiver.contains(&expected), "{receiver}");
    }

    #[tokio::test]
    async fn a_receiver_of_another_ca_is_told_apart_from_a_refused_agent() {
        let ca = ca();
        let other = self::ca();
        // The agent trusts `other`'s CA; the receiver's certificate is from `ca`.
        let (agent, receiver) = handshake(&ca, &ca.agent, &other.ca, "skyferry-receiver").await;
        let agent = handshake_failure(
            &agent,
            &Viewpoint::Agent {
                server_name: "skyferry-receiver",
                ca: &other.ca,
            },
        );
        let expected = format!(
            "the receiver's certificate is not signed by the configured CA {}",
            other.ca.display()
        );
        assert!(agent.contains(&expected), "{agent}");
        let receiver = handshake_failure(&receiver, &Viewpoint::Receiver { ca: &ca.ca });
        assert!(
            receiver.contains("the agent rejected our certificate (alert decrypt_error)"),
            "{receiver}"
        );
    }
}
