//! The transparency log (issue 11): every publication, retirement and
//! publisher key change as an entry of an append-only Merkle tree whose
//! signed checkpoints consumers, mirrors and witnesses remember, in the
//! formats of C2SP (signed-note, tlog-checkpoint, tlog-tiles, tlog-proof) so
//! that tools other than imgsrv can read it.
//!
//! Built so far: the tree itself ([`tree`]): RFC 6962 hashing, O(log n)
//! appends over stored complete subtrees, tree hashes, inclusion and
//! consistency proofs and their verification; signed notes and checkpoints
//! ([`note`]), Ed25519 keys in the signed-note `vkey` form; tile paths, hash
//! tiles and entry bundles ([`tiles`]); offline proofs ([`proof`], C2SP
//! tlog-proof). Not yet: entries
//! in the catalog, the log key under `DATA/log/`, tiles over HTTP, witnesses,
//! the consumers' checks.

pub mod consumer;
pub mod entry;
pub mod note;
pub mod proof;
pub mod tiles;
pub mod tree;
