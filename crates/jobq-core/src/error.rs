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

    /// True when a Redis call failed for a reason that passes on its own: the connection
    /// (refused, dropped, I/O), a timeout, or a server that is loading, out of memory, unable
    /// to persist (MISCONF) or short of replicas, or in a fail-over (a replica that is
    /// read-only until the client reaches the new primary). False for errors that the same call would meet again (a key of the
    /// wrong type, a refused command, a script error).
    pub fn is_transient_redis(&self) -> bool {
        let Error::Redis(e) = self else { return false };
        e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                redis::ErrorKind::Server(
                    redis::ServerErrorKind::BusyLoading
                        | redis::ServerErrorKind::TryAgain
                        | redis::ServerErrorKind::ClusterDown
                        | redis::ServerErrorKind::MasterDown
                )
            )
            || matches!(e.code(), Some("OOM" | "BUSY" | "LOADING" | "READONLY" | "MISCONF" | "NOREPLICAS"))
    }
}

/// `Result` with [`Error`] as default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_transient_and_a_wrong_key_is_not() {
        let io = redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(Error::Redis(io).is_transient_redis());
        let loading =
            redis::RedisError::from((redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading), "loading"));
        assert!(Error::Redis(loading).is_transient_redis());
        let wrong = redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "WRONGTYPE"));
        assert!(!Error::Redis(wrong).is_transient_redis());
        assert!(!Error::Invalid("x".into()).is_transient_redis());
    }
}
