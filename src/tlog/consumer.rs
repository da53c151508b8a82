//! What a consumer (`imgsrv verify`, `imgsrv pull`) checks of the log, and remembers.
//!
//! The policy is the consumer's, in its client config (never the server's word):
//!
//! ```toml
//! [transparency_log]
//! # the verifier keys of the logs you trust (a server's DATA/log/log.vkey, /log/vkey)
//! keys = ["images.example.org/imgsrv/1a2b3c4d+0badc0de+AV..."]
//! # where the newest checkpoint seen of each log is kept (default: the XDG state
//! # directory, ~/.local/state/imgsrv)
//! # state_dir = "/var/lib/imgsrv-client"
//! # witnesses whose cosignatures (C2SP tlog-cosignature) a checkpoint must carry,
//! # and how many of them (default: all listed)
//! # witnesses = ["witness.example+1a2b3c4d+BA..."]
//! # quorum = 1
//! ```
//!
//! A consumer that saw the log before catches a fork or a rollback against what it
//! remembers; a fresh one has nothing to compare with, and that is what witnesses are
//! for: each cosigns only a checkpoint consistent with every one it saw of the log,
//! so a tree shown to this consumer alone lacks their cosignatures.
//!
//! With a key listed, every version verified must come with a tlog-proof whose
//! checkpoint that key signed, proving that the log holds exactly the publication the
//! consumer checked (image, version, manifest digest, signer, time); and that
//! checkpoint must be consistent with the newest one this consumer saw of the log
//! before: a smaller tree (a rollback) or one that does not extend it (a fork) is a
//! problem, failed in enforce mode, printed in warn mode. Without keys listed the log
//! is not checked, and `imgsrv verify` says so.

use super::cosign::WitnessKey;
use super::entry::Entry;
use super::note::{Checkpoint, Note, Verifier};
use super::proof::TlogProof;
use super::tree::{self, Hash};
use std::path::{Path, PathBuf};

/// The consumer's log policy.
#[derive(Clone, Debug)]
pub struct LogPolicy {
    pub keys: Vec<Verifier>,
    pub state_dir: PathBuf,
    pub witnesses: Vec<WitnessKey>,
    /// How many of `witnesses` must have cosigned a checkpoint.
    pub quorum: usize,
}

/// `[transparency_log]` of a client config: `None` when it lists no key.
pub fn policy_from(doc: &toml::Table) -> anyhow::Result<Option<LogPolicy>> {
    let Some(section) = doc.get("transparency_log") else {
        return Ok(None);
    };
    let section = section
        .as_table()
        .ok_or_else(|| anyhow::anyhow!("[transparency_log] is not a table"))?;
    for k in section.keys() {
        anyhow::ensure!(
            ["keys", "state_dir", "witnesses", "quorum"].contains(&k.as_str()),
            "[transparency_log] has no setting {k:?} (it takes keys, state_dir, witnesses \
             and quorum)"
        );
    }
    let keys = match section.get("keys") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("[transparency_log] keys is not a list of vkeys"))?
            .iter()
            .map(|k| {
                let s = k
                    .as_str()
                    .ok_or_else(|| anyhow::anyhow!("[transparency_log] keys: {k} is not text"))?;
                Verifier::parse(s).map_err(|e| {
                    anyhow::anyhow!(
                        "[transparency_log] keys: {s:?} is not a log's verifier key ({e}); \
                         copy it from the server's DATA/log/log.vkey or /log/vkey"
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?,
    };
    if keys.is_empty() {
        return Ok(None);
    }
    let state_dir = match section.get("state_dir") {
        Some(v) => PathBuf::from(
            v.as_str()
                .ok_or_else(|| anyhow::anyhow!("[transparency_log] state_dir is not a path"))?,
        ),
        None => default_state_dir()?,
    };
    let witnesses: Vec<WitnessKey> = match section.get("witnesses") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("[transparency_log] witnesses is not a list of vkeys"))?
            .iter()
            .map(|k| {
                let s = k.as_str().ok_or_else(|| {
                    anyhow::anyhow!("[transparency_log] witnesses: {k} is not text")
                })?;
                WitnessKey::parse(s).map_err(|e| {
                    anyhow::anyhow!(
                        "[transparency_log] witnesses: {s:?} is not a witness's cosignature key \
                         ({e}); copy it from the witness's DATA/witness/witness.vkey"
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?,
    };
    for (i, w) in witnesses.iter().enumerate() {
        anyhow::ensure!(
            !witnesses[..i]
                .iter()
                .any(|o| o.id == w.id && o.name == w.name),
            "[transparency_log] witnesses: {} is listed twice (each counts once toward the \
             quorum)",
            w.name
        );
    }
    let quorum = match section.get("quorum") {
        None => witnesses.len(),
        Some(v) => {
            let q = v
                .as_integer()
                .and_then(|q| usize::try_from(q).ok())
                .ok_or_else(|| anyhow::anyhow!("[transparency_log] quorum is not a number"))?;
            anyhow::ensure!(
                (1..=witnesses.len()).contains(&q),
                "[transparency_log] quorum = {q}, but {} witness(es) are listed: it must be \
                 between 1 and that",
                witnesses.len()
            );
            q
        }
    };
    Ok(Some(LogPolicy {
        keys,
        state_dir,
        witnesses,
        quorum,
    }))
}

/// Checks that the signed note `note` carries cosignatures by at least `quorum` of the
/// policy's witnesses (none asked for: Ok). A cosignature by a listed witness that
/// does not verify refuses it.
pub fn check_quorum(policy: &LogPolicy, note: &str) -> Result<(), String> {
    if policy.quorum == 0 {
        return Ok(());
    }
    let n = Note::parse(note).map_err(|e| format!("the checkpoint: {e}"))?;
    let mut by = Vec::new();
    for w in &policy.witnesses {
        if w.cosigned(&n)
            .map_err(|e| format!("the checkpoint: {e}"))?
            .is_some()
        {
            by.push(w.name.as_str());
        }
    }
    if by.len() < policy.quorum {
        let names: Vec<&str> = policy.witnesses.iter().map(|w| w.name.as_str()).collect();
        return Err(format!(
            "its checkpoint is cosigned by {} of the witnesses you trust ({}), {} required: no \
             quorum of witnesses has seen this tree (a history shown to you alone, a fork?)",
            by.len(),
            names.join(", "),
            policy.quorum
        ));
    }
    Ok(())
}

pub(crate) fn default_state_dir() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    {
        return Ok(x.join("imgsrv"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!("no HOME: set [transparency_log] state_dir in the client config")
        })?;
    Ok(PathBuf::from(home).join(".local/state/imgsrv"))
}

/// What a passing check established.
#[derive(Clone, Debug)]
pub struct Logged {
    pub origin: String,
    pub index: u64,
    pub size: u64,
    /// The size of the checkpoint this consumer had seen before, if any.
    pub since: Option<u64>,
}

/// The file keeping the newest checkpoint seen of `origin`.
pub(crate) fn state_file(dir: &Path, origin: &str) -> PathBuf {
    // readable, and unique: two origins that read alike ("a/b", "a_b") differ in the hash
    let hash = hex::encode(&crate::digest::Digest::of(origin.as_bytes()).as_bytes()[..4]);
    let name: String = origin
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join("log").join(format!("{name}-{hash}.checkpoint"))
}

/// Checks that `proof` proves `entry` in a log of `policy`, consistent with what this
/// consumer saw before (`consistency(old, new)` fetches a proof between two sizes),
/// and remembers the newer checkpoint. `Err`: the problem, in words.
pub fn check(
    policy: &LogPolicy,
    proof: Option<&str>,
    entry: &Entry,
    consistency: &dyn Fn(u64, u64) -> anyhow::Result<Vec<Hash>>,
) -> Result<Logged, String> {
    let proof = proof.ok_or_else(|| {
        "the server gave no transparency-log proof (manifest.tlog-proof) for it: nothing \
         shows it is in a log you trust"
            .to_string()
    })?;
    let proof = TlogProof::parse(proof).map_err(|e| format!("the tlog-proof: {e:#}"))?;
    let note =
        Note::parse(&proof.checkpoint).map_err(|e| format!("the proof's checkpoint: {e}"))?;
    let origin = note.text.lines().next().unwrap_or_default().to_string();
    let keys = keys_of(policy, &origin)?;
    let text = entry.text().map_err(|e| format!("{e:#}"))?;
    let proven = proof
        .verify(&tree::leaf_hash(text.as_bytes()), &origin, &keys)
        .map_err(|e| {
            format!(
                "its tlog-proof does not prove this publication in the log {origin}: {e:#} \
                 (the log holds another history than the server shows you)"
            )
        })?;
    check_quorum(policy, &proof.checkpoint)?;
    let since = advance(
        policy,
        &keys,
        &proof.checkpoint,
        &proven.checkpoint,
        consistency,
    )?;
    Ok(Logged {
        origin,
        index: proof.index,
        size: proven.checkpoint.size,
        since,
    })
}

/// The keys of `policy` for the log `origin`; `Err` when it trusts none.
fn keys_of(policy: &LogPolicy, origin: &str) -> Result<Vec<Verifier>, String> {
    let keys: Vec<Verifier> = policy
        .keys
        .iter()
        .filter(|k| k.name == origin)
        .cloned()
        .collect();
    if keys.is_empty() {
        return Err(format!(
            "its proof is in the log {origin:?}, which you do not trust ([transparency_log] \
             keys in your client config)"
        ));
    }
    Ok(keys)
}

/// Checks the signed checkpoint `note` (a bundle's `log/checkpoint`) as [`check`]
/// checks a proof's: signed by a key of `policy`, consistent with the newest one
/// seen of its log before, which it then replaces if larger.
pub fn check_checkpoint(
    policy: &LogPolicy,
    note: &str,
    consistency: &dyn Fn(u64, u64) -> anyhow::Result<Vec<Hash>>,
) -> Result<Checkpoint, String> {
    let parsed = Note::parse(note).map_err(|e| format!("not a signed note: {e}"))?;
    let origin = parsed.text.lines().next().unwrap_or_default().to_string();
    let keys = keys_of(policy, &origin)?;
    let new = super::note::signed_checkpoint(note, &keys)
        .map_err(|e| format!("not a checkpoint signed by the log's key: {e}"))?;
    check_quorum(policy, note)?;
    advance(policy, &keys, note, &new, consistency)?;
    Ok(new)
}

/// The consistency of the checkpoint `new` (signed: the note `note`) with the newest
/// one this consumer saw of its log, remembered if it is larger: the size seen before.
fn advance(
    policy: &LogPolicy,
    keys: &[Verifier],
    note: &str,
    new: &Checkpoint,
    consistency: &dyn Fn(u64, u64) -> anyhow::Result<Vec<Hash>>,
) -> Result<Option<u64>, String> {
    let origin = &new.origin;
    let file = state_file(&policy.state_dir, origin);
    // one consumer at a time per log: two runs at once (parallel pulls) must neither
    // mix their writes nor let the one that saw less overwrite the one that saw more
    let _held = lock_state(&file).map_err(|e| format!("locking {}: {e:#}", file.display()))?;
    let old = read_state(&file, keys)?;
    if let Some(old) = &old {
        if old.size > new.size {
            return Err(format!(
                "the log {origin} is at {} entries, but you saw it at {} before: it was rolled \
                 back (or you are shown an old view)",
                new.size, old.size
            ));
        }
        if old.size == new.size && old.root != new.root {
            return Err(format!(
                "the log {origin} has two different trees of {} entries: the one you saw \
                 before and this one (a fork)",
                new.size
            ));
        }
        if old.size < new.size {
            let hashes = consistency(old.size, new.size)
                .map_err(|e| format!("fetching the consistency proof: {e:#}"))?;
            tree::verify_consistency(old.size, new.size, &old.root, &new.root, &hashes).map_err(
                |e| {
                    format!(
                        "the log {origin} at {} entries does not extend the tree of {} you saw \
                         before ({e}): its history was rewritten (a fork)",
                        new.size, old.size
                    )
                },
            )?;
        }
    }
    if old.as_ref().is_none_or(|o| o.size < new.size) {
        write_state(&file, note)
            .map_err(|e| format!("remembering the checkpoint in {}: {e:#}", file.display()))?;
    }
    Ok(old.map(|o| o.size))
}

pub(crate) fn read_state(file: &Path, keys: &[Verifier]) -> Result<Option<Checkpoint>, String> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", file.display())),
    };
    let bad = |e: String| {
        format!(
            "{} is not a checkpoint signed by the log's key ({e}): remove it only if you know \
             why it changed",
            file.display()
        )
    };
    super::note::signed_checkpoint(&text, keys)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

/// An exclusive flock(2) on `<file>.lock`, held until dropped.
pub(crate) fn lock_state(file: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let dir = file.parent().expect("a state file has a directory");
    std::fs::create_dir_all(dir)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(file.with_extension("lock"))?;
    loop {
        // SAFETY: flock(2) on a descriptor owned by `lock`, open here.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(lock);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

pub(crate) fn write_state(file: &Path, note: &str) -> anyhow::Result<()> {
    Ok(crate::tls::write_atomic(file, note.as_bytes(), 0o644)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_is_read_strictly() {
        let (_, s) = super::super::note::Signer::generate("log.example/imgsrv/1").unwrap();
        let vkey = s.verifier().vkey();
        let doc = |t: &str| -> toml::Table { t.parse().unwrap() };
        assert!(policy_from(&doc("")).unwrap().is_none());
        assert!(policy_from(&doc("[transparency_log]\nkeys = []"))
            .unwrap()
            .is_none());
        let p = policy_from(&doc(&format!(
            "[transparency_log]\nkeys = [\"{vkey}\"]\nstate_dir = \"/s\""
        )))
        .unwrap()
        .unwrap();
        assert_eq!(p.keys[0].vkey(), vkey);
        assert_eq!(p.state_dir, Path::new("/s"));
        assert_eq!((p.witnesses.len(), p.quorum), (0, 0));
        let w1 = super::super::cosign::Cosigner::generate("w1.example").unwrap();
        let w2 = super::super::cosign::Cosigner::generate("w2.example").unwrap();
        let (k1, k2) = (w1.key().vkey(), w2.key().vkey());
        let with = |extra: &str| {
            policy_from(&doc(&format!(
                "[transparency_log]\nkeys = [\"{vkey}\"]\nwitnesses = [\"{k1}\", \"{k2}\"]\n{extra}"
            )))
        };
        // all of them unless told
        assert_eq!(with("").unwrap().unwrap().quorum, 2);
        assert_eq!(with("quorum = 1").unwrap().unwrap().quorum, 1);
        assert!(policy_from(&doc(&format!(
            "[transparency_log]\nkeys = [\"{vkey}\"]\nwitnesses = [\"{k1}\", \"{k1}\"]"
        )))
        .is_err());
        for bad in ["quorum = 0", "quorum = 3", "quorum = \"1\""] {
            assert!(with(bad).is_err(), "{bad}");
        }
        // a checkpoint cosigned by one of the two: enough for 1, not for 2
        let text = "log.example/imgsrv/1\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n";
        let note = format!("{}{}", s.sign(text).unwrap(), w1.cosign(text, 1));
        assert!(check_quorum(&with("quorum = 1").unwrap().unwrap(), &note).is_ok());
        let two = check_quorum(&with("").unwrap().unwrap(), &note).unwrap_err();
        assert!(
            two.contains("cosigned by 1 of the witnesses you trust"),
            "{two}"
        );
        for bad in [
            "[transparency_log]\nkeys = [\"not a key\"]".to_string(),
            "[transparency_log]\nkeys = \"x\"".to_string(),
            format!("[transparency_log]\nkeys = [\"{vkey}\"]\nwitnesses = 2"),
            format!("[transparency_log]\nkeys = [\"{vkey}\"]\nwitnesses = [\"{vkey}\"]"),
            format!("[transparency_log]\nkeys = [\"{vkey}\"]\nquorum = 1"),
            format!("[transparency_log]\nkeys = [\"{vkey}\"]\nlogs = 1"),
            "transparency_log = 1".to_string(),
        ] {
            assert!(policy_from(&doc(&bad)).is_err(), "{bad}");
        }
        let f = state_file(Path::new("/s"), "a.example/imgsrv/1+x");
        assert!(f.starts_with("/s/log/"), "{f:?}");
        assert!(
            f.to_string_lossy().contains("a.example_imgsrv_1_x-"),
            "{f:?}"
        );
        assert_ne!(
            state_file(Path::new("/s"), "a/b"),
            state_file(Path::new("/s"), "a_b")
        );
    }
}
