//! The policy language: loading `TerminalPolicy` documents from a GitOps
//! directory, compiling them once per generation (CEL programs, version
//! constraints), and evaluating them against a terminal's inventory.
//!
//! Evaluation is a pure function of a compiled policy and an inventory: it
//! tells whether the policy selects the terminal and, for each requirement,
//! whether it holds and why not.

/// The assigned label that puts a terminal in a Kubernetes namespace's
/// tenancy: in Kubernetes mode, a TerminalPolicy selects only terminals
/// whose admins assigned them its namespace.
pub const NAMESPACE_LABEL: &str = "tenet.dev/namespace";

pub mod approval;
pub mod auto;
pub mod cel;
pub mod compile;
pub mod eval;
pub mod load;
pub mod version;
mod yamlpos;

pub use compile::{CompiledPolicy, FieldError, compile};
pub use eval::{Drift, Evaluation, RequirementResult, TerminalView, evaluate};
pub use load::{LoadError, LoadedPolicy, PolicySet, load_dir, load_inventories, yaml_files};
