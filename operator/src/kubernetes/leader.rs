//! Leader election on a `coordination.k8s.io` Lease: of several operator
//! replicas only the holder reconciles, dispatches and serves the agent
//! gateway. The holder renews every `lease / 3`; a replica takes the Lease
//! over only once it has not been renewed for `lease`. Writes are
//! compare-and-set on the Lease's resourceVersion, so two replicas never
//! both take it. A holder that cannot renew before its lease runs out stops
//! (exits): another replica may already hold it, and this one must not
//! dispatch beside it.

use crate::time::now_ms;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

/// The Lease's name (the Role grants exactly this one).
pub const LEASE: &str = "tenet-operator";

/// What to do with the Lease as read (pure: tested below).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody holds it: create it.
    Create,
    /// Ours, or expired: write it with us as holder.
    Take { transition: bool },
    /// Another holder renewed it recently.
    Wait,
}

/// Decide from the Lease's holder, last renewal (ms) and duration.
pub fn claim(lease: Option<(&str, u64, u64)>, me: &str, now_ms: u64) -> Claim {
    match lease {
        None => Claim::Create,
        Some((holder, _, _)) if holder == me => Claim::Take { transition: false },
        Some((holder, renewed_ms, duration_ms))
            if holder.is_empty() || now_ms >= renewed_ms + duration_ms =>
        {
            Claim::Take { transition: true }
        }
        Some(_) => Claim::Wait,
    }
}

fn micro(ms: u64) -> Option<MicroTime> {
    Timestamp::from_millisecond(ms as i64).ok().map(MicroTime)
}

fn read(lease: &Lease) -> Option<(String, u64, u64)> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let renewed = spec
        .renew_time
        .as_ref()
        .map_or(0, |t| t.0.as_millisecond().max(0) as u64);
    let duration = u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15) * 1000;
    Some((holder, renewed, duration))
}

/// Try once to hold the Lease; whether we hold it now.
pub async fn try_hold(api: &Api<Lease>, me: &str, lease: Duration) -> Result<bool, kube::Error> {
    let now = now_ms();
    let current = api.get_opt(LEASE).await?;
    let seen = current.as_ref().and_then(read);
    let decision = claim(seen.as_ref().map(|(h, r, d)| (h.as_str(), *r, *d)), me, now);
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(lease.as_secs() as i32),
        acquire_time: acquired,
        renew_time: micro(now),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let result = match (decision, current) {
        (Claim::Wait, _) => return Ok(false),
        (Claim::Create, _) | (_, None) => {
            let l = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE.into()),
                    ..Default::default()
                },
                spec: Some(spec(0, micro(now))),
            };
            api.create(&PostParams::default(), &l).await.map(|_| ())
        }
        (Claim::Take { transition }, Some(mut l)) => {
            let old = l.spec.clone().unwrap_or_default();
            let transitions = old.lease_transitions.unwrap_or(0) + i32::from(transition);
            let acquired = if transition {
                micro(now)
            } else {
                old.acquire_time
            };
            l.spec = Some(spec(transitions, acquired));
            // Carries the resourceVersion read: a concurrent writer makes this fail.
            api.replace(LEASE, &PostParams::default(), &l)
                .await
                .map(|_| ())
        }
    };
    match result {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Wait until this replica holds the Lease, then keep renewing it in the
/// background; the process exits if a renewal cannot be made in time.
pub async fn lead(api: Api<Lease>, me: String, lease: Duration) {
    loop {
        match try_hold(&api, &me, lease).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "leader election: cannot read or write the Lease"),
        }
        tokio::time::sleep(lease / 5).await;
    }
    tracing::info!(identity = %me, "leader: this replica holds the Lease");
    tokio::spawn(async move {
        let mut last_ok = std::time::Instant::now();
        loop {
            tokio::time::sleep(lease / 3).await;
            match try_hold(&api, &me, lease).await {
                Ok(true) => last_ok = std::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("leader election: another replica took the Lease; stopping");
                    std::process::exit(3);
                }
                Err(e) => tracing::warn!(error = %e, "leader election: renewal failed"),
            }
            // Stop before the lease could have run out on the others' clocks.
            if last_ok.elapsed() >= lease * 2 / 3 {
                tracing::error!(
                    "leader election: the Lease could not be renewed in time; stopping"
                );
                std::process::exit(3);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_only_when_free_ours_or_expired() {
        assert_eq!(claim(None, "a", 1000), Claim::Create);
        assert_eq!(
            claim(Some(("a", 900, 15_000)), "a", 1000),
            Claim::Take { transition: false }
        );
        assert_eq!(claim(Some(("b", 900, 15_000)), "a", 1000), Claim::Wait);
        assert_eq!(
            claim(Some(("b", 900, 15_000)), "a", 15_900),
            Claim::Take { transition: true }
        );
        assert_eq!(
            claim(Some(("", 900, 15_000)), "a", 1000),
            Claim::Take { transition: true }
        );
    }
}
