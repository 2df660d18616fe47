//! Presentation over TLS: how a peer asks a terminal (or a server running
//! the agent) for its security certificate.
//!
//! The peer opens TLS 1.3, sends a frame with a fresh random 32-byte
//! challenge, and gets a frame back with a signed `Presentation`. What is
//! signed is not the bare challenge but the challenge *bound to this TLS
//! session*: SHA-256 over a label, the challenge and 32 bytes of keying
//! material exported from the session (RFC 8446 §7.5). A machine in the
//! middle holds two TLS sessions with two different exports, so an answer
//! it relays from the genuine terminal does not verify on its side. The TLS
//! server certificate is therefore not what authenticates the terminal
//! (it is self-signed); the issuer's certificate and the signature are.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::session::{FrameError, read_frame, write_frame};
use crate::wire::sha256;

const EXPORTER_LABEL: &[u8] = b"EXPORTER-tenet-presentation";
/// The largest answer a peer reads.
pub const MAX_ANSWER: usize = 128 * 1024;

/// The peer's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentRequest {
    pub challenge: [u8; 32],
}

/// The terminal's answer: a signed `Presentation`, or why it has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PresentAnswer {
    Presentation(#[serde(with = "serde_bytes")] Vec<u8>),
    /// No valid certificate to present (not issued yet, or withdrawn).
    Unavailable(String),
}

/// The challenge as signed: bound to the TLS session.
pub fn bind(challenge: &[u8; 32], exporter: &[u8; 32]) -> [u8; 32] {
    let mut input = Vec::with_capacity(96);
    input.extend_from_slice(b"tenet.dev/presentation-binding\0");
    input.extend_from_slice(challenge);
    input.extend_from_slice(exporter);
    sha256(&input)
}

fn exporter_error(e: rustls::Error) -> FrameError {
    FrameError::Io(std::io::Error::other(format!("TLS exporter: {e}")))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks the server's handshake signature but not who issued its
/// certificate: the presentation authenticates the terminal.
#[derive(Debug)]
struct AnyServerKey(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerKey {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The peer's TLS configuration (TLS 1.3 only: the exporter binds).
pub fn client_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    Ok(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerKey(provider)))
            .with_no_client_auth(),
    )
}

/// The terminal's TLS configuration from a (self-signed) certificate.
pub fn server_config(
    cert: CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
}

/// Ask over an established client TLS stream: send `challenge`, return the
/// answer and the bound challenge it must be signed over.
pub async fn ask<S>(
    tls: &mut tokio_rustls::client::TlsStream<S>,
    challenge: [u8; 32],
) -> Result<(PresentAnswer, [u8; 32]), FrameError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exported = tls
        .get_ref()
        .1
        .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(exporter_error)?;
    let bound = bind(&challenge, &exported);
    write_frame(tls, &PresentRequest { challenge }).await?;
    let answer: PresentAnswer = read_frame(tls, MAX_ANSWER).await?;
    Ok((answer, bound))
}

/// Take one request on an accepted server TLS stream; `answer` gets the
/// bound challenge and returns what to send.
pub async fn answer<S, F, Fut>(
    tls: &mut tokio_rustls::server::TlsStream<S>,
    answer: F,
) -> Result<(), FrameError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce([u8; 32]) -> Fut,
    Fut: std::future::Future<Output = PresentAnswer>,
{
    let request: PresentRequest = read_frame(tls, 1024).await?;
    let exported = tls
        .get_ref()
        .1
        .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(exporter_error)?;
    let bound = bind(&request.challenge, &exported);
    let reply = answer(bound).await;
    write_frame(tls, &reply).await?;
    Ok(())
}
