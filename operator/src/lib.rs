//! The Tenet operator as a library: the policy language, the reconciler,
//! the gateway agents connect to, and the admin commands the `tenet` binary
//! exposes (`cli`). `main.rs` only calls `cli::main`.

pub mod bench;
pub mod cli;
pub mod daemon;
pub mod data_dir;
pub mod evidence;
pub mod fleet;
pub mod gateway;
pub mod kubernetes;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod posture;
pub mod reconcile;
pub mod status;
pub mod store;
pub mod time;
pub mod tokens;
pub mod tpm_trust;
pub mod trust;
