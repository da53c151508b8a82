//! imgsrv: a self-hosted image server for Incus.
pub mod app;
pub mod auth;
pub mod cas;
pub mod catalog;
// pub mod cli;
pub mod config;
pub mod digest;
pub mod fingerprint;
pub mod http;
pub mod manifest;
// pub mod serve;
pub mod sign;
pub mod simplestreams;
pub mod tls;
