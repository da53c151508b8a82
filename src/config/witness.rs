//! The server's side of witnessing (issue 11, point 3):
//!
//! ```toml
//! # this server's log asks these witnesses to cosign each checkpoint it serves
//! [transparency_log]
//! witnesses = [
//!   { url = "https://witness.example:8443/witness", vkey = "witness.example+1a2b3c4d+BA...", ca = "/etc/imgsrv/witness-ca.pem" },
//! ]
//!
//! # this server is a witness of these logs (POST /witness/add-checkpoint); its key is
//! # DATA/witness/witness.key, made by `imgsrv witness init`
//! [witness]
//! logs = ["images.example.org/imgsrv/1a2b3c4d+0badc0de+AV..."]
//! ```

use crate::tlog::cosign::WitnessKey;
use crate::tlog::note::Verifier;
use anyhow::Context;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTransparencyLog {
    #[serde(default)]
    witnesses: Vec<RawLogWitness>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogWitness {
    url: String,
    vkey: String,
    ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWitness {
    #[serde(default)]
    logs: Vec<String>,
}

/// A witness the log asks for cosignatures.
#[derive(Debug, Clone)]
pub struct LogWitness {
    /// The witness's prefix: `add-checkpoint` is below it.
    pub url: String,
    pub key: WitnessKey,
    /// PEM root(s) to trust for it instead of the system store.
    pub ca: Option<PathBuf>,
}

/// `[witness]`: the logs this server witnesses.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    pub logs: Vec<Verifier>,
}

pub(super) fn log_witnesses(
    raw: RawTransparencyLog,
    data_dir: &Path,
) -> anyhow::Result<Vec<LogWitness>> {
    let mut out: Vec<LogWitness> = Vec::new();
    for (i, w) in raw.witnesses.into_iter().enumerate() {
        let what = format!("[transparency_log] witnesses #{}", i + 1);
        let key = WitnessKey::parse(&w.vkey).map_err(|e| {
            anyhow::anyhow!(
                "{what}: {e}; copy the witness's DATA/witness/witness.vkey (a cosignature key)"
            )
        })?;
        let url = w.url.trim_end_matches('/').to_string();
        if !url.starts_with("https://") {
            anyhow::bail!("{what}: url {url:?} must be https://HOST[:PORT]/PREFIX");
        }
        if out.iter().any(|o| o.key.id == key.id) {
            anyhow::bail!("{what}: the witness {} is listed twice", key.name);
        }
        let ca =
            w.ca.map(|p| if p.is_absolute() { p } else { data_dir.join(p) });
        out.push(LogWitness { url, key, ca });
    }
    Ok(out)
}

pub(super) fn witness(raw: Option<RawWitness>) -> anyhow::Result<Option<WitnessConfig>> {
    let Some(raw) = raw else { return Ok(None) };
    let logs = raw
        .logs
        .iter()
        .map(|k| {
            Verifier::parse(k)
                .with_context(|| format!("[witness] logs: {k:?} is not a log's verifier key"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if logs.is_empty() {
        anyhow::bail!("[witness] lists no logs: name the vkeys of the logs to witness");
    }
    Ok(Some(WitnessConfig { logs }))
}
