//! Which releases of Tenet talk to which (the rules are written out in
//! the crate's README, "Compatibility"). A release is `MAJOR.MINOR`; the
//! patch number never changes a format. Pure functions: the gateway asks
//! [`serves`] about each agent's `Hello`, and each side asks [`knows`]
//! before it sends something an older peer could not read.

use std::fmt;

/// This build's version (the workspace's), as agents put it in `Hello`.
pub const THIS: &str = env!("CARGO_PKG_VERSION");

/// A release: what the compatibility rules are stated in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Release {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The first release: its agents sent `Hello` without knowing `Welcome`,
/// and its stores carry no format marker.
pub const FIRST: Release = Release { major: 0, minor: 1 };

/// The release `Welcome` came with: an operator sends it only to agents of
/// this release or later.
pub const WELCOME: Release = Release { major: 0, minor: 2 };

/// The release `DispatchRef`, `Want` and `Bundle` came with: bundles by
/// digest, from the agent's cache.
pub const BY_DIGEST: Release = Release { major: 0, minor: 2 };

impl Release {
    /// The release of a version string: `MAJOR.MINOR[.PATCH][SUFFIX]`
    /// (`0.1.0`, `0.2.0-simulated`, `0.2.1~rc1`, `1.4`). `None` when it
    /// does not start that way.
    pub fn of(version: &str) -> Option<Release> {
        let mut parts = version.splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor_part = parts.next()?;
        let digits = minor_part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(minor_part.len());
        if digits == 0 || (digits < minor_part.len() && parts.next().is_some()) {
            return None;
        }
        let minor = minor_part[..digits].parse().ok()?;
        Some(Release { major, minor })
    }

    /// This build's release.
    pub fn this() -> Release {
        Release::of(THIS).expect("the workspace version is MAJOR.MINOR.PATCH")
    }

    /// Whether `other` is the release just before this one: the previous
    /// minor, or for `N.0` the last minor of major N-1 ([`LAST_MINORS`]).
    fn follows(self, other: Release) -> bool {
        if self.minor > 0 {
            other.major == self.major && other.minor + 1 == self.minor
        } else {
            other.major + 1 == self.major
                && LAST_MINORS
                    .iter()
                    .any(|&(major, minor)| major == other.major && minor == other.minor)
        }
    }
}

/// The last minor release of each major that has a successor: `N.0`
/// follows it. Written when a new major is released (none yet).
pub const LAST_MINORS: &[(u32, u32)] = &[];

/// The longest version string an agent may say.
pub const MAX_VERSION_LEN: usize = 64;

/// Whether `version` is made of what versions are made of (digits,
/// letters, `.+~-`), at most [`MAX_VERSION_LEN`] long: it is logged and
/// shown in status, and a terminal chooses it.
pub fn well_formed(version: &str) -> bool {
    (1..=MAX_VERSION_LEN).contains(&version.len())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~-".contains(c))
}

/// Why an operator does not serve an agent, in words for its log and the
/// terminal's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unserved {
    /// The version in `Hello` is not `MAJOR.MINOR...`.
    Unreadable { agent: String },
    /// More than one release behind: it may send what this operator no
    /// longer reads.
    TooOld { agent: String, operator: Release },
    /// More than one release ahead.
    TooNew { agent: String, operator: Release },
}

impl fmt::Display for Unserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unserved::Unreadable { agent } => write!(
                f,
                "the agent's version {agent:?} is not MAJOR.MINOR.PATCH; install a released agent"
            ),
            Unserved::TooOld { agent, operator } => write!(
                f,
                "agent {agent} is more than one release older than this operator ({operator}); \
                 install the current agent package on the terminal (its enrolment is kept)"
            ),
            Unserved::TooNew { agent, operator } => write!(
                f,
                "agent {agent} is more than one release newer than this operator ({operator}); \
                 upgrade the operator first"
            ),
        }
    }
}

impl Unserved {
    /// A CamelCase word for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Unserved::Unreadable { .. } => "AgentVersionUnreadable",
            Unserved::TooOld { .. } => "AgentTooOld",
            Unserved::TooNew { .. } => "AgentTooNew",
        }
    }
}

/// Whether an operator of release `operator` serves an agent that says it
/// is `agent`: one release back (it sends only what that release sent),
/// the same, or one release ahead (it writes only what the operator's
/// release reads, having been told that release by `Welcome`).
pub fn serves(operator: Release, agent: &str) -> Result<Release, Unserved> {
    let Some(a) = Release::of(agent).filter(|_| well_formed(agent)) else {
        return Err(Unserved::Unreadable {
            agent: agent.chars().take(MAX_VERSION_LEN).collect(),
        });
    };
    if a == operator || operator.follows(a) || a.follows(operator) {
        return Ok(a);
    }
    if a < operator {
        Err(Unserved::TooOld {
            agent: agent.to_string(),
            operator,
        })
    } else {
        Err(Unserved::TooNew {
            agent: agent.to_string(),
            operator,
        })
    }
}

/// Whether a peer of release `peer` reads what came with `since`.
pub fn knows(peer: Release, since: Release) -> bool {
    peer >= since
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(major: u32, minor: u32) -> Release {
        Release { major, minor }
    }

    #[test]
    fn versions_read_as_releases() {
        assert_eq!(Release::of("0.1.0"), Some(r(0, 1)));
        assert_eq!(Release::of("0.2.0-simulated"), Some(r(0, 2)));
        assert_eq!(Release::of("0.2.1~rc1"), Some(r(0, 2)));
        assert_eq!(Release::of("1.4"), Some(r(1, 4)));
        assert_eq!(Release::of("12.30.7"), Some(r(12, 30)));
        for bad in [
            "", "1", "x.1.0", "1.x.0", "1..0", "test", "1.2-rc.3", "-1.2.0",
        ] {
            assert_eq!(Release::of(bad), None, "{bad:?}");
        }
        assert_eq!(Release::this().to_string().split('.').count(), 2);
    }

    #[test]
    fn an_operator_serves_one_release_either_side() {
        let op = r(0, 2);
        assert_eq!(serves(op, "0.1.0"), Ok(r(0, 1)));
        assert_eq!(serves(op, "0.2.7"), Ok(r(0, 2)));
        assert_eq!(serves(op, "0.3.0"), Ok(r(0, 3)));
        assert_eq!(
            serves(op, "0.4.0").expect_err("refused").to_string(),
            "agent 0.4.0 is more than one release newer than this operator (0.2); upgrade the operator first"
        );
        let old = serves(r(0, 5), "0.3.2").expect_err("refused");
        assert_eq!(old.reason(), "AgentTooOld");
        assert_eq!(
            old.to_string(),
            "agent 0.3.2 is more than one release older than this operator (0.5); \
             install the current agent package on the terminal (its enrolment is kept)"
        );
        assert_eq!(
            serves(op, "test").expect_err("refused").to_string(),
            "the agent's version \"test\" is not MAJOR.MINOR.PATCH; install a released agent"
        );
    }

    #[test]
    fn across_a_major_only_a_listed_last_minor_meets_the_next_major() {
        // No major has a successor yet: 1.0 follows no 0.x.
        assert!(LAST_MINORS.is_empty());
        assert!(serves(r(1, 0), "0.9.3").is_err());
        assert!(serves(r(0, 2), "1.0.0").is_err());
        assert!(serves(r(1, 0), "0.1.0").is_err());
        assert!(serves(r(2, 0), "0.9.0").is_err());
        assert_eq!(serves(r(1, 0), "1.1.0"), Ok(r(1, 1)));
    }

    #[test]
    fn a_version_a_terminal_says_is_only_shown_when_well_formed() {
        for bad in [
            "0.2.0\n  Compliant   x/y",
            "0.2.0\u{1b}[2J",
            "0.2.0 ",
            &format!("0.2.{}", "0".repeat(70)),
            "",
        ] {
            let refused = serves(r(0, 2), bad).expect_err("refused");
            assert_eq!(refused.reason(), "AgentVersionUnreadable", "{bad:?}");
            assert!(refused.to_string().len() < 200);
        }
        assert!(well_formed("0.2.0+site1~rc1-simulated"));
    }

    #[test]
    fn welcome_goes_only_to_agents_that_read_it() {
        assert!(!knows(r(0, 1), WELCOME));
        assert!(knows(r(0, 2), WELCOME));
        assert!(knows(r(1, 0), WELCOME));
    }
}
