//! One netboot at a time per cluster: a coordination.k8s.io Lease at a fixed
//! place, `kube-system/netboot-lock`, whatever `spec.namespace` says (a lock in
//! the spec's namespace would let a run with another namespace start beside
//! one in progress). A second apply or reconciler waits (bounded) and then exits with
//! a message naming the holder. The holder renews in the background; a
//! crashed holder's lease expires after its duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tokio::task::JoinHandle;

use crate::apply::describe;

pub const LEASE_NAME: &str = "netboot-lock";
/// Where the lock lives, for every spec.
pub const LEASE_NAMESPACE: &str = "kube-system";
pub const LEASE_SECONDS: i32 = 60;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("Lease/{namespace}/{LEASE_NAME}: held by {holder} (renewed {age}s ago); gave up after waiting {waited}s — another netboot apply or reconciler is working on this cluster")]
    Held {
        namespace: String,
        holder: String,
        age: i64,
        waited: u64,
    },
    #[error("Lease/{namespace}/{LEASE_NAME}: {message}")]
    Api { namespace: String, message: String },
    #[error("Lease/{namespace}/{LEASE_NAME}: no longer ours ({now}); another netboot may be working on this cluster")]
    Lost { namespace: String, now: String },
}

/// A held lock; call [`Lock::release`] when done (dropping it stops renewal
/// and lets the lease expire).
pub struct Lock {
    api: Api<Lease>,
    namespace: String,
    holder: String,
    renewer: JoinHandle<()>,
}

/// Who we are, in the lease: host, pid and a random suffix.
pub fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{host}/pid-{}/{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// Acquires the lease, waiting up to `wait` for another holder to finish.
pub async fn acquire(client: &Client, wait: Duration) -> Result<Lock, LockError> {
    let namespace = LEASE_NAMESPACE;
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let holder = identity();
    let started = std::time::Instant::now();
    let err = |e: kube::Error| LockError::Api {
        namespace: namespace.into(),
        message: describe(&e),
    };
    let mut announced = false;
    loop {
        match api.get_opt(LEASE_NAME).await.map_err(err)? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        namespace: Some(namespace.into()),
                        ..Default::default()
                    },
                    spec: Some(spec(&holder)),
                };
                match api.create(&PostParams::default(), &lease).await {
                    Ok(_) => break,
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(err(e)),
                }
            }
            Some(mut lease) => {
                let s = lease.spec.clone().unwrap_or_default();
                let current = s.holder_identity.clone().unwrap_or_default();
                let renewed = s
                    .renew_time
                    .as_ref()
                    .map(|t| t.0)
                    .or(s.acquire_time.as_ref().map(|t| t.0));
                let age = renewed
                    .map(|t| jiff::Timestamp::now().duration_since(t).as_secs())
                    .unwrap_or(i64::MAX);
                let free = current.is_empty()
                    || age > i64::from(s.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
                if free {
                    lease.spec = Some(spec(&holder));
                    // resourceVersion makes this a compare-and-swap: a racing taker gets 409.
                    match api
                        .replace(LEASE_NAME, &PostParams::default(), &lease)
                        .await
                    {
                        Ok(_) => break,
                        Err(kube::Error::Api(s)) if s.code == 409 => continue,
                        Err(e) => return Err(err(e)),
                    }
                }
                if started.elapsed() >= wait {
                    return Err(LockError::Held {
                        namespace: namespace.into(),
                        holder: current,
                        age,
                        waited: wait.as_secs(),
                    });
                }
                if !announced {
                    tracing::info!(
                        "waiting for Lease/{namespace}/{LEASE_NAME}, held by {current} (up to {}s)",
                        wait.as_secs()
                    );
                    announced = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    tracing::info!(holder = %holder, "acquired Lease/{namespace}/{LEASE_NAME}");
    let renewer = tokio::spawn(renew(api.clone(), holder.clone()));
    Ok(Lock {
        api,
        namespace: namespace.into(),
        holder,
        renewer,
    })
}

fn spec(holder: &str) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(holder.into()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        acquire_time: Some(now()),
        renew_time: Some(now()),
        ..Default::default()
    }
}

async fn renew(api: Api<Lease>, holder: String) {
    loop {
        tokio::time::sleep(Duration::from_secs(
            u64::try_from(LEASE_SECONDS / 3).unwrap_or(20),
        ))
        .await;
        let Ok(Some(mut lease)) = api.get_opt(LEASE_NAME).await else {
            continue;
        };
        let Some(s) = lease.spec.as_mut() else {
            continue;
        };
        if s.holder_identity.as_deref() != Some(holder.as_str()) {
            tracing::error!("lost Lease/{LEASE_NAME} to {:?}", s.holder_identity);
            return;
        }
        s.renew_time = Some(now());
        if let Err(e) = api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!("renewing Lease/{LEASE_NAME}: {}", describe(&e));
        }
    }
}

impl Lock {
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Checks, with a fresh read, that the lease is still ours and not
    /// expired; called before every destructive step, so a run that lost its
    /// lock (renewals failed, another netboot took it over) stops there.
    pub async fn ensure_held(&self) -> Result<(), LockError> {
        let lease = self
            .api
            .get_opt(LEASE_NAME)
            .await
            .map_err(|e| LockError::Api {
                namespace: self.namespace.clone(),
                message: describe(&e),
            })?;
        let lost = |now: String| LockError::Lost {
            namespace: self.namespace.clone(),
            now,
        };
        let Some(spec) = lease.and_then(|l| l.spec) else {
            return Err(lost("the Lease is gone".into()));
        };
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != self.holder {
            return Err(lost(format!(
                "held by {}",
                if holder.is_empty() { "nobody" } else { &holder }
            )));
        }
        let renewed = spec
            .renew_time
            .as_ref()
            .or(spec.acquire_time.as_ref())
            .map(|t| t.0);
        let age = renewed
            .map(|t| jiff::Timestamp::now().duration_since(t).as_secs())
            .unwrap_or(i64::MAX);
        if age > i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS)) {
            return Err(lost(format!("expired: last renewed {age}s ago")));
        }
        Ok(())
    }

    /// Gives the lease up so the next netboot need not wait for it to expire.
    pub async fn release(self) -> Result<(), LockError> {
        self.renewer.abort();
        let err = |e: kube::Error| LockError::Api {
            namespace: self.namespace.clone(),
            message: describe(&e),
        };
        if let Some(mut lease) = self.api.get_opt(LEASE_NAME).await.map_err(err)? {
            if let Some(s) = lease.spec.as_mut() {
                if s.holder_identity.as_deref() == Some(self.holder.as_str()) {
                    s.holder_identity = None;
                    s.renew_time = None;
                    self.api
                        .replace(LEASE_NAME, &PostParams::default(), &lease)
                        .await
                        .map_err(err)?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}
