//! Evaluating compiled policies against one terminal's inventory: a pure
//! function from (policy, inventory) to which requirements fail and why.

use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tenet_crds::policy::{DesiredServiceState, VersionScheme};
use tenet_protocol::inventory::{FileEntry, Inventory, Package, Service, ServiceState};

use super::cel::TerminalVars;
use super::compile::{Check, CompiledPolicy};
use super::version::Version;

/// One terminal's inventory, indexed for evaluation. Build it once per
/// inventory report and evaluate every policy against it.
pub struct TerminalView<'a> {
    pub inventory: &'a Inventory,
    /// The labels admins assigned the terminal: what selectors match.
    pub assigned: &'a BTreeMap<String, String>,
    packages: HashMap<&'a str, PackageView<'a>>,
    services: HashMap<&'a str, &'a Service>,
    files: HashMap<&'a str, &'a FileEntry>,
    cel: TerminalVars<'a>,
}

struct PackageView<'a> {
    package: &'a Package,
    dpkg: OnceCell<Option<Version>>,
    semver: OnceCell<Option<Version>>,
}

impl<'a> PackageView<'a> {
    /// The installed version in `scheme`, parsed on first use.
    fn version(&self, scheme: VersionScheme) -> Option<&Version> {
        let cell = match scheme {
            VersionScheme::Dpkg => &self.dpkg,
            VersionScheme::Semver => &self.semver,
        };
        cell.get_or_init(|| Version::parse(scheme, &self.package.version).ok())
            .as_ref()
    }
}

impl<'a> TerminalView<'a> {
    /// The terminal whose inventory is `inventory` and to which admins
    /// assigned the labels `assigned`.
    pub fn new(
        inventory: &'a Inventory,
        assigned: &'a BTreeMap<String, String>,
    ) -> TerminalView<'a> {
        let mut packages = HashMap::with_capacity(inventory.packages.len());
        for p in &inventory.packages {
            packages.entry(p.name.as_str()).or_insert(PackageView {
                package: p,
                dpkg: OnceCell::new(),
                semver: OnceCell::new(),
            });
        }
        TerminalView {
            inventory,
            assigned,
            packages,
            services: inventory
                .services
                .iter()
                .map(|s| (s.name.as_str(), s))
                .collect(),
            files: inventory
                .files
                .iter()
                .map(|f| (f.path.as_str(), f))
                .collect(),
            cel: TerminalVars::new(inventory, assigned),
        }
    }

    /// The CEL variables; each is built when an expression first reads it.
    fn cel(&self) -> &TerminalVars<'a> {
        &self.cel
    }
}

/// The verdict of one requirement on one terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequirementResult<'p> {
    pub requirement: &'p str,
    pub passed: bool,
    /// Why it fails, for a person; empty when it passes.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// The verdict of one policy on one terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evaluation<'p> {
    pub selected: bool,
    /// Why the policy does not select the terminal, when the selector could
    /// not be evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector_error: Option<String>,
    pub results: Vec<RequirementResult<'p>>,
}

/// The failing requirements of a selected terminal.
pub type Drift<'e, 'p> = Vec<&'e RequirementResult<'p>>;

impl<'p> Evaluation<'p> {
    /// Selected and every requirement holds.
    pub fn compliant(&self) -> bool {
        self.selected && self.results.iter().all(|r| r.passed)
    }

    pub fn drift(&self) -> Drift<'_, 'p> {
        self.results.iter().filter(|r| !r.passed).collect()
    }
}

/// Evaluate `policy` on the terminal in `view`.
pub fn evaluate<'p>(policy: &'p CompiledPolicy, view: &TerminalView<'_>) -> Evaluation<'p> {
    // On what admins assigned, never on what the terminal claims; and, in
    // a tenancy (Kubernetes mode), only terminals assigned its namespace.
    let labels = view.assigned;
    let tenant =
        !policy.tenant_scoped || labels.get(super::NAMESPACE_LABEL) == Some(&policy.namespace);
    let labels_match = tenant
        && policy
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v));
    let not_selected = |selector_error| Evaluation {
        selected: false,
        selector_error,
        results: Vec::new(),
    };
    if !labels_match {
        return not_selected(None);
    }
    if let Some(sel) = &policy.selector {
        match sel.evaluate_bool(view.cel()) {
            Ok(true) => {}
            Ok(false) => return not_selected(None),
            Err(e) => return not_selected(Some(format!("selector expression failed: {e}"))),
        }
    }
    let results = policy
        .requirements
        .iter()
        .map(|r| {
            let failure = check(&r.check, view);
            RequirementResult {
                requirement: &r.label,
                passed: failure.is_none(),
                reason: failure.unwrap_or_default(),
            }
        })
        .collect();
    Evaluation {
        selected: true,
        selector_error: None,
        results,
    }
}

/// `None` when the check passes, otherwise why it fails.
fn check(check: &Check, view: &TerminalView<'_>) -> Option<String> {
    match check {
        Check::PackagePresent { name, constraint } => {
            let Some(pv) = view.packages.get(name.as_str()) else {
                return Some(match constraint {
                    Some(c) => format!("{name} is not installed (needs {c})"),
                    None => format!("{name} is not installed"),
                });
            };
            // Only a fully installed package counts: a half-installed one
            // is drift, with dpkg's word for its state.
            if let Some(why) = pv.package.not_installed_because() {
                return Some(match constraint {
                    Some(c) => format!("{why} (needs {c})"),
                    None => why,
                });
            }
            let c = constraint.as_ref()?;
            let installed = &pv.package.version;
            match pv.version(c.scheme) {
                None => Some(format!(
                    "{name} {installed} is not a valid {} version, so it cannot satisfy {c}",
                    scheme_name(c.scheme)
                )),
                Some(v) if c.matches(v) => None,
                Some(_) => Some(format!("{name} {installed} does not satisfy {c}")),
            }
        }
        Check::PackageAbsent { name } => view
            .packages
            .get(name.as_str())
            .filter(|pv| pv.package.is_present())
            .map(|pv| match pv.package.not_installed_because() {
                None => format!(
                    "{name} {} is installed but must be absent",
                    pv.package.version
                ),
                Some(why) => format!("{why}, and it must be absent"),
            }),
        Check::File {
            path,
            sha256,
            absent,
        } => match (view.files.get(path.as_str()), absent) {
            (None, true) => None,
            (Some(_), true) => Some(format!("{path} exists but must be absent")),
            (None, false) => Some(format!("{path} is missing")),
            (Some(f), false) => match sha256 {
                Some(want) if !f.sha256.eq_ignore_ascii_case(want) => Some(format!(
                    "{path} has sha256 {} instead of {}",
                    short(&f.sha256),
                    short(want)
                )),
                _ => None,
            },
        },
        Check::Service {
            name,
            state,
            enabled,
        } => {
            let Some(s) = view.services.get(name.as_str()) else {
                return Some(match state {
                    DesiredServiceState::Running => format!("service {name} is not installed"),
                    // A service that does not exist is not running.
                    DesiredServiceState::Stopped => return None,
                });
            };
            let want = match state {
                DesiredServiceState::Running => ServiceState::Running,
                DesiredServiceState::Stopped => ServiceState::Stopped,
            };
            let running = s.state == ServiceState::Running;
            if (want == ServiceState::Running) != running {
                return Some(format!(
                    "service {name} is {}, must be {}",
                    s.state.as_str(),
                    want.as_str()
                ));
            }
            match enabled {
                Some(true) if !s.enabled => Some(format!("service {name} is not enabled at boot")),
                Some(false) if s.enabled => {
                    Some(format!("service {name} is enabled at boot, must not be"))
                }
                _ => None,
            }
        }
        Check::Expression { expr, message } => match expr.evaluate_bool(view.cel()) {
            Ok(true) => None,
            Ok(false) => Some(
                message
                    .clone()
                    .unwrap_or_else(|| format!("expression is false: {}", expr.source)),
            ),
            Err(e) => Some(format!("expression failed: {e}")),
        },
    }
}

fn scheme_name(s: VersionScheme) -> &'static str {
    match s {
        VersionScheme::Dpkg => "Debian",
        VersionScheme::Semver => "semantic",
    }
}

/// The first 12 hex digits of a digest, enough for a person to compare.
fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use tenet_crds::TerminalPolicy;
    use tenet_protocol::inventory::*;

    use super::*;
    use crate::policy::compile;

    fn policy(spec_yaml: &str) -> CompiledPolicy {
        let doc = format!(
            "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata:\n  name: t\nspec:\n{spec_yaml}"
        );
        let p: TerminalPolicy = serde_yaml::from_str(&doc).expect("test policy parses");
        compile(&p).expect("test policy compiles")
    }

    fn terminal() -> Inventory {
        Inventory {
            terminal: "ward-01".into(),
            labels: [("site".to_string(), "nagoya".to_string())].into(),
            facts: Facts {
                os: OsFacts {
                    family: "debian".into(),
                    ..Default::default()
                },
                hardware: HardwareFacts {
                    memory_mib: 8192,
                    ..Default::default()
                },
                ..Default::default()
            },
            packages: vec![
                Package {
                    name: "browser-a".into(),
                    version: "118.0.2-1".into(),
                    manager: PackageManager::Dpkg,
                    state: Default::default(),
                    problems: Vec::new(),
                },
                Package {
                    name: "agent-x".into(),
                    version: "2.10.0".into(),
                    manager: PackageManager::Other,
                    state: Default::default(),
                    problems: Vec::new(),
                },
                Package {
                    name: "weird".into(),
                    version: "not a version".into(),
                    manager: PackageManager::Dpkg,
                    state: Default::default(),
                    problems: Vec::new(),
                },
                // What `dpkg -i` of a new jq left when its library was too
                // old: unpacked, not configured.
                Package {
                    name: "jq".into(),
                    version: "1.6-2.1".into(),
                    manager: PackageManager::Dpkg,
                    state: PackageState::Unpacked,
                    problems: Vec::new(),
                },
                Package {
                    name: "telnetd".into(),
                    version: "0.17-44".into(),
                    manager: PackageManager::Dpkg,
                    state: PackageState::ConfigFiles,
                    problems: Vec::new(),
                },
                Package {
                    name: "hello".into(),
                    version: "2.10-3".into(),
                    manager: PackageManager::Dpkg,
                    state: PackageState::Installed,
                    problems: vec![
                        "dpkg --audit finds it missing the md5sums control file in the database"
                            .into(),
                    ],
                },
            ],
            services: vec![Service {
                name: "clamav-daemon".into(),
                state: ServiceState::Stopped,
                enabled: false,
            }],
            files: vec![FileEntry {
                path: "/etc/motd".into(),
                sha256: "ab".repeat(32),
                size: 10,
            }],
        }
    }

    /// The failure reasons of a policy on the test terminal.
    fn reasons(spec_yaml: &str) -> Vec<String> {
        let p = policy(spec_yaml);
        let inv = terminal();
        let view = TerminalView::new(&inv, &inv.labels);
        let e = evaluate(&p, &view);
        assert!(e.selected, "the policy should select the terminal");
        e.drift().iter().map(|r| r.reason.clone()).collect()
    }

    /// Only a fully installed package (`ii`, nothing `dpkg --audit`
    /// objects to) satisfies a requirement; the others are drift with
    /// dpkg's word for their state. The CEL `packages` map holds only
    /// fully installed ones.
    #[test]
    fn a_package_dpkg_did_not_finish_is_not_installed() {
        assert_eq!(
            reasons("  requirements:\n    - package: { name: jq, version: '>= 1.6' }\n"),
            ["jq 1.6-2.1 is unpacked but not configured (needs >= 1.6)"]
        );
        assert_eq!(
            reasons("  requirements:\n    - package: { name: jq }\n"),
            ["jq 1.6-2.1 is unpacked but not configured"]
        );
        assert_eq!(
            reasons("  requirements:\n    - package: { name: telnetd }\n"),
            ["telnetd is removed; only its configuration files remain"]
        );
        assert_eq!(
            reasons("  requirements:\n    - package: { name: hello }\n"),
            [
                "hello 2.10-3 is installed, but dpkg --audit finds it missing the md5sums control file in the database"
            ]
        );
        // Must be absent: configuration files alone are absent; an
        // unpacked package is not.
        assert!(
            reasons("  requirements:\n    - package: { name: telnetd, absent: true }\n").is_empty()
        );
        assert_eq!(
            reasons("  requirements:\n    - package: { name: jq, absent: true }\n"),
            ["jq 1.6-2.1 is unpacked but not configured, and it must be absent"]
        );
        assert_eq!(
            reasons(
                "  requirements:\n    - expression: { cel: \"'jq' in packages || 'telnetd' in packages\", message: neither }\n"
            ),
            ["neither"]
        );
    }

    #[test]
    fn package_versions() {
        assert_eq!(
            reasons("  requirements:\n    - package: { name: browser-a, version: '>= 120.0' }\n"),
            ["browser-a 118.0.2-1 does not satisfy >= 120.0"]
        );
        assert!(
            reasons(
                "  requirements:\n    - package: { name: browser-a, version: '>= 118, < 119' }\n"
            )
            .is_empty()
        );
        assert_eq!(
            reasons("  requirements:\n    - package: { name: browser-b, version: '>= 1' }\n"),
            ["browser-b is not installed (needs >= 1)"]
        );
        assert_eq!(
            reasons("  requirements:\n    - package: { name: weird, version: '>= 1' }\n"),
            ["weird not a version is not a valid Debian version, so it cannot satisfy >= 1"]
        );
        // 2.10.0 > 2.9 in semver, and in Debian order too; as strings it is not.
        assert!(reasons("  requirements:\n    - package: { name: agent-x, version: '>= 2.9', scheme: semver }\n").is_empty());
        assert_eq!(
            reasons("  requirements:\n    - package: { name: browser-a, absent: true }\n"),
            ["browser-a 118.0.2-1 is installed but must be absent"]
        );
    }

    #[test]
    fn files_and_services() {
        let motd = "ab".repeat(32);
        assert!(
            reasons(&format!(
                "  requirements:\n    - file: {{ path: /etc/motd, sha256: {motd} }}\n"
            ))
            .is_empty()
        );
        assert_eq!(
            reasons(&format!(
                "  requirements:\n    - file: {{ path: /etc/motd, sha256: {} }}\n",
                "cd".repeat(32)
            )),
            ["/etc/motd has sha256 abababababab instead of cdcdcdcdcdcd"]
        );
        assert_eq!(
            reasons(
                "  requirements:\n    - file: { path: /etc/issue }\n    - file: { path: /etc/motd, absent: true }\n"
            ),
            [
                "/etc/issue is missing",
                "/etc/motd exists but must be absent"
            ]
        );
        assert_eq!(
            reasons("  requirements:\n    - service: { name: clamav-daemon }\n"),
            ["service clamav-daemon is stopped, must be running"]
        );
        assert_eq!(
            reasons(
                "  requirements:\n    - service: { name: clamav-daemon, state: stopped, enabled: true }\n"
            ),
            ["service clamav-daemon is not enabled at boot"]
        );
        assert_eq!(
            reasons("  requirements:\n    - service: { name: sshd }\n"),
            ["service sshd is not installed"]
        );
    }

    #[test]
    fn expressions() {
        assert!(
            reasons(
                "  requirements:\n    - expression: { cel: 'claims.facts.hardware.memoryMib >= 4096' }\n"
            )
            .is_empty()
        );
        assert!(reasons("  requirements:\n    - expression: { cel: 'dpkgCompare(packages[\"browser-a\"], \"120\") < 0' }\n").is_empty());
        assert_eq!(
            reasons(
                "  requirements:\n    - expression: { cel: 'size(inventory.services) > 5', message: too few services }\n"
            ),
            ["too few services"]
        );
        assert_eq!(
            reasons("  requirements:\n    - expression: { cel: 'labels.role == \"ward\"' }\n"),
            ["expression failed: no such key 'role'"]
        );
    }

    #[test]
    fn selection() {
        let inv = terminal();
        let view = TerminalView::new(&inv, &inv.labels);
        let other_site = policy(
            "  selector:\n    matchLabels: { site: osaka }\n  requirements:\n    - package: { name: x }\n",
        );
        assert!(!evaluate(&other_site, &view).selected);
        let by_cel = policy(
            "  selector:\n    expression: claims.facts.os.family == 'debian'\n  requirements:\n    - package: { name: x }\n",
        );
        assert!(evaluate(&by_cel, &view).selected);
        let broken = policy(
            "  selector:\n    expression: labels.role == 'ward'\n  requirements:\n    - package: { name: x }\n",
        );
        let e = evaluate(&broken, &view);
        assert!(!e.selected);
        assert_eq!(
            e.selector_error.as_deref(),
            Some("selector expression failed: no such key 'role'")
        );
        assert!(!e.compliant());
    }

    /// A terminal that says it is in Nagoya is selected by Nagoya's
    /// policies only if admins assigned it there; and in a tenancy, a
    /// namespace's policy selects only the terminals assigned to it.
    #[test]
    fn selection_is_on_what_admins_assigned_not_on_what_a_terminal_claims() {
        let inv = terminal();
        assert_eq!(inv.labels["site"], "nagoya");
        let nagoya = policy(
            "  selector:\n    matchLabels: { site: nagoya }\n  requirements:\n    - package: { name: x }\n",
        );
        let osaka: BTreeMap<String, String> = [("site".to_string(), "osaka".to_string())].into();
        assert!(!evaluate(&nagoya, &TerminalView::new(&inv, &osaka)).selected);
        let by_cel = policy(
            "  selector:\n    expression: labels.site == 'nagoya'\n  requirements:\n    - package: { name: x }\n",
        );
        assert!(!evaluate(&by_cel, &TerminalView::new(&inv, &osaka)).selected);

        let mut tenant = nagoya.clone();
        tenant.tenant_scoped = true;
        let mut assigned: BTreeMap<String, String> = inv.labels.clone();
        assert!(!evaluate(&tenant, &TerminalView::new(&inv, &assigned)).selected);
        assigned.insert(crate::policy::NAMESPACE_LABEL.into(), "other-tenant".into());
        assert!(!evaluate(&tenant, &TerminalView::new(&inv, &assigned)).selected);
        assigned.insert(
            crate::policy::NAMESPACE_LABEL.into(),
            tenant.namespace.clone(),
        );
        assert!(evaluate(&tenant, &TerminalView::new(&inv, &assigned)).selected);
    }
}
