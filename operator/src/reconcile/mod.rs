//! The reconciler's decisions, as pure functions of state, event and time:
//! where a (terminal, policy) pair stands ([`state`]), how many drifted
//! terminals a policy's rollout may start now ([`rollout`]). The I/O that
//! feeds them (inventories, reports, the store, the gateway) sits outside.

pub mod level;
pub mod pass;
pub mod posture;
pub mod rollout;
pub mod state;
