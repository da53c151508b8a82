//! C2SP signed notes (the format of Go's `golang.org/x/mod/sumdb/note`) and
//! the checkpoints of C2SP tlog-checkpoint written in them.
//!
//! A note is UTF-8 text ending in a newline, a blank line, then one line per
//! signature: `— <key name> <base64(key ID || signature)>`. The key ID is the
//! first 4 bytes of `SHA-256(name || "\n" || 0x01 || public key)` for an
//! Ed25519 key (signature type 0x01); its verifier key is written
//! `<name>+<hex key ID>+<base64(0x01 || public key)>`. A reader ignores
//! signatures by keys it does not know, refuses a note that a key it knows
//! signed wrongly, and refuses one that no key it knows signed.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use sha2::{Digest as _, Sha256};

use super::tree::Hash;

/// The signature type of an Ed25519 key.
const ED25519_TYPE: u8 = 0x01;
/// What begins every signature line (U+2014 EM DASH, a space).
const SIG_PREFIX: &str = "\u{2014} ";
/// Signatures read from one note at most (C2SP: a reader accepts at least 16).
const MAX_SIGNATURES: usize = 100;

/// Why a note, a key or a checkpoint was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoteError {
    #[error("malformed verifier key {0:?}: expected NAME+HEX8+BASE64 of an Ed25519 key")]
    BadVerifierKey(String),
    #[error("malformed signer key: {0}")]
    BadSignerKey(String),
    #[error("malformed note: {0}")]
    Malformed(String),
    #[error("the signature by {0} does not verify: the note was altered or the key is wrong")]
    BadSignature(String),
    #[error("no signature by a trusted key ({0})")]
    Unverified(String),
    #[error("malformed checkpoint: {0}")]
    BadCheckpoint(String),
}

/// The 4-byte key ID of an Ed25519 key named `name`.
pub fn key_id(name: &str, public: &[u8; 32]) -> [u8; 4] {
    key_id_of(name, ED25519_TYPE, public)
}

/// The 4-byte key ID of a key of signature type `kind` (0x01 a log's key, 0x04 a
/// witness's cosignature key) named `name`: `SHA-256(name || "\n" || kind || key)[:4]`.
pub(crate) fn key_id_of(name: &str, kind: u8, public: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([kind]);
    h.update(public);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// A key name: non-empty, no spaces, no `+`, printable (C2SP signed-note).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '+')
}

/// A `vkey` of signature type `kind` taken apart and checked: name, key ID (the one
/// its key and name give), key.
pub(crate) fn parse_vkey(vkey: &str, kind: u8) -> Result<(String, [u8; 4], [u8; 32]), NoteError> {
    let bad = || NoteError::BadVerifierKey(vkey.to_string());
    let mut parts = vkey.trim().splitn(3, '+');
    let (Some(name), Some(hex), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    if !valid_name(name) || hex.len() != 8 {
        return Err(bad());
    }
    let id = u32::from_str_radix(hex, 16)
        .map_err(|_| bad())?
        .to_be_bytes();
    let key = B64.decode(b64).map_err(|_| bad())?;
    let [k, public @ ..] = key.as_slice() else {
        return Err(bad());
    };
    let public: [u8; 32] = public.try_into().map_err(|_| bad())?;
    if *k != kind || key_id_of(name, kind, &public) != id {
        return Err(bad());
    }
    Ok((name.to_string(), id, public))
}

/// `<name>+<hex key ID>+<base64(kind || key)>`.
pub(crate) fn vkey_text(name: &str, id: &[u8; 4], kind: u8, public: &[u8; 32]) -> String {
    let mut key = vec![kind];
    key.extend_from_slice(public);
    format!("{name}+{}+{}", hex::encode(id), B64.encode(key))
}

/// Go's signer text of a key of signature type `kind`,
/// `PRIVATE+KEY+<name>+<hex key ID>+<base64(kind || seed)>`, taken apart: name, key ID
/// as written (the caller checks it against the key), seed.
pub(crate) fn parse_private(text: &str, kind: u8) -> Result<(String, String, [u8; 32]), NoteError> {
    let bad = |why: &str| NoteError::BadSignerKey(why.to_string());
    let rest = text
        .trim()
        .strip_prefix("PRIVATE+KEY+")
        .ok_or_else(|| bad("it does not start with PRIVATE+KEY+"))?;
    let mut parts = rest.splitn(3, '+');
    let (Some(name), Some(hex), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("expected PRIVATE+KEY+NAME+HEX8+BASE64"));
    };
    let key = B64.decode(b64).map_err(|_| bad("its key is not base64"))?;
    let [k, seed @ ..] = key.as_slice() else {
        return Err(bad("its key is empty"));
    };
    if *k != kind {
        return Err(bad(match kind {
            ED25519_TYPE => "not an Ed25519 key",
            _ => "not a cosignature (type 0x04) key",
        }));
    }
    let seed: [u8; 32] = seed.try_into().map_err(|_| bad("not a 32-byte seed"))?;
    Ok((name.to_string(), hex.to_ascii_lowercase(), seed))
}

/// [`parse_private`]'s text of the key `name` (key ID `id`, type `kind`, `seed`).
pub(crate) fn private_text(name: &str, id: &[u8; 4], kind: u8, seed: &[u8; 32]) -> String {
    let mut key = vec![kind];
    key.extend_from_slice(seed);
    format!("PRIVATE+KEY+{name}+{}+{}", hex::encode(id), B64.encode(key))
}

/// The Ed25519 key pair of `seed`, and its public key (a key `name` must be valid).
pub(crate) fn key_pair(
    name: &str,
    seed: &[u8; 32],
) -> Result<(Ed25519KeyPair, [u8; 32]), NoteError> {
    if !valid_name(name) {
        return Err(NoteError::BadSignerKey(format!(
            "invalid key name {name:?}"
        )));
    }
    let pair = Ed25519KeyPair::from_seed_unchecked(seed)
        .map_err(|e| NoteError::BadSignerKey(e.to_string()))?;
    let public: [u8; 32] = pair
        .public_key()
        .as_ref()
        .try_into()
        .expect("an Ed25519 public key is 32 bytes");
    Ok((pair, public))
}

/// 32 random bytes, a new key's seed.
pub(crate) fn random_seed() -> Result<[u8; 32], NoteError> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| NoteError::BadSignerKey("no randomness from the system".into()))?;
    Ok(seed)
}

/// A public key that checks signatures, from its `vkey` text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    pub name: String,
    pub id: [u8; 4],
    pub public: [u8; 32],
}

impl Verifier {
    pub fn parse(vkey: &str) -> Result<Verifier, NoteError> {
        let (name, id, public) = parse_vkey(vkey, ED25519_TYPE)?;
        Ok(Verifier { name, id, public })
    }

    /// The `vkey` text: `<name>+<hex key ID>+<base64(0x01 || key)>`.
    pub fn vkey(&self) -> String {
        vkey_text(&self.name, &self.id, ED25519_TYPE, &self.public)
    }

    fn verifies(&self, text: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.public)
            .verify(text, sig)
            .is_ok()
    }
}

/// A private key that signs notes.
pub struct Signer {
    pair: Ed25519KeyPair,
    /// its public half (name, key ID, key)
    verifier: Verifier,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("name", &self.verifier.name)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// The key named `name` from its 32-byte Ed25519 seed.
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<Signer, NoteError> {
        let (pair, public) = key_pair(name, seed)?;
        let verifier = Verifier {
            name: name.to_string(),
            id: key_id(name, &public),
            public,
        };
        Ok(Signer { pair, verifier })
    }

    /// A new key named `name` (its seed, to keep, and the key).
    pub fn generate(name: &str) -> Result<([u8; 32], Signer), NoteError> {
        let seed = random_seed()?;
        let s = Signer::from_seed(name, &seed)?;
        Ok((seed, s))
    }

    /// The key in Go's signer text form, `PRIVATE+KEY+<name>+<hex ID>+<base64(0x01 || seed)>`.
    pub fn parse_go(skey: &str) -> Result<Signer, NoteError> {
        let (name, hex, seed) = parse_private(skey, ED25519_TYPE)?;
        let s = Signer::from_seed(&name, &seed)?;
        if hex::encode(s.verifier.id) != hex {
            return Err(NoteError::BadSignerKey(
                "its key ID does not match its key".into(),
            ));
        }
        Ok(s)
    }

    /// Go's signer text form of the key named `name` with `seed` (what
    /// [`Signer::parse_go`] reads back; `note.NewSigner` in Go takes it too).
    pub fn go_text(name: &str, seed: &[u8; 32]) -> Result<String, NoteError> {
        let s = Signer::from_seed(name, seed)?;
        Ok(private_text(name, &s.verifier.id, ED25519_TYPE, seed))
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The signature line of this key over `text`.
    fn signature_line(&self, text: &str) -> String {
        let sig = self.pair.sign(text.as_bytes());
        let mut blob = self.verifier.id.to_vec();
        blob.extend_from_slice(sig.as_ref());
        format!("{SIG_PREFIX}{} {}\n", self.verifier.name, B64.encode(blob))
    }

    /// `text` (ending in a newline) signed: the note.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        check_text(text)?;
        Ok(format!("{text}\n{}", self.signature_line(text)))
    }
}

fn check_text(text: &str) -> Result<(), NoteError> {
    if !text.ends_with('\n') {
        return Err(NoteError::Malformed(
            "the text does not end in a newline".into(),
        ));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::Malformed(
            "control characters in the text".into(),
        ));
    }
    Ok(())
}

/// A signature line of a note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub name: String,
    pub id: [u8; 4],
    pub sig: Vec<u8>,
}

/// A note taken apart: its text and its signature lines (none checked yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub text: String,
    pub signatures: Vec<Signature>,
}

impl Note {
    pub fn parse(note: &str) -> Result<Note, NoteError> {
        let bad = |why: &str| NoteError::Malformed(why.to_string());
        if note.chars().any(|c| c.is_control() && c != '\n') {
            return Err(bad("control characters in the note"));
        }
        let split = note
            .rfind("\n\n")
            .ok_or_else(|| bad("no blank line before the signatures"))?;
        let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
        if !sigs.ends_with('\n') {
            return Err(bad("the last signature line does not end in a newline"));
        }
        let mut signatures = Vec::new();
        for line in sigs.lines() {
            let rest = line
                .strip_prefix(SIG_PREFIX)
                .ok_or_else(|| bad("a signature line does not start with an em dash"))?;
            let (name, b64) = rest
                .split_once(' ')
                .ok_or_else(|| bad("a signature line has no key name"))?;
            let blob = B64
                .decode(b64)
                .map_err(|_| bad("a signature is not base64"))?;
            if !valid_name(name) || blob.len() < 5 {
                return Err(bad("a signature line is malformed"));
            }
            signatures.push(Signature {
                name: name.to_string(),
                id: [blob[0], blob[1], blob[2], blob[3]],
                sig: blob[4..].to_vec(),
            });
            if signatures.len() > MAX_SIGNATURES {
                return Err(bad("too many signatures"));
            }
        }
        if signatures.is_empty() {
            return Err(bad("no signature"));
        }
        Ok(Note {
            text: text.to_string(),
            signatures,
        })
    }

    /// Checks the signatures by `known` keys: every one must verify, and at
    /// least one must be there. The names of the keys that signed.
    pub fn verify(&self, known: &[Verifier]) -> Result<Vec<String>, NoteError> {
        let mut signed = Vec::new();
        for s in &self.signatures {
            let Some(k) = known.iter().find(|k| k.name == s.name && k.id == s.id) else {
                continue; // unknown keys are ignored (witnesses, rotated keys)
            };
            if !k.verifies(self.text.as_bytes(), &s.sig) {
                return Err(NoteError::BadSignature(k.name.clone()));
            }
            signed.push(k.name.clone());
        }
        if signed.is_empty() {
            let names: Vec<&str> = known.iter().map(|k| k.name.as_str()).collect();
            return Err(NoteError::Unverified(format!(
                "trusted: {}",
                names.join(", ")
            )));
        }
        Ok(signed)
    }
}

/// The checkpoint a signed note holds, when a key of `known` signed it (the rules of
/// [`Note::verify`]).
pub fn signed_checkpoint(note: &str, known: &[Verifier]) -> Result<Checkpoint, NoteError> {
    let n = Note::parse(note)?;
    n.verify(known)?;
    Checkpoint::parse(&n.text)
}

/// A checkpoint (C2SP tlog-checkpoint): the log's origin, a tree size and
/// that tree's root hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The note text.
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    /// From a note's text (extension lines after the third are allowed and
    /// ignored, as the spec says).
    pub fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let bad = |why: &str| NoteError::BadCheckpoint(why.to_string());
        let mut lines = text.split('\n');
        let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(bad("fewer than three lines"));
        };
        if origin.is_empty() {
            return Err(bad("no origin"));
        }
        if size.is_empty()
            || !size.bytes().all(|b| b.is_ascii_digit())
            || (size.len() > 1 && size.starts_with('0'))
        {
            return Err(bad(
                "the tree size is not a decimal number without leading zeros",
            ));
        }
        let size = size
            .parse()
            .map_err(|_| bad("the tree size is too large"))?;
        let root: Hash = B64
            .decode(root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| bad("the root is not a base64 SHA-256 hash"))?;
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // golang.org/x/mod/sumdb/note's examples (ExampleSign, ExampleOpen)
    const GO_SKEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n";
    const GO_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn the_go_example_signs_and_verifies_byte_for_byte() {
        let s = Signer::parse_go(GO_SKEY).unwrap();
        assert_eq!(s.verifier().vkey(), GO_VKEY);
        // and the signer text is written back as Go writes it
        let key = B64.decode(GO_SKEY.splitn(5, '+').nth(4).unwrap()).unwrap();
        let seed: [u8; 32] = key[1..].try_into().unwrap();
        assert_eq!(Signer::go_text("PeterNeumann", &seed).unwrap(), GO_SKEY);
        let note = s.sign(GO_TEXT).unwrap();
        assert_eq!(note, format!("{GO_TEXT}\n{GO_SIG}"));
        let v = Verifier::parse(GO_VKEY).unwrap();
        let n = Note::parse(&note).unwrap();
        assert_eq!(n.text, GO_TEXT);
        assert_eq!(n.verify(&[v]).unwrap(), vec!["PeterNeumann".to_string()]);
        // the C2SP spec's example key parses too
        Verifier::parse("example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k")
            .unwrap();
    }

    #[test]
    fn unknown_keys_are_ignored_and_a_bad_known_signature_is_refused() {
        let (_, log) = Signer::generate("log.example").unwrap();
        let (_, witness) = Signer::generate("witness.example").unwrap();
        let text = "log.example\n3\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n";
        let note = log.sign(text).unwrap();
        let cosigned = format!("{note}{}", witness.signature_line(text));
        let n = Note::parse(&cosigned).unwrap();
        assert_eq!(n.signatures.len(), 2);
        // only the log trusted: the witness line is ignored
        assert_eq!(
            n.verify(&[log.verifier().clone()]).unwrap(),
            vec!["log.example"]
        );
        // both trusted: both count
        let both = [log.verifier().clone(), witness.verifier().clone()];
        assert_eq!(n.verify(&both).unwrap().len(), 2);
        // neither: refused
        let (_, other) = Signer::generate("other.example").unwrap();
        assert!(matches!(
            n.verify(&[other.verifier().clone()]),
            Err(NoteError::Unverified(_))
        ));
        // the text altered: the trusted key's signature fails
        let altered = cosigned.replacen("\n3\n", "\n4\n", 1);
        assert_eq!(
            Note::parse(&altered)
                .unwrap()
                .verify(&[log.verifier().clone()]),
            Err(NoteError::BadSignature("log.example".into()))
        );
        // a key of the same name but another key ID is someone else
        let (_, impostor) = Signer::generate("log.example").unwrap();
        assert!(matches!(
            n.verify(&[impostor.verifier().clone()]),
            Err(NoteError::Unverified(_))
        ));
    }

    #[test]
    fn malformed_notes_keys_and_checkpoints_are_refused() {
        for bad in [
            "no blank line\n\u{2014} k AAAA\n",
            "text\n\nnot a signature line\n",
            "text\n\n",
            "text\n\n\u{2014} k AAAAAAA=",
            "te\rxt\n\n\u{2014} k AAAAAAA=\n",
        ] {
            assert!(Note::parse(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "",
            "name+c74f20a3",
            "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a3+AhpcSQcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        ] {
            assert!(Verifier::parse(bad).is_err(), "{bad:?}");
        }
        let (_, s) = Signer::generate("k").unwrap();
        assert!(s.sign("no newline").is_err());
        let c = Checkpoint {
            origin: "imgsrv.example/log".into(),
            size: 12345,
            root: [7u8; 32],
        };
        assert_eq!(Checkpoint::parse(&c.text()).unwrap(), c);
        assert_eq!(
            Checkpoint::parse(&format!("{}extension line\n", c.text())).unwrap(),
            c
        );
        for bad in [
            "origin\n012\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
            "origin\n-1\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
            "origin\n12\nBwcH\n",
            "\n12\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
            "origin\n12\n",
        ] {
            assert!(Checkpoint::parse(bad).is_err(), "{bad:?}");
        }
    }
}
