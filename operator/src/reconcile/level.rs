//! The security level index: the one number, 0 to 100, a security
//! certificate carries instead of what was audited (so a certificate leaks
//! no weakness). A pure function of the terminal's compliance and of its
//! audit:
//!
//! ```text
//! compliance = 100 × Σ weight(p) · compliant(p) / Σ weight(p)
//!              over the policies selecting the terminal with weight > 0
//!              (spec.securityWeight, default 1); 0 when there are none
//! level      = compliance                     when the TPM quote verified
//!              min(compliance, 60)            when the terminal has no TPM
//!                                             (its claims are its own word)
//!              0                              when a quote failed to verify
//!                                             or the audit is missing
//! ```
//!
//! rounded down. A pair counts as compliant only in state Compliant
//! (verified): Drifted, remediating, Failed and Unknown count as not.

/// What the issuer's audit of a terminal concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attestation {
    /// A TPM quote over the expected PCRs, with the issuer's nonce, verified
    /// against the terminal's registered attestation key.
    Verified,
    /// The terminal has no TPM: its posture claims are unattested.
    NoTpm,
    /// A quote did not verify (wrong nonce, PCRs or key), or no audit yet.
    Failed,
}

/// The highest level a terminal without a TPM can reach.
pub const UNATTESTED_CAP: u8 = 60;

/// The level of a terminal: `policies` are (weight, compliant) for every
/// policy selecting it.
pub fn level(policies: &[(u32, bool)], attestation: Attestation) -> u8 {
    let total: u64 = policies.iter().map(|(w, _)| u64::from(*w)).sum();
    let met: u64 = policies
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(w, _)| u64::from(*w))
        .sum();
    let compliance = (met * 100).checked_div(total).unwrap_or(0) as u8;
    match attestation {
        Attestation::Verified => compliance,
        Attestation::NoTpm => compliance.min(UNATTESTED_CAP),
        Attestation::Failed => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compliance_is_weighted_and_attestation_caps_it() {
        // browser (30) and antivirus (50) compliant, openssl (20) not.
        let p = [(30, true), (50, true), (20, false)];
        assert_eq!(level(&p, Attestation::Verified), 80);
        assert_eq!(level(&p, Attestation::NoTpm), 60);
        assert_eq!(level(&p, Attestation::Failed), 0);
        assert_eq!(level(&[(1, true), (1, true)], Attestation::Verified), 100);
        assert_eq!(level(&[(1, true), (2, false)], Attestation::Verified), 33);
    }

    #[test]
    fn weightless_or_no_policies_give_nothing() {
        assert_eq!(level(&[], Attestation::Verified), 0);
        assert_eq!(level(&[(0, true)], Attestation::Verified), 0);
        // A weight of 0 does not count either way.
        assert_eq!(level(&[(0, false), (5, true)], Attestation::Verified), 100);
    }

    #[test]
    fn huge_weights_do_not_overflow() {
        let p = [(u32::MAX, true), (u32::MAX, false)];
        assert_eq!(level(&p, Attestation::Verified), 50);
    }
}
