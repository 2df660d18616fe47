//! Turning a `TerminalPolicy` into something that evaluates fast and cannot
//! fail for reasons the author could have been told about: every CEL program
//! compiled and checked, every version constraint parsed and satisfiable,
//! and the rules the CRD schema states for the API server checked here too,
//! so that standalone mode refuses exactly what Kubernetes refuses.

use std::sync::Arc;

use tenet_crds::TerminalPolicy;
use tenet_crds::policy::{
    Capability, DesiredServiceState, MaintenanceWindow, Requirement, TerminalPolicySpec,
};
use tenet_protocol::approval::PolicyStatement;
use tenet_protocol::window::{Window, check_time_zone, parse_time_of_day};

use super::cel::Expression;
use super::version::Constraint;

/// One error in a policy, located by its field path
/// (`spec.requirements[0].package.version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
    /// Column offset inside the field's value (for CEL syntax errors), 0-based.
    pub offset: Option<usize>,
}

impl FieldError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            message: message.into(),
            offset: None,
        }
    }
}

/// A policy ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub namespace: String,
    pub name: String,
    /// The generation envelopes carry: it only goes up for a policy's
    /// name, also across a deletion and re-creation (see
    /// `Store::policy_generation`), so agents never take a new policy for
    /// a rollback.
    pub generation: i64,
    /// The resource's own `metadata.generation`, what its status reports
    /// as observed (in Kubernetes it starts again at 1 on re-creation).
    pub observed_generation: i64,
    pub spec: Arc<TerminalPolicySpec>,
    pub match_labels: Vec<(String, String)>,
    pub selector: Option<Expression>,
    pub requirements: Vec<CompiledRequirement>,
    /// It selects only terminals whose admins assigned them its namespace
    /// (`tenet.dev/namespace`): Kubernetes mode, where each namespace is a
    /// tenant.
    pub tenant_scoped: bool,
    /// What the admins' approval of this version must sign.
    pub statement: Arc<PolicyStatement>,
    /// The approval frame its `tenet.dev/approval` annotation carries, or
    /// why there is none (judged by `approval::Gate`).
    pub approval: Result<Arc<[u8]>, String>,
}

impl CompiledPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone)]
pub struct CompiledRequirement {
    /// How the requirement is named in reasons: its `name`, or a description.
    pub label: String,
    pub check: Check,
}

/// What one requirement checks.
#[derive(Debug, Clone)]
pub enum Check {
    PackagePresent {
        name: String,
        constraint: Option<Constraint>,
    },
    PackageAbsent {
        name: String,
    },
    File {
        path: String,
        sha256: Option<String>,
        absent: bool,
    },
    Service {
        name: String,
        state: DesiredServiceState,
        enabled: Option<bool>,
    },
    Expression {
        expr: Expression,
        message: Option<String>,
    },
}

/// Compile a policy, or list every error in it.
pub fn compile(policy: &TerminalPolicy) -> Result<CompiledPolicy, Vec<FieldError>> {
    let mut errors = Vec::new();
    let spec = &policy.spec;

    let selector = spec
        .selector
        .expression
        .as_deref()
        .and_then(|src| compile_cel(src, "spec.selector.expression", &mut errors));

    let mut requirements = Vec::with_capacity(spec.requirements.len());
    let mut labels = std::collections::HashSet::new();
    for (i, req) in spec.requirements.iter().enumerate() {
        let path = format!("spec.requirements[{i}]");
        if let Some(r) = compile_requirement(req, &path, &mut errors) {
            if !labels.insert(r.label.clone()) {
                errors.push(FieldError::new(
                    format!("{path}.name"),
                    format!(
                        "two requirements are named {:?}; give each its own name",
                        r.label
                    ),
                ));
            }
            requirements.push(r);
        }
    }
    if spec.requirements.is_empty() && spec.certificate.is_none() {
        errors.push(FieldError::new(
            "spec.requirements",
            "a policy needs at least one requirement (or a certificate section)",
        ));
    }
    check_remediation(spec, &mut errors);
    check_rollout(spec, &mut errors);
    if spec.requirements.len() > MAX_REQUIREMENTS {
        errors.push(FieldError::new(
            "spec.requirements",
            format!(
                "{} requirements; at most {MAX_REQUIREMENTS} (the CRD's maxItems)",
                spec.requirements.len()
            ),
        ));
    }
    check_certificate(spec, &mut errors);
    if spec.security_weight > 100 {
        errors.push(FieldError::new(
            "spec.securityWeight",
            "must be between 0 and 100",
        ));
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = policy.metadata.name.clone().unwrap_or_default();
    let approval = super::approval::annotation_frame(&policy.metadata);
    Ok(CompiledPolicy {
        statement: Arc::new(super::approval::statement(
            &format!("{namespace}/{name}"),
            spec,
            approval
                .as_deref()
                .ok()
                .and_then(super::auto::approved_digest),
        )),
        approval: approval.map(Arc::from),
        tenant_scoped: false,
        namespace,
        name,
        generation: policy.metadata.generation.unwrap_or(1),
        observed_generation: policy.metadata.generation.unwrap_or(1),
        spec: Arc::new(spec.clone()),
        match_labels: spec
            .selector
            .match_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        selector,
        requirements,
    })
}

fn compile_cel(src: &str, path: &str, errors: &mut Vec<FieldError>) -> Option<Expression> {
    match Expression::compile(src) {
        Ok(e) => Some(e),
        Err(e) => {
            let offset = match &e {
                super::cel::CelError::Syntax { column, .. } => Some(column.saturating_sub(1)),
                _ => None,
            };
            errors.push(FieldError {
                path: path.to_string(),
                message: e.to_string(),
                offset,
            });
            None
        }
    }
}

fn compile_requirement(
    req: &Requirement,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<CompiledRequirement> {
    let set = [
        req.package.is_some(),
        req.file.is_some(),
        req.service.is_some(),
        req.expression.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        errors.push(FieldError::new(
            path,
            format!(
                "a requirement sets exactly one of package, file, service, expression (this one sets {set})"
            ),
        ));
        return None;
    }
    let (default_label, check) = if let Some(p) = &req.package {
        let path = format!("{path}.package");
        if p.name.trim().is_empty() {
            errors.push(FieldError::new(
                format!("{path}.name"),
                "package name is empty",
            ));
        }
        if p.absent {
            if p.version.is_some() {
                errors.push(FieldError::new(
                    format!("{path}.version"),
                    "a package that must be absent has no version constraint",
                ));
                return None;
            }
            (
                format!("package {} absent", p.name),
                Check::PackageAbsent {
                    name: p.name.clone(),
                },
            )
        } else {
            let constraint = match p.version.as_deref().map(|v| Constraint::parse(p.scheme, v)) {
                None => None,
                Some(Ok(c)) => Some(c),
                Some(Err(e)) => {
                    errors.push(FieldError::new(format!("{path}.version"), e.to_string()));
                    return None;
                }
            };
            (
                format!("package {}", p.name),
                Check::PackagePresent {
                    name: p.name.clone(),
                    constraint,
                },
            )
        }
    } else if let Some(f) = &req.file {
        let path = format!("{path}.file");
        if !f.path.starts_with('/') {
            errors.push(FieldError::new(
                format!("{path}.path"),
                format!("{:?} is not an absolute path", f.path),
            ));
        }
        if let Some(d) = &f.sha256 {
            if d.len() != 64
                || !d
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                errors.push(FieldError::new(
                    format!("{path}.sha256"),
                    "must be 64 lower-case hex digits",
                ));
            }
            if f.absent {
                errors.push(FieldError::new(
                    format!("{path}.sha256"),
                    "a file that must be absent has no sha256",
                ));
            }
        }
        (
            format!("file {}", f.path),
            Check::File {
                path: f.path.clone(),
                sha256: f.sha256.clone(),
                absent: f.absent,
            },
        )
    } else if let Some(s) = &req.service {
        if s.name.trim().is_empty() {
            errors.push(FieldError::new(
                format!("{path}.service.name"),
                "service name is empty",
            ));
        }
        // The inventory lists services by name, without `.service`: a
        // requirement on `sshd.service` would never find it (and a
        // stopped one would always hold).
        if let Some(unit) = UNIT_SUFFIXES.iter().find(|u| s.name.ends_with(*u)) {
            errors.push(FieldError::new(
                format!("{path}.service.name"),
                if *unit == ".service" {
                    format!(
                        "{:?}: name the service without .service ({:?}), as the inventory lists it",
                        s.name,
                        s.name.trim_end_matches(".service")
                    )
                } else {
                    format!("{:?} is a {unit} unit; only services are checked", s.name)
                },
            ));
        }
        (
            format!("service {}", s.name),
            Check::Service {
                name: s.name.clone(),
                state: s.state,
                enabled: s.enabled,
            },
        )
    } else {
        let e = req.expression.as_ref()?;
        let expr = compile_cel(&e.cel, &format!("{path}.expression.cel"), errors)?;
        (
            format!("expression {}", e.cel),
            Check::Expression {
                expr,
                message: e.message.clone(),
            },
        )
    };
    Some(CompiledRequirement {
        label: req.name.clone().unwrap_or(default_label),
        check,
    })
}

fn check_remediation(spec: &TerminalPolicySpec, errors: &mut Vec<FieldError>) {
    let Some(r) = &spec.remediation else { return };
    match (&r.auto, &r.payload) {
        (Some(_), None) => {
            for (field, set) in [
                ("args", !r.args.is_empty()),
                ("capabilities", !r.capabilities.is_empty()),
                ("writePaths", !r.write_paths.is_empty()),
            ] {
                if set {
                    errors.push(FieldError::new(
                        format!("spec.remediation.{field}"),
                        "an auto remediation computes its arguments and capabilities from the requirements; remove this",
                    ));
                }
            }
            if let Err(e) = super::auto::steps(spec) {
                errors.extend(e);
            }
        }
        (None, Some(payload)) => check_payload(payload, errors),
        _ => errors.push(FieldError::new(
            "spec.remediation",
            "a remediation sets exactly one of auto (Tenet computes it) and payload (a bundle of your own)",
        )),
    }
    if r.capabilities.contains(&Capability::WriteFiles) && r.write_paths.is_empty() {
        errors.push(FieldError::new(
            "spec.remediation.writePaths",
            "the write-files capability needs at least one writePaths prefix",
        ));
    }
    for (i, p) in r.write_paths.iter().enumerate() {
        if !p.starts_with('/') || p.split('/').any(|seg| seg == "..") {
            errors.push(FieldError::new(
                format!("spec.remediation.writePaths[{i}]"),
                format!("{p:?} must be an absolute path without '..'"),
            ));
        }
    }
    if !(1..=100).contains(&r.max_attempts) {
        errors.push(FieldError::new(
            "spec.remediation.maxAttempts",
            "must be between 1 and 100",
        ));
    }
    if !(1..=86400).contains(&r.timeout_seconds) {
        errors.push(FieldError::new(
            "spec.remediation.timeoutSeconds",
            "must be between 1 and 86400",
        ));
    }
}

fn check_payload(payload: &tenet_crds::policy::PayloadRef, errors: &mut Vec<FieldError>) {
    let digest_ok = payload.digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !digest_ok {
        errors.push(FieldError::new(
            "spec.remediation.payload.digest",
            format!(
                "{:?} is not sha256: and 64 lower-case hex digits",
                payload.digest
            ),
        ));
    }
    if payload.name.trim().is_empty() {
        errors.push(FieldError::new(
            "spec.remediation.payload.name",
            "payload name is empty",
        ));
    }
}

/// systemd's unit types: a service requirement names a service without
/// its suffix.
const UNIT_SUFFIXES: [&str; 11] = [
    ".service",
    ".socket",
    ".timer",
    ".target",
    ".mount",
    ".automount",
    ".path",
    ".slice",
    ".scope",
    ".device",
    ".swap",
];

/// The CRD's `maxItems` on `spec.requirements`: the API server budgets the
/// cost of the validation rules by the longest list, and standalone mode
/// enforces the same limit.
const MAX_REQUIREMENTS: usize = 256;

fn check_rollout(spec: &TerminalPolicySpec, errors: &mut Vec<FieldError>) {
    let r = &spec.rollout;
    if r.max_in_flight.is_some() && r.max_in_flight_percent.is_some() {
        errors.push(FieldError::new(
            "spec.rollout",
            "set maxInFlight or maxInFlightPercent, not both",
        ));
    }
    if r.max_in_flight == Some(0) {
        errors.push(FieldError::new(
            "spec.rollout.maxInFlight",
            "must be at least 1",
        ));
    }
    if let Some(p) = r.max_in_flight_percent
        && !(1..=100).contains(&p)
    {
        errors.push(FieldError::new(
            "spec.rollout.maxInFlightPercent",
            format!("{p} is not a percentage between 1 and 100"),
        ));
    }
    if r.halt_on_failure_percent > 100 {
        errors.push(FieldError::new(
            "spec.rollout.haltOnFailurePercent",
            format!(
                "{} is not a percentage between 0 and 100",
                r.halt_on_failure_percent
            ),
        ));
    }
    if r.canary == Some(0) {
        errors.push(FieldError::new("spec.rollout.canary", "must be at least 1"));
    }
    if let (Some(c), Some(m)) = (r.canary, r.max_in_flight)
        && c > m
    {
        errors.push(FieldError::new(
            "spec.rollout.canary",
            format!("canary ({c}) must not be larger than maxInFlight ({m})"),
        ));
    }
    for (i, w) in r.windows.iter().enumerate() {
        if let Err((field, message)) = window(w) {
            errors.push(FieldError::new(
                format!("spec.rollout.windows[{i}].{field}"),
                message,
            ));
        }
    }
}

/// A policy's maintenance window as terminals check it; or the field that
/// is wrong, and why.
pub fn window(w: &MaintenanceWindow) -> Result<Window, (&'static str, String)> {
    if w.days.is_empty() {
        return Err(("days", "name at least one day (Mon ... Sun)".into()));
    }
    let days = w.days.iter().fold(0u8, |bits, d| bits | (1 << (*d as u8)));
    let start = parse_time_of_day(&w.start).map_err(|e| ("start", e))?;
    let end = parse_time_of_day(&w.end).map_err(|e| ("end", e))?;
    if start == 1440 {
        return Err(("start", "a window opens before 24:00".into()));
    }
    if start == end {
        return Err(("end", format!("the window opens and closes at {}", w.start)));
    }
    check_time_zone(&w.time_zone).map_err(|e| ("timeZone", e))?;
    Ok(Window {
        days,
        start_minute: start,
        end_minute: end % 1440,
        time_zone: w.time_zone.clone(),
    })
}

/// A pinned PCR value: 64 hex digits (an optional `sha256:` prefix).
pub fn pinned_value(text: &str) -> Option<[u8; 32]> {
    let hex_digits = text.strip_prefix("sha256:").unwrap_or(text);
    hex::decode(hex_digits).ok()?.try_into().ok()
}

/// The longest validity a security certificate may have: 30 days. Expiry
/// is the only revocation, so a longer one would vouch for a posture
/// long gone (and a huge one overflowed the expiry time).
pub const MAX_CERTIFICATE_VALIDITY_SECONDS: f64 = 30.0 * 24.0 * 3600.0;

fn check_certificate(spec: &TerminalPolicySpec, errors: &mut Vec<FieldError>) {
    let Some(c) = &spec.certificate else { return };
    let validity = parse_duration(&c.validity)
        .map_err(|e| errors.push(FieldError::new("spec.certificate.validity", e)))
        .ok();
    let renew = parse_duration(&c.renew_before)
        .map_err(|e| errors.push(FieldError::new("spec.certificate.renewBefore", e)))
        .ok();
    if let Some(v) = validity
        && v > MAX_CERTIFICATE_VALIDITY_SECONDS
    {
        errors.push(FieldError::new(
            "spec.certificate.validity",
            format!(
                "{:?} is longer than the longest validity the operator issues ({}h): security certificates are short-lived",
                c.validity,
                MAX_CERTIFICATE_VALIDITY_SECONDS / 3600.0
            ),
        ));
    }
    if let (Some(v), Some(r)) = (validity, renew)
        && r >= v
    {
        errors.push(FieldError::new(
            "spec.certificate.renewBefore",
            "renewBefore must be shorter than validity",
        ));
    }
    if c.minimum_level > 100 {
        errors.push(FieldError::new(
            "spec.certificate.minimumLevel",
            "must be between 0 and 100",
        ));
    }
    for (index, value) in &c.expected_pcrs {
        let path = format!("spec.certificate.expectedPcrs.{index}");
        match index.parse::<u32>() {
            Ok(i) if c.pcrs.contains(&i) => {}
            Ok(i) if i <= 23 => errors.push(FieldError::new(
                path.clone(),
                format!("PCR {i} is pinned but not quoted: add it to spec.certificate.pcrs"),
            )),
            _ => errors.push(FieldError::new(
                path.clone(),
                format!("{index:?} is not a PCR index (0 to 23)"),
            )),
        }
        if pinned_value(value).is_none() {
            errors.push(FieldError::new(
                path,
                format!("{value:?} is not a SHA-256 value (64 hex digits)"),
            ));
        }
    }
}

pub use crate::time::parse_duration;

#[cfg(test)]
mod tests;
