//! `Remediation`: one dispatch attempt of one policy's payload to one
//! terminal.
//!
//! Writers: the operator creates it (spec) and advances it (status). It keeps
//! only the commitment (SHA-256) of the dispatch nonce, never the nonce.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tenet.dev",
    version = "v1alpha1",
    kind = "Remediation",
    shortname = "rem",
    category = "tenet",
    namespaced,
    doc = "One dispatch attempt of a policy's payload to one terminal.",
    status = "RemediationStatus",
    printcolumn = r#"{"name":"Terminal","type":"string","jsonPath":".spec.terminal"}"#,
    printcolumn = r#"{"name":"Policy","type":"string","jsonPath":".spec.policy"}"#,
    printcolumn = r#"{"name":"Attempt","type":"integer","jsonPath":".spec.attempt"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemediationSpec {
    pub terminal: String,
    pub policy: String,
    pub policy_generation: i64,
    /// `sha256:...` of the payload bundle dispatched.
    pub payload_digest: String,
    /// Hex SHA-256 of the dispatch nonce (the evidence).
    pub nonce_commitment: String,
    /// The per-terminal sequence number of the envelope.
    pub sequence: u64,
    #[schemars(range(min = 1))]
    pub attempt: u32,
    /// RFC 3339.
    pub issued_at: String,
    /// RFC 3339; a report after this is refused.
    pub deadline: String,
}

/// Where a remediation is in its life.
///
/// ```text
/// Pending -> Dispatched -> Verifying -> Succeeded
///    |           |            |
///    +-----------+------------+-----> Failed | Expired
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RemediationPhase {
    /// Waiting for the terminal to be online and the rollout to allow it.
    #[default]
    Pending,
    /// Sent to the agent; no report yet.
    Dispatched,
    /// The report verified; waiting for the next inventory to satisfy the policy.
    Verifying,
    Succeeded,
    Failed,
    /// The deadline passed without a verified report.
    Expired,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemediationStatus {
    #[serde(default)]
    pub phase: RemediationPhase,
    /// A CamelCase word for the last transition (`ReportVerified`, `NonceMismatch`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The payload's exit code, from the verified report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<String>,
}
