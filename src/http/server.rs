//! Connection engine (owned by the HTTP/TLS work item; see docs/design.md).
