//! Tenet's wire protocol: the messages that cross between the operator, the
//! agents and their peers. This crate depends on neither kube nor tokio, so
//! the agent and any third-party verifier can use it alone.

pub mod inventory;
