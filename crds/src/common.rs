//! Types shared by several resources.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A status condition, as in Kubernetes' `metav1.Condition`: one per `type`,
/// changed only on a transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing`, `Halted`, `Degraded`, ...
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word a program can match on.
    pub reason: String,
    /// A sentence a person can read.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
