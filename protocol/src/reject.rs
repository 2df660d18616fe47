//! Why a message is refused. One variant per reason, each carrying what a
//! person needs to see; `reason()` is the CamelCase word used in metrics,
//! status conditions and agent refusal reports.

use crate::keys::Fingerprint;
use crate::wire::Kind;

/// A refusal. Nothing a refused message asked for is done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unknown format version {found} (this build speaks version {supported})")]
    UnknownFormatVersion { found: u16, supported: u16 },
    #[error("expected a {expected} but got a {found}")]
    WrongKind { expected: Kind, found: Kind },
    #[error("{what} is too large: {actual} (the limit is {limit})")]
    SizeLimitExceeded {
        what: &'static str,
        limit: usize,
        actual: usize,
    },
    #[error("the signature by key {key} does not verify")]
    BadSignature { key: Fingerprint },
    #[error("signed by key {key}, which is not trusted here")]
    UnknownKey { key: Fingerprint },
    #[error("{valid} valid signature(s) by trusted keys, {required} required")]
    ThresholdNotMet { valid: usize, required: usize },
    #[error("meant for terminal {found:?}, but this is {expected:?}")]
    WrongTerminal { expected: String, found: String },
    #[error("payload digest {found} does not match the expected {expected}")]
    WrongPayloadDigest { expected: String, found: String },
    #[error("the evidence (nonce) does not match the dispatch")]
    NonceMismatch,
    #[error("replayed: {0}")]
    Replay(String),
    #[error("rollback: {what} {got} is lower than {seen} already seen")]
    Rollback {
        what: &'static str,
        seen: u64,
        got: u64,
    },
    #[error("expired at {deadline_ms} ms, now {now_ms} ms")]
    Expired { deadline_ms: u64, now_ms: u64 },
    #[error("not valid before {not_before_ms} ms, now {now_ms} ms")]
    NotYetValid { not_before_ms: u64, now_ms: u64 },
    #[error("capability {0} is not granted")]
    CapabilityNotGranted(String),
    #[error("security level {level} is below the required {required}")]
    LevelTooLow { level: u8, required: u8 },
    #[error("the answer is not to this challenge")]
    ChallengeMismatch,
    #[error("not approved by the admins: {0}")]
    NotApproved(String),
    #[error("not now: {0}")]
    OutsideWindow(String),
}

impl Rejection {
    /// A CamelCase word a program can match on.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "Malformed",
            Rejection::UnknownFormatVersion { .. } => "UnknownFormatVersion",
            Rejection::WrongKind { .. } => "WrongKind",
            Rejection::SizeLimitExceeded { .. } => "SizeLimitExceeded",
            Rejection::BadSignature { .. } => "BadSignature",
            Rejection::UnknownKey { .. } => "UnknownKey",
            Rejection::ThresholdNotMet { .. } => "ThresholdNotMet",
            Rejection::WrongTerminal { .. } => "WrongTerminal",
            Rejection::WrongPayloadDigest { .. } => "WrongPayloadDigest",
            Rejection::NonceMismatch => "NonceMismatch",
            Rejection::Replay(_) => "Replay",
            Rejection::Rollback { .. } => "Rollback",
            Rejection::Expired { .. } => "Expired",
            Rejection::NotYetValid { .. } => "NotYetValid",
            Rejection::CapabilityNotGranted(_) => "CapabilityNotGranted",
            Rejection::LevelTooLow { .. } => "LevelTooLow",
            Rejection::ChallengeMismatch => "ChallengeMismatch",
            Rejection::NotApproved(_) => "NotApproved",
            Rejection::OutsideWindow(_) => "OutsideWindow",
        }
    }
}
