//! imgsrv: a self-hosted image server for Incus.
pub mod client;
pub mod digest;
pub mod http;
pub mod image;
pub mod publish;
pub mod sign;
pub mod tls;
