//! What a bundle carries of the source's transparency log (issue 11, point 5), and
//! how an import checks it offline.
//!
//! An export adds, when the source has a log:
//! - `manifests/<image>/<version>.json.tlog-proof`: each version's C2SP tlog-proof (the
//!   inclusion of its publish entry, with the checkpoint it was made against), exactly
//!   what the source serves at `.../manifest.tlog-proof`;
//! - `log/checkpoint`: the log's newest signed checkpoint, taken after the proofs (so
//!   it is at least as large as each of theirs);
//! - `log/tile/0/...`: the level-0 hash tiles (C2SP tlog-tiles paths) of that
//!   checkpoint's tree: every leaf hash, from which the importer rebuilds the tree.
//!
//! An import with log keys in the client config (`[transparency_log]`, as for `imgsrv
//! verify`), and a target whose verification mode is not `off`, checks with no network:
//! the checkpoint is signed by a trusted log key, the tiles make exactly its tree, each
//! version's proof shows exactly its publication (image, version, manifest digest, the
//! key that signed it, time) in that log, and the checkpoint extends the newest one
//! this consumer saw of that log before (its state directory; the consistency proof is
//! computed from the tiles and checked against both signed roots). An older bundle (a
//! smaller tree than seen), a forked one, or a proof missing or altered is refused in
//! enforce mode and printed in warn mode. The newer checkpoint is remembered.

use super::{Index, IndexVersion, Pending, Source};
use crate::tlog::consumer::{self, LogPolicy};
use crate::tlog::tiles::{bottom_tiles, tile_hashes, Tile, WIDTH};
use crate::tlog::tree::{self, Hash, MemTree};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;

pub const CHECKPOINT_MEMBER: &str = "log/checkpoint";

/// The index's `log`: the members carrying the source's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexLog {
    /// The log's name (the checkpoint's first line).
    pub origin: String,
    /// The checkpoint's tree size.
    pub size: u64,
    /// Member names of the level-0 tiles, in order.
    pub tiles: Vec<String>,
}

pub fn proof_member(image: &str, version: &str) -> String {
    format!("{}.tlog-proof", super::manifest_member(image, version))
}

/// What an export writes of the log: members (name, bytes) and the index's section.
pub struct Carried {
    pub index: IndexLog,
    pub members: Vec<(String, Vec<u8>)>,
}

/// The level-0 tiles of a tree of `size` leaves.
fn tiles_of(size: u64) -> impl Iterator<Item = Tile> {
    bottom_tiles(Some(0), 0, size)
}

/// Reads the source's log for `versions`: its checkpoint, the level-0 tiles of that
/// tree, and for each version the index of its entry (from the source's proof), whose
/// inclusion proof is then made against that one checkpoint from the tiles (so every
/// proof in a bundle is against the same tree, whatever was published meanwhile).
/// Sets each version's `tlog_proof` member. `None` (with a warning on `out`) when the
/// source has no log; a version without a proof is warned about and carries none.
pub fn carry(
    source: &Source,
    versions: &mut [IndexVersion],
    out: &mut dyn Write,
) -> Result<Option<Carried>> {
    let mut indexes = Vec::new();
    for v in versions.iter() {
        let label = format!("{}@{}", v.image, v.version);
        // a log that cannot prove it now (an instance without the log's key, behind
        // the newest entries) leaves the version without a proof, said, not a failed
        // export: the bundle still serves a site that does not check the log
        let proof = source.tlog_proof(&v.image, &v.version).and_then(|p| {
            p.map(|p| crate::tlog::proof::TlogProof::parse(&p).map(|p| p.index))
                .transpose()
        });
        match proof {
            Ok(Some(index)) => indexes.push(Some(index)),
            Ok(None) => {
                writeln!(
                    out,
                    "WARNING: {label} has no transparency-log proof on the source: the bundle \
                     carries none for it (an importer that trusts the log refuses it)"
                )?;
                indexes.push(None);
            }
            Err(e) => {
                writeln!(
                    out,
                    "WARNING: {label}: no transparency-log proof ({e:#}): the bundle carries \
                     none for it (an importer that trusts the log refuses it)"
                )?;
                indexes.push(None);
            }
        }
    }
    // after the proofs: at least as large as the tree each was made against
    let note = match source.log_checkpoint() {
        Ok(Some(n)) => n,
        found => {
            let why = match found {
                Err(e) => format!("its log has no checkpoint to give ({e:#})"),
                _ => "it has no transparency log".into(),
            };
            writeln!(
                out,
                "WARNING: {}: {why}: the bundle carries no proofs (an importer that trusts a \
                 log refuses it)",
                source.describe()
            )?;
            return Ok(None);
        }
    };
    let parsed = crate::tlog::note::Note::parse(&note)
        .and_then(|n| crate::tlog::note::Checkpoint::parse(&n.text))
        .map_err(|e| anyhow::anyhow!("the source's checkpoint: {e}"))?;
    let (mut members, mut tiles, mut leaves) = (Vec::new(), Vec::new(), Vec::new());
    for t in tiles_of(parsed.size) {
        let path = t.path();
        let bytes = source
            .log_tile(&path, parsed.size)
            .with_context(|| format!("reading the log's {path}"))?;
        leaves.extend(tile_hashes(&t, &bytes).context("the source's log")?);
        let name = format!("log/{path}");
        tiles.push(name.clone());
        members.push((name, bytes));
    }
    let tree = MemTree::from_leaves(leaves);
    anyhow::ensure!(
        tree::tree_hash(parsed.size, &tree)? == parsed.root,
        "the source's log tiles do not make the tree of its checkpoint"
    );
    for (v, index) in versions.iter_mut().zip(indexes) {
        let Some(index) = index else { continue };
        if index >= parsed.size {
            writeln!(
                out,
                "WARNING: {}@{}: its log entry {index} is not in the source's checkpoint of {} \
                 entries yet: the bundle carries no proof for it",
                v.image, v.version, parsed.size
            )?;
            continue;
        }
        let proof = crate::tlog::proof::TlogProof {
            extra: None,
            index,
            hashes: tree::inclusion_proof(index, parsed.size, &tree)
                .with_context(|| format!("{}@{}: its inclusion proof", v.image, v.version))?,
            checkpoint: note.clone(),
        };
        let name = proof_member(&v.image, &v.version);
        members.push((name.clone(), proof.format().into_bytes()));
        v.tlog_proof = Some(name);
    }
    members.push((CHECKPOINT_MEMBER.into(), note.into_bytes()));
    Ok(Some(Carried {
        index: IndexLog {
            origin: parsed.origin,
            size: parsed.size,
            tiles,
        },
        members,
    }))
}

/// The index's log section is well formed: its tile members are exactly the level-0
/// tiles of its size, and each version's proof member has the expected name.
pub fn check_index(index: &Index) -> Result<(), String> {
    for v in &index.versions {
        if let Some(p) = &v.tlog_proof {
            if *p != proof_member(&v.image, &v.version) {
                return Err(format!(
                    "{}@{}: unexpected tlog-proof member name",
                    v.image, v.version
                ));
            }
        }
    }
    let Some(log) = &index.log else {
        return Ok(());
    };
    // the size is the untrusted index's: the tile count first, then each name
    if log.size > MAX_LOG_SIZE || log.tiles.len() as u64 != log.size.div_ceil(WIDTH) {
        return Err(format!(
            "log: {} tile(s) listed for a tree of {} entries",
            log.tiles.len(),
            log.size
        ));
    }
    for (name, t) in log.tiles.iter().zip(tiles_of(log.size)) {
        if *name != format!("log/{}", t.path()) {
            return Err(format!(
                "log: {name:?} is not the level-0 tile {} of a tree of {} entries",
                t.index, log.size
            ));
        }
    }
    Ok(())
}

/// The largest log a bundle may carry (2^32 entries: 128 GiB of tiles).
const MAX_LOG_SIZE: u64 = 1 << 32;
/// The largest member of the log's read: a full tile (256 hashes).
pub const MAX_TILE: u64 = WIDTH * 32;
/// The largest tlog-proof or checkpoint read (63 hashes and a few signatures fit in
/// a few KiB).
pub const MAX_NOTE: u64 = 64 << 10;

/// How large a log member may be (`None`: not a log member of this index).
pub fn member_limit(index: &Index, member: &str) -> Option<u64> {
    if index
        .versions
        .iter()
        .any(|v| v.tlog_proof.as_deref() == Some(member))
        || (index.log.is_some() && member == CHECKPOINT_MEMBER)
    {
        return Some(MAX_NOTE);
    }
    index
        .log
        .as_ref()
        .is_some_and(|l| l.tiles.iter().any(|t| t == member))
        .then_some(MAX_TILE)
}

/// The offline check (see the module doc). `Ok` when it passed, was not asked for, or
/// failed in warn mode (then printed); `Err`: the refusal.
pub fn check(
    policy: Option<&LogPolicy>,
    mode: crate::config::VerificationMode,
    sigs: &crate::replicate::SignatureCheck,
    index: &Index,
    pending: &[Pending],
    members: &HashMap<String, Vec<u8>>,
    out: &mut dyn Write,
) -> Result<(), String> {
    use crate::config::VerificationMode;
    let Some(policy) = policy.filter(|_| mode != VerificationMode::Off) else {
        let _ = writeln!(
            out,
            "transparency log: not checked ({})",
            match mode {
                VerificationMode::Off => "the target's verification mode is off",
                _ => "no [transparency_log] keys in the client config",
            }
        );
        return Ok(());
    };
    let problems = problems(policy, sigs, index, pending, members);
    if problems.is_empty() {
        let log = index.log.as_ref().expect("checked");
        let _ = writeln!(
            out,
            "transparency log: {} version(s) proven in {} at {} entries",
            index.versions.len(),
            log.origin,
            log.size
        );
        return Ok(());
    }
    if mode == VerificationMode::Warn {
        for p in &problems {
            let _ = writeln!(
                out,
                "WARNING: transparency log: {p} (the target's verification mode is warn: \
                 imported anyway)"
            );
        }
        return Ok(());
    }
    Err(format!("transparency log: {}", problems.join("; ")))
}

fn problems(
    policy: &LogPolicy,
    sigs: &crate::replicate::SignatureCheck,
    index: &Index,
    pending: &[Pending],
    members: &HashMap<String, Vec<u8>>,
) -> Vec<String> {
    let Some(log) = &index.log else {
        return vec![
            "the bundle carries no transparency log (no log/checkpoint): nothing shows its \
             versions are in a log you trust; export it again from an imgsrv with a log"
                .into(),
        ];
    };
    let tree = match rebuild(log, members) {
        Ok(t) => t,
        Err(e) => return vec![e],
    };
    let consistency = |old: u64, new: u64| -> Result<Vec<Hash>> {
        anyhow::ensure!(
            new <= tree.size(),
            "the bundle's tiles hold {} entries, not {new}",
            tree.size()
        );
        tree::consistency_proof(old, new, &tree)
    };
    let text = |m: &str| {
        members
            .get(m)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    // the bundle's checkpoint: signed by a trusted key, the tiles' tree, and consistent
    // with what this consumer saw before
    let note = text(CHECKPOINT_MEMBER).unwrap_or_default();
    // the tiles make the checkpoint's tree (before anything is compared with what this
    // consumer saw: altered tiles are altered tiles, not a fork)
    let claimed = crate::tlog::note::Note::parse(&note)
        .and_then(|n| crate::tlog::note::Checkpoint::parse(&n.text))
        .map_err(|e| format!("{CHECKPOINT_MEMBER}: {e}"));
    match claimed {
        Err(e) => return vec![e],
        Ok(cp) if cp.size != log.size || cp.origin != log.origin => {
            return vec![format!(
                "{CHECKPOINT_MEMBER} is of {} at {} entries, the index says {} at {}",
                cp.origin, cp.size, log.origin, log.size
            )]
        }
        Ok(cp) => match tree::tree_hash(cp.size, &tree) {
            Ok(root) if root == cp.root => {}
            _ => {
                return vec![format!(
                    "the bundle's log tiles do not make the tree of {CHECKPOINT_MEMBER} (they \
                     were altered)"
                )]
            }
        },
    }
    // signed by a trusted key (and cosigned, if asked), consistent with what this
    // consumer saw before
    if let Err(why) = consumer::check_checkpoint(policy, &note, &consistency) {
        return vec![format!("{CHECKPOINT_MEMBER}: {why}")];
    }
    // each version's proof
    let mut out = Vec::new();
    for (v, p) in index.versions.iter().zip(pending) {
        let label = format!("{}@{}", v.image, v.version);
        let Some(proof) = v.tlog_proof.as_deref().and_then(text) else {
            out.push(format!(
                "{label}: the bundle carries no tlog-proof for it ({} is missing)",
                proof_member(&v.image, &v.version)
            ));
            continue;
        };
        let signer = match (&p.manifest, &p.signature) {
            (Some((bytes, _)), Some(sig)) => crate::sign::verify_signed_by(&sigs.keys, bytes, sig)
                .ok()
                .map(|(_, verified)| verified.key_id),
            _ => None,
        };
        let entry = crate::tlog::entry::Entry::Publish {
            image: v.image.clone(),
            version: v.version.clone(),
            manifest: v.manifest_digest,
            signer,
            time: v.published_at.clone(),
        };
        if let Err(why) = consumer::check(policy, Some(&proof), &entry, &consistency) {
            out.push(format!("{label}: {why}"));
        }
    }
    out
}

/// The tree of the bundle's level-0 tiles.
fn rebuild(log: &IndexLog, members: &HashMap<String, Vec<u8>>) -> Result<MemTree, String> {
    let mut leaves = Vec::new();
    for name in &log.tiles {
        let bytes = members
            .get(name)
            .ok_or_else(|| format!("{name}: listed in the index but missing from the bundle"))?;
        let tile = name
            .strip_prefix("log/")
            .and_then(Tile::parse)
            .ok_or_else(|| format!("{name}: not a tile"))?;
        leaves.extend(tile_hashes(&tile, bytes).map_err(|e| format!("{name}: {e}"))?);
    }
    Ok(MemTree::from_leaves(leaves))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(size: u64, tiles: Vec<String>) -> Index {
        let mut i: Index = serde_json::from_value(serde_json::json!({
            "format": "imgsrv-bundle", "format_version": 1, "created_at": "t", "source": "s",
            "versions": [], "blobs": []
        }))
        .unwrap();
        i.log = Some(IndexLog {
            origin: "o".into(),
            size,
            tiles,
        });
        i
    }

    #[test]
    fn the_index_names_exactly_the_tiles_of_its_size() {
        let names = |size: u64| -> Vec<String> {
            tiles_of(size)
                .map(|t| format!("log/{}", t.path()))
                .collect()
        };
        assert!(check_index(&index(300, names(300))).is_ok());
        assert_eq!(names(300), ["log/tile/0/000", "log/tile/0/001.p/44"]);
        for bad in [
            index(301, names(300)),
            index(300, vec![]),
            index(u64::MAX, vec![]),
            index(1 << 40, names(300)),
            index(300, vec!["log/tile/0/000".into(), "log/tile/0/001".into()]),
        ] {
            // refused at once, whatever size the index claims
            assert!(check_index(&bad).is_err());
        }
        let i = index(300, names(300));
        assert_eq!(member_limit(&i, "log/tile/0/000"), Some(MAX_TILE));
        assert_eq!(member_limit(&i, CHECKPOINT_MEMBER), Some(MAX_NOTE));
        assert_eq!(member_limit(&i, "log/tile/0/002"), None);
    }
}
