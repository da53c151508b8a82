//! `imgsrv log monitor`: follow a remote log and report its entries about given images
//! or keys (issue 11, point 6). A publisher's early warning: a publication signed by
//! one of their keys that they did not make shows up here, whatever the server hides
//! elsewhere, because the log's signed tree commits to every entry.
//!
//! Each run reads the log's checkpoint (signed by the log key the monitor trusts), the
//! entry bundles added since the last run, and (the first time, or when its cache is
//! gone) the level-0 hash tiles of the tree it saw before. It rebuilds the tree from
//! those and its own hashes of the new entries, and checks that the tree's first
//! entries still make the checkpoint it saw before (else the log was forked or rolled
//! back) and that the whole makes the new checkpoint (else the server serves entries
//! other than those its key signed). Then it remembers the checkpoint and the leaf
//! hashes (`STATE/log/<origin>.checkpoint`, `.leaves`), so the next run reads only what
//! is new.

use super::consumer::{lock_state, read_state, state_file, write_state};
use super::entry::Entry;
use super::note::Verifier;
use super::tiles::{bottom_tiles, hashes_of, parse_entry_bundle, tile_hashes, WIDTH};
use super::tree::{self, Hash, MemTree};
use anyhow::Context as _;
use std::path::PathBuf;

/// Where the monitor reads the log (a server's `/log/`).
pub trait LogReader {
    /// `/log/checkpoint`.
    fn checkpoint(&self) -> anyhow::Result<String>;
    /// `/log/<path>` (`tile/0/000`, `tile/entries/x001/002.p/7`).
    fn tile(&self, path: &str) -> anyhow::Result<Vec<u8>>;
}

/// What to watch.
#[derive(Debug, Clone)]
pub struct MonitorOptions {
    pub log_key: Verifier,
    pub state_dir: PathBuf,
    /// Image-name globs; entries about other images are not reported.
    pub images: Vec<String>,
    /// Key ids (hex); entries about other keys are not reported.
    pub keys: Vec<String>,
}

/// What a run saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MonitorReport {
    pub origin: String,
    pub size: u64,
    /// The size seen at the last run (`None`: the first run).
    pub since: Option<u64>,
    /// The new entries matching the filters: (index, entry text).
    pub matched: Vec<(u64, String)>,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The log is not what it must be (a fork, a rollback, a bad signature).
    #[error("{0}")]
    Problem(String),
    #[error(transparent)]
    CannotRun(#[from] anyhow::Error),
}

fn problem(s: String) -> MonitorError {
    MonitorError::Problem(s)
}

impl MonitorOptions {
    fn wants(&self, e: &Entry) -> bool {
        let image_ok = self.images.is_empty()
            || e.version().is_some_and(|(i, _)| {
                self.images
                    .iter()
                    .any(|g| crate::names::scope_matches(g, i))
            });
        let key_ok = self.keys.is_empty()
            || e.key()
                .is_some_and(|k| self.keys.iter().any(|want| want.eq_ignore_ascii_case(k)));
        match (self.images.is_empty(), self.keys.is_empty()) {
            (true, true) => true,
            // either filter names what to report
            (false, false) => image_ok || key_ok,
            (false, true) => image_ok,
            (true, false) => key_ok,
        }
    }
}

/// One run (see the module doc).
pub fn run(reader: &dyn LogReader, opts: &MonitorOptions) -> Result<MonitorReport, MonitorError> {
    let keys = std::slice::from_ref(&opts.log_key);
    let note = reader.checkpoint()?;
    let cp = super::note::signed_checkpoint(&note, keys).map_err(|e| {
        problem(format!(
            "the log's checkpoint is not signed by the key you gave ({e})"
        ))
    })?;
    let file = state_file(&opts.state_dir, &cp.origin);
    let leaves_file = file.with_extension("leaves");
    let _held = lock_state(&file)?;
    let old = read_state(&file, keys).map_err(|e| anyhow::anyhow!(e))?;
    let n = old.as_ref().map_or(0, |o| o.size);
    if n > cp.size {
        return Err(problem(format!(
            "the log {} is at {} entries, but it was at {n} at the last run: it was rolled back",
            cp.origin, cp.size
        )));
    }
    // the leaf hashes of the tree seen before: the cache, else the level-0 tiles
    let mut leaves: Vec<Hash> = match std::fs::read(&leaves_file) {
        Ok(b) if b.len() as u64 == n * 32 => hashes_of(&b).expect("a multiple of 32"),
        _ => read_leaf_tiles(reader, n)?,
    };
    // the new entries, from the entry bundles
    let mut new = Vec::new();
    for t in bottom_tiles(None, n / WIDTH, cp.size) {
        let path = t.path();
        let bytes = reader.tile(&path)?;
        let entries =
            parse_entry_bundle(&bytes).map_err(|e| problem(format!("the log's {path}: {e:#}")))?;
        if entries.len() != usize::from(t.width) {
            return Err(problem(format!(
                "the log's {path} holds {} entries, not {}",
                entries.len(),
                t.width
            )));
        }
        for (j, e) in entries.into_iter().enumerate() {
            let index = t.index * WIDTH + j as u64;
            if index >= n {
                new.push((index, e.to_vec()));
            }
        }
    }
    leaves.extend(new.iter().map(|(_, e)| tree::leaf_hash(e)));
    let t = MemTree::from_leaves(leaves);
    if let Some(o) = &old {
        if tree::tree_hash(o.size, &t)? != o.root {
            return Err(problem(format!(
                "the log {}'s first {} entries are not the tree you saw at the last run: its \
                 history was rewritten (a fork)",
                cp.origin, o.size
            )));
        }
    }
    if tree::tree_hash(cp.size, &t)? != cp.root {
        // which is it: the signed tree does not extend the one seen (a fork), or the
        // entries served are not those of the signed tree? The log's own hash tiles of
        // the new tree tell, when they make its checkpoint
        if let Some(o) = &old {
            let theirs = MemTree::from_leaves(read_leaf_tiles(reader, cp.size)?);
            if tree::tree_hash(cp.size, &theirs)? == cp.root
                && tree::tree_hash(o.size, &theirs)? != o.root
            {
                return Err(problem(format!(
                    "the log {}'s tree of {} entries does not extend the one of {} you saw at \
                     the last run: its history was rewritten (a fork)",
                    cp.origin, cp.size, o.size
                )));
            }
        }
        return Err(problem(format!(
            "the log {}'s entries do not make the tree its checkpoint of {} signs: the server \
             serves other entries than those its key signed",
            cp.origin, cp.size
        )));
    }
    let mut matched = Vec::new();
    for (index, bytes) in &new {
        let e =
            Entry::parse(bytes).map_err(|e| problem(format!("entry {index} of the log: {e:#}")))?;
        if opts.wants(&e) {
            matched.push((*index, e.text()?.trim_end().replace('\n', " ")));
        }
    }
    if cp.size > n {
        let bytes = t.leaves().concat();
        crate::tls::write_atomic(&leaves_file, &bytes, 0o644)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", leaves_file.display()))?;
        write_state(&file, &note)?;
    }
    Ok(MonitorReport {
        origin: cp.origin,
        size: cp.size,
        since: old.map(|o| o.size),
        matched,
    })
}

/// The first `n` leaf hashes, from the level-0 tiles of a tree of `n` leaves.
fn read_leaf_tiles(reader: &dyn LogReader, n: u64) -> anyhow::Result<Vec<Hash>> {
    let mut out = Vec::new();
    for t in bottom_tiles(Some(0), 0, n) {
        let bytes = reader.tile(&t.path())?;
        out.extend(tile_hashes(&t, &bytes).context("the log's tiles")?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlog::note::{Checkpoint, Signer};
    use crate::tlog::tiles::{entry_bundle, Tile};
    use std::collections::HashMap;

    /// A log served from memory: its entries, tiles and signed checkpoint.
    struct Mem {
        files: HashMap<String, Vec<u8>>,
        checkpoint: String,
    }

    impl LogReader for Mem {
        fn checkpoint(&self) -> anyhow::Result<String> {
            Ok(self.checkpoint.clone())
        }
        fn tile(&self, path: &str) -> anyhow::Result<Vec<u8>> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("404 {path}"))
        }
    }

    fn entry(i: u64, image: &str) -> Vec<u8> {
        Entry::Retire {
            image: image.into(),
            version: i.to_string(),
            manifest: crate::digest::Digest::of(&i.to_be_bytes()),
            time: "2026-12-01T00:00:00Z".into(),
        }
        .text()
        .unwrap()
        .into_bytes()
    }

    /// `entries` served as the log `signer` signs them; `served` replaces the entry
    /// bundles' contents (what a lying server sends).
    fn log(signer: &Signer, entries: &[Vec<u8>], served: &[Vec<u8>]) -> Mem {
        let t = MemTree::from_leaves(entries.iter().map(|e| tree::leaf_hash(e)).collect());
        let n = t.size();
        let checkpoint = signer
            .sign(
                &Checkpoint {
                    origin: signer.verifier().name.clone(),
                    size: n,
                    root: tree::tree_hash(n, &t).unwrap(),
                }
                .text(),
            )
            .unwrap();
        let mut files = HashMap::new();
        let mut i = 0;
        while i * WIDTH < n {
            let width = (n - i * WIDTH).min(WIDTH);
            for (level, bytes) in [
                (
                    Some(0),
                    t.leaves()[(i * WIDTH) as usize..(i * WIDTH + width) as usize].concat(),
                ),
                (
                    None,
                    entry_bundle(
                        served[(i * WIDTH) as usize..(i * WIDTH + width) as usize]
                            .iter()
                            .map(Vec::as_slice),
                    )
                    .unwrap(),
                ),
            ] {
                let path = Tile {
                    level,
                    index: i,
                    width: width as u16,
                }
                .path();
                files.insert(path, bytes);
            }
            i += 1;
        }
        Mem { files, checkpoint }
    }

    #[test]
    fn a_monitor_reads_what_is_new_and_refuses_entries_its_log_did_not_sign() {
        let (_, signer) = Signer::generate("log.test/imgsrv/1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let opts = MonitorOptions {
            log_key: signer.verifier().clone(),
            state_dir: dir.path().to_path_buf(),
            images: vec!["deb*".into()],
            keys: vec![],
        };
        let mut entries: Vec<Vec<u8>> = (0..300)
            .map(|i| entry(i, if i % 100 == 7 { "debian" } else { "ubuntu" }))
            .collect();
        let r = run(&log(&signer, &entries, &entries), &opts).unwrap();
        assert_eq!((r.size, r.since), (300, None));
        let at: Vec<u64> = r.matched.iter().map(|m| m.0).collect();
        assert_eq!(at, vec![7, 107, 207]);
        // the next run reads only the new ones (the tiles of the old tree are not asked
        // for: a reader without them still works)
        entries.push(entry(300, "debian"));
        let mut grown = log(&signer, &entries, &entries);
        grown.files.retain(|p, _| !p.starts_with("tile/0/"));
        let r = run(&grown, &opts).unwrap();
        assert_eq!(r.since, Some(300));
        assert_eq!(r.matched.iter().map(|m| m.0).collect::<Vec<_>>(), vec![300]);
        // a server that serves another entry than the one its key signed: refused
        let mut lie = entries.clone();
        entries.push(entry(301, "ubuntu"));
        lie.push(entry(301, "debian"));
        match run(&log(&signer, &entries, &lie), &opts) {
            Err(MonitorError::Problem(p)) => {
                assert!(p.contains("serves other entries"), "{p}")
            }
            other => panic!("{other:?}"),
        }
    }
}
