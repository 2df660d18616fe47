//! The Tenet terminal agent: the resident client of the first paper. It
//! reports the terminal's inventory, and runs each dispatch in a separate
//! loader process that verifies everything, runs the payload in wasmtime
//! with only the granted capabilities, and signs a report carrying the
//! dispatch's evidence. It never depends on kube.

pub mod audit;
pub mod bench;
pub mod beneath;
pub mod config;
pub mod connection;
pub mod dispatch;
pub mod exec;
pub mod inventory;
pub mod load;
pub mod parked;
pub mod run_queue;
pub mod self_update;
pub mod session;
pub mod simulate;
pub mod store;
pub mod tls;
pub mod tpm;
