//! `Terminal`: one enrolled endpoint.
//!
//! Writers: `spec` by the operator at enrolment (identity key, labels the
//! bootstrap token carried), then `spec.labels` by the fleet's admins
//! (relabelling: the operator takes the change); `status` by the operator
//! from the agent's verified reports.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tenet.dev",
    version = "v1alpha1",
    kind = "Terminal",
    shortname = "term",
    category = "tenet",
    namespaced,
    doc = "An enrolled endpoint terminal, its identity key and what the operator knows of it.",
    status = "TerminalStatus",
    printcolumn = r#"{"name":"Site","type":"string","jsonPath":".spec.labels.site"}"#,
    printcolumn = r#"{"name":"Connected","type":"boolean","jsonPath":".status.connected"}"#,
    printcolumn = r#"{"name":"Compliant","type":"string","jsonPath":".status.compliance"}"#,
    printcolumn = r#"{"name":"Level","type":"integer","jsonPath":".status.securityLevel"}"#,
    printcolumn = r#"{"name":"Last-Report","type":"date","jsonPath":".status.lastReportTime"}"#,
    printcolumn = r#"{"name":"Agent","type":"string","priority":1,"jsonPath":".status.agentVersion"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TerminalSpec {
    /// The terminal's identity public key, registered at enrolment.
    pub identity: IdentityKey,
    /// The labels admins assigned the terminal, which policies select on
    /// (`labels.*` in CEL, `matchLabels`): those of its bootstrap token at
    /// enrolment. Edit them here to relabel the terminal (a move to
    /// another site, or to another tenant with `tenet.dev/namespace`);
    /// the operator checks their syntax and takes them on its next pass.
    /// Unset on Terminals written before relabelling existed: then the
    /// operator's own record stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Deprecated: the `site` label at enrolment, written by earlier
    /// versions; see `labels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// A public key and where its private half lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityKey {
    /// `ed25519` or `ecdsa-p256`.
    pub algorithm: String,
    /// The public key, base64.
    pub public_key: String,
    /// SHA-256 fingerprint of the public key, hex.
    pub fingerprint: String,
    /// Whether the private key is held in a TPM.
    #[serde(default)]
    pub tpm: bool,
}

/// Compliance of this terminal with one policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCompliance {
    pub policy: String,
    pub generation: i64,
    /// `Compliant`, `Drifted`, `Dispatched`, `Verifying` or `Failed`.
    pub state: String,
    /// Why, for a person: the failing requirements, or the failure.
    #[serde(default)]
    pub reason: String,
}

/// What the operator knows of a terminal. Written by the operator only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TerminalStatus {
    #[serde(default)]
    pub connected: bool,
    /// RFC 3339 time since which the terminal is offline, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_time: Option<String>,
    /// The version its agent said on its latest session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// `3/4`: policies complied with out of policies selecting the terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliance: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyCompliance>,
    /// The security level index (0-100) of the last audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_level: Option<u32>,
    /// Facts of the last verified inventory.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facts: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
