//! The server's trust store: publisher public keys in the catalog
//! ([`crate::catalog::KeyCatalog`]), shared by every instance on it. Read at each
//! verification, so a key added, retired or revoked by `imgsrv key ... --data DIR`
//! (on any instance) holds at the next request everywhere. Only forward:
//! active -> retired -> revoked, or active -> revoked; a key retired or revoked
//! is never trusted again, and a revoked key stays listed (the catalog's guards
//! enforce both, also against `sqlite3`/`psql`).

use super::{parse_public_key, valid_key_name, KeyPolicy, KeyState, SignError, TrustedKey};
use crate::catalog::{CatalogError, KeyCatalog, KeyRecord};
use std::fs;
use std::path::Path;

/// What [`TrustedKey::origin`] says of a catalog key.
pub(crate) const CATALOG_ORIGIN: &str = "the catalog";

/// When a state was recorded, as key policies have always written it.
fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn policy_of(r: &KeyRecord) -> KeyPolicy {
    KeyPolicy {
        scopes: r.scopes.clone(),
        state: r.state(),
        retired_at: r.retired_at.clone(),
        revoked_at: r.revoked_at.clone(),
    }
}

/// A catalog row as a usable key. Fails closed: a public key that does not parse,
/// or whose key id is not the one recorded, is an error (never skipped).
fn key_of(r: &KeyRecord) -> Result<TrustedKey, SignError> {
    let bad = |reason: String| SignError::MalformedStoredKey {
        name: r.name.clone(),
        reason,
    };
    let key = TrustedKey::from_text(&r.name, &r.public_key, policy_of(r), CATALOG_ORIGIN.into())
        .map_err(bad)?;
    if key.key_id != r.key_id {
        return Err(bad(format!(
            "its public key has key id {}, the catalog records {}",
            key.key_id, r.key_id
        )));
    }
    if !valid_key_name(&r.name) {
        return Err(bad("not a valid key name".into()));
    }
    Ok(key)
}

/// Every trusted key of the catalog, sorted by name, read now. Fails closed: an
/// unusable key or an unreadable catalog is an error, never "no keys".
pub fn load_trusted_keys(cat: &dyn KeyCatalog) -> Result<Vec<TrustedKey>, SignError> {
    cat.trusted_keys()?.iter().map(key_of).collect()
}

fn find_key(keys: &[TrustedKey], name_or_key_id: &str) -> Result<TrustedKey, SignError> {
    keys.iter()
        .find(|k| k.name == name_or_key_id)
        .or_else(|| {
            keys.iter()
                .find(|k| k.key_id.eq_ignore_ascii_case(name_or_key_id))
        })
        .cloned()
        .ok_or_else(|| SignError::NotFound(name_or_key_id.to_string()))
}

/// The scopes given, checked (default: every image).
fn scope_list(scopes: &[String]) -> Result<Vec<String>, SignError> {
    if let Some(bad) = scopes.iter().find(|g| !crate::names::scope(g)) {
        return Err(SignError::InvalidScope(bad.clone()));
    }
    Ok(if scopes.is_empty() {
        vec!["*".to_string()]
    } else {
        scopes.to_vec()
    })
}

/// Adds a trusted publisher key from a `minisign -G` public key file (default
/// name: the file stem) to the catalog. Refuses a duplicate name or key id, and a
/// key id that was retired or revoked before.
pub fn add_trusted_key(
    cat: &dyn KeyCatalog,
    name: Option<&str>,
    pubkey_file: &Path,
    scopes: &[String],
) -> Result<TrustedKey, SignError> {
    let text = fs::read_to_string(pubkey_file).map_err(super::io_err(pubkey_file))?;
    let (_, _, normalized) = parse_public_key(&text).map_err(|reason| SignError::MalformedKey {
        path: pubkey_file.to_path_buf(),
        reason,
    })?;
    let name = match name {
        Some(n) => n.to_string(),
        None => pubkey_file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string(),
    };
    if !valid_key_name(&name) {
        return Err(SignError::InvalidName(name));
    }
    let policy = KeyPolicy {
        scopes: scope_list(scopes)?,
        ..KeyPolicy::default()
    };
    let key = TrustedKey::from_text(&name, &normalized, policy, CATALOG_ORIGIN.into()).map_err(
        |reason| SignError::MalformedKey {
            path: pubkey_file.to_path_buf(),
            reason,
        },
    )?;
    let existing = load_trusted_keys(cat)?;
    if existing.iter().any(|k| k.name == name) {
        return Err(SignError::DuplicateName(name));
    }
    if let Some(k) = existing.iter().find(|k| k.key_id == key.key_id) {
        return Err(SignError::DuplicateKeyId {
            key_id: key.key_id.clone(),
            name: k.name.clone(),
        });
    }
    let record = KeyRecord {
        name: name.clone(),
        key_id: key.key_id.clone(),
        public_key: normalized,
        scopes: key.policy.scopes.clone(),
        added_at: crate::catalog::now(),
        retired_at: None,
        revoked_at: None,
    };
    match cat.add_trusted_key(&record) {
        Ok(()) => Ok(key),
        // a concurrent add of the same name or key
        Err(CatalogError::AlreadyExists(_)) => Err(SignError::DuplicateName(name)),
        Err(CatalogError::Precondition(_)) => Err(SignError::NeverAgain { key_id: key.key_id }),
        Err(e) => Err(e.into()),
    }
}

/// Retires (no new publications; older ones still verify) or revokes
/// (compromised: nothing signed with it verifies) a trusted key, by name or key
/// id. Only forward: active -> retired -> revoked, or active -> revoked; the same
/// state again changes nothing.
pub fn set_key_state(
    cat: &dyn KeyCatalog,
    name_or_key_id: &str,
    to: KeyState,
) -> Result<TrustedKey, SignError> {
    let key = find_key(&load_trusted_keys(cat)?, name_or_key_id)?;
    let from = key.policy.state;
    if from == to {
        return Ok(key);
    }
    if to <= from {
        return Err(SignError::BadTransition {
            name: key.name,
            from,
            to,
        });
    }
    match cat.record_key_state(&key.key_id, &key.name, to, &timestamp()) {
        Ok(_) => {}
        // revoked meanwhile (another instance): what is recorded stands
        Err(CatalogError::Precondition(_)) => {}
        Err(e) => return Err(e.into()),
    }
    find_key(&load_trusted_keys(cat)?, &key.key_id)
}

/// Replaces the image globs a key may sign for (by name or key id).
pub fn set_key_scopes(
    cat: &dyn KeyCatalog,
    name_or_key_id: &str,
    scopes: &[String],
) -> Result<TrustedKey, SignError> {
    let key = find_key(&load_trusted_keys(cat)?, name_or_key_id)?;
    cat.set_key_scopes(&key.key_id, &scope_list(scopes)?)?;
    find_key(&load_trusted_keys(cat)?, &key.key_id)
}

/// Removes a trusted key by name, or by key id (case-insensitive hex). A revoked
/// key is refused: it stays listed as revoked.
pub fn remove_trusted_key(
    cat: &dyn KeyCatalog,
    name_or_key_id: &str,
) -> Result<TrustedKey, SignError> {
    let key = find_key(&load_trusted_keys(cat)?, name_or_key_id)?;
    let revoked = || SignError::RevokedStaysListed {
        name: key.name.clone(),
        key_id: key.key_id.clone(),
    };
    if key.policy.state == KeyState::Revoked {
        return Err(revoked());
    }
    match cat.remove_trusted_key(&key.key_id) {
        Ok(()) => Ok(key),
        Err(CatalogError::Precondition(_)) => Err(revoked()),
        Err(CatalogError::NotFound(_)) => Err(SignError::NotFound(name_or_key_id.to_string())),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::SqliteCatalog;
    use crate::sign::tests::minisign_keygen;

    #[test]
    fn trust_store_add_list_retire_revoke_remove() {
        let t = tempfile::tempdir().unwrap();
        let cat = SqliteCatalog::open(&t.path().join("catalog.db")).unwrap();
        assert!(load_trusted_keys(&cat).unwrap().is_empty());
        let (pk, _) = minisign_keygen(t.path(), "alice", None);
        let (pk2, _) = minisign_keygen(t.path(), "bob", None);
        let (pk3, _) = minisign_keygen(t.path(), "carol", None);

        let k = add_trusted_key(&cat, None, &pk, &[]).unwrap();
        assert_eq!(k.name, "alice");
        assert_eq!(k.policy.scopes, ["*"]);
        // The id minisign prints in the untrusted comment of the .pub file.
        let pub_text = fs::read_to_string(&pk).unwrap();
        assert!(
            pub_text.lines().next().unwrap().ends_with(&k.key_id),
            "{pub_text}"
        );
        // minisign prints the id without leading zeros (`%016` is not
        // used), so one key in sixteen has a 15-digit id: only the upper
        // bound is fixed.
        assert!((1..=16).contains(&k.key_id.len()), "{}", k.key_id);
        assert!(k
            .key_id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()));
        assert_eq!(k.public_key_text(), pub_text);
        assert_eq!(k.origin, CATALOG_ORIGIN);

        assert!(matches!(
            add_trusted_key(&cat, None, &pk, &[]),
            Err(SignError::DuplicateName(_))
        ));
        assert!(matches!(
            add_trusted_key(&cat, Some("other"), &pk, &[]),
            Err(SignError::DuplicateKeyId { .. })
        ));
        assert!(matches!(
            add_trusted_key(&cat, Some("bad name"), &pk2, &[]),
            Err(SignError::InvalidName(_))
        ));
        assert!(matches!(
            add_trusted_key(&cat, Some("b"), &pk2, &["a b".into()]),
            Err(SignError::InvalidScope(_))
        ));
        let k2 = add_trusted_key(&cat, Some("bob2"), &pk2, &["debian-*".into()]).unwrap();
        let keys = load_trusted_keys(&cat).unwrap();
        let names: Vec<_> = keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["alice", "bob2"]);
        assert_eq!(keys[1].policy.scopes, ["debian-*"]);
        assert_eq!(keys[1].public_key_text(), fs::read_to_string(&pk2).unwrap());

        // scopes are replaced; an unknown key is NotFound
        let w = set_key_scopes(&cat, "bob2", &["debian-*".into(), "alpine-*".into()]).unwrap();
        assert_eq!(w.policy.scopes, ["debian-*", "alpine-*"]);
        assert!(matches!(
            set_key_scopes(&cat, "nobody", &[]),
            Err(SignError::NotFound(_))
        ));

        // forward only; the same state again is no change
        let r = set_key_state(&cat, "alice", KeyState::Retired).unwrap();
        assert_eq!(r.policy.state, KeyState::Retired);
        assert!(r.policy.retired_at.is_some());
        let again = set_key_state(&cat, "alice", KeyState::Retired).unwrap();
        assert_eq!(again.policy.retired_at, r.policy.retired_at);
        assert!(matches!(
            set_key_state(&cat, "alice", KeyState::Active),
            Err(SignError::BadTransition { .. })
        ));
        let v = set_key_state(&cat, &k.key_id.to_lowercase(), KeyState::Revoked).unwrap();
        assert_eq!(v.policy.state, KeyState::Revoked);
        assert!(v.policy.revoked_at.is_some());
        assert!(matches!(
            set_key_state(&cat, "alice", KeyState::Retired),
            Err(SignError::BadTransition { .. })
        ));
        // a revoked key stays listed
        let e = remove_trusted_key(&cat, "alice").unwrap_err();
        assert!(matches!(e, SignError::RevokedStaysListed { .. }), "{e}");
        assert_eq!(load_trusted_keys(&cat).unwrap().len(), 2);

        // Remove by key id (any case); a retired key removed is never added again
        let r = remove_trusted_key(&cat, &k2.key_id.to_lowercase()).unwrap();
        assert_eq!(r.name, "bob2");
        assert!(matches!(
            remove_trusted_key(&cat, "bob2"),
            Err(SignError::NotFound(_))
        ));
        let c = add_trusted_key(&cat, None, &pk3, &[]).unwrap();
        set_key_state(&cat, "carol", KeyState::Retired).unwrap();
        remove_trusted_key(&cat, "carol").unwrap();
        let e = add_trusted_key(&cat, None, &pk3, &[]).unwrap_err();
        assert!(
            matches!(&e, SignError::NeverAgain { key_id } if *key_id == c.key_id),
            "{e}"
        );
        // an active key removed may come back
        add_trusted_key(&cat, None, &pk2, &[]).unwrap();
        let names: Vec<_> = load_trusted_keys(&cat)
            .unwrap()
            .into_iter()
            .map(|k| k.name)
            .collect();
        assert_eq!(names, ["alice", "bob"]);
    }
}
