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

use super::note::{
    key_id_of, key_pair, parse_private, parse_vkey, private_text, random_seed, vkey_text, Note,
    NoteError,
};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};

/// The signature type of an Ed25519 cosignature key.
const COSIGNATURE_TYPE: u8 = 0x04;

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
        let (name, id, public) = parse_vkey(vkey, COSIGNATURE_TYPE)?;
        Ok(WitnessKey { name, id, public })
    }

    pub fn vkey(&self) -> String {
        vkey_text(&self.name, &self.id, COSIGNATURE_TYPE, &self.public)
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
        let (pair, public) = key_pair(name, seed)?;
        Ok(Cosigner {
            pair,
            seed: *seed,
            key: WitnessKey {
                name: name.to_string(),
                id: key_id_of(name, COSIGNATURE_TYPE, &public),
                public,
            },
        })
    }

    /// A new key named `name`.
    pub fn generate(name: &str) -> Result<Cosigner, NoteError> {
        Cosigner::from_seed(name, &random_seed()?)
    }

    /// `PRIVATE+KEY+<name>+<hex key ID>+<base64(0x04 || seed)>`.
    pub fn text(&self) -> String {
        private_text(&self.key.name, &self.key.id, COSIGNATURE_TYPE, &self.seed)
    }

    pub fn parse(text: &str) -> Result<Cosigner, NoteError> {
        let (name, hex, seed) = parse_private(text, COSIGNATURE_TYPE)?;
        let c = Cosigner::from_seed(&name, &seed)?;
        if hex::encode(c.key.id) != hex {
            return Err(NoteError::BadSignerKey(
                "the key ID does not match the key".into(),
            ));
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
