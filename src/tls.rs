//! TLS certificates and rustls configuration.
