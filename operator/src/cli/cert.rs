//! `tenet cert verify`: check a peer's security certificate by
//! challenge-response, as a server would before it lets a terminal in.

use crate::time::now_ms;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tenet_protocol::PublicKey;
use tenet_protocol::present_tls::{PresentAnswer, ask, client_config};
use tenet_protocol::presentation::{Requirements, verify_presentation};

#[derive(clap::Subcommand)]
pub enum CertCommand {
    /// Ask a terminal (or a server running the agent) for its security
    /// certificate over TLS with a fresh challenge, and check it: signed by
    /// the issuer, valid now, answered to this challenge on this connection
    /// by the key the certificate names, for the expected subject, at the
    /// required level. Exit 0: verified; 1: refused, with the reason
    /// (expired, wrong issuer, level too low, bad signature, challenge
    /// mismatch, wrong subject); 2: the peer could not be asked.
    Verify {
        /// The peer's presentation address (the agent's `presentation.listen`).
        #[arg(long, value_name = "HOST:PORT")]
        peer: String,
        /// The lowest acceptable security level (0-100).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        min_level: u8,
        /// The issuer's public key (the operator's DATA/dispatch.key.pub).
        #[arg(long, value_name = "FILE")]
        issuer_key: PathBuf,
        /// The terminal the peer must be.
        #[arg(long)]
        subject: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
}

pub fn run(
    command: CertCommand,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> std::io::Result<i32> {
    let CertCommand::Verify {
        peer,
        min_level,
        issuer_key,
        subject,
        timeout,
    } = command;
    verify(
        &peer,
        &issuer_key,
        min_level,
        subject.as_deref(),
        Duration::from_secs(timeout),
        stdout,
        stderr,
    )
}

/// Exit codes: 0 verified; 1 refused (the reason is printed); 2 the peer
/// could not be asked (unreachable, no certificate, bad usage).
pub fn verify(
    peer: &str,
    issuer_key: &Path,
    min_level: u8,
    subject: Option<&str>,
    timeout: Duration,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let issuer = match PublicKey::read_pem_file(issuer_key) {
        Ok(k) => k,
        Err(e) => {
            writeln!(err, "tenet: {}: {e}", issuer_key.display())?;
            return Ok(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let asked = runtime.block_on(async {
        tokio::time::timeout(timeout, ask_peer(peer))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", timeout.as_secs())))
    });
    let (answer, bound) = match asked {
        Ok(a) => a,
        Err(e) => {
            writeln!(err, "tenet: {peer}: {e}")?;
            return Ok(2);
        }
    };
    let bytes = match answer {
        PresentAnswer::Presentation(b) => b,
        PresentAnswer::Unavailable(why) => {
            writeln!(
                out,
                "{peer}: refused: the peer presents no certificate ({why}) (NoCertificate)"
            )?;
            return Ok(1);
        }
    };
    let required = Requirements {
        issuer_key: &issuer,
        subject,
        min_level,
    };
    match verify_presentation(&bytes, &bound, &required, now_ms()) {
        Ok(cert) => {
            if subject.is_none() {
                // Any terminal with a good enough certificate passes: the
                // peer may not be the terminal the caller meant.
                writeln!(
                    err,
                    "tenet: warning: no --subject given, so any terminal with a valid certificate passes; this one is {:?}. Pin the terminal you expect with --subject NAME",
                    cert.subject
                )?;
            }
            writeln!(
                out,
                "{peer}: verified: {} at security level {} (required {min_level}), issued by {} ({}), valid until {}, in {:.1} ms",
                cert.subject,
                cert.level,
                cert.issuer,
                cert.issuer_key,
                crate::time::rfc3339(cert.not_after_ms),
                started.elapsed().as_secs_f64() * 1000.0
            )?;
            Ok(0)
        }
        Err(e) => {
            writeln!(out, "{peer}: refused: {} ({})", describe(&e), e.reason())?;
            Ok(1)
        }
    }
}

/// The rejection in the words of a certificate check.
fn describe(e: &tenet_protocol::Rejection) -> String {
    use tenet_protocol::Rejection as R;
    match e {
        R::Expired { deadline_ms, .. } => format!(
            "the certificate expired at {}",
            crate::time::rfc3339(*deadline_ms)
        ),
        R::NotYetValid { not_before_ms, .. } => format!(
            "the certificate is not valid before {}",
            crate::time::rfc3339(*not_before_ms)
        ),
        R::UnknownKey { key } => {
            format!("wrong issuer: the certificate is signed by key {key}, not the issuer's")
        }
        R::BadSignature { key } => format!("bad signature: the signature by key {key} does not verify"),
        R::LevelTooLow { level, required } => {
            format!("level too low: security level {level} is below the required {required}")
        }
        R::ChallengeMismatch => {
            "challenge mismatch: the answer is not to this challenge on this connection (replayed or relayed)".into()
        }
        R::WrongTerminal { expected, found } => {
            format!("wrong subject: the certificate is for {found:?}, not {expected:?}")
        }
        other => other.to_string(),
    }
}

async fn ask_peer(peer: &str) -> Result<(PresentAnswer, [u8; 32]), String> {
    let config = client_config().map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(peer)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
    let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| format!("bad host {host:?}: {e}"))?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let challenge = tenet_protocol::keys::random_bytes().map_err(|e| e.to_string())?;
    ask(&mut tls, challenge).await.map_err(|e| e.to_string())
}
