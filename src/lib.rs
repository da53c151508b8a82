//! imgsrv: a self-hosted image server for Incus.
pub mod cas;
pub mod catalog;
pub mod digest;
pub mod http;
pub mod manifest;
pub mod tls;
