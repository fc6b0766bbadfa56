//! Integration tests of the broker's Lua scripts and the Postgres store, against real Redis and
//! PostgreSQL (one namespace and one database per test).

mod delivery;
mod schedules;
mod scripts;
mod store;
