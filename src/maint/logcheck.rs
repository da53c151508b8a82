//! `imgsrv log verify --data DIR`: the server's own transparency log, checked against
//! itself and against the catalog, for an operator who suspects the database was
//! written behind imgsrv's back (its guards dropped, a manifest edited in the
//! `sqlite3` shell or `psql`).
//!
//! 1. **The tree.** Every entry is read in order and parsed (canonical form only); the
//!    tree is recomputed from the entries, and each hash the catalog stores (the leaves
//!    and every complete subtree) must be the recomputed one.
//! 2. **The catalog.** Every published version (retired ones too) must have exactly one
//!    publish entry, naming the manifest digest its publish record holds now, and the
//!    digest of the manifest stored must be that digest; every publish entry must name
//!    a version the catalog has; a retired version has its retirement entry.
//! 3. **The checkpoints.** Every stored checkpoint must be signed by the log's key,
//!    name its origin, and have the recomputed tree's root at its size (which is what
//!    makes them all consistent with each other: each is a prefix of one tree).
//!
//! It reads and reports; it changes nothing. Every problem is named (the version, the
//! entry number) and counted; the run goes on past each.

use crate::catalog::{Catalog, CatalogError};
use crate::tlog::entry::Entry;
use crate::tlog::note::signed_checkpoint;
use crate::tlog::tree::{self, Hash, HashReader, Node};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Entries read per query.
const BATCH: u64 = 4096;

/// What `imgsrv log verify` found.
#[derive(Debug, Default, Serialize)]
pub struct LogReport {
    pub entries: u64,
    pub hashes_checked: u64,
    pub versions_checked: u64,
    pub checkpoints_checked: u64,
    pub problems: Vec<String>,
}

impl LogReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn describe(&self) -> String {
        format!(
            "log verify: {} entries, {} stored hashes recomputed, {} published versions and {} \
             checkpoints checked: {}",
            self.entries,
            self.hashes_checked,
            self.versions_checked,
            self.checkpoints_checked,
            match self.problems.len() {
                0 => "no problem found".to_string(),
                n => format!("{n} problem(s)"),
            }
        )
    }
}

/// The right edge of the tree as it is recomputed: the newest complete subtree at each
/// level, which is all an append reads ([`tree::hashes_to_store`]).
#[derive(Default)]
struct Frontier(HashMap<u8, (u64, Hash)>);

impl HashReader for Frontier {
    fn read_hashes(&self, nodes: &[Node]) -> anyhow::Result<Vec<Hash>> {
        nodes
            .iter()
            .map(|n| match self.0.get(&n.level) {
                Some((i, h)) if *i == n.index => Ok(*h),
                _ => anyhow::bail!("node {n:?} is not on the frontier"),
            })
            .collect()
    }
}

/// A publish entry, as the catalog is compared with it.
struct Published {
    index: u64,
    manifest: crate::digest::Digest,
}

/// Checks the log of `cat` whose verifier key is `vkey` (see the module doc).
pub fn verify(cat: &dyn Catalog, vkey: &str) -> Result<LogReport, CatalogError> {
    let mut report = LogReport::default();
    let size = cat.log_size()?;
    report.entries = size;
    let mut frontier = Frontier::default();
    let mut publishes: BTreeMap<(String, String), Vec<Published>> = BTreeMap::new();
    let mut retires: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut at = 0;
    while at < size {
        let texts = cat.log_entries(at, at + BATCH)?;
        if texts.is_empty() {
            report.problems.push(format!(
                "entries from {at} on are missing (the log has {size})"
            ));
            break;
        }
        let mut computed = Vec::new();
        for text in &texts {
            let leaf = tree::leaf_hash(text);
            let stored = tree::hashes_to_store(at, leaf, &frontier)
                .map_err(|e| CatalogError::Backend(format!("recomputing the tree: {e:#}")))?;
            for (n, h) in &stored {
                frontier.0.insert(n.level, (n.index, *h));
            }
            computed.extend(stored);
            match Entry::parse(text) {
                Ok(Entry::Publish {
                    image,
                    version,
                    manifest,
                    ..
                }) => publishes
                    .entry((image, version))
                    .or_default()
                    .push(Published {
                        index: at,
                        manifest,
                    }),
                Ok(Entry::Retire { image, version, .. }) => {
                    retires.insert((image, version), at);
                }
                Ok(_) => {}
                Err(e) => report
                    .problems
                    .push(format!("entry {at} is not a log entry: {e:#}")),
            }
            at += 1;
        }
        let nodes: Vec<Node> = computed.iter().map(|(n, _)| *n).collect();
        match cat.log_hashes(&nodes) {
            Ok(stored) => {
                for ((n, want), got) in computed.iter().zip(stored) {
                    report.hashes_checked += 1;
                    if got != *want {
                        report.problems.push(format!(
                            "the stored hash at level {} index {} is not the one its entries \
                             make: the log was written behind imgsrv's back",
                            n.level, n.index
                        ));
                    }
                }
            }
            Err(e) => report.problems.push(format!("the stored hashes: {e}")),
        }
    }
    check_versions(cat, &publishes, &retires, &mut report)?;
    check_checkpoints(cat, vkey, size, &mut report)?;
    Ok(report)
}

fn check_versions(
    cat: &dyn Catalog,
    publishes: &BTreeMap<(String, String), Vec<Published>>,
    retires: &BTreeMap<(String, String), u64>,
    report: &mut LogReport,
) -> Result<(), CatalogError> {
    let mut seen = std::collections::BTreeSet::new();
    let mut check = |image: &str, version: &str, retired: bool, report: &mut LogReport| {
        let name = format!("{image}@{version}");
        seen.insert((image.to_string(), version.to_string()));
        report.versions_checked += 1;
        let v = cat.get_version(image, version)?;
        let record = cat.publish_record(&v.id)?;
        let key = (image.to_string(), version.to_string());
        match publishes.get(&key).map(Vec::as_slice) {
            None | Some([]) => report.problems.push(format!(
                "{name} is published but not in the log: it was published behind imgsrv's back"
            )),
            Some([p]) => {
                if p.manifest != record.manifest_digest {
                    report.problems.push(format!(
                        "{name}: the catalog's manifest digest {} is not the one logged at \
                         entry {} ({}): its publish record was altered",
                        record.manifest_digest, p.index, p.manifest
                    ));
                }
            }
            Some(many) => report.problems.push(format!(
                "{name} is logged as published {} times (entries {})",
                many.len(),
                many.iter()
                    .map(|p| p.index.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
        let stored = crate::digest::Digest::of(&record.manifest);
        if stored != record.manifest_digest {
            report.problems.push(format!(
                "{name}: the manifest stored hashes to {stored}, not to its recorded digest {}: \
                 it was altered",
                record.manifest_digest
            ));
        }
        if retired && !retires.contains_key(&key) {
            report.problems.push(format!(
                "{name} is retired but its retirement is not in the log"
            ));
        }
        Ok::<(), CatalogError>(())
    };
    for img in cat.list_images(true)? {
        for v in cat.list_versions(&img.name, false)? {
            check(&img.name, &v.version, false, report)?;
        }
    }
    for rv in cat.retirements()? {
        check(&rv.image, &rv.version, true, report)?;
    }
    for (key, ps) in publishes {
        if !seen.contains(key) {
            report.problems.push(format!(
                "{}@{} is logged as published (entry {}) but the catalog has no such published \
                 version: it was removed behind imgsrv's back",
                key.0,
                key.1,
                ps.first().map_or(0, |p| p.index)
            ));
        }
    }
    Ok(())
}

fn check_checkpoints(
    cat: &dyn Catalog,
    vkey: &str,
    size: u64,
    report: &mut LogReport,
) -> Result<(), CatalogError> {
    let verifier = crate::tlog::note::Verifier::parse(vkey)
        .map_err(|e| CatalogError::Backend(format!("the log's key {vkey:?}: {e}")))?;
    for (n, note) in cat.checkpoints()? {
        report.checkpoints_checked += 1;
        let what = format!("the stored checkpoint of size {n}");
        let c = match signed_checkpoint(&note, std::slice::from_ref(&verifier)) {
            Ok(c) => c,
            Err(e) => {
                report.problems.push(format!("{what}: {e}"));
                continue;
            }
        };
        if c.origin != verifier.name || c.size != n {
            report.problems.push(format!(
                "{what} says origin {:?} size {}, not {:?} size {n}",
                c.origin, c.size, verifier.name
            ));
            continue;
        }
        if n > size {
            report.problems.push(format!(
                "{what} is of a larger tree than the log ({size} entries)"
            ));
            continue;
        }
        let root = tree::tree_hash(n, &crate::ledger::CatalogHashes(cat))
            .map_err(|e| CatalogError::Backend(format!("the tree hash at {n}: {e:#}")))?;
        if root != c.root {
            report.problems.push(format!(
                "{what} signs another tree than the entries make: the log was rewritten after \
                 it was signed (a fork)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frontier_recomputes_what_the_store_keeps() {
        // the frontier gives every append what a full store would
        let mut frontier = Frontier::default();
        let mut all: HashMap<Node, Hash> = HashMap::new();
        struct All<'a>(&'a HashMap<Node, Hash>);
        impl HashReader for All<'_> {
            fn read_hashes(&self, nodes: &[Node]) -> anyhow::Result<Vec<Hash>> {
                Ok(nodes.iter().map(|n| self.0[n]).collect())
            }
        }
        for i in 0..300u64 {
            let leaf = tree::leaf_hash(&i.to_be_bytes());
            let a = tree::hashes_to_store(i, leaf, &frontier).unwrap();
            let b = tree::hashes_to_store(i, leaf, &All(&all)).unwrap();
            assert_eq!(a, b, "{i}");
            for (n, h) in a {
                frontier.0.insert(n.level, (n.index, h));
                all.insert(n, h);
            }
        }
    }
}
