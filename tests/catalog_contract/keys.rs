//! The contract of [`KeyCatalog`] (trusted keys, append-only retirements and
//! revocations) and of [`AuthCatalog::note_auth_failure`] (the failed-login
//! throttle's counts), on every backend; each also read through a second instance.

use super::*;

/// A key record as `imgsrv key add` makes it (the catalog does not parse keys).
pub fn key(name: &str, key_id: &str) -> KeyRecord {
    KeyRecord {
        name: name.into(),
        key_id: key_id.into(),
        public_key: format!("untrusted comment: minisign public key {key_id}\nRWQ{key_id}\n"),
        scopes: vec!["*".into()],
        added_at: now(),
        retired_at: None,
        revoked_at: None,
    }
}

fn listed(c: &dyn Catalog) -> Vec<(String, String, KeyState)> {
    c.trusted_keys()
        .unwrap()
        .into_iter()
        .map(|k| (k.name.clone(), k.key_id.clone(), k.state()))
        .collect()
}

pub fn trusted_keys_and_their_states(f: &Fixture) {
    let c = f.cat.as_ref();
    assert!(c.trusted_keys().unwrap().is_empty());
    c.add_trusted_key(&key("release", "A1")).unwrap();
    let mut scoped = key("ci", "B2");
    scoped.scopes = vec!["debian-*".into(), "alpine-*".into()];
    c.add_trusted_key(&scoped).unwrap();
    // read back as written, by name
    let all = c.trusted_keys().unwrap();
    assert_eq!(
        all,
        [scoped.clone(), key_with_time("release", "A1", &all[1])]
    );
    assert_eq!(all[0].state(), KeyState::Active);
    // a name or a key id is taken once; key ids are upper-case hex
    assert_err!(
        c.add_trusted_key(&key("release", "C3")),
        CatalogError::AlreadyExists(_)
    );
    assert_err!(
        c.add_trusted_key(&key("other", "A1")),
        CatalogError::AlreadyExists(_)
    );
    assert_err!(
        c.add_trusted_key(&key("lower", "a1b2")),
        CatalogError::Invalid(_)
    );
    assert_err!(
        c.add_trusted_key(&key("toolong", "0123456789ABCDEF0")),
        CatalogError::Invalid(_)
    );

    // scopes change; nothing else does
    c.set_key_scopes("B2", &["*".to_string()]).unwrap();
    assert_eq!(c.trusted_keys().unwrap()[0].scopes, ["*"]);
    assert_err!(c.set_key_scopes("FF", &[]), CatalogError::NotFound(_));

    // states: append-only, idempotent (the first time stays), only forward
    assert!(c
        .record_key_state("A1", "release", KeyState::Retired, "2025-01-01T00:00:00Z")
        .unwrap());
    assert!(!c
        .record_key_state("A1", "release", KeyState::Retired, "2026-01-01T00:00:00Z")
        .unwrap());
    assert_err!(
        c.record_key_state("A1", "release", KeyState::Active, "t"),
        CatalogError::Invalid(_)
    );
    let release = || {
        f.cat
            .trusted_keys()
            .unwrap()
            .into_iter()
            .find(|k| k.name == "release")
            .unwrap()
    };
    assert_eq!(release().state(), KeyState::Retired);
    assert_eq!(
        release().retired_at.as_deref(),
        Some("2025-01-01T00:00:00Z")
    );
    assert!(c
        .record_key_state("A1", "release", KeyState::Revoked, "2025-02-01T00:00:00Z")
        .unwrap());
    assert_eq!(release().state(), KeyState::Revoked);
    assert_eq!(
        release().revoked_at.as_deref(),
        Some("2025-02-01T00:00:00Z")
    );
    assert_eq!(
        release().retired_at.as_deref(),
        Some("2025-01-01T00:00:00Z")
    );
    // revoked without a retirement: never retired afterwards
    c.record_key_state("B2", "ci", KeyState::Revoked, "t")
        .unwrap();
    assert_err!(
        c.record_key_state("B2", "ci", KeyState::Retired, "t"),
        CatalogError::Precondition(_)
    );
    // another instance sees the revocations at its next read
    let other = (f.reopen)();
    assert_eq!(
        listed(other.as_ref()),
        [
            ("ci".to_string(), "B2".to_string(), KeyState::Revoked),
            ("release".to_string(), "A1".to_string(), KeyState::Revoked)
        ]
    );

    // a revoked key stays listed, its name taken
    assert_err!(c.remove_trusted_key("A1"), CatalogError::Precondition(_));
    assert_err!(
        c.add_trusted_key(&key("release", "C3")),
        CatalogError::AlreadyExists(_)
    );
    assert_err!(
        other.remove_trusted_key("B2"),
        CatalogError::Precondition(_)
    );
    assert_eq!(listed(c).len(), 2);
    assert_err!(c.remove_trusted_key("FF"), CatalogError::NotFound(_));

    // a retired key removed is never added again, under any name
    c.add_trusted_key(&key("old", "D4")).unwrap();
    c.record_key_state("D4", "old", KeyState::Retired, "t")
        .unwrap();
    c.remove_trusted_key("D4").unwrap();
    assert_err!(
        c.add_trusted_key(&key("old", "D4")),
        CatalogError::Precondition(_)
    );
    assert_err!(
        other.add_trusted_key(&key("renamed", "D4")),
        CatalogError::Precondition(_)
    );
    // its record stays: revoking it later is still recorded
    assert!(c
        .record_key_state("D4", "old", KeyState::Revoked, "t")
        .unwrap());
    // a key the catalog never trusted, revoked (imported from files): never added
    assert!(c
        .record_key_state("E5", "lost", KeyState::Revoked, "t")
        .unwrap());
    assert_err!(
        c.add_trusted_key(&key("lost", "E5")),
        CatalogError::Precondition(_)
    );
    // an active key removed may come back
    c.add_trusted_key(&key("fresh", "F6")).unwrap();
    c.remove_trusted_key("F6").unwrap();
    c.add_trusted_key(&key("fresh", "F6")).unwrap();

    // a key added with its states (an import) in one go
    let mut imported = key("imported", "1234");
    imported.retired_at = Some("2024-01-01T00:00:00Z".into());
    imported.revoked_at = Some("2024-02-01T00:00:00Z".into());
    other.add_trusted_key(&imported).unwrap();
    let got = c
        .trusted_keys()
        .unwrap()
        .into_iter()
        .find(|k| k.name == "imported")
        .unwrap();
    assert_eq!(got, imported);
    assert_eq!(got.state(), KeyState::Revoked);
    assert_eq!(
        listed(c)
            .iter()
            .map(|(n, ..)| n.as_str())
            .collect::<Vec<_>>(),
        ["ci", "fresh", "imported", "release"]
    );
}

/// `key(name, id)` with the added_at the catalog returned.
fn key_with_time(name: &str, key_id: &str, got: &KeyRecord) -> KeyRecord {
    KeyRecord {
        added_at: got.added_at.clone(),
        ..key(name, key_id)
    }
}

pub fn failed_logins_are_counted_per_client_across_instances(f: &Fixture) {
    let c = f.cat.as_ref();
    let other = (f.reopen)();
    let window = 900_000;
    let t0 = 1_800_000_000_000i64;
    assert_eq!(c.note_auth_failure("192.0.2.1", t0, window).unwrap(), 1);
    assert_eq!(
        c.note_auth_failure("192.0.2.1", t0 + 1_000, window)
            .unwrap(),
        2
    );
    // another instance goes on counting; another address counts alone
    assert_eq!(
        other
            .note_auth_failure("192.0.2.1", t0 + 2_000, window)
            .unwrap(),
        3
    );
    assert_eq!(
        other
            .note_auth_failure("2001:db8::7", t0 + 2_000, window)
            .unwrap(),
        1
    );
    // each failure within the window of the last one counts on
    let late = t0 + 2_000 + window - 1;
    assert_eq!(c.note_auth_failure("192.0.2.1", late, window).unwrap(), 4);
    // a clock a little behind on another instance still counts
    assert_eq!(
        other
            .note_auth_failure("192.0.2.1", late - 5_000, window)
            .unwrap(),
        5
    );
    // quiet for longer than the window: forgotten, counting from 1 again
    let quiet = late + window + 1;
    assert_eq!(c.note_auth_failure("192.0.2.1", quiet, window).unwrap(), 1);
    assert_eq!(
        other
            .note_auth_failure("2001:db8::7", quiet, window)
            .unwrap(),
        1
    );
    assert_err!(
        c.note_auth_failure(&"x".repeat(65), t0, window),
        CatalogError::Invalid(_)
    );
}
