//! The server's transparency log (issue 11) over its catalog: the log's key under
//! `DATA/log/`, signed checkpoints, inclusion and consistency proofs, tiles. The
//! formats are [`crate::tlog`]'s (C2SP); the rows are the catalog's
//! ([`crate::catalog::LogCatalog`], appended in the transaction of each event).
//!
//! # The key
//! `DATA/log/log.key` holds the log's Ed25519 key in Go's signer text form
//! (`PRIVATE+KEY+<origin>+<id>+<base64>`, mode 0600), `DATA/log/log.vkey` its verifier
//! key (`<origin>+<id>+<base64>`), which consumers trust. The key signs checkpoints,
//! never images, and is not in the catalog: whoever can write the database still
//! cannot sign a history of their own. The catalog records which verifier key is the
//! log's (the first instance to open it claims it): an instance holding another key
//! refuses to start, and one holding none (a deployment's second instance before its
//! operator copied `DATA/log/` to it) serves the log and the checkpoints the others
//! signed, but signs none.
//!
//! # Checkpoints
//! Signed when asked for and the newest stored one is behind the log (after a publish,
//! the next request for the checkpoint or a proof): one signature covers any number
//! of appends, and a crash between an append and its checkpoint loses nothing. Every
//! signed checkpoint is stored (one per size), so that `imgsrv log verify` can check
//! that each is consistent with the entries.
//!
//! # Origin
//! `<host>/imgsrv/<8 random hex digits>`: the host the operator named for the
//! certificate (`[tls] names`, `init --name`), else the machine's name, and a random
//! part, so that two servers on one name (or one re-initialised) are two logs.

use crate::catalog::{CatalogError, LogCatalog};
use crate::tlog::note::{Checkpoint, Signer, Verifier};
use crate::tlog::tiles::Tile;
use crate::tlog::tree::{self, Hash, HashReader, Node};
use anyhow::{bail, Context, Result};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

pub const LOG_DIR: &str = "log";
pub const KEY_FILE: &str = "log.key";
pub const VKEY_FILE: &str = "log.vkey";

/// The catalog's stored hashes, as [`tree`] reads them.
pub struct CatalogHashes<'a>(pub &'a dyn LogCatalog);

impl HashReader for CatalogHashes<'_> {
    fn read_hashes(&self, nodes: &[Node]) -> Result<Vec<Hash>> {
        Ok(self.0.log_hashes(nodes)?)
    }
}

/// The log as one server keeps it.
pub struct Ledger {
    verifier: Verifier,
    signer: Option<Signer>,
    /// `DATA/log`.
    dir: PathBuf,
    /// `[transparency_log] witnesses`: asked to cosign each checkpoint served.
    witnesses: Vec<crate::config::LogWitness>,
    /// What was asked of each witness (by key ID): the size it was last known to
    /// have, and the size and time of the last request (one every [`ASK_EVERY`]).
    asked: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<[u8; 4], Asked>>>,
    /// The catalog, for the consistency proofs sent to witnesses (from another thread).
    catalog: Option<std::sync::Arc<dyn LogCatalog>>,
    /// Full tiles served before (a full tile never changes), by path, and their bytes
    /// in all: at most [`FULL_TILES_BYTES`].
    full_tiles: std::sync::Mutex<FullTiles>,
}

/// Full tiles by path, and their bytes in all.
#[derive(Default)]
struct FullTiles {
    by_path: std::collections::HashMap<String, std::sync::Arc<[u8]>>,
    bytes: usize,
}

/// A tile and its bytes.
pub type TileBytes = (Tile, std::sync::Arc<[u8]>);

/// What the full tiles kept in memory may take (a hash tile is 8 KiB: 4,096 of them, the
/// level-0 tiles of a log of 1,000,000 entries and the levels above).
const FULL_TILES_BYTES: usize = 32 << 20;

#[derive(Default)]
struct Asked {
    size: u64,
    last: Option<(u64, std::time::Instant)>,
}

/// A witness that did not cosign a checkpoint is asked again at most this often.
const ASK_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// Where the cosignatures of each size are kept: `DATA/log/cosigned/<size>/<key ID>`.
const COSIGNED_DIR: &str = "cosigned";

/// Creates `DATA/log/` with a new key unless it has one, or the catalog's log has a
/// key recorded already (an instance of a deployment: the key is copied from another
/// instance, never made anew). The key file made, if one was.
pub fn init(data_dir: &Path, cat: &dyn LogCatalog, host: &str) -> Result<Option<PathBuf>> {
    let dir = data_dir.join(LOG_DIR);
    let key = dir.join(KEY_FILE);
    if key.exists() || cat.log_vkey()?.is_some() {
        return Ok(None);
    }
    let mut rand = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rand)
        .map_err(|_| anyhow::anyhow!("no randomness from the system"))?;
    let origin = format!("{host}/imgsrv/{}", hex::encode(rand));
    let (seed, signer) = Signer::generate(&origin)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let write = |path: &Path, text: String, mode: u32| -> Result<()> {
        crate::tls::write_atomic(path, text.as_bytes(), mode)
            .with_context(|| format!("writing {}", path.display()))
    };
    write(
        &dir.join(VKEY_FILE),
        format!("{}\n", signer.verifier().vkey()),
        0o644,
    )?;
    write(
        &key,
        format!("{}\n", Signer::go_text(&origin, &seed)?),
        0o600,
    )?;
    Ok(Some(key))
}

impl Ledger {
    /// The log of the server at `data_dir` (see the module doc for the key's rules).
    /// `None` when there is neither a key file nor a recorded key (a data directory
    /// `imgsrv init` has not seen since the log came).
    pub fn open(data_dir: &Path, cat: &dyn LogCatalog) -> Result<Option<Ledger>> {
        let key = data_dir.join(LOG_DIR).join(KEY_FILE);
        let signer = match std::fs::read_to_string(&key) {
            Ok(text) => Some(Signer::parse_go(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a log key ({e}): restore it from a backup of this data \
                     directory (a new key would start another log)",
                    key.display()
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", key.display())),
        };
        // a write only the first time: every later open reads what was recorded
        let recorded = match (cat.log_vkey()?, &signer) {
            (Some(v), _) => Some(v),
            (None, Some(s)) => Some(cat.claim_log_vkey(&s.verifier().vkey())?),
            (None, None) => None,
        };
        let Some(recorded) = recorded else {
            return Ok(None);
        };
        let verifier = Verifier::parse(&recorded)
            .map_err(|e| anyhow::anyhow!("the catalog's log key {recorded:?}: {e}"))?;
        if let Some(s) = &signer {
            if s.verifier().vkey() != recorded {
                bail!(
                    "{} is the key of log {}, but this catalog's log is {recorded}: copy \
                     DATA/log/ from an instance of this deployment (or from the backup the \
                     catalog came from) over it",
                    key.display(),
                    s.verifier().vkey()
                );
            }
        } else {
            log::warn!(
                "no log key in {}: this instance serves the transparency log {recorded} and \
                 the checkpoints other instances signed, but signs none; copy DATA/log/ from \
                 an instance that has it",
                key.display()
            );
        }
        Ok(Some(Ledger {
            verifier,
            signer,
            dir: data_dir.join(LOG_DIR),
            witnesses: Vec::new(),
            asked: Default::default(),
            catalog: None,
            full_tiles: Default::default(),
        }))
    }

    /// The log, asking `witnesses` to cosign what it serves (`catalog`: this log's,
    /// for the consistency proofs it sends them).
    pub fn with_witnesses(
        mut self,
        witnesses: Vec<crate::config::LogWitness>,
        catalog: std::sync::Arc<dyn LogCatalog>,
    ) -> Ledger {
        self.witnesses = witnesses;
        self.catalog = Some(catalog);
        self
    }

    pub fn vkey(&self) -> String {
        self.verifier.vkey()
    }

    pub fn origin(&self) -> &str {
        &self.verifier.name
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The newest checkpoint: the stored one, or, when that is behind the log and
    /// this instance holds the key, a new one signed now (and stored). `(size, note)`.
    ///
    /// The note carries the cosignatures witnesses gave for that size (kept under
    /// `DATA/log/cosigned/`), the configured witnesses that gave none yet asked first
    /// (C2SP tlog-witness; a witness that is down or refuses costs a warning in the log,
    /// and is asked again after a while).
    pub fn checkpoint(&self, cat: &dyn LogCatalog) -> Result<(u64, String), CatalogError> {
        let (size, note) = self.signed_checkpoint(cat)?;
        Ok((size, self.cosigned(size, note)))
    }

    fn signed_checkpoint(&self, cat: &dyn LogCatalog) -> Result<(u64, String), CatalogError> {
        let size = cat.log_size()?;
        let stored = cat.latest_checkpoint()?;
        if let Some(s) = stored.as_ref().filter(|(n, _)| *n >= size) {
            return Ok(s.clone());
        }
        let Some(signer) = &self.signer else {
            return stored.ok_or_else(|| {
                CatalogError::Unavailable(
                    "no checkpoint is signed yet: the instances holding the log's key sign one \
                     at their next request"
                        .into(),
                )
            });
        };
        let root = tree::tree_hash(size, &CatalogHashes(cat))
            .map_err(|e| CatalogError::Backend(format!("the log's tree hash: {e:#}")))?;
        // The key signs only a tree that extends what it signed before: whoever rewrote
        // the log's rows (the guards dropped) gets no signature on that history.
        if let Some((old, note)) = &stored {
            self.extends(cat, *old, note)?;
        }
        let text = Checkpoint {
            origin: self.origin().to_string(),
            size,
            root,
        }
        .text();
        let note = signer
            .sign(&text)
            .map_err(|e| CatalogError::Backend(format!("signing the checkpoint: {e}")))?;
        if size == 0 {
            return Ok((0, note)); // nothing to store: the table holds sizes from 1
        }
        if !cat.put_checkpoint(size, &note)? {
            // another instance signed this size first: the stored one is the one
            if let Some(s) = cat.latest_checkpoint()?.filter(|(n, _)| *n >= size) {
                return Ok(s);
            }
        }
        Ok((size, note))
    }

    /// `note` (the log's signed checkpoint of `size`) with the cosignature of each
    /// configured witness that gave one for exactly this checkpoint (a kept line that
    /// does not verify over it, left from another tree of that size, is asked anew).
    /// Witnesses that gave none are asked, all at once, each on a thread of its own;
    /// the answer waits for them at most [`WAIT_FOR_WITNESSES`] (a slow one's
    /// cosignature is kept when it comes, for the next request).
    fn cosigned(&self, size: u64, note: String) -> String {
        if size == 0 || self.witnesses.is_empty() {
            return note;
        }
        let dir = self.dir.join(COSIGNED_DIR).join(size.to_string());
        let mut lines = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut waiting = 0;
        for w in &self.witnesses {
            let file = dir.join(hex::encode(w.key.id));
            match std::fs::read_to_string(&file) {
                Ok(line) if cosigns(w, &note, &line) => {
                    lines.push(line);
                    continue;
                }
                _ => {}
            }
            let Some(cat) = self.catalog.clone() else {
                continue;
            };
            if !self.time_to_ask(w, size) {
                continue;
            }
            let (w, note, asked, tx, dir) = (
                w.clone(),
                note.clone(),
                self.asked.clone(),
                tx.clone(),
                dir.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name("log-witness".into())
                .spawn(move || {
                    let got = ask(cat.as_ref(), &w, size, &note, &asked);
                    if let Ok(line) = &got {
                        keep(&dir, &file, line);
                    }
                    let _ = tx.send((w, got));
                });
            match spawned {
                Ok(_) => waiting += 1,
                Err(e) => log::warn!("transparency log: cannot ask a witness: {e}"),
            }
        }
        let deadline = std::time::Instant::now() + WAIT_FOR_WITNESSES;
        while waiting > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok((w, got)) = rx.recv_timeout(left) else {
                break;
            };
            waiting -= 1;
            match got {
                Ok(line) => lines.push(line),
                Err(e) => log::warn!(
                    "transparency log: the witness {} ({}) did not cosign the checkpoint of \
                     {size} entries: {e:#}",
                    w.key.name,
                    w.url
                ),
            }
        }
        lines.sort();
        lines.into_iter().fold(note, |n, l| n + &l)
    }

    /// Whether witness `w` may be asked about `size` now (once every [`ASK_EVERY`]);
    /// if so, the time is noted.
    fn time_to_ask(&self, w: &crate::config::LogWitness, size: u64) -> bool {
        let mut asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
        let a = asked.entry(w.key.id).or_default();
        if a.last
            .is_some_and(|(s, at)| s == size && at.elapsed() < ASK_EVERY)
        {
            return false;
        }
        a.last = Some((size, std::time::Instant::now()));
        true
    }

    /// Ok when the log's tree still has, at `size` entries, the root of the checkpoint
    /// `note` the log's key signed: the log grew only by appending since.
    fn extends(&self, cat: &dyn LogCatalog, size: u64, note: &str) -> Result<(), CatalogError> {
        let refuse = |why: String| {
            log::error!("transparency log: {why}");
            CatalogError::Conflict(format!(
                "the transparency log's rows do not extend its last signed checkpoint ({why}): \
                 no new checkpoint is signed; run `imgsrv log verify` on the data directory"
            ))
        };
        let signed =
            crate::tlog::note::signed_checkpoint(note, std::slice::from_ref(&self.verifier))
                .map_err(|e| refuse(format!("the stored checkpoint of size {size}: {e}")))?;
        let root = tree::tree_hash(size, &CatalogHashes(cat))
            .map_err(|e| refuse(format!("the tree of {size} entries: {e:#}")))?;
        if signed.size != size || signed.root != root {
            return Err(refuse(format!(
                "the tree of its first {size} entries is not the one signed"
            )));
        }
        Ok(())
    }

    /// The C2SP tlog-proof that `image`@`version`'s publication is in the log, against
    /// the newest checkpoint. `None` when the log has no entry of its publication.
    pub fn proof(
        &self,
        cat: &dyn LogCatalog,
        image: &str,
        version: &str,
    ) -> Result<Option<String>, CatalogError> {
        let Some((index, _)) = cat
            .log_entries_of(image, version)?
            .into_iter()
            .find(|(_, kind)| kind == "publish")
        else {
            return Ok(None);
        };
        let (size, note) = self.checkpoint(cat)?;
        if index >= size {
            return Err(CatalogError::Unavailable(format!(
                "{image}@{version} is in the log but in no signed checkpoint yet: ask again in \
                 a moment"
            )));
        }
        let hashes = tree::inclusion_proof(index, size, &CatalogHashes(cat))
            .map_err(|e| CatalogError::Backend(format!("the inclusion proof: {e:#}")))?;
        Ok(Some(
            crate::tlog::proof::TlogProof {
                extra: None,
                index,
                hashes,
                checkpoint: note,
            }
            .format(),
        ))
    }

    /// The consistency proof from the tree of `old` entries to the one of `new`.
    pub fn consistency(
        cat: &dyn LogCatalog,
        old: u64,
        new: u64,
    ) -> Result<Vec<Hash>, CatalogError> {
        let size = cat.log_size()?;
        if old > new || new > size {
            return Err(CatalogError::Invalid(format!(
                "a consistency proof goes from a smaller tree to a larger one the log has \
                 (it has {size} entries): {old} to {new} is not one"
            )));
        }
        tree::consistency_proof(old, new, &CatalogHashes(cat))
            .map_err(|e| CatalogError::Backend(format!("the consistency proof: {e:#}")))
    }

    /// [`Ledger::tile`], a full tile from memory when it was served before: a full tile
    /// never changes, and the log's tiles are read as static files are (a client
    /// following the log, a monitor's first run, a verifier) without the catalog.
    pub fn cached_tile(
        &self,
        cat: &dyn LogCatalog,
        path: &str,
        size: u64,
    ) -> Result<Option<TileBytes>, CatalogError> {
        let Some(tile) = Tile::parse(path).filter(|t| t.covered_by(size)) else {
            return Ok(None);
        };
        let lock = || self.full_tiles.lock().unwrap_or_else(|p| p.into_inner());
        if tile.is_full() {
            if let Some(b) = lock().by_path.get(path) {
                return Ok(Some((tile, b.clone())));
            }
        }
        let Some((tile, bytes)) = Self::tile(cat, path, size)? else {
            return Ok(None);
        };
        let bytes: std::sync::Arc<[u8]> = bytes.into();
        if tile.is_full() {
            let mut kept = lock();
            if kept.bytes + bytes.len() <= FULL_TILES_BYTES
                && kept
                    .by_path
                    .insert(path.to_string(), bytes.clone())
                    .is_none()
            {
                kept.bytes += bytes.len();
            }
        }
        Ok(Some((tile, bytes)))
    }

    /// The bytes of the tile at `path` (under `/log/tile/`), for a log of `size`
    /// entries: `None` when the path names no tile of it.
    pub fn tile(
        cat: &dyn LogCatalog,
        path: &str,
        size: u64,
    ) -> Result<Option<(Tile, Vec<u8>)>, CatalogError> {
        let Some(tile) = Tile::parse(path) else {
            return Ok(None);
        };
        if !tile.covered_by(size) {
            return Ok(None);
        }
        let bytes = match tile.level {
            Some(_) => crate::tlog::tiles::hash_tile(&tile, &CatalogHashes(cat))
                .map_err(|e| CatalogError::Backend(format!("tile {path}: {e:#}")))?,
            None => {
                let start = tile.index * crate::tlog::tiles::WIDTH;
                let entries = cat.log_entries(start, start + u64::from(tile.width))?;
                crate::tlog::tiles::entry_bundle(entries.iter().map(Vec::as_slice))
                    .map_err(|e| CatalogError::Backend(format!("tile {path}: {e:#}")))?
            }
        };
        Ok(Some((tile, bytes)))
    }
}

/// How long an answer waits for the witnesses it asked.
const WAIT_FOR_WITNESSES: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `line` is witness `w`'s valid cosignature on `note`.
fn cosigns(w: &crate::config::LogWitness, note: &str, line: &str) -> bool {
    line.ends_with('\n')
        && crate::tlog::note::Note::parse(&format!("{note}{line}"))
            .ok()
            .and_then(|n| w.key.cosigned(&n).ok().flatten())
            .is_some()
}

/// Keeps a cosignature line (a failure only costs asking again).
fn keep(dir: &Path, file: &Path, line: &str) {
    let stored = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .and_then(|()| crate::tls::write_atomic(file, line.as_bytes(), 0o644));
    if let Err(e) = stored {
        log::warn!("transparency log: keeping {}: {e}", file.display());
    }
}

/// Asks witness `w` to cosign `note` (the log's checkpoint of `size` entries), from
/// the size it was last known to have (`asked`): its cosignature line.
fn ask(
    cat: &dyn LogCatalog,
    w: &crate::config::LogWitness,
    size: u64,
    note: &str,
    asked: &std::sync::Mutex<std::collections::HashMap<[u8; 4], Asked>>,
) -> Result<String> {
    let known = |set: Option<u64>| {
        let mut m = asked.lock().unwrap_or_else(|p| p.into_inner());
        let a = m.entry(w.key.id).or_default();
        if let Some(n) = set {
            a.size = n;
        }
        a.size
    };
    let mut old = known(None).min(size);
    // twice at most: the witness may know the log at another size than we thought
    for _ in 0..2 {
        let mut body = format!("old {old}\n");
        for h in Ledger::consistency(cat, old, size)? {
            use base64::Engine as _;
            body.push_str(&base64::engine::general_purpose::STANDARD.encode(h));
            body.push('\n');
        }
        body.push('\n');
        body.push_str(note);
        let (status, text) = crate::client::witness_add_checkpoint(&w.url, w.ca.as_deref(), &body)?;
        match status {
            200 => {
                let line = text
                    .lines()
                    .map(|l| format!("{l}\n"))
                    .find(|l| cosigns(w, note, l))
                    .ok_or_else(|| anyhow::anyhow!("its answer holds no cosignature by its key"))?;
                known(Some(size));
                return Ok(line);
            }
            409 => {
                let have: u64 = text
                    .trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("409 without its size: {text:?}"))?;
                if have > size {
                    bail!(
                        "it has seen this log at {have} entries, more than the {size} served here: \
                         this log was rolled back (restored from an older backup?)"
                    );
                }
                if have == old {
                    bail!(
                        "it cosigned another tree of {have} entries than this log's: this log's \
                         history forked (restored from an older backup, then written to?)"
                    );
                }
                old = known(Some(have));
            }
            _ => bail!("HTTP {status}: {}", text.trim()),
        }
    }
    bail!("the witness's size kept changing")
}
