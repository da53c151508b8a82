//! imgsrv as a witness (C2SP tlog-witness): `POST <prefix>/add-checkpoint` from a log
//! that wants this server's cosignature on a checkpoint.
//!
//! The request body is `old <size>\n`, the consistency proof from that size to the
//! checkpoint's (one base64 hash per line, at most 63), a blank line, then the signed
//! checkpoint. The witness cosigns only a checkpoint that a log it witnesses
//! (`[witness] logs`) signed, and only when `old` is the size of the newest checkpoint
//! of that log it cosigned before and the proof shows the new tree extends it; then
//! that checkpoint becomes the newest it saw. So a witness never cosigns two
//! inconsistent trees of one log: a log forked after a witness saw it (a data
//! directory restored from an older backup that published something else) gets no
//! more cosignatures from it.
//!
//! Answers: 200 with the cosignature line; 400 malformed; 403 not signed by the log's
//! key; 404 a log it does not witness; 409 `old` is not its size (the body, of type
//! `text/x.tlog.size`, is the size it has); 422 the proof does not hold.
//!
//! Its key is `DATA/witness/witness.key` (made by `imgsrv witness init`), the newest
//! checkpoint of each log in `DATA/witness/seen/`.

use super::consumer::{lock_state, read_state, state_file, write_state};
use super::cosign::Cosigner;
use super::note::{Note, Verifier};
use super::tree::{self, Hash};
use anyhow::Context;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use std::path::{Path, PathBuf};

pub const DIR: &str = "witness";
pub const KEY_FILE: &str = "witness.key";
pub const VKEY_FILE: &str = "witness.vkey";
/// At most this many proof lines (C2SP tlog-witness).
const MAX_PROOF: usize = 63;

/// Why a checkpoint was not cosigned, with the status the protocol gives it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    BadSignature(String),
    #[error("{0}")]
    UnknownLog(String),
    /// The size this witness has of the log.
    #[error("{0}")]
    SizeMismatch(u64),
    #[error("{0}")]
    BadProof(String),
    /// The witness could not keep or read its state.
    #[error("{0}")]
    Internal(String),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Malformed(_) => 400,
            Refusal::BadSignature(_) => 403,
            Refusal::UnknownLog(_) => 404,
            Refusal::SizeMismatch(_) => 409,
            Refusal::BadProof(_) => 422,
            Refusal::Internal(_) => 500,
        }
    }
}

/// This server as a witness.
#[derive(Debug)]
pub struct Witness {
    cosigner: Cosigner,
    logs: Vec<Verifier>,
    state_dir: PathBuf,
}

/// Makes the witness key of the data directory `data_dir` named `name` (unless it has
/// one): its vkey, and whether it was made now.
pub fn init(data_dir: &Path, name: &str) -> anyhow::Result<(String, bool)> {
    let dir = data_dir.join(DIR);
    let key = dir.join(KEY_FILE);
    if let Ok(text) = std::fs::read_to_string(&key) {
        let c = Cosigner::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
        return Ok((c.key().vkey(), false));
    }
    let c = Cosigner::generate(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let vkey = c.key().vkey();
    crate::tls::write_atomic(&dir.join(VKEY_FILE), format!("{vkey}\n").as_bytes(), 0o644)
        .with_context(|| format!("writing {}", dir.join(VKEY_FILE).display()))?;
    crate::tls::write_atomic(&key, format!("{}\n", c.text()).as_bytes(), 0o600)
        .with_context(|| format!("writing {}", key.display()))?;
    Ok((vkey, true))
}

impl Witness {
    /// The witness of `data_dir` for `logs`; its key must have been made.
    pub fn open(data_dir: &Path, logs: Vec<Verifier>) -> anyhow::Result<Witness> {
        let key = data_dir.join(DIR).join(KEY_FILE);
        let text = std::fs::read_to_string(&key).with_context(|| {
            format!(
                "[witness] is configured but {} cannot be read: make it with `imgsrv witness \
                 init --data {}`",
                key.display(),
                data_dir.display()
            )
        })?;
        let cosigner =
            Cosigner::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
        Ok(Witness {
            cosigner,
            logs,
            state_dir: data_dir.join(DIR).join("seen"),
        })
    }

    pub fn vkey(&self) -> String {
        self.cosigner.key().vkey()
    }

    /// Handles an `add-checkpoint` request body at time `now` (Unix seconds): the
    /// cosignature line.
    pub fn add_checkpoint(&self, body: &str, now: u64) -> Result<String, Refusal> {
        let bad = |why: &str| Refusal::Malformed(why.to_string());
        let (old_line, rest) = body
            .split_once('\n')
            .ok_or_else(|| bad("the body does not start with an `old SIZE` line"))?;
        let old: u64 = old_line
            .strip_prefix("old ")
            .and_then(|n| n.parse().ok())
            .filter(|_| {
                let digits = &old_line[4..];
                digits.bytes().all(|b| b.is_ascii_digit())
                    && (digits == "0" || !digits.starts_with('0'))
            })
            .ok_or_else(|| bad("the first line is not `old SIZE`"))?;
        // proof lines up to the first empty line; the checkpoint after it (which has
        // an empty line of its own, before its signatures)
        let mut proof: Vec<Hash> = Vec::new();
        let mut at = rest;
        let note_text = loop {
            let (line, next) = at
                .split_once('\n')
                .ok_or_else(|| bad("no blank line between the proof and the checkpoint"))?;
            if line.is_empty() {
                break next;
            }
            let h = B64
                .decode(line)
                .ok()
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
                .ok_or_else(|| bad("a proof line is not a base64 SHA-256 hash"))?;
            proof.push(h);
            if proof.len() > MAX_PROOF {
                return Err(bad("more than 63 proof lines"));
            }
            at = next;
        };
        let note = Note::parse(note_text).map_err(|e| bad(&format!("the checkpoint: {e}")))?;
        let origin = note.text.lines().next().unwrap_or_default();
        let keys: Vec<Verifier> = self
            .logs
            .iter()
            .filter(|k| k.name == origin)
            .cloned()
            .collect();
        if keys.is_empty() {
            return Err(Refusal::UnknownLog(format!(
                "this witness does not witness the log {origin:?}"
            )));
        }
        let new = super::note::signed_checkpoint(note_text, &keys)
            .map_err(|e| Refusal::BadSignature(format!("the checkpoint: {e}")))?;
        if old > new.size {
            return Err(bad("old is larger than the checkpoint's size"));
        }
        let file = state_file(&self.state_dir, origin);
        let _held = lock_state(&file)
            .map_err(|e| Refusal::Internal(format!("the witness's state: {e:#}")))?;
        let seen = read_state(&file, &keys).map_err(|e| {
            Refusal::Internal(format!(
                "{e} (the log's key changed? a witness of a new log under the same name \
                 starts again once its operator removes that file)"
            ))
        })?;
        let have = seen.as_ref().map_or(0, |c| c.size);
        if old != have {
            return Err(Refusal::SizeMismatch(have));
        }
        // the same size as seen, another tree: 409 too (C2SP tlog-witness); the log
        // learns it forked
        if seen
            .as_ref()
            .is_some_and(|s| s.size == new.size && s.root != new.root)
        {
            return Err(Refusal::SizeMismatch(have));
        }
        match &seen {
            None if !proof.is_empty() => {
                return Err(Refusal::BadProof(
                    "a proof from the empty tree must be empty".into(),
                ))
            }
            None => {}
            Some(s) => tree::verify_consistency(s.size, new.size, &s.root, &new.root, &proof)
                .map_err(|e| {
                    Refusal::BadProof(format!(
                        "the tree of {} entries does not extend the one of {} this witness \
                         cosigned ({e})",
                        new.size, s.size
                    ))
                })?,
        }
        if seen.as_ref().is_none_or(|s| s.size < new.size) {
            write_state(&file, note_text)
                .map_err(|e| Refusal::Internal(format!("the witness's state: {e:#}")))?;
        }
        Ok(self.cosigner.cosign(&note.text, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlog::note::{Checkpoint, Signer};
    use crate::tlog::tree::{consistency_proof, leaf_hash, tree_hash, MemTree};

    fn body(old: u64, proof: &[Hash], note: &str) -> String {
        let mut b = format!("old {old}\n");
        for h in proof {
            b.push_str(&B64.encode(h));
            b.push('\n');
        }
        b.push('\n');
        b.push_str(note);
        b
    }

    #[test]
    fn a_witness_cosigns_only_extensions_of_what_it_saw() {
        let dir = tempfile::tempdir().unwrap();
        let (vkey, made) = init(dir.path(), "witness.test").unwrap();
        assert!(made);
        assert_eq!(init(dir.path(), "other").unwrap(), (vkey.clone(), false));
        let (_, log) = Signer::generate("log.test/imgsrv/1").unwrap();
        let w = Witness::open(dir.path(), vec![log.verifier().clone()]).unwrap();
        let key = crate::tlog::cosign::WitnessKey::parse(&vkey).unwrap();
        let tree_of = |n: u64, tag: u8| {
            MemTree::from_leaves((0..n).map(|i| leaf_hash(&[tag, i as u8])).collect())
        };
        let note_of = |t: &MemTree| {
            log.sign(
                &Checkpoint {
                    origin: "log.test/imgsrv/1".into(),
                    size: t.size(),
                    root: tree_hash(t.size(), t).unwrap(),
                }
                .text(),
            )
            .unwrap()
        };
        let (t3, t5) = (tree_of(3, 0), tree_of(5, 0));
        let line = w.add_checkpoint(&body(0, &[], &note_of(&t3)), 7).unwrap();
        let cosigned = Note::parse(&format!("{}{line}", note_of(&t3))).unwrap();
        assert_eq!(key.cosigned(&cosigned).unwrap(), Some(7));
        // the log must say where the witness is
        assert_eq!(
            w.add_checkpoint(&body(0, &[], &note_of(&t5)), 8),
            Err(Refusal::SizeMismatch(3))
        );
        let p = consistency_proof(3, 5, &t5).unwrap();
        assert!(w.add_checkpoint(&body(3, &p, &note_of(&t5)), 8).is_ok());
        // the same tree again: cosigned again; another tree of 5, or of 6 not extending it: no
        assert!(w.add_checkpoint(&body(5, &[], &note_of(&t5)), 9).is_ok());
        let fork = tree_of(5, 1);
        assert_eq!(
            w.add_checkpoint(&body(5, &[], &note_of(&fork)), 9),
            Err(Refusal::SizeMismatch(5))
        );
        let fork6 = tree_of(6, 1);
        let p = consistency_proof(5, 6, &fork6).unwrap();
        assert_eq!(
            w.add_checkpoint(&body(5, &p, &note_of(&fork6)), 9)
                .unwrap_err()
                .status(),
            422
        );
        // another log, another key under the same name, garbage
        let (_, stranger) = Signer::generate("other.test/log").unwrap();
        let n = stranger
            .sign("other.test/log\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")
            .unwrap();
        assert_eq!(
            w.add_checkpoint(&body(0, &[], &n), 1).unwrap_err().status(),
            404
        );
        let (_, impostor) = Signer::generate("log.test/imgsrv/1").unwrap();
        let n = impostor
            .sign(
                &Checkpoint {
                    origin: "log.test/imgsrv/1".into(),
                    size: 9,
                    root: [0; 32],
                }
                .text(),
            )
            .unwrap();
        assert_eq!(
            w.add_checkpoint(&body(5, &[], &n), 1).unwrap_err().status(),
            403
        );
        assert_eq!(w.add_checkpoint("nonsense", 1).unwrap_err().status(), 400);
        for old in ["old +5", "old 05", "old -1", "old 5x"] {
            let b = body(5, &[], &note_of(&t5)).replacen("old 5", old, 1);
            assert_eq!(w.add_checkpoint(&b, 1).unwrap_err().status(), 400, "{old}");
        }
    }
}
