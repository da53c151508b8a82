//! HTTP: the connection engine ([`server`]), request/response values
//! ([`message`]), routes and error mapping.
pub mod admin;
pub mod incus_api;
pub mod message;
pub mod response;
pub mod routes;
pub mod server;
pub mod web;
