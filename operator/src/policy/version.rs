//! Version constraints and the two orderings packages are compared in:
//! Debian's (what `dpkg --compare-versions` does) and semantic versioning.
//!
//! A constraint is a comma-separated list of comparisons that must all hold:
//! `>= 120.0`, `>= 120, < 130`, `= 1:2.4.1-3`, `!= 2.0`.

use std::cmp::Ordering;
use std::fmt;

use tenet_crds::policy::VersionScheme;

/// A version parsed in one scheme, ready to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    Dpkg(debversion::Version),
    Semver(semver::Version),
}

impl Version {
    pub fn parse(scheme: VersionScheme, text: &str) -> Result<Version, VersionError> {
        let text = text.trim();
        match scheme {
            VersionScheme::Dpkg => parse_dpkg(text).map(Version::Dpkg),
            VersionScheme::Semver => parse_semver(text).map(Version::Semver),
        }
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        match (self, other) {
            (Version::Dpkg(a), Version::Dpkg(b)) => Some(a.cmp(b)),
            // Build metadata does not take part in semver precedence.
            (Version::Semver(a), Version::Semver(b)) => Some(a.cmp_precedence(b)),
            _ => None,
        }
    }
}

/// Why a version or a constraint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("{version:?} is not a valid Debian version: {why}")]
    BadDpkg { version: String, why: &'static str },
    #[error("{version:?} is not a valid semantic version: {why}")]
    BadSemver { version: String, why: String },
    #[error("empty version constraint")]
    EmptyConstraint,
    #[error(
        "{clause:?} is not a comparison: write an operator (=, !=, <, <=, >, >=) and a version, e.g. \">= 120.0\""
    )]
    BadClause { clause: String },
    #[error("{constraint:?} can never be satisfied: {why}")]
    Impossible { constraint: String, why: String },
}

/// Parse and check a Debian version the way dpkg does (`parseversion` in
/// dpkg's lib/dpkg/parsehelp.c): an optional numeric epoch, an upstream
/// part starting with a digit, an optional revision after the last hyphen.
pub fn parse_dpkg(text: &str) -> Result<debversion::Version, VersionError> {
    let bad = |why| VersionError::BadDpkg {
        version: text.to_string(),
        why,
    };
    if text.is_empty() {
        return Err(bad("it is empty"));
    }
    if text.chars().any(char::is_whitespace) {
        return Err(bad("it contains white space"));
    }
    let (epoch, rest) = match text.split_once(':') {
        Some((epoch, rest)) => {
            if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("the epoch before ':' must be a number"));
            }
            match epoch.parse::<u32>() {
                Ok(e) if e <= i32::MAX as u32 => (Some(e), rest),
                _ => return Err(bad("the epoch is too large")),
            }
        }
        None => (None, text),
    };
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((u, r)) => (u, Some(r)),
        None => (rest, None),
    };
    if upstream.is_empty() {
        return Err(bad("the upstream version is empty"));
    }
    if !upstream.as_bytes()[0].is_ascii_digit() {
        return Err(bad("the upstream version must start with a digit"));
    }
    let upstream_ok = |b: u8| b.is_ascii_alphanumeric() || b".+~-:".contains(&b);
    if !upstream.bytes().all(upstream_ok) {
        return Err(bad(
            "the upstream version may hold only letters, digits and . + ~ - :",
        ));
    }
    if let Some(r) = revision {
        if r.is_empty() {
            return Err(bad("the revision after '-' is empty"));
        }
        if !r
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+.~".contains(&b))
        {
            return Err(bad("the revision may hold only letters, digits and + . ~"));
        }
    }
    // Checked above as dpkg checks; build the value without the crate's
    // regex, which cost a fifth of a policy evaluation.
    Ok(debversion::Version {
        epoch,
        upstream_version: upstream.to_string(),
        debian_revision: revision.map(str::to_string),
    })
}

/// Semantic versions; `120` and `120.1` are read as `120.0.0` and `120.1.0`,
/// as people write them in policies.
pub fn parse_semver(text: &str) -> Result<semver::Version, VersionError> {
    let core_end = text.find(['-', '+']).unwrap_or(text.len());
    let dots = text[..core_end].matches('.').count();
    let padded;
    let full = match dots {
        0 => {
            padded = format!("{}.0.0{}", &text[..core_end], &text[core_end..]);
            &padded
        }
        1 => {
            padded = format!("{}.0{}", &text[..core_end], &text[core_end..]);
            &padded
        }
        _ => text,
    };
    semver::Version::parse(full).map_err(|e| VersionError::BadSemver {
        version: text.to_string(),
        why: e.to_string(),
    })
}

/// A comparison operator in a constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn holds(self, ord: Ordering) -> bool {
        match self {
            Op::Eq => ord == Ordering::Equal,
            Op::Ne => ord != Ordering::Equal,
            Op::Lt => ord == Ordering::Less,
            Op::Le => ord != Ordering::Greater,
            Op::Gt => ord == Ordering::Greater,
            Op::Ge => ord != Ordering::Less,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// One comparison: `>= 120.0`.
#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    pub op: Op,
    pub version: Version,
    text: String,
}

/// All clauses must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub scheme: VersionScheme,
    pub clauses: Vec<Clause>,
    text: String,
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Constraint {
    /// Parse `>= 120, < 130` in `scheme`, and refuse constraints no version
    /// can satisfy.
    pub fn parse(scheme: VersionScheme, text: &str) -> Result<Constraint, VersionError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(VersionError::EmptyConstraint);
        }
        let mut clauses = Vec::new();
        for raw in trimmed.split(',') {
            let clause = raw.trim();
            let (op, rest) = split_op(clause).ok_or_else(|| VersionError::BadClause {
                clause: clause.to_string(),
            })?;
            let rest = rest.trim();
            // `=> 120` would otherwise read as `=` and a version `> 120`.
            if rest.is_empty() || rest.starts_with(['<', '>', '=', '!']) {
                return Err(VersionError::BadClause {
                    clause: clause.to_string(),
                });
            }
            let version = Version::parse(scheme, rest)?;
            clauses.push(Clause {
                op,
                version,
                text: format!("{} {}", op.as_str(), rest),
            });
        }
        let constraint = Constraint {
            scheme,
            clauses,
            text: trimmed.to_string(),
        };
        constraint.check_satisfiable()?;
        Ok(constraint)
    }

    /// The clauses as `dpkg --compare-versions` takes them (what the
    /// standard library payload checks on the terminal).
    pub fn dpkg_clauses(&self) -> Vec<(tenet_protocol::stdlib::DpkgOp, String)> {
        use tenet_protocol::stdlib::DpkgOp;
        self.clauses
            .iter()
            .map(|c| {
                let op = match c.op {
                    Op::Eq => DpkgOp::Eq,
                    Op::Ne => DpkgOp::Ne,
                    Op::Lt => DpkgOp::Lt,
                    Op::Le => DpkgOp::Le,
                    Op::Gt => DpkgOp::Gt,
                    Op::Ge => DpkgOp::Ge,
                };
                // `text` is the operator, a space and the version as written.
                let version = c.text.split_once(' ').map_or("", |(_, v)| v).trim();
                (op, version.to_string())
            })
            .collect()
    }

    /// Whether `version` satisfies every clause.
    pub fn matches(&self, version: &Version) -> bool {
        self.clauses.iter().all(|c| {
            version
                .partial_cmp(&c.version)
                .is_some_and(|ord| c.op.holds(ord))
        })
    }

    /// The tightest lower and upper bounds must leave room for a version;
    /// an exact version must satisfy every other clause.
    fn check_satisfiable(&self) -> Result<(), VersionError> {
        let impossible = |why: String| VersionError::Impossible {
            constraint: self.text.clone(),
            why,
        };
        for exact in self.clauses.iter().filter(|c| c.op == Op::Eq) {
            if let Some(other) = self.clauses.iter().find(|c| {
                !exact
                    .version
                    .partial_cmp(&c.version)
                    .is_some_and(|ord| c.op.holds(ord))
            }) {
                return Err(impossible(format!(
                    "{} contradicts {}",
                    exact.text, other.text
                )));
            }
        }
        let lower = self
            .clauses
            .iter()
            .filter(|c| matches!(c.op, Op::Gt | Op::Ge))
            .max_by(|a, b| bound_order(a, b, true));
        let upper = self
            .clauses
            .iter()
            .filter(|c| matches!(c.op, Op::Lt | Op::Le))
            .max_by(|a, b| bound_order(a, b, false));
        if let (Some(lo), Some(hi)) = (lower, upper) {
            let ord = lo.version.partial_cmp(&hi.version);
            let empty = match ord {
                Some(Ordering::Greater) => true,
                Some(Ordering::Equal) => !(lo.op == Op::Ge && hi.op == Op::Le),
                _ => false,
            };
            if empty {
                return Err(impossible(format!(
                    "{} and {} leave no version",
                    lo.text, hi.text
                )));
            }
        }
        Ok(())
    }
}

/// Orders bounds so that `max_by` picks the tightest one: for lower bounds
/// the highest version (exclusive beats inclusive at a tie); for upper
/// bounds the lowest.
fn bound_order(a: &Clause, b: &Clause, lower: bool) -> Ordering {
    let ord = a.version.partial_cmp(&b.version).unwrap_or(Ordering::Equal);
    let ord = if lower { ord } else { ord.reverse() };
    ord.then_with(|| {
        let exclusive = |c: &Clause| matches!(c.op, Op::Gt | Op::Lt);
        exclusive(a).cmp(&exclusive(b))
    })
}

fn split_op(clause: &str) -> Option<(Op, &str)> {
    // Longest operators first.
    const OPS: [(&str, Op); 7] = [
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("!=", Op::Ne),
        ("==", Op::Eq),
        (">", Op::Gt),
        ("<", Op::Lt),
        ("=", Op::Eq),
    ];
    OPS.iter()
        .find_map(|(s, op)| clause.strip_prefix(s).map(|rest| (*op, rest)))
}

/// Compare two Debian version strings as dpkg does. `None` when either does
/// not parse.
pub fn compare_dpkg(a: &str, b: &str) -> Option<Ordering> {
    Some(parse_dpkg(a).ok()?.cmp(&parse_dpkg(b).ok()?))
}

/// Compare two semantic versions by precedence. `None` when either does not
/// parse.
pub fn compare_semver(a: &str, b: &str) -> Option<Ordering> {
    Some(parse_semver(a).ok()?.cmp_precedence(&parse_semver(b).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(text: &str) -> Result<Constraint, VersionError> {
        Constraint::parse(VersionScheme::Dpkg, text)
    }
    fn v(text: &str) -> Version {
        Version::parse(VersionScheme::Dpkg, text).expect("test version parses")
    }

    #[test]
    fn debian_ordering_basics() {
        assert_eq!(compare_dpkg("1.0~rc1", "1.0"), Some(Ordering::Less));
        assert_eq!(compare_dpkg("1:1.0", "2.0"), Some(Ordering::Greater));
        assert_eq!(compare_dpkg("118.0.2", "120"), Some(Ordering::Less));
        assert_eq!(compare_dpkg("9.0", "120.0"), Some(Ordering::Less));
        assert_eq!(compare_dpkg("1.0-1", "1.0-1+b1"), Some(Ordering::Less));
        assert_eq!(compare_dpkg("1.0a", "1.0+"), Some(Ordering::Less));
    }

    #[test]
    fn ranges_and_exact() {
        let range = c(">= 120, < 130").expect("valid");
        assert!(range.matches(&v("120.0")));
        assert!(range.matches(&v("129.9-1")));
        assert!(!range.matches(&v("130")));
        assert!(!range.matches(&v("118.0.2")));
        let exact = c("= 1:2.4.1-3").expect("valid");
        assert!(exact.matches(&v("1:2.4.1-3")));
        assert!(!exact.matches(&v("2.4.1-3")));
        assert!(c("!= 2.0").expect("valid").matches(&v("2.1")));
    }

    #[test]
    fn impossible_constraints_are_refused() {
        for text in [
            ">= 130, < 120",
            "> 5, <= 5",
            ">= 5, < 5",
            "= 3, > 4",
            "= 1.0, != 1.0",
        ] {
            assert!(
                matches!(c(text), Err(VersionError::Impossible { .. })),
                "{text} should be impossible: {:?}",
                c(text)
            );
        }
        assert!(c(">= 5, <= 5").is_ok());
    }

    #[test]
    fn malformed_constraints_are_refused() {
        assert_eq!(c(""), Err(VersionError::EmptyConstraint));
        assert!(matches!(c("=> 120"), Err(VersionError::BadClause { .. })));
        assert!(matches!(c(">="), Err(VersionError::BadClause { .. })));
        assert!(matches!(c("120"), Err(VersionError::BadClause { .. })));
        assert!(matches!(c(">= abc"), Err(VersionError::BadDpkg { .. })));
        assert!(matches!(c(">= 1.0 2.0"), Err(VersionError::BadDpkg { .. })));
    }

    #[test]
    fn semver_ordering_and_padding() {
        let s = Constraint::parse(VersionScheme::Semver, ">= 1.2, < 2").expect("valid");
        let sv = |t| Version::parse(VersionScheme::Semver, t).expect("semver");
        assert!(s.matches(&sv("1.10.0")));
        // A pre-release of 2.0.0 precedes 2.0.0, so `< 2` admits it.
        assert!(s.matches(&sv("2.0.0-rc.1")));
        assert!(!s.matches(&sv("1.1.9")));
        assert_eq!(compare_semver("1.0.0-alpha", "1.0.0"), Some(Ordering::Less));
        assert_eq!(compare_semver("1.0.0+b1", "1.0.0"), Some(Ordering::Equal));
    }
}
