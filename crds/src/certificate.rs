//! `SecurityCertificate`: the short-lived posture certificate of one
//! terminal. Expiry is revocation: there is no revocation list.
//!
//! Writers: the operator creates it for each terminal a certificate policy
//! selects (spec) and issues and renews it (status).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tenet.dev",
    version = "v1alpha1",
    kind = "SecurityCertificate",
    shortname = "scert",
    category = "tenet",
    namespaced,
    doc = "The short-lived security certificate of one terminal; expiry is revocation.",
    status = "SecurityCertificateStatus",
    printcolumn = r#"{"name":"Terminal","type":"string","jsonPath":".spec.terminal"}"#,
    printcolumn = r#"{"name":"Level","type":"integer","jsonPath":".status.level"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".status.notAfter"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "duration(self.renewBefore) < duration(self.validity)",
    "message": "renewBefore must be shorter than validity"
}]))]
pub struct SecurityCertificateSpec {
    pub terminal: String,
    /// The policy that asked for this certificate.
    pub policy: String,
    /// Validity of each issued certificate (`1h`).
    pub validity: String,
    /// Renew this long before expiry (`15m`).
    pub renew_before: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityCertificateStatus {
    /// The security level index (0-100) in the current certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// When the operator will renew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_time: Option<String>,
    /// The signed certificate document, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// `Ready`, `Renewing`, `Expired`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
