//! C2SP tlog-cosignature: a witness's timestamped Ed25519 signature on a checkpoint it
//! checked to be consistent with every earlier one it saw of that log.
//!
//! A cosignature is one more signature line of the checkpoint's note, by a key of
//! signature type 0x04: its key ID is the first 4 bytes of
//! `SHA-256(name || "\n" || 0x04 || public key)`, its verifier key is written
//! `<name>+<hex key ID>+<base64(0x04 || public key)>`, and it signs
//! `cosignature/v1\ntime <unix seconds>\n` followed by the checkpoint's text; the line
//! carries `key ID || the time as a big-endian u64 || the 64-byte signature`. A log's
//! own key (type 0x01) never verifies a cosignature, nor a witness key a log signature.

use super::note::{Note, NoteError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use sha2::{Digest as _, Sha256};

/// The signature type of an Ed25519 cosignature key.
const COSIGNATURE_TYPE: u8 = 0x04;
const PRIVATE_PREFIX: &str = "PRIVATE+KEY+";

fn key_id(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([COSIGNATURE_TYPE]);
    h.update(public);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '+')
}

/// What a witness signs for the checkpoint `text` at `time`.
fn message(text: &str, time: u64) -> String {
    format!("cosignature/v1\ntime {time}\n{text}")
}

/// A witness's public key, from its `vkey` text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessKey {
    pub name: String,
    pub id: [u8; 4],
    pub public: [u8; 32],
}

impl WitnessKey {
    pub fn parse(vkey: &str) -> Result<WitnessKey, NoteError> {
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
        let [COSIGNATURE_TYPE, public @ ..] = key.as_slice() else {
            return Err(bad());
        };
        let public: [u8; 32] = public.try_into().map_err(|_| bad())?;
        if key_id(name, &public) != id {
            return Err(bad());
        }
        Ok(WitnessKey {
            name: name.to_string(),
            id,
            public,
        })
    }

    pub fn vkey(&self) -> String {
        let mut key = vec![COSIGNATURE_TYPE];
        key.extend_from_slice(&self.public);
        format!("{}+{}+{}", self.name, hex::encode(self.id), B64.encode(key))
    }

    /// The time of this witness's cosignature on `note`; `None` when it has none.
    /// `Err` when it has one that does not verify.
    pub fn cosigned(&self, note: &Note) -> Result<Option<u64>, NoteError> {
        let Some(s) = note
            .signatures
            .iter()
            .find(|s| s.name == self.name && s.id == self.id)
        else {
            return Ok(None);
        };
        let bad = || NoteError::BadSignature(format!("witness {}", self.name));
        let (time, sig) = s.sig.split_at_checked(8).ok_or_else(bad)?;
        let time = u64::from_be_bytes(time.try_into().map_err(|_| bad())?);
        UnparsedPublicKey::new(&ED25519, &self.public)
            .verify(message(&note.text, time).as_bytes(), sig)
            .map_err(|_| bad())?;
        Ok(Some(time))
    }
}

/// A witness's private key.
pub struct Cosigner {
    pair: Ed25519KeyPair,
    seed: [u8; 32],
    key: WitnessKey,
}

impl std::fmt::Debug for Cosigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cosigner")
            .field("name", &self.key.name)
            .finish_non_exhaustive()
    }
}

impl Cosigner {
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<Cosigner, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::BadSignerKey(format!("invalid name {name:?}")));
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| NoteError::BadSignerKey("not an Ed25519 seed".into()))?;
        let public: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| NoteError::BadSignerKey("not an Ed25519 key".into()))?;
        Ok(Cosigner {
            pair,
            seed: *seed,
            key: WitnessKey {
                name: name.to_string(),
                id: key_id(name, &public),
                public,
            },
        })
    }

    /// A new key named `name`.
    pub fn generate(name: &str) -> Result<Cosigner, NoteError> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| NoteError::BadSignerKey("no randomness from the system".into()))?;
        Cosigner::from_seed(name, &seed)
    }

    /// `PRIVATE+KEY+<name>+<hex key ID>+<base64(0x04 || seed)>`.
    pub fn text(&self) -> String {
        let mut key = vec![COSIGNATURE_TYPE];
        key.extend_from_slice(&self.seed);
        format!(
            "{PRIVATE_PREFIX}{}+{}+{}",
            self.key.name,
            hex::encode(self.key.id),
            B64.encode(key)
        )
    }

    pub fn parse(text: &str) -> Result<Cosigner, NoteError> {
        let bad = |why: &str| NoteError::BadSignerKey(why.to_string());
        let rest = text
            .trim()
            .strip_prefix(PRIVATE_PREFIX)
            .ok_or_else(|| bad("it does not start with PRIVATE+KEY+"))?;
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(hex), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected PRIVATE+KEY+NAME+HEX8+BASE64"));
        };
        let key = B64.decode(b64).map_err(|_| bad("the key is not base64"))?;
        let [COSIGNATURE_TYPE, seed @ ..] = key.as_slice() else {
            return Err(bad("not a cosignature (type 0x04) key"));
        };
        let seed: [u8; 32] = seed.try_into().map_err(|_| bad("not a 32-byte seed"))?;
        let c = Cosigner::from_seed(name, &seed)?;
        if hex::encode(c.key.id) != hex {
            return Err(bad("the key ID does not match the key"));
        }
        Ok(c)
    }

    pub fn key(&self) -> &WitnessKey {
        &self.key
    }

    /// The cosignature line (`— <name> <base64>\n`) on the checkpoint text `text`.
    pub fn cosign(&self, text: &str, time: u64) -> String {
        let sig = self.pair.sign(message(text, time).as_bytes());
        let mut blob = self.key.id.to_vec();
        blob.extend_from_slice(&time.to_be_bytes());
        blob.extend_from_slice(sig.as_ref());
        format!("\u{2014} {} {}\n", self.key.name, B64.encode(blob))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlog::note::{Checkpoint, Signer};

    #[test]
    fn a_cosignature_verifies_only_for_its_checkpoint_and_key() {
        let (_, log) = Signer::generate("log.example/imgsrv/1").unwrap();
        let text = Checkpoint {
            origin: "log.example/imgsrv/1".into(),
            size: 5,
            root: [7; 32],
        }
        .text();
        let w = Cosigner::generate("witness.example").unwrap();
        let note = format!(
            "{}{}",
            log.sign(&text).unwrap(),
            w.cosign(&text, 1_700_000_000)
        );
        let n = Note::parse(&note).unwrap();
        assert_eq!(w.key().cosigned(&n).unwrap(), Some(1_700_000_000));
        // the log's own signature still verifies beside it
        assert_eq!(n.verify(&[log.verifier().clone()]).unwrap().len(), 1);
        // another witness: none; the key round-trips through its texts
        let other = Cosigner::generate("witness.example").unwrap();
        assert_eq!(other.key().cosigned(&n).unwrap(), None);
        assert_eq!(WitnessKey::parse(&w.key().vkey()).unwrap(), *w.key());
        assert_eq!(Cosigner::parse(&w.text()).unwrap().key(), w.key());
        // a log key is not a witness key
        assert!(WitnessKey::parse(&log.verifier().vkey()).is_err());
        // another checkpoint under the same cosignature: refused
        let forged = note.replacen("\n5\n", "\n6\n", 1);
        let n = Note::parse(&forged).unwrap();
        assert!(w.key().cosigned(&n).is_err());
    }
}
