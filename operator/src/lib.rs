//! The Tenet operator as a library: the policy language, and the admin
//! commands the `tenet` binary exposes. `main.rs` only parses arguments.

pub mod bench;
pub mod certs;
pub mod cli;
pub mod daemon;
pub mod fleet;
pub mod gateway;
pub mod kubernetes;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod reconcile;
pub mod status;
pub mod store;
pub mod tpm_trust;
