//! The transparency log (issue 11): every publication, retirement and
//! publisher key change as an entry of an append-only Merkle tree whose
//! signed checkpoints consumers, mirrors and witnesses remember, in the
//! formats of C2SP (signed-note, tlog-checkpoint, tlog-tiles, tlog-proof) so
//! that tools other than imgsrv can read it.
//!
//! Here are the pure parts: the tree ([`tree`]: RFC 6962 hashing, O(log n)
//! appends over stored complete subtrees, tree hashes, inclusion and consistency
//! proofs and their verification); signed notes and checkpoints ([`note`]), Ed25519
//! keys in the signed-note `vkey` form; tile paths, hash tiles and entry bundles
//! ([`tiles`]); offline proofs ([`proof`], C2SP tlog-proof); the entries ([`entry`]);
//! what a consumer checks and remembers ([`consumer`]); witnesses' cosignatures
//! ([`cosign`], C2SP tlog-cosignature). The server's side (its key under `DATA/log/`,
//! checkpoints, tiles over the catalog) is [`crate::ledger`]; the rows are the
//! catalog's ([`crate::catalog::LogCatalog`]); bundles carry the log as
//! `crate::bundle`'s `log` module says.

pub mod consumer;
pub mod cosign;
pub mod entry;
pub mod monitor;
pub mod note;
pub mod proof;
pub mod tiles;
pub mod tree;
pub mod witness;
