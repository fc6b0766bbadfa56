//! Integration tests of the broker's Lua scripts and the Postgres store, against real Redis and
//! PostgreSQL (one namespace and one database per test).

mod delivery;
mod schedules;
mod scripts;
mod store;

use jobq_core::stream::{Delivery, Lease};

/// The lease a worker holds on a fetched job.
pub(crate) fn lease(d: &Delivery) -> Lease {
    Lease {
        queue: d.queue.clone(),
        priority: d.priority,
        entry: d.entry.clone(),
        id: d.envelope.id,
        token: d.lease.clone(),
    }
}
