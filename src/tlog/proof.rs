//! C2SP tlog-proof: an offline proof that an entry is in the log, kept beside
//! what it proves (`.tlog-proof`):
//!
//! ```text
//! c2sp.org/tlog-proof@v1
//! [extra <base64>]
//! index <n>
//! <inclusion proof hash, base64, one per line>
//!
//! <the checkpoint, a signed note, with any cosignatures>
//! ```

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::note::{Checkpoint, Note, Verifier};
use super::tree::{verify_inclusion, Hash};

const HEADER: &str = "c2sp.org/tlog-proof@v1";

/// A parsed `.tlog-proof`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlogProof {
    pub extra: Option<Vec<u8>>,
    pub index: u64,
    pub hashes: Vec<Hash>,
    /// The checkpoint note, signatures included.
    pub checkpoint: String,
}

/// What a verified proof establishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proven {
    pub checkpoint: Checkpoint,
    /// The keys (log and witnesses) whose signatures verified.
    pub signed_by: Vec<String>,
}

impl TlogProof {
    pub fn format(&self) -> String {
        let mut s = format!("{HEADER}\n");
        if let Some(e) = &self.extra {
            s.push_str(&format!("extra {}\n", B64.encode(e)));
        }
        s.push_str(&format!("index {}\n", self.index));
        for h in &self.hashes {
            s.push_str(&B64.encode(h));
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&self.checkpoint);
        s
    }

    pub fn parse(text: &str) -> anyhow::Result<TlogProof> {
        let (head, checkpoint) = text.split_once("\n\n").ok_or_else(|| {
            anyhow::anyhow!("not a tlog-proof: no blank line before the checkpoint")
        })?;
        let mut lines = head.split('\n');
        anyhow::ensure!(
            lines.next() == Some(HEADER),
            "not a tlog-proof: the first line is not {HEADER}"
        );
        let mut next = lines.next();
        let mut extra = None;
        if let Some(e) = next.and_then(|l| l.strip_prefix("extra ")) {
            extra = Some(
                B64.decode(e)
                    .map_err(|_| anyhow::anyhow!("tlog-proof: its extra data is not base64"))?,
            );
            next = lines.next();
        }
        let index = next
            .and_then(|l| l.strip_prefix("index "))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .filter(|n| n.len() == 1 || !n.starts_with('0'))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("tlog-proof: no 'index N' line where one belongs"))?;
        let mut hashes = Vec::new();
        for l in lines {
            let h: Hash = B64
                .decode(l)
                .ok()
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| anyhow::anyhow!("tlog-proof: {l:?} is not a base64 SHA-256 hash"))?;
            hashes.push(h);
        }
        anyhow::ensure!(hashes.len() <= 63, "tlog-proof: more than 63 proof hashes");
        Ok(TlogProof {
            extra,
            index,
            hashes,
            checkpoint: checkpoint.to_string(),
        })
    }

    /// Checks it for the entry whose leaf hash is `leaf`: the checkpoint is of
    /// the log `origin`, signed by a key of `log_keys` (other signatures are
    /// reported, for a witness policy to count), and the entry is in its tree.
    pub fn verify(
        &self,
        leaf: &Hash,
        origin: &str,
        log_keys: &[Verifier],
    ) -> anyhow::Result<Proven> {
        let note = Note::parse(&self.checkpoint)?;
        let checkpoint = Checkpoint::parse(&note.text)?;
        anyhow::ensure!(
            checkpoint.origin == origin,
            "the proof's checkpoint is of the log {:?}, not of {origin:?}",
            checkpoint.origin
        );
        let signed_by = note.verify(log_keys)?;
        verify_inclusion(
            self.index,
            checkpoint.size,
            leaf,
            &self.hashes,
            &checkpoint.root,
        )
        .map_err(|e| {
            anyhow::anyhow!("entry {} is not in the checkpointed tree: {e}", self.index)
        })?;
        Ok(Proven {
            checkpoint,
            signed_by,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlog::note::Signer;
    use crate::tlog::tree::{
        hashes_to_store, inclusion_proof, leaf_hash, tree_hash, HashReader, Node,
    };
    use std::collections::HashMap;

    #[derive(Default)]
    struct Mem(HashMap<Node, Hash>);
    impl HashReader for Mem {
        fn read_hashes(&self, nodes: &[Node]) -> anyhow::Result<Vec<Hash>> {
            Ok(nodes.iter().map(|n| self.0[n]).collect())
        }
    }

    #[test]
    fn a_proof_round_trips_and_verifies_only_for_its_entry_log_and_key() {
        let mut m = Mem::default();
        for i in 0..37u64 {
            for (n, h) in hashes_to_store(i, leaf_hash(&i.to_be_bytes()), &m).unwrap() {
                m.0.insert(n, h);
            }
        }
        let (_, log) = Signer::generate("imgsrv.example/log").unwrap();
        let cp = Checkpoint {
            origin: "imgsrv.example/log".into(),
            size: 37,
            root: tree_hash(37, &m).unwrap(),
        };
        let p = TlogProof {
            extra: Some(b"debian-bookworm 20260101".to_vec()),
            index: 21,
            hashes: inclusion_proof(21, 37, &m).unwrap(),
            checkpoint: log.sign(&cp.text()).unwrap(),
        };
        let text = p.format();
        assert!(
            text.starts_with("c2sp.org/tlog-proof@v1\nextra ZGVi"),
            "{text}"
        );
        assert_eq!(TlogProof::parse(&text).unwrap(), p);
        let keys = [log.verifier().clone()];
        let leaf = leaf_hash(&21u64.to_be_bytes());
        let ok = p.verify(&leaf, "imgsrv.example/log", &keys).unwrap();
        assert_eq!(ok.checkpoint, cp);
        // another entry, another log, another key: refused
        assert!(p
            .verify(&leaf_hash(b"x"), "imgsrv.example/log", &keys)
            .is_err());
        assert!(p.verify(&leaf, "other.example/log", &keys).is_err());
        let (_, other) = Signer::generate("imgsrv.example/log").unwrap();
        assert!(p
            .verify(&leaf, "imgsrv.example/log", &[other.verifier().clone()])
            .is_err());
        // a proof hash changed
        let mut bad = p.clone();
        bad.hashes[0][0] ^= 1;
        assert!(bad.verify(&leaf, "imgsrv.example/log", &keys).is_err());
        // without extra, and malformed ones
        let plain = TlogProof {
            extra: None,
            ..p.clone()
        };
        assert_eq!(TlogProof::parse(&plain.format()).unwrap(), plain);
        for bad in [
            text.replacen("tlog-proof@v1", "tlog-proof@v2", 1),
            text.replacen("index 21", "index 021", 1),
            text.replacen("index 21", "idx 21", 1),
            text.replacen("\n\n", "\n", 1),
        ] {
            assert!(TlogProof::parse(&bad).is_err(), "{bad}");
        }
    }
}
