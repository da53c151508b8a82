//! What the appliance keeps in its data directory beside the catalog and the blobs,
//! which a deployment instance needs too, and migrate does not move on its own:
//!
//! * **The TLS certificate.** Consumers pinned it (`incus remote add` asks to accept
//!   the certificate's fingerprint; `--ca` of `imgsrv pull`): a deployment serving
//!   another one breaks every one of them. The appliance's generated certificate and
//!   key (`tls/`) are copied into the deployment's directory when that has none yet;
//!   a different certificate there is left alone and named in the plan, with what it
//!   means for clients. A certificate the appliance's `[tls]` names elsewhere is the
//!   operator's (a CA's), and only named.
//! * **The settings.** Every top-level setting of the appliance's `imgsrv.toml` other
//!   than `[storage]` (scheduled mirrors, retention, gc, scrub, limits, verification)
//!   that the deployment's file lacks or sets otherwise is named in the plan: migrate
//!   never writes the operator's configuration, and a deployment that silently stopped
//!   mirroring, or kept nothing it should retire, would be found out late.
//!
//! Not carried over, and said so in the module doc of `migrate`: upload sessions in
//! progress, blob pins (both short-lived), the failed-login throttle's counts.

use crate::config::Config;
use anyhow::{Context, Result};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The plan for the files: what to copy, what to tell the operator.
pub(super) struct Files {
    /// The appliance's certificate and key, to be copied to these paths.
    copy_tls: Option<TlsCopy>,
    /// The appliance's `DATA/log/`, to be copied to the deployment's.
    copy_log: Option<(PathBuf, PathBuf)>,
    /// What the operator should know (printed with the plan, and kept as notes of
    /// the report).
    pub notes: Vec<String>,
}

struct TlsCopy {
    from: (PathBuf, PathBuf),
    to: (PathBuf, PathBuf),
    fingerprint: String,
}

impl Files {
    /// Compares the appliance (its configuration `src_config`) with the deployment
    /// instance whose configuration `dst_config` was read from `dst_path`.
    pub(super) fn plan(src_config: &Config, dst_config: &Config, dst_path: &Path) -> Result<Files> {
        let mut files = Files {
            copy_tls: None,
            copy_log: None,
            notes: Vec::new(),
        };
        files.plan_tls(src_config, dst_config)?;
        files.plan_log(src_config, dst_config)?;
        files
            .notes
            .extend(settings(&Config::path(&src_config.data_dir), dst_path)?);
        Ok(files)
    }

    fn plan_tls(&mut self, src: &Config, dst: &Config) -> Result<()> {
        let Ok(theirs) = crate::tls::ServedCert::load(&src.tls_cert) else {
            return Ok(()); // an appliance never started: no certificate anyone pinned
        };
        let fp = theirs.fingerprint_hex();
        if src.tls_configured {
            self.notes.push(format!(
                "tls: the appliance serves the certificate its [tls] names ({}, sha256 {fp}); \
                 give the deployment's instances a certificate for the name clients use",
                src.tls_cert.display()
            ));
            return Ok(());
        }
        match crate::tls::ServedCert::load(&dst.tls_cert) {
            Ok(ours) if ours.sha256 == theirs.sha256 => {}
            Ok(ours) => self.notes.push(format!(
                "tls: the deployment's {} (sha256 {}) is not the appliance's certificate \
                 (sha256 {fp}): clients that accepted the appliance's (`incus remote add`, \
                 --ca) will refuse the deployment's until they accept it anew. To keep them \
                 working, copy {} and {} over the deployment's, on every instance",
                dst.tls_cert.display(),
                ours.fingerprint_hex(),
                src.tls_cert.display(),
                src.tls_key.display()
            )),
            Err(_) if dst.tls_cert.exists() || dst.tls_key.exists() => self.notes.push(format!(
                "tls: the deployment's {} cannot be read as a certificate: fix it, or remove \
                 it and its key and run migrate again to get the appliance's",
                dst.tls_cert.display()
            )),
            Err(_) => {
                self.copy_tls = Some(TlsCopy {
                    from: (src.tls_cert.clone(), src.tls_key.clone()),
                    to: (dst.tls_cert.clone(), dst.tls_key.clone()),
                    fingerprint: fp,
                });
            }
        }
        Ok(())
    }

    /// The log's key goes along (the deployment goes on with the appliance's log):
    /// copied when the deployment's directory has none, else it must be the same.
    fn plan_log(&mut self, src: &Config, dst: &Config) -> Result<()> {
        use crate::ledger::{KEY_FILE, LOG_DIR};
        let (from, to) = (src.data_dir.join(LOG_DIR), dst.data_dir.join(LOG_DIR));
        let Ok(theirs) = std::fs::read(from.join(KEY_FILE)) else {
            return Ok(());
        };
        match std::fs::read(to.join(KEY_FILE)) {
            Ok(ours) if ours == theirs => {}
            Ok(_) => anyhow::bail!(
                "{} is another transparency log's key than the appliance's {}: the \
                 deployment goes on with the appliance's log, signed by its key. Move {} out \
                 of the deployment's directory (migrate copies the appliance's), then run \
                 migrate again (nothing was changed)",
                to.join(KEY_FILE).display(),
                from.join(KEY_FILE).display(),
                to.display()
            ),
            Err(_) => self.copy_log = Some((from, to)),
        }
        Ok(())
    }

    pub(super) fn print(&self, out: &mut dyn Write) -> Result<()> {
        if let Some((from, to)) = &self.copy_log {
            writeln!(
                out,
                "log: copy the appliance's transparency log key ({}) to {}: the deployment goes on with the appliance's log; give every instance the same directory",
                from.display(),
                to.display()
            )?;
        }
        if let Some(c) = &self.copy_tls {
            writeln!(
                out,
                "tls: copy the appliance's certificate (sha256 {}) and key to {}: clients \
                 that accepted it keep connecting; give every instance of the deployment the \
                 same two files",
                c.fingerprint,
                c.to.0.display()
            )?;
        }
        for n in &self.notes {
            writeln!(out, "{n}")?;
        }
        Ok(())
    }

    /// Copies what the plan said to copy. Each file is written beside its place and
    /// renamed into it, the key with mode 0600: an interrupted copy leaves no half
    /// file where `imgsrv serve` reads one (and the next run copies it again).
    pub(super) fn apply(&self, out: &mut dyn Write) -> Result<()> {
        if let Some((from, to)) = &self.copy_log {
            use crate::ledger::{KEY_FILE, VKEY_FILE};
            copy_file(&from.join(VKEY_FILE), &to.join(VKEY_FILE), 0o644)?;
            copy_file(&from.join(KEY_FILE), &to.join(KEY_FILE), 0o600)?;
            writeln!(
                out,
                "log: copied the appliance's log key to {}",
                to.display()
            )?;
        }
        let Some(c) = &self.copy_tls else {
            return Ok(());
        };
        for ((from, to), mode) in [(&c.from.0, &c.to.0), (&c.from.1, &c.to.1)]
            .into_iter()
            .zip([0o644, 0o600])
        {
            copy_file(from, to, mode)?;
        }
        writeln!(
            out,
            "tls: copied the appliance's certificate (sha256 {}) to {}",
            c.fingerprint,
            c.to.0.display()
        )?;
        Ok(())
    }
}

fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let dir = to.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    crate::tls::write_atomic(to, &bytes, mode).with_context(|| format!("writing {}", to.display()))
}

/// The top-level settings of the appliance's `imgsrv.toml` (other than `storage`)
/// that the deployment's lacks or sets otherwise, one line each.
fn settings(src: &Path, dst: &Path) -> Result<Vec<String>> {
    let read = |p: &Path| -> Result<toml::Table> {
        match std::fs::read_to_string(p) {
            Ok(t) => t
                .parse()
                .with_context(|| format!("reading {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(toml::Table::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    };
    // what a file leaves out is what `imgsrv init` writes (the defaults), and an
    // empty table (`[tls]` with every line commented) is one left out
    let defaults: toml::Table = crate::config::default_file()
        .parse()
        .context("the default configuration")?;
    let effective = |file: &toml::Table| -> toml::Table {
        let mut t = defaults.clone();
        t.extend(file.clone());
        t.retain(|k, v| k != "storage" && v.as_table().is_none_or(|t| !t.is_empty()));
        t
    };
    let (ours, theirs) = (effective(&read(src)?), effective(&read(dst)?));
    let mut out = Vec::new();
    for (key, value) in &ours {
        let how = match theirs.get(key) {
            None => "does not",
            Some(v) if v == value => continue,
            Some(_) => "sets it otherwise",
        };
        out.push(format!(
            "settings: the appliance's {} sets `{key}`, the deployment's {} {how}: copy the \
             setting over if the deployment is to do the same (migrate does not write the \
             configuration)",
            src.display(),
            dst.display()
        ));
    }
    Ok(out)
}
