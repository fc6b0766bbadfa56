//! Core of jobq, shared by every process.
//!
//! # Layout
//!
//! * [`job`]: the job envelope, identifiers, priorities and states.
//! * [`backoff`]: retry delays (strategy + jitter).
//! * [`config`]: settings, layered defaults → file → environment.
//! * [`error`]: the crate's error type.
//! * [`stream`]: every Redis command: the keyspace and the Lua scripts (the broker).
//! * [`store`]: every SQL statement: execution history and the dead-letter queue.
//! * [`shutdown`], [`telemetry`]: process plumbing.
//!
//! ```no_run
//! # async fn demo() -> jobq_core::Result<()> {
//! let settings = jobq_core::config::load(None).expect("valid settings");
//! let broker = jobq_core::stream::Broker::connect(&settings).await?;
//! let job = broker.enqueue(jobq_core::job::NewJob::new("echo", serde_json::json!({"hi": 1}))).await?;
//! println!("enqueued {} (new: {})", job.job.id, job.created);
//! # Ok(()) }
//! ```

pub mod backoff;
pub mod config;
pub mod duration;
pub mod error;
pub mod fault;
pub mod job;
pub mod ops;
pub mod schedule;
pub mod shutdown;
pub mod store;
pub mod stream;
pub mod telemetry;

pub use error::{Error, Result};

/// The SQL migrations of `migrations/`, embedded in every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");
