//! `TerminalPolicy`: which terminals, what must hold on them, how to
//! remediate drift and how fast to roll remediation out.
//!
//! Writers: `spec` by people (a file in the GitOps directory or
//! `kubectl apply`); `status` by the operator only.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// The desired state of a set of terminals.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tenet.dev",
    version = "v1alpha1",
    kind = "TerminalPolicy",
    plural = "terminalpolicies",
    shortname = "tpol",
    category = "tenet",
    namespaced,
    doc = "The desired state of a set of terminals: which, what must hold, how to remediate and roll out.",
    status = "TerminalPolicyStatus",
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.selected"}"#,
    printcolumn = r#"{"name":"Compliant","type":"integer","jsonPath":".status.compliant"}"#,
    printcolumn = r#"{"name":"Remediating","type":"integer","jsonPath":".status.remediating"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TerminalPolicySpec {
    /// What this policy is for, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Which terminals the policy applies to. Empty selects every terminal.
    #[serde(default)]
    pub selector: TerminalSelector,
    /// What must hold on every selected terminal. All must pass for the
    /// terminal to be compliant. At most 256 (the API server budgets the
    /// cost of the validation rules by the largest list).
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub requirements: Vec<Requirement>,
    /// How to bring a drifted terminal back. Without it, drift is reported
    /// and nothing is dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation: Option<RemediationTemplate>,
    /// How many terminals may be remediated at once.
    #[serde(default)]
    pub rollout: Rollout,
    /// Issue short-lived security certificates to the selected terminals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateTemplate>,
    /// How much this policy counts in a terminal's security level
    /// (0 = not at all). See the security level index in the README.
    #[serde(default = "default_weight")]
    #[schemars(range(max = 100))]
    pub security_weight: u32,
    /// Stop dispatching for this policy; drift is still evaluated and shown.
    #[serde(default)]
    pub suspend: bool,
}

fn default_weight() -> u32 {
    1
}

/// Selects terminals by their labels and, optionally, a CEL expression over
/// `terminal`, `labels` and `facts`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TerminalSelector {
    /// Every label listed must be one admins assigned the terminal (on its
    /// bootstrap token, `tenet token create --label`), with this value;
    /// what the terminal reports about itself does not count.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// A CEL expression that must be true, e.g.
    /// `claims.facts.os.family == "debian" && labels.site == "nagoya"`
    /// (`labels` are those admins assigned; `claims` what the terminal
    /// reports about itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

/// One thing that must hold on a terminal. Exactly one of `package`, `file`,
/// `service` and `expression` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.package) ? 1 : 0) + (has(self.file) ? 1 : 0) + (has(self.service) ? 1 : 0) + (has(self.expression) ? 1 : 0) == 1",
    "message": "a requirement sets exactly one of package, file, service, expression"
}]))]
pub struct Requirement {
    /// A short name shown in drift reasons; defaults to a description of the
    /// requirement such as `package browser-a`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<PackageRequirement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileRequirement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRequirement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<ExpressionRequirement>,
}

/// How versions of a package compare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VersionScheme {
    /// Debian's ordering, as `dpkg --compare-versions` (epochs, `~`, revisions).
    #[default]
    Dpkg,
    /// Semantic versioning 2.0.0.
    Semver,
}

/// A package must be installed (optionally within a version range) or must
/// be absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.absent) && self.absent && has(self.version))",
    "message": "a package that must be absent has no version constraint"
}]))]
pub struct PackageRequirement {
    pub name: String,
    /// A version constraint: comparisons joined by commas, all of which must
    /// hold, e.g. `>= 120.0`, `>= 120, < 130`, `= 1:2.4.1-3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The package must not be installed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub absent: bool,
    #[serde(default)]
    pub scheme: VersionScheme,
}

/// A file must exist (optionally with a given content digest) or be absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.absent) && self.absent && has(self.sha256))",
    "message": "a file that must be absent has no sha256"
}]))]
pub struct FileRequirement {
    /// Absolute path on the terminal.
    #[schemars(regex(pattern = r"^/"))]
    pub path: String,
    /// Lower-case hex SHA-256 the content must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub absent: bool,
}

/// The state a service must be in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DesiredServiceState {
    #[default]
    Running,
    Stopped,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRequirement {
    pub name: String,
    #[serde(default)]
    pub state: DesiredServiceState,
    /// When set, the service must (or must not) start at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// Any CEL expression over the inventory that must be true.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExpressionRequirement {
    /// E.g. `inventory.packages.exists(p, p.name == "clamav")`.
    pub cel: String,
    /// What to tell a person when it is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A host capability a payload may be granted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// Write a bundled artifact to a private directory and run it.
    RunArtifact,
    /// Read the terminal's inventory.
    ReadInventory,
    /// Write files under the granted `writePaths`.
    WriteFiles,
    /// Write log lines that travel in the report.
    Log,
}

/// The remediation dispatched to a drifted terminal: `auto` (Tenet
/// computes it from the requirements) or a `payload` of the admins' own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.capabilities) || !self.capabilities.exists(c, c == 'write-files') || (has(self.writePaths) && size(self.writePaths) > 0)",
        "message": "the write-files capability needs at least one writePaths prefix"
    },
    {
        "rule": "has(self.auto) != has(self.payload)",
        "message": "a remediation sets exactly one of auto, payload"
    },
    {
        "rule": "!has(self.auto) || (!has(self.args) && !has(self.capabilities) && !has(self.writePaths))",
        "message": "an auto remediation computes its arguments and capabilities; remove args, capabilities and writePaths"
    }
]))]
pub struct RemediationTemplate {
    /// Let Tenet remediate the package, file and service requirements
    /// with its standard library payload: it computes the steps from the
    /// requirements, and `tenet policy sign --bundles DIR` picks the signed
    /// standard-library bundle that carries what they need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "auto_schema")]
    pub auto: Option<AutoRemediation>,
    /// A payload bundle of the admins' own, pinned by digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadRef>,
    /// Arguments passed to the payload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Host capabilities granted to the payload; anything else it calls is
    /// refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<Capability>,
    /// Path prefixes the `write-files` capability may write under.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub write_paths: Vec<String>,
    /// Attempts per terminal before it is marked failed.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// How long a dispatched payload may take before the dispatch expires.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u32,
}

fn default_max_attempts() -> u32 {
    5
}
fn default_timeout_seconds() -> u32 {
    300
}

/// An empty object in the CRD: a structural schema may not say
/// `additionalProperties: false`, which schemars writes for a struct
/// without fields that denies unknown ones (standalone mode still refuses
/// them; the API server prunes them).
fn auto_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "description": "Tenet computes the remediation from the requirements (no settings yet)."
    })
}

/// Remediation computed by Tenet (no settings yet: the requirements say
/// what).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoRemediation {}

/// A signed payload bundle, named and pinned by digest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PayloadRef {
    pub name: String,
    /// `sha256:` and 64 lower-case hex digits.
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub digest: String,
}

/// Rollout limits for a policy's remediation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.maxInFlight) && has(self.maxInFlightPercent))",
        "message": "set maxInFlight or maxInFlightPercent, not both"
    },
    {
        "rule": "!has(self.canary) || !has(self.maxInFlight) || self.canary <= self.maxInFlight",
        "message": "canary must not be larger than maxInFlight"
    }
]))]
pub struct Rollout {
    /// At most this many terminals remediating at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_in_flight: Option<u32>,
    /// At most this percentage of the selected terminals remediating at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_in_flight_percent: Option<u32>,
    /// Remediate this many terminals first, and go on only when all of them
    /// verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub canary: Option<u32>,
    /// Halt the rollout when more than this percentage of the finished
    /// remediations failed.
    #[serde(default = "default_halt_percent")]
    #[schemars(range(max = 100))]
    pub halt_on_failure_percent: u32,
    /// When remediations may start (none: any time). The operator
    /// dispatches only inside one, and the terminals refuse to start a
    /// payload outside all of them (the admins approve them with the
    /// remediation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub windows: Vec<MaintenanceWindow>,
}

/// A maintenance window: days of the week, a start and an end time of
/// day, in a time zone. An end before the start runs past midnight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// The days it opens on: `Mon` ... `Sun`.
    #[schemars(length(min = 1, max = 7))]
    pub days: Vec<Weekday>,
    /// When it opens, `HH:MM`.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// When it closes, `HH:MM` (`24:00` for midnight).
    #[schemars(regex(pattern = r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$"))]
    pub end: String,
    /// An IANA time zone name (`Asia/Tokyo`, `UTC`).
    pub time_zone: String,
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

fn default_halt_percent() -> u32 {
    20
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_in_flight: None,
            max_in_flight_percent: None,
            canary: None,
            halt_on_failure_percent: default_halt_percent(),
            windows: Vec::new(),
        }
    }
}

/// Issue security certificates to the selected terminals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "duration(self.renewBefore) < duration(self.validity)",
    "message": "renewBefore must be shorter than validity"
}]))]
pub struct CertificateTemplate {
    /// How long an issued certificate is valid, as a duration (`1h`, `30m`).
    #[serde(default = "default_validity")]
    pub validity: String,
    /// Renew this long before expiry.
    #[serde(default = "default_renew_before")]
    pub renew_before: String,
    /// The lowest security level (0-100) at which a certificate is issued at
    /// all; below it the terminal holds none.
    #[serde(default)]
    #[schemars(range(max = 100))]
    pub minimum_level: u32,
    /// The PCRs (SHA-256 bank) a terminal's TPM quotes in each audit; the
    /// first verified quote sets the values later ones must match, unless
    /// `expectedPcrs` pins them.
    #[serde(default = "default_pcrs")]
    #[schemars(length(min = 1, max = 8), inner(range(max = 23)))]
    pub pcrs: Vec<u32>,
    /// Pinned SHA-256 values of quoted PCRs, by index (`"7": <64 hex
    /// digits>`): every quote must show exactly these, from the first one
    /// on, instead of trusting whatever the first quote showed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 24))]
    pub expected_pcrs: BTreeMap<String, String>,
}

fn default_pcrs() -> Vec<u32> {
    (0..8).collect()
}

fn default_validity() -> String {
    "1h".into()
}
fn default_renew_before() -> String {
    "15m".into()
}

/// What the operator observed of a policy. Written by the operator only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TerminalPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The git commit the policy was read from, in standalone GitOps mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_revision: Option<String>,
    #[serde(default)]
    pub selected: u32,
    #[serde(default)]
    pub compliant: u32,
    #[serde(default)]
    pub drifted: u32,
    #[serde(default)]
    pub remediating: u32,
    #[serde(default)]
    pub failed: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
