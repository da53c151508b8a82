//! The transparency log's rows (issue 11), on every backend: entries appended in the
//! transaction of each event, in order, with the hashes that make the RFC 6962 tree of
//! exactly those entries; checkpoints stored once per size; the log's key claimed once.

use super::*;
use imgsrv::tlog::entry::Entry;
use imgsrv::tlog::tree::{self, Hash, HashReader, Node};

pub struct Stored<'a>(pub &'a dyn Catalog);
impl HashReader for Stored<'_> {
    fn read_hashes(&self, nodes: &[Node]) -> anyhow::Result<Vec<Hash>> {
        Ok(self.0.log_hashes(nodes)?)
    }
}

/// RFC 6962's Merkle tree hash by its recursive definition, over the entries.
pub fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => tree::empty_hash(),
        1 => leaves[0],
        n => {
            // the largest power of two below n
            let mut k = 1;
            while k * 2 < n {
                k *= 2;
            }
            tree::node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// The kinds of the log's entries, and the tree its stored hashes make checked against
/// the entries at every size.
fn kinds_and_tree(c: &dyn Catalog) -> Vec<String> {
    let n = c.log_size().unwrap();
    let texts = c.log_entries(0, u64::MAX).unwrap();
    assert_eq!(texts.len() as u64, n);
    let leaves: Vec<Hash> = texts.iter().map(|t| tree::leaf_hash(t)).collect();
    for size in 1..=n {
        assert_eq!(
            tree::tree_hash(size, &Stored(c)).unwrap(),
            mth(&leaves[..size as usize]),
            "tree of {size}"
        );
    }
    // a run of one level (what a hash tile asks for) reads back in order, and a run
    // reaching past the stored hashes is an error
    let level0: Vec<Node> = (0..n).map(|index| Node { level: 0, index }).collect();
    assert_eq!(c.log_hashes(&level0).unwrap(), leaves);
    let past: Vec<Node> = (0..=n).map(|index| Node { level: 0, index }).collect();
    assert!(c.log_hashes(&past).is_err(), "a hash past the log");
    texts
        .iter()
        .map(|t| Entry::parse(t).unwrap().kind().to_string())
        .collect()
}

pub fn the_log_records_each_event_in_its_transaction(f: &Fixture) {
    let c = f.cat.as_ref();
    assert_eq!(c.log_size().unwrap(), 0);
    let v1 = published(c, "debian", "1");
    published(c, "debian", "2");
    c.add_trusted_key(&key("release", "ABCDEF0123456789"))
        .unwrap();
    c.record_key_state(
        "ABCDEF0123456789",
        "release",
        imgsrv::sign::KeyState::Retired,
        &now(),
    )
    .unwrap();
    // recorded once: the second time is no event
    assert!(!c
        .record_key_state(
            "ABCDEF0123456789",
            "release",
            imgsrv::sign::KeyState::Retired,
            &now()
        )
        .unwrap());
    c.retire(&v1.id, "superseded", None, Some("test")).unwrap();
    assert_eq!(
        kinds_and_tree(c),
        ["publish", "publish", "key-add", "key-retire", "retire"]
    );
    assert_eq!(
        c.log_entries_of("debian", "1").unwrap(),
        [(0, "publish".to_string()), (4, "retire".to_string())]
    );
    let first = Entry::parse(&c.log_entries(0, 1).unwrap()[0]).unwrap();
    let record = c.publish_record(&v1.id).unwrap();
    assert_eq!(
        first,
        Entry::Publish {
            image: "debian".into(),
            version: "1".into(),
            manifest: record.manifest_digest,
            signer: None,
            time: record.published_at,
        }
    );
    // a refused event writes no entry
    assert!(c.publish(&record_for(c, "debian", "1").0, &[]).is_err());
    assert!(c.retire(&v1.id, "again", None, None).is_err());
    assert_eq!(c.log_size().unwrap(), 5);
    // another instance sees the same log, and appends after it
    let other = (f.reopen)();
    assert_eq!(other.log_size().unwrap(), 5);
    published(other.as_ref(), "alpine", "1");
    assert_eq!(kinds_and_tree(c).len(), 6);
    // (enough entries for a run of hashes read as one range)
    for v in 2..12 {
        published(c, "alpine", &v.to_string());
    }
    assert_eq!(kinds_and_tree(c).len(), 16);
}

pub fn checkpoints_are_stored_once_per_size_and_the_log_key_once(f: &Fixture) {
    let c = f.cat.as_ref();
    assert!(c.latest_checkpoint().unwrap().is_none());
    assert!(
        c.put_checkpoint(1, "note").is_err(),
        "no checkpoint beyond the log"
    );
    published(c, "debian", "1");
    published(c, "debian", "2");
    assert!(c.put_checkpoint(1, "one").unwrap());
    assert!(
        !c.put_checkpoint(1, "another one").unwrap(),
        "the first stays"
    );
    assert!(c.put_checkpoint(2, "two").unwrap());
    assert_eq!(c.latest_checkpoint().unwrap(), Some((2, "two".to_string())));
    assert_eq!(
        c.checkpoints().unwrap(),
        [(1, "one".to_string()), (2, "two".to_string())]
    );
    assert_eq!(c.log_vkey().unwrap(), None);
    assert_eq!(c.claim_log_vkey("a+1+x").unwrap(), "a+1+x");
    assert_eq!((f.reopen)().claim_log_vkey("b+2+y").unwrap(), "a+1+x");
    assert_eq!(c.log_vkey().unwrap().as_deref(), Some("a+1+x"));
    // a copy appends only where its source's log ends
    let (copy, _keep) = (f.fresh)();
    let entries: Vec<Entry> = c
        .log_entries(0, 2)
        .unwrap()
        .iter()
        .map(|t| Entry::parse(t).unwrap())
        .collect();
    assert!(!copy.append_log_at(1, &entries).unwrap());
    assert!(copy.append_log_at(0, &entries[..1]).unwrap());
    assert!(copy.append_log_at(1, &entries[1..]).unwrap());
    assert_eq!(
        tree::tree_hash(2, &Stored(copy.as_ref())).unwrap(),
        tree::tree_hash(2, &Stored(c)).unwrap()
    );
}
