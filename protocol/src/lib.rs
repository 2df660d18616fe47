//! Tenet's wire protocol: the messages that cross between the operator, the
//! agents and their peers, their canonical encoding, and how each is signed
//! and verified. This crate depends on neither kube nor tokio, so the agent
//! and any third-party verifier can use it alone; it reads no clock (callers
//! pass `now`), so every check is a pure function.

pub mod approval;
pub mod audit;
pub mod bundle;
pub mod certificate;
pub mod enrol;
pub mod envelope;
pub mod evidence;
#[cfg(feature = "io")]
pub mod host;
pub mod inventory;
pub mod keys;
#[cfg(feature = "io")]
pub mod listen;
#[cfg(feature = "tls")]
pub mod present_tls;
pub mod presentation;
pub mod reject;
pub mod release;
pub mod report;
pub mod rotation;
pub mod session;
pub mod stdlib;
pub mod window;
pub mod wire;

pub use keys::{Algorithm, Fingerprint, KeyPair, PublicKey, Signer};
pub use reject::Rejection;
pub use wire::{Kind, Message, SignedMessage};
