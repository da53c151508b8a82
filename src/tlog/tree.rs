//! The Merkle tree of the transparency log (issue 11), hashed as RFC 6962
//! (section 2.1) says: SHA-256, a leaf hashed as `H(0x00 || entry)`, an
//! interior node as `H(0x01 || left || right)`, the tree of `n` leaves split
//! at the largest power of two below `n`.
//!
//! Stored hashes are addressed the way C2SP tlog-tiles addresses them: level
//! `L` (0 for leaf hashes), index `N` within that level; the node at
//! `(L, N)` covers leaves `N * 2^L .. (N + 1) * 2^L`. Only complete subtrees
//! are ever stored, so a stored hash never changes. Appending a leaf adds its
//! hash and the hashes of the subtrees it completes: at most `log2(n) + 1`
//! new hashes ([`hashes_to_store`]), never a recomputation of the tree.
//! Tree hashes, inclusion and consistency proofs of any size up to `n` read
//! O(log n) stored hashes through [`HashReader`].

use sha2::{Digest as _, Sha256};

/// A SHA-256 value in the tree.
pub type Hash = [u8; 32];

/// `H(0x00 || entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// `H(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The hash of the empty tree, `H()`.
pub fn empty_hash() -> Hash {
    Sha256::digest([]).into()
}

/// Where a stored hash lives: level and index in that level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    pub level: u8,
    pub index: u64,
}

/// Reads stored hashes (all of them complete subtrees of the tree so far).
pub trait HashReader {
    /// The hashes at `nodes`, in that order.
    fn read_hashes(&self, nodes: &[Node]) -> anyhow::Result<Vec<Hash>>;
}

/// Why a proof could not be made or does not hold.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofError {
    #[error("leaf {index} is not in a tree of {size} leaves")]
    NoSuchLeaf { index: u64, size: u64 },
    #[error("a tree of {old} leaves is not a prefix of one of {new}")]
    BadSizes { old: u64, new: u64 },
    #[error("the proof has {got} hashes, {want} expected")]
    WrongLength { got: usize, want: usize },
    #[error("the proof does not lead to the tree hash")]
    Mismatch,
}

/// The hashes to store when leaf `n` (numbered from 0) with hash `leaf` is
/// appended to a tree of `n` leaves: the leaf's own, then each subtree it
/// completes, bottom up. `stored` gives the hashes of complete subtrees
/// already stored (the left siblings on the way up).
pub fn hashes_to_store(
    n: u64,
    leaf: Hash,
    stored: &impl HashReader,
) -> anyhow::Result<Vec<(Node, Hash)>> {
    let mut out = vec![(Node { level: 0, index: n }, leaf)];
    // leaf n completes the subtree at level l whenever the low l bits of n are all 1
    let mut siblings = Vec::new();
    let (mut level, mut index) = (0u8, n);
    while index & 1 == 1 {
        siblings.push(Node {
            level,
            index: index - 1,
        });
        level += 1;
        index >>= 1;
    }
    let left = stored.read_hashes(&siblings)?;
    let mut h = leaf;
    for (sib, l) in siblings.iter().zip(left) {
        h = node_hash(&l, &h);
        out.push((
            Node {
                level: sib.level + 1,
                index: sib.index >> 1,
            },
            h,
        ));
    }
    Ok(out)
}

/// The complete subtrees that make up `[lo, hi)`, left to right, each as the
/// largest stored node starting where the previous one ended.
fn subtrees(mut lo: u64, hi: u64, out: &mut Vec<Node>) {
    while lo < hi {
        // the largest power of two that aligns with lo and fits before hi
        let mut level = if lo == 0 {
            63
        } else {
            lo.trailing_zeros() as u8
        };
        while level > 0 && (1u64 << level) > hi - lo {
            level -= 1;
        }
        out.push(Node {
            level,
            index: lo >> level,
        });
        lo += 1u64 << level;
    }
}

/// The hash of leaves `[lo, hi)`, a subtree of RFC 6962's split (`hi - lo`
/// need not be a power of two: its complete subtrees are combined right to
/// left, which is how the split nests).
fn range_hash(lo: u64, hi: u64, r: &impl HashReader) -> anyhow::Result<Hash> {
    if lo == hi {
        return Ok(empty_hash());
    }
    let mut nodes = Vec::new();
    subtrees(lo, hi, &mut nodes);
    let hashes = r.read_hashes(&nodes)?;
    let mut it = hashes.into_iter().rev();
    let mut h = it.next().expect("at least one subtree");
    for l in it {
        h = node_hash(&l, &h);
    }
    Ok(h)
}

/// Every complete subtree's hash, in memory, made from the leaf hashes: the tree as a
/// reader of the log's level-0 tiles rebuilds it (an import checking a bundle's
/// copy of the log offline).
pub struct MemTree {
    /// `levels[L][N]`: the subtree at level `L`, index `N`.
    levels: Vec<Vec<Hash>>,
}

impl MemTree {
    pub fn from_leaves(leaves: Vec<Hash>) -> MemTree {
        let mut levels = vec![leaves];
        while let Some(below) = levels.last().filter(|l| l.len() >= 2) {
            let up = below
                .chunks_exact(2)
                .map(|p| node_hash(&p[0], &p[1]))
                .collect();
            levels.push(up);
        }
        MemTree { levels }
    }

    /// How many leaves it has.
    pub fn size(&self) -> u64 {
        self.levels[0].len() as u64
    }

    /// The leaf hashes.
    pub fn leaves(&self) -> &[Hash] {
        &self.levels[0]
    }
}

impl HashReader for MemTree {
    fn read_hashes(&self, nodes: &[Node]) -> anyhow::Result<Vec<Hash>> {
        nodes
            .iter()
            .map(|n| {
                self.levels
                    .get(usize::from(n.level))
                    .and_then(|l| l.get(usize::try_from(n.index).ok()?))
                    .copied()
                    .ok_or_else(|| {
                        anyhow::anyhow!("no hash at level {} index {}", n.level, n.index)
                    })
            })
            .collect()
    }
}

/// The root hash of the first `size` leaves.
pub fn tree_hash(size: u64, r: &impl HashReader) -> anyhow::Result<Hash> {
    range_hash(0, size, r)
}

/// The largest power of two strictly below `n` (n >= 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// RFC 6962 PATH(m, D[lo:hi]) as ranges whose hashes make it, leaf side first.
fn path_ranges(m: u64, lo: u64, hi: u64, out: &mut Vec<(u64, u64)>) {
    let n = hi - lo;
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path_ranges(m, lo, lo + k, out);
        out.push((lo + k, hi));
    } else {
        path_ranges(m - k, lo + k, hi, out);
        out.push((lo, lo + k));
    }
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves.
pub fn inclusion_proof(index: u64, size: u64, r: &impl HashReader) -> anyhow::Result<Vec<Hash>> {
    if index >= size {
        return Err(ProofError::NoSuchLeaf { index, size }.into());
    }
    let mut ranges = Vec::new();
    path_ranges(index, 0, size, &mut ranges);
    ranges
        .iter()
        .map(|&(lo, hi)| range_hash(lo, hi, r))
        .collect()
}

/// RFC 6962 SUBPROOF(m, D[lo:hi], b) as ranges, leaf side first.
fn subproof_ranges(m: u64, lo: u64, hi: u64, whole: bool, out: &mut Vec<(u64, u64)>) {
    let n = hi - lo;
    if m == n {
        if !whole {
            out.push((lo, hi));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof_ranges(m, lo, lo + k, whole, out);
        out.push((lo + k, hi));
    } else {
        subproof_ranges(m - k, lo + k, hi, false, out);
        out.push((lo, lo + k));
    }
}

/// The consistency proof from the tree of `old` leaves to the one of `new`.
pub fn consistency_proof(old: u64, new: u64, r: &impl HashReader) -> anyhow::Result<Vec<Hash>> {
    if old > new {
        return Err(ProofError::BadSizes { old, new }.into());
    }
    if old == 0 || old == new {
        return Ok(Vec::new());
    }
    let mut ranges = Vec::new();
    subproof_ranges(old, 0, new, true, &mut ranges);
    ranges
        .iter()
        .map(|&(lo, hi)| range_hash(lo, hi, r))
        .collect()
}

/// The RFC 9162 walk up the tree (sections 2.1.3.2 and 2.1.4.2) from node `f`
/// of a tree whose last node is `s`, one proof hash per level: `step(p, true)`
/// where `p` is the left sibling, `step(p, false)` where it is the right one.
/// False when the proof is shorter or longer than the sizes make it.
fn walk(mut f: u64, mut s: u64, proof: &[Hash], mut step: impl FnMut(&Hash, bool)) -> bool {
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            step(p, true);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            step(p, false);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0
}

/// Checks that `leaf` is leaf `index` of the tree of `size` leaves whose hash
/// is `root` (RFC 9162, section 2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::NoSuchLeaf { index, size });
    }
    let mut h = *leaf;
    let fits = walk(index, size - 1, proof, |p, left| {
        h = match left {
            true => node_hash(p, &h),
            false => node_hash(&h, p),
        }
    });
    if !fits {
        let mut want = Vec::new();
        path_ranges(index, 0, size, &mut want);
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want: want.len(),
        });
    }
    match h == *root {
        true => Ok(()),
        false => Err(ProofError::Mismatch),
    }
}

/// Checks that the tree of `old` leaves with hash `old_root` is a prefix of
/// the tree of `new` leaves with hash `new_root` (RFC 9162, section 2.1.4.2).
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old > new {
        return Err(ProofError::BadSizes { old, new });
    }
    let bad_len = || {
        let mut want = Vec::new();
        if old != 0 && old != new {
            subproof_ranges(old, 0, new, true, &mut want);
        }
        ProofError::WrongLength {
            got: proof.len(),
            want: want.len(),
        }
    };
    // the empty tree is a prefix of every tree, and a tree of itself: no proof
    if old == 0 || old == new {
        return match (proof.is_empty(), old == 0 || old_root == new_root) {
            (false, _) => Err(bad_len()),
            (true, true) => Ok(()),
            (true, false) => Err(ProofError::Mismatch),
        };
    }
    // old a power of two: its root is the first hash, not sent
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return Err(bad_len());
    };
    let (mut f, mut s) = (old - 1, new - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    let fits = walk(f, s, rest, |c, left| match left {
        true => {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
        }
        false => sr = node_hash(&sr, c),
    });
    if !fits {
        return Err(bad_len());
    }
    match fr == *old_root && sr == *new_root {
        true => Ok(()),
        false => Err(ProofError::Mismatch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Stored hashes in memory, counting reads.
    #[derive(Default)]
    struct Mem {
        hashes: HashMap<Node, Hash>,
        reads: RefCell<usize>,
    }
    impl HashReader for Mem {
        fn read_hashes(&self, nodes: &[Node]) -> anyhow::Result<Vec<Hash>> {
            *self.reads.borrow_mut() += nodes.len();
            nodes
                .iter()
                .map(|n| {
                    self.hashes
                        .get(n)
                        .copied()
                        .ok_or_else(|| anyhow::anyhow!("no hash at {n:?}"))
                })
                .collect()
        }
    }
    impl Mem {
        fn append(&mut self, entry: &[u8]) {
            let n = self.hashes.keys().filter(|k| k.level == 0).count() as u64;
            for (node, h) in hashes_to_store(n, leaf_hash(entry), self).unwrap() {
                assert!(
                    self.hashes.insert(node, h).is_none(),
                    "{node:?} stored twice"
                );
            }
        }
    }

    #[test]
    fn a_tree_rebuilt_from_its_leaves_holds_the_stored_hashes() {
        let mut m = Mem::default();
        let mut leaves = Vec::new();
        for i in 0..70u64 {
            m.append(&i.to_be_bytes());
            leaves.push(leaf_hash(&i.to_be_bytes()));
            let t = MemTree::from_leaves(leaves.clone());
            assert_eq!(t.size(), i + 1);
            let n = i + 1;
            assert_eq!(tree_hash(n, &t).unwrap(), mth(&leaves), "{n}");
            for old in [0, 1, n / 2, n] {
                assert_eq!(
                    consistency_proof(old, n, &t).unwrap(),
                    consistency_proof(old, n, &m).unwrap(),
                    "{old} -> {n}"
                );
            }
        }
        let t = MemTree::from_leaves(leaves);
        assert!(t
            .read_hashes(&[Node {
                level: 0,
                index: 70
            }])
            .is_err());
        assert!(t.read_hashes(&[Node { level: 9, index: 0 }]).is_err());
    }

    /// RFC 6962 MTH straight from its definition, over leaf hashes.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_hash(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    /// RFC 6962 PATH from its definition.
    fn path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
        let n = leaves.len();
        if n <= 1 {
            return vec![];
        }
        let k = split(n as u64) as usize;
        if m < k {
            let mut p = path(m, &leaves[..k]);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = path(m - k, &leaves[k..]);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    /// RFC 6962 SUBPROOF from its definition.
    fn subproof(m: usize, leaves: &[Hash], b: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if b { vec![] } else { vec![mth(leaves)] };
        }
        let k = split(n as u64) as usize;
        if m <= k {
            let mut p = subproof(m, &leaves[..k], b);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = subproof(m - k, &leaves[k..], false);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    fn hex(h: &Hash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The eight leaves of the RFC 6962 test data of certificate-transparency
    /// (Google's reference implementation) and the roots it lists for them.
    #[test]
    fn roots_match_the_reference_test_vectors() {
        let entries: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let mut m = Mem::default();
        assert_eq!(
            hex(&tree_hash(0, &m).unwrap()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        for (i, e) in entries.iter().enumerate() {
            m.append(e);
            assert_eq!(
                hex(&tree_hash(i as u64 + 1, &m).unwrap()),
                roots[i],
                "size {}",
                i + 1
            );
        }
        // every earlier size stays answerable from the same stored hashes
        for (i, root) in roots.iter().enumerate() {
            assert_eq!(hex(&tree_hash(i as u64 + 1, &m).unwrap()), *root);
        }
    }

    /// Every proof for every size up to 70 is what the RFC's definitions give,
    /// and verifies; a changed proof hash or leaf does not, nor a forked old tree.
    /// (A proof checked against a wrong size may still hold: the size is bound
    /// to the root by the signed checkpoint, not by the proof.)
    #[test]
    fn proofs_follow_the_rfc_definitions_and_verify() {
        let mut m = Mem::default();
        let mut leaves = Vec::new();
        for i in 0..70u32 {
            let e = i.to_be_bytes();
            m.append(&e);
            leaves.push(leaf_hash(&e));
        }
        for size in 1..=70usize {
            let root = mth(&leaves[..size]);
            assert_eq!(tree_hash(size as u64, &m).unwrap(), root);
            for i in 0..size {
                let p = inclusion_proof(i as u64, size as u64, &m).unwrap();
                assert_eq!(p, path(i, &leaves[..size]), "PATH({i}, {size})");
                verify_inclusion(i as u64, size as u64, &leaves[i], &p, &root).unwrap();
                let other = leaves[(i + 1) % size];
                if size > 1 {
                    assert!(verify_inclusion(i as u64, size as u64, &other, &p, &root).is_err());
                }
                if let Some((first, _)) = p.split_first() {
                    let mut bad = p.clone();
                    bad[0] = node_hash(first, first);
                    assert!(
                        verify_inclusion(i as u64, size as u64, &leaves[i], &bad, &root).is_err()
                    );
                }
            }
            for old in 1..=size {
                let p = consistency_proof(old as u64, size as u64, &m).unwrap();
                let want = if old == size {
                    vec![]
                } else {
                    subproof(old, &leaves[..size], true)
                };
                assert_eq!(p, want, "SUBPROOF({old}, {size})");
                let old_root = mth(&leaves[..old]);
                verify_consistency(old as u64, size as u64, &old_root, &root, &p).unwrap();
                if old < size {
                    // a forked old tree (another last leaf) is caught
                    let mut forked = leaves[..old].to_vec();
                    forked[old - 1] = leaf_hash(b"fork");
                    assert!(
                        verify_consistency(old as u64, size as u64, &mth(&forked), &root, &p)
                            .is_err()
                    );
                    assert!(
                        verify_consistency(old as u64, size as u64, &old_root, &old_root, &p)
                            .is_err()
                    );
                }
            }
        }
    }

    /// Appending stores at most log2(n) + 1 hashes and reads as many; a proof
    /// in a large tree reads O(log n) stored hashes.
    #[test]
    fn appending_and_proving_cost_logarithmically() {
        let mut m = Mem::default();
        let n = 5000u64;
        let mut most_stored = 0;
        for i in 0..n {
            let before = m.hashes.len();
            m.append(&i.to_be_bytes());
            most_stored = most_stored.max(m.hashes.len() - before);
        }
        assert!(most_stored <= 13, "{most_stored} hashes for one append");
        *m.reads.borrow_mut() = 0;
        let p = inclusion_proof(1234, n, &m).unwrap();
        let root = tree_hash(n, &m).unwrap();
        verify_inclusion(1234, n, &leaf_hash(&1234u64.to_be_bytes()), &p, &root).unwrap();
        let reads = *m.reads.borrow();
        assert!(reads <= 4 * 13, "{reads} stored hashes read for one proof");
        assert!(matches!(
            inclusion_proof(n, n, &m)
                .unwrap_err()
                .downcast_ref::<ProofError>(),
            Some(ProofError::NoSuchLeaf { .. })
        ));
    }
}
