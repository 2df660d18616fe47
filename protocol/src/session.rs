//! The held connection between an agent and the operator's gateway: the
//! messages each side sends, and the framing that carries them over a TLS
//! stream. Each frame is a 4-byte big-endian length and a canonical
//! encoding of one message; a frame over the limit, or one that does not
//! decode, ends the connection (the agent reconnects; nothing is lost,
//! since reports stay queued until acknowledged).
//!
//! The signed payloads inside (envelopes, bundles, reports, inventories)
//! are verified by their receivers as usual: the session adds no trust.

use serde::{Deserialize, Serialize};

use crate::reject::Rejection;
use crate::wire::{Kind, decode, encode};

/// What an agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToOperator {
    /// First message on every connection.
    Hello {
        terminal: String,
        agent_version: String,
    },
    /// A signed `EnrolmentRequest` (the only message allowed without a
    /// client certificate).
    Enrol(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A signed `InventoryReport`.
    Inventory(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A signed `ExecutionReport`.
    Report(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A PKCS#10 request (PEM) for a new client certificate, before the
    /// current one expires. Allowed only on an authenticated session.
    RenewCertificate {
        csr_pem: String,
    },
    /// A signed `AuditReport`, the answer to `ToAgent::Audit`.
    Audit(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The secret `ToAgent::ActivateCredential` carried, as the TPM
    /// recovered it: proof that the attestation key and the certified
    /// endorsement key are in the same TPM. Only during an enrolment.
    CredentialActivated {
        #[serde(with = "serde_bytes")]
        secret: Vec<u8>,
    },
    /// The TPM could not activate the credential, and why.
    ActivationFailed {
        reason: String,
    },
    Pong,
    /// Instead of `Hello`, first on a connection that only asks whether
    /// this agent would be served (an agent proving a new binary of itself
    /// before it hands over): the operator answers `Welcome` and closes,
    /// and no session starts. Operators of 0.2 or later read it.
    Probe {
        terminal: String,
        agent_version: String,
    },
    /// Send the bundle with this digest (the body digest an envelope
    /// named in `DispatchRef`): this terminal does not hold it.
    Want {
        digest: [u8; 32],
    },
}

/// What the gateway sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToAgent {
    /// During an enrolment with a TPM: a secret only the TPM holding both
    /// the certified endorsement key and the attestation key can recover
    /// (TPM2_MakeCredential's `credentialBlob` and `secret`, contents of
    /// the TPM2B structures). Answered with `CredentialActivated`.
    ActivateCredential {
        #[serde(with = "serde_bytes")]
        credential_blob: Vec<u8>,
        #[serde(with = "serde_bytes")]
        secret: Vec<u8>,
    },
    /// A signed `EnrolmentResponse`, or why enrolment was refused.
    Enrolled(#[serde(with = "serde_bytes")] Vec<u8>),
    EnrolmentRefused {
        reason: String,
    },
    /// Run this: a signed envelope and the signed bundle it names. The
    /// bundle is one shared copy however many envelopes are queued for it.
    Dispatch {
        #[serde(with = "serde_bytes")]
        envelope: Vec<u8>,
        bundle: SharedBytes,
    },
    /// The report (or inventory) with this SHA-256 over its bytes is stored;
    /// the agent may drop it from its outbox.
    Ack {
        digest: [u8; 32],
    },
    /// Send an inventory now.
    InventoryWanted,
    /// The renewed client certificate (PEM), or why it was not renewed.
    Certificate {
        pem: String,
    },
    RenewalRefused {
        reason: String,
    },
    /// Audit yourself now: posture facts for these packages and services,
    /// and a TPM quote over these PCRs with this nonce.
    Audit {
        nonce: [u8; 32],
        pcrs: Vec<u8>,
        packages: Vec<String>,
        services: Vec<String>,
    },
    /// The terminal's security certificate (a signed `SecurityCertificate`)
    /// to present to peers from now on; `None`: stop presenting the one
    /// held (the level fell below the policy's minimum).
    SecurityCertificate {
        #[serde(with = "serde_bytes")]
        certificate: Option<Vec<u8>>,
    },
    Ping,
    /// The chain of trust rotations (signed `TrustRotation` frames, in
    /// version order) from version 2 to the one in force; sent first on a
    /// session when there has been a rotation. The agent pins what verifies
    /// against what it pinned before (`rotation::apply_chain`).
    TrustRotations {
        rotations: Vec<serde_bytes::ByteBuf>,
    },
    /// First on a session of an agent of release 0.2 or later (older ones
    /// cannot decode it): the operator's version, so the agent writes
    /// nothing that release does not read (`release`).
    Welcome {
        operator_version: String,
    },
    /// Run this: a signed envelope whose bundle is not sent along. The
    /// agent takes the bundle the envelope names (by body digest) from
    /// its cache, or asks for it (`ToOperator::Want`). To agents of 0.2
    /// or later; older ones get `Dispatch`.
    DispatchRef {
        #[serde(with = "serde_bytes")]
        envelope: Vec<u8>,
    },
    /// A signed bundle an agent asked for (`ToOperator::Want`).
    Bundle {
        bundle: SharedBytes,
    },
}

/// Bytes shared between messages (a bundle sent to many terminals):
/// cloning it copies a pointer. On the wire it is a byte string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SharedBytes(pub std::sync::Arc<Vec<u8>>);

impl SharedBytes {
    pub fn new(bytes: Vec<u8>) -> SharedBytes {
        SharedBytes(std::sync::Arc::new(bytes))
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(bytes: Vec<u8>) -> SharedBytes {
        SharedBytes::new(bytes)
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Serialize for SharedBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Bytes::new(&self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SharedBytes, D::Error> {
        serde_bytes::ByteBuf::deserialize(d).map(|b| SharedBytes::new(b.into_vec()))
    }
}

/// The largest frame the gateway reads from a connection that has not
/// authenticated yet: a `Hello`, an `Enrol` (a signed enrolment request is
/// at most about 70 KiB: token, name, 64 labels, a certificate request, an
/// EK certificate) or its credential activation answer. Memory a stranger
/// can make the gateway hold stays this small.
pub const MAX_OPENING_FRAME: usize = 128 * 1024;

/// The largest frame either side reads: a bundle and an envelope.
pub const MAX_SESSION_FRAME: usize = Kind::PayloadBundle.max_frame_bytes_const() + 1024 * 1024;

/// One message as a frame.
pub fn frame<T: Serialize>(message: &T) -> Vec<u8> {
    let body = encode(message);
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The length announced by a frame header, refused when over `limit`.
pub fn frame_length(header: [u8; 4], limit: usize) -> Result<usize, Rejection> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(Rejection::SizeLimitExceeded {
            what: "a session frame",
            limit,
            actual: len,
        });
    }
    Ok(len)
}

/// Decode a frame's body.
pub fn unframe<T: Serialize + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Rejection> {
    decode(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_oversize() {
        let m = ToAgent::Dispatch {
            envelope: vec![1, 2, 3],
            bundle: vec![4; 100].into(),
        };
        let f = frame(&m);
        let len =
            frame_length(f[..4].try_into().expect("header"), MAX_SESSION_FRAME).expect("fits");
        assert_eq!(len, f.len() - 4);
        assert_eq!(unframe::<ToAgent>(&f[4..]).expect("decodes"), m);
        assert!(frame_length([0xff; 4], 1024).is_err());
        // A dispatch written from its parts is the same frame.
        for size in [0, 1, 127, 128, 300, 70_000] {
            let m = ToAgent::Dispatch {
                envelope: vec![9; 33],
                bundle: vec![4; size].into(),
            };
            let ToAgent::Dispatch { envelope, bundle } = &m else {
                unreachable!()
            };
            let (head, len) = dispatch_head(envelope, bundle.len());
            let mut whole = (len as u32).to_be_bytes().to_vec();
            whole.extend_from_slice(&head);
            whole.extend_from_slice(bundle);
            assert_eq!(whole, frame(&m), "bundle of {size} bytes");
        }
        // A shared bundle is a plain byte string on the wire.
        #[derive(Serialize)]
        struct Plain(#[serde(with = "serde_bytes")] Vec<u8>);
        assert_eq!(
            encode(&SharedBytes::new(vec![4; 100])),
            encode(&Plain(vec![4; 100]))
        );
        assert!(unframe::<ToAgent>(&[0xff, 0xff]).is_err());
    }
}

/// Why a frame could not be read: the stream failed, or the frame is refused.
#[cfg(feature = "io")]
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Refused(#[from] Rejection),
}

/// Read one frame from an async stream, refusing one over `limit` before
/// reading its body. The body's buffer grows with the bytes that really
/// arrive, never to the announced length up front: a peer that announces
/// 16 MiB and sends nothing costs nothing.
#[cfg(feature = "io")]
pub async fn read_frame<R, T>(r: &mut R, limit: usize) -> Result<T, FrameError>
where
    R: tokio::io::AsyncRead + Unpin,
    T: Serialize + serde::de::DeserializeOwned,
{
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 4];
    r.read_exact(&mut header).await?;
    let len = frame_length(header, limit)?;
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    let read = (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if read != len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(unframe(&body)?)
}

/// Bundles larger than this are written straight from their shared copy.
#[cfg(feature = "io")]
const STREAMED_BUNDLE: usize = 64 * 1024;

/// Write one message as a frame and flush it, a large dispatch bundle
/// straight from its shared copy (no copy of it per terminal it is sent to).
#[cfg(feature = "io")]
pub async fn write_message<W>(w: &mut W, message: &ToAgent) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    // A small bundle is copied into one frame: one write (one TLS record,
    // one system call) costs less than copying a few KiB.
    let ToAgent::Dispatch { envelope, bundle } = message else {
        return write_frame(w, message).await;
    };
    if bundle.len() <= STREAMED_BUNDLE {
        return write_frame(w, message).await;
    }
    let (head, len) = dispatch_head(envelope, bundle.len());
    w.write_all(&(len as u32).to_be_bytes()).await?;
    w.write_all(&head).await?;
    w.write_all(bundle).await?;
    w.flush().await
}

#[cfg(any(feature = "io", test))]
/// The encoding of `ToAgent::Dispatch` up to its bundle's bytes, and the
/// whole body's length: the message with an empty bundle, its last byte
/// (the empty bundle's length, 0) replaced by the real length.
fn dispatch_head(envelope: &[u8], bundle_len: usize) -> (Vec<u8>, usize) {
    let mut head = encode(&ToAgent::Dispatch {
        envelope: envelope.to_vec(),
        bundle: SharedBytes::default(),
    });
    head.pop();
    let mut n = bundle_len as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            head.push(byte);
            break;
        }
        head.push(byte | 0x80);
    }
    let len = head.len() + bundle_len;
    (head, len)
}

/// Write one message as a frame and flush it.
#[cfg(feature = "io")]
pub async fn write_frame<W, T>(w: &mut W, message: &T) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    T: Serialize,
{
    use tokio::io::AsyncWriteExt;
    w.write_all(&frame(message)).await?;
    w.flush().await
}
