//! The transparency log, copied: the deployment must go on with the appliance's log,
//! not start another one. Consumers remember the appliance's checkpoints, and a log
//! made anew on the deployment would be a fork of that history, refused by every one
//! of them. So the entries are appended to the target in the same order (the same
//! texts make the same tree, hash for hash), the stored checkpoints are copied as
//! they were signed, and the key comes along in `DATA/log/` ([`super::files`]).
//! Resumable: the target's entries must be the source's first ones, and only the
//! rest is appended.

use super::MigrateReport;
use crate::catalog::Catalog;
use crate::ledger::CatalogHashes;
use crate::tlog::entry::Entry;
use anyhow::{bail, Context, Result};
use std::io::Write;

/// Records the appliance's log key as the deployment's, before any row is copied:
/// instances without the key file then serve the log the others sign, none claims a
/// key of its own, and no open of the half-filled catalog fills a log of its own from
/// the rows copied so far. A deployment whose log has another key is refused.
pub(super) fn claim(src: &dyn Catalog, dst: &dyn Catalog) -> Result<()> {
    let Some(vkey) = src.log_vkey()? else {
        return Ok(()); // an appliance never served since it had a log: nothing to claim
    };
    let claimed = dst.claim_log_vkey(&vkey)?;
    if claimed != vkey {
        bail!(
            "the deployment's catalog belongs to the transparency log {claimed}, not the \
             appliance's {vkey}: migrate into an empty database"
        );
    }
    Ok(())
}

/// Entries read and appended per transaction.
const BATCH: u64 = 1024;

pub(super) fn copy(
    src: &dyn Catalog,
    dst: &dyn Catalog,
    report: &mut MigrateReport,
    out: &mut dyn Write,
) -> Result<()> {
    let total = src.log_size()?;
    let have = dst.log_size()?;
    let refuse = |why: String| -> Result<()> {
        bail!(
            "the deployment's transparency log is not the appliance's ({why}): it was \
             written by another server or by publishes into the deployment; migrate into \
             an empty database"
        )
    };
    if have > total {
        return refuse(format!("it has {have} entries, the appliance's {total}"));
    }
    let mut at = 0;
    while at < have {
        let end = (at + BATCH).min(have);
        if src.log_entries(at, end)? != dst.log_entries(at, end)? {
            return refuse(format!("entries from {at} to {end} differ"));
        }
        at = end;
    }
    while at < total {
        let end = (at + BATCH).min(total);
        let entries = src
            .log_entries(at, end)?
            .iter()
            .map(|t| Entry::parse(t))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("reading the appliance's log entries {at} to {end}"))?;
        if !dst.append_log_at(at, &entries)? {
            bail!("the deployment's log changed while migrate copied it (run it again)");
        }
        at = end;
    }
    let mut checkpoints = 0;
    for (size, note) in src.checkpoints()? {
        if dst.put_checkpoint(size, &note)? {
            checkpoints += 1;
        }
    }
    let (a, b) = (
        crate::tlog::tree::tree_hash(total, &CatalogHashes(src))?,
        crate::tlog::tree::tree_hash(total, &CatalogHashes(dst))?,
    );
    if a != b {
        bail!("the copied log's tree hash is not the appliance's: the copy is refused");
    }
    report.log_entries.total = total;
    report.log_entries.loaded = total - have;
    report.log_entries.present = have;
    writeln!(
        out,
        "transparency log: {total} entries ({} copied now), {checkpoints} checkpoint(s); the \
         same tree hash on both sides",
        total - have
    )?;
    Ok(())
}
