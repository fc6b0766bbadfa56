//! Routes of the REST API.

pub mod dlq;
pub mod health;
pub mod jobs;
pub mod queues;
pub mod schedules;
