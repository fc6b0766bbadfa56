//! The error type of `jobq-core`.

use crate::job::JobId;

/// Everything that can go wrong in the broker, the store or the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No job with this id exists (or it expired per retention).
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// A named thing (schedule, queue) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request itself is invalid; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The operation conflicts with the job's current state.
    #[error("{0}")]
    Conflict(String),
    /// Redis is unreachable or failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Postgres is unreachable or failed.
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored document did not decode.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Redis answered something the scripts never return: a bug or a foreign writer.
    #[error("unexpected reply from Redis: {0}")]
    Protocol(String),
}

impl Error {
    /// True when the error is an outage of Redis or Postgres (callers answer 503 and retry).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Redis(_) | Error::Database(_))
    }
}

/// `Result` with [`Error`] as default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
