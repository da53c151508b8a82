//! TEMPORARY stub, replaced by the real module on merge.
use std::path::{Path, PathBuf};
use std::sync::Arc;
pub fn ensure_self_signed(
    dir: &Path,
    _extra: &[String],
) -> anyhow::Result<(PathBuf, PathBuf, bool)> {
    Ok((dir.join("cert.pem"), dir.join("key.pem"), false))
}
pub fn server_config(_c: &Path, _k: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    anyhow::bail!("stub")
}
