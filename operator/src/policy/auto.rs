//! `remediation: {auto: {}}`: the policy says what must hold, Tenet says
//! how. The steps of the standard library payload
//! (`tenet_protocol::stdlib`) are computed from the requirements; which
//! signed standard-library bundle carries what they need (the .debs, a
//! file's content) is chosen when an admin signs the policy, and the
//! approval names it by digest like any payload.
//!
//! So the operator computes an auto policy's statement from the policy
//! and the bundle digest its approval names: adding a bundle to the
//! directory changes nothing in force, and moving to a newer one is a
//! signature of the admins (`tenet policy sign --renew`).

use std::cmp::Ordering;
use std::collections::BTreeSet;

use tenet_crds::policy::{DesiredServiceState, TerminalPolicySpec, VersionScheme};
use tenet_protocol::approval::PolicyApproval;
use tenet_protocol::bundle::{Capability, PayloadBundle};
use tenet_protocol::envelope::MAX_ARGS;
use tenet_protocol::stdlib::{self, Step};
use tenet_protocol::wire::{Kind, SignedMessage, digest_string};

use super::compile::FieldError;
use super::version::{Constraint, compare_dpkg};

/// The standard library payload: its module and its two scripts, built
/// into the binary (`tenet payload build --std` ships them).
pub const STD_WAT: &str = include_str!("../../../stdlib/tenet-std.wat");
pub const STD_SH: &str = include_str!("../../../stdlib/tenet-std.sh");
/// Its installer, the install-deb example payload's.
pub const INSTALLER_SH: &str = include_str!("../../../examples/payloads/install-deb.sh");
/// The installer's file name in the bundle.
pub const INSTALLER: &str = "install-deb.sh";

/// The bytes of steps the module takes (its page, less where it starts
/// copying them).
const MAX_STEP_BYTES: usize = 65_535 - 256;

/// The standard library's module, compiled once.
pub fn std_module() -> &'static [u8] {
    static MODULE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    MODULE.get_or_init(|| {
        // Built into the binary and parsed by a test: it always parses.
        wat::parse_str(STD_WAT).unwrap_or_default()
    })
}

/// What the standard library payload is granted.
pub const CAPABILITIES: [Capability; 2] = [Capability::RunArtifact, Capability::Log];

/// The steps that bring a terminal to `spec`'s requirements, in the order
/// the payload runs them, or why some requirement cannot be remediated
/// automatically (each at its field).
pub fn steps(spec: &TerminalPolicySpec) -> Result<Vec<Step>, Vec<FieldError>> {
    let mut steps = Vec::new();
    let mut errors = Vec::new();
    let mut refuse = |path: String, message: String| errors.push(FieldError::new(path, message));
    for (i, req) in spec.requirements.iter().enumerate() {
        let path = format!("spec.requirements[{i}]");
        let step = if let Some(p) = &req.package {
            if p.absent {
                Step::Purge {
                    package: p.name.clone(),
                }
            } else {
                if p.scheme != VersionScheme::Dpkg {
                    refuse(
                        format!("{path}.package.scheme"),
                        "remediation auto installs Debian packages, whose versions compare as dpkg's; a semver package needs a payload of its own".into(),
                    );
                    continue;
                }
                let constraint = match p.version.as_deref() {
                    None => Vec::new(),
                    Some(v) => match Constraint::parse(VersionScheme::Dpkg, v) {
                        Ok(c) => c.dpkg_clauses(),
                        // compile() says why, at the same field.
                        Err(_) => continue,
                    },
                };
                Step::Install {
                    package: p.name.clone(),
                    constraint,
                }
            }
        } else if let Some(f) = &req.file {
            match (&f.sha256, f.absent) {
                (_, true) => Step::FileAbsent {
                    path: f.path.clone(),
                },
                (Some(sha256), false) => Step::File {
                    path: f.path.clone(),
                    sha256: sha256.clone(),
                },
                (None, false) => {
                    refuse(
                        format!("{path}.file"),
                        "remediation auto cannot make a file exist without knowing its content: give its sha256 (and ship the content in the bundle), or make it absent".into(),
                    );
                    continue;
                }
            }
        } else if let Some(s) = &req.service {
            Step::Service {
                name: s.name.clone(),
                running: s.state == DesiredServiceState::Running,
                enabled: s.enabled,
            }
        } else if req.expression.is_some() {
            refuse(
                format!("{path}.expression"),
                "remediation auto cannot make an expression true: move this requirement to a policy without remediation, or give a payload of your own".into(),
            );
            continue;
        } else {
            continue;
        };
        if let Err(e) = step.to_arg() {
            let field = match (&req.package, &req.file, &req.service) {
                (Some(_), _, _) => "package",
                (_, Some(_), _) => "file.path",
                _ => "service.name",
            };
            refuse(
                format!("{path}.{field}"),
                format!("remediation auto cannot pass this on to the terminal: {e}"),
            );
            continue;
        }
        steps.push(step);
    }
    // The standard library's module copies them into its one 64 KiB page.
    let bytes: usize = steps.iter().map(|s| s.to_string().len() + 1).sum();
    if bytes > MAX_STEP_BYTES {
        refuse(
            "spec.requirements".into(),
            format!(
                "remediation auto passes the steps in at most {MAX_STEP_BYTES} bytes; this policy's take {bytes}: split it into policies"
            ),
        );
    }
    if steps.len() > MAX_ARGS {
        refuse(
            "spec.requirements".into(),
            format!(
                "remediation auto takes at most {MAX_ARGS} package, file and service requirements (an envelope's arguments); this policy has {}",
                steps.len()
            ),
        );
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    steps.sort_by_key(Step::phase);
    Ok(steps)
}

/// The envelope arguments of `steps`.
pub fn args(steps: &[Step]) -> Vec<String> {
    steps.iter().map(ToString::to_string).collect()
}

/// The bundle digest a policy's approval names, read without verifying
/// it (the verdict on the approval does that, against the statement
/// computed with this digest).
pub fn approved_digest(frame: &[u8]) -> Option<[u8; 32]> {
    let frame = SignedMessage::decode(frame, Kind::PolicyApproval).ok()?;
    let approval: PolicyApproval = frame.open().ok()?;
    Some(approval.statement.remediation?.payload_digest)
}

/// What a bundle holds, as far as choosing one for auto policies goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub name: String,
    pub digest: [u8; 32],
    /// It carries the standard library's script.
    pub standard: bool,
    /// Its .debs: package and version, from the Debian file names.
    pub debs: Vec<(String, String)>,
    /// The SHA-256 (hex) of each of its artifacts.
    pub files: BTreeSet<String>,
    pub artifacts: usize,
}

impl Contents {
    pub fn of(bundle: &PayloadBundle, digest: [u8; 32]) -> Contents {
        let carries = |name: &str, text: &str| {
            bundle
                .artifacts
                .iter()
                .any(|a| a.name == name && a.data == text.as_bytes())
        };
        Contents {
            name: bundle.manifest.name.clone(),
            digest,
            // This Tenet's library, byte for byte: a bundle that merely has
            // a script of that name runs code of its own.
            standard: bundle.module == std_module()
                && carries(stdlib::SCRIPT, STD_SH)
                && carries(INSTALLER, INSTALLER_SH),
            debs: bundle
                .artifacts
                .iter()
                .filter_map(|a| stdlib::deb_file_name(&a.name))
                .collect(),
            files: bundle
                .artifacts
                .iter()
                .map(|a| hex::encode(a.sha256))
                .collect(),
            artifacts: bundle.artifacts.len(),
        }
    }

    /// Why this bundle cannot carry out `steps`, if it cannot.
    pub fn lacks(&self, steps: &[Step]) -> Option<String> {
        if !self.standard {
            return Some(
                "it is not this Tenet's standard library (its module or scripts differ: build it with `tenet payload build --std`)".into(),
            );
        }
        for step in steps {
            match step {
                Step::Purge { package } if self.debs.iter().any(|(p, _)| p == package) => {
                    return Some(format!(
                        "it carries a .deb of {package}, which the policy purges"
                    ));
                }
                Step::Install {
                    package,
                    constraint,
                } => {
                    let of: Vec<&String> = self
                        .debs
                        .iter()
                        .filter(|(p, _)| p == package)
                        .map(|(_, v)| v)
                        .collect();
                    match of.as_slice() {
                        [v] if satisfies(v, constraint) => {}
                        [v] => {
                            return Some(format!(
                                "its {package} {v} does not satisfy {}",
                                describe(constraint)
                            ));
                        }
                        [] => return Some(format!("it carries no .deb of {package}")),
                        _ => return Some(format!("it carries more than one .deb of {package}")),
                    }
                }
                Step::File { path, sha256 } if !self.files.contains(sha256) => {
                    return Some(format!(
                        "it carries no file with the SHA-256 {path} must have"
                    ));
                }
                _ => {}
            }
        }
        None
    }

    fn carried(&self) -> Vec<String> {
        self.debs.iter().map(|(p, v)| format!("{p} {v}")).collect()
    }

    /// The versions it would install for `steps`, in step order.
    fn versions<'a>(&'a self, steps: &[Step]) -> Vec<&'a str> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Install { package, .. } => self
                    .debs
                    .iter()
                    .find(|(p, _)| p == package)
                    .map(|(_, v)| v.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// Whether the Debian version `v` satisfies every clause.
pub fn satisfies(v: &str, constraint: &[(stdlib::DpkgOp, String)]) -> bool {
    constraint
        .iter()
        .all(|(op, w)| compare_dpkg(v, w).is_some_and(|o| op.holds(o)))
}

fn describe(constraint: &[(stdlib::DpkgOp, String)]) -> String {
    constraint
        .iter()
        .map(|(op, v)| format!("{} {v}", op.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bundle an admin's signature of an auto policy names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub digest: [u8; 32],
    pub name: String,
    /// The packages it carries (`NAME VERSION`), for the admin to see.
    pub carries: Vec<String>,
    /// Said to the admin: a better bundle that was not taken, and how to
    /// take it.
    pub note: Option<String>,
}

/// Choose the bundle for `steps` among `candidates`: the one the policy's
/// approval already names (`current`), while it still can carry them
/// out and `renew` is not asked, so that the admins' signatures add up;
/// otherwise the one installing the newest versions (then the fewest
/// artifacts, then by name).
pub fn choose(
    steps: &[Step],
    candidates: &[Contents],
    current: Option<[u8; 32]>,
    renew: bool,
) -> Result<Choice, String> {
    let mut able: Vec<&Contents> = candidates
        .iter()
        .filter(|c| c.lacks(steps).is_none())
        .collect();
    able.sort_by(|a, b| better(steps, a, b));
    let Some(best) = able.first() else {
        return Err(why_none(steps, candidates));
    };
    if let Some(kept) = current
        .filter(|_| !renew)
        .and_then(|d| able.iter().find(|c| c.digest == d))
    {
        let note = (better(steps, best, kept) == Ordering::Less
            && best.versions(steps) != kept.versions(steps))
        .then(|| {
            format!(
                "bundle {} ({}) would install newer versions than the approved {}; sign with --renew to move to it",
                best.name,
                digest_string(&best.digest),
                kept.name
            )
        });
        return Ok(Choice {
            digest: kept.digest,
            name: kept.name.clone(),
            carries: kept.carried(),
            note,
        });
    }
    Ok(Choice {
        digest: best.digest,
        name: best.name.clone(),
        carries: best.carried(),
        note: None,
    })
}

/// `Less` when `a` is the better choice.
fn better(steps: &[Step], a: &Contents, b: &Contents) -> Ordering {
    let newer = a
        .versions(steps)
        .iter()
        .zip(b.versions(steps))
        .map(|(x, y)| compare_dpkg(y, x).unwrap_or(Ordering::Equal))
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal);
    newer
        .then(a.artifacts.cmp(&b.artifacts))
        .then(a.name.cmp(&b.name))
        .then(a.digest.cmp(&b.digest))
}

fn why_none(steps: &[Step], candidates: &[Contents]) -> String {
    let standard: Vec<&Contents> = candidates.iter().filter(|c| c.standard).collect();
    if standard.is_empty() {
        return "no standard-library bundle to remediate it with: build one (`tenet payload build --std --name tenet-std --out DIR/tenet-std.bundle`, with `--apt PACKAGE --target ROOT` for packages to install), sign it, and name its directory with --bundles".into();
    }
    let reasons: Vec<String> = standard
        .iter()
        .filter_map(|c| c.lacks(steps).map(|why| format!("{}: {why}", c.name)))
        .collect();
    format!(
        "no standard-library bundle carries what it needs ({}); build one with `tenet payload build --std --apt PACKAGE[=VERSION] --target ROOT` and sign it",
        reasons.join("; ")
    )
}

#[cfg(test)]
mod tests;
