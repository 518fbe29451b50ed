//! pinq-core: everything the pinq binaries share.
//!
//! Domain types ([`model`], [`cid`]), the retry policy ([`retry`]), PostgreSQL access and
//! the embedded migrations ([`db`]), the AMQP topology, publisher and consumer ([`amqp`]),
//! IPFS backend clients ([`kubo`]), typed settings ([`config`]), logging ([`telemetry`]) and
//! signal handling ([`shutdown`]). This crate never reads environment variables itself:
//! binaries parse their settings at the edge (clap with `env = …`) and pass them in.

pub mod amqp;
pub mod cid;
pub mod config;
pub mod db;
pub mod health;
pub mod kubo;
pub mod model;
pub mod psa;
pub mod retry;
pub mod schedule;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
pub mod tokens;
