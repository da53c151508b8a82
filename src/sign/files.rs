//! Keys kept as files: a consumer's trusted keys ([`load_keys_from`]: a directory
//! of `<name>.pub` files with optional `<name>.toml` policies, or one `.pub`
//! file), and the `DATA_DIR/keys/` directory where an appliance kept its trusted
//! keys before they moved into the catalog, imported by [`import_key_files`].
//!
//! The import, each time a catalog is opened for a data directory:
//!
//! * without [`MARKER_FILE`] in `DATA_DIR/keys/`, every key file the catalog does
//!   not have is added with its policy (scopes, retirement, revocation) in one
//!   transaction per key, audited as `key.import`; then the marker is written and
//!   the files are made read-only (0444): they stay as a record, and are no
//!   longer the trust store;
//! * with or without the marker, a retirement or revocation a file records that
//!   the catalog does not is recorded in the catalog (forward only, audited as
//!   `key.retire`/`key.revoke`), also for a key the catalog does not list: a
//!   revocation is never lost, whichever instance's files hold it;
//! * after the marker, a key file the catalog does not have is not trusted (a
//!   warning says to use `imgsrv key add`).
//!
//! Fails closed: a malformed key or policy file stops the open (it may hold a
//! revocation), naming the file.

use super::{io_err, valid_key_name, KeyPolicy, KeyState, SignError, TrustedKey};
use crate::catalog::{Catalog, CatalogError, KeyRecord};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Written into `DATA_DIR/keys/` once its keys are imported into the catalog.
pub const MARKER_FILE: &str = "IMPORTED-INTO-CATALOG.txt";

fn policy_path(key_path: &Path) -> PathBuf {
    key_path.with_extension("toml")
}

/// Reads `<name>.toml` beside a key; absent means the default policy. An
/// unreadable policy is an error (fail closed: it may hold a revocation).
fn load_policy(key_path: &Path) -> Result<KeyPolicy, SignError> {
    let path = policy_path(key_path);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(KeyPolicy::default()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let policy: KeyPolicy = toml::from_str(&text).map_err(|e| SignError::MalformedPolicy {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if let Some(bad) = policy.scopes.iter().find(|g| !crate::names::scope(g)) {
        return Err(SignError::MalformedPolicy {
            path,
            reason: format!("invalid scope {bad:?}"),
        });
    }
    Ok(policy)
}

fn load_key_file(path: &Path, name: &str) -> Result<TrustedKey, SignError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let policy = load_policy(path)?;
    TrustedKey::from_text(name, &text, policy, path.display().to_string()).map_err(|reason| {
        SignError::MalformedKey {
            path: path.to_path_buf(),
            reason,
        }
    })
}

/// Loads trusted keys from a directory of `<name>.pub` files (with optional
/// `<name>.toml` policies), or from one `.pub` file: how a consumer names the
/// keys it trusts.
pub fn load_keys_from(path: &Path) -> Result<Vec<TrustedKey>, SignError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if meta.is_dir() {
        return load_key_dir(path);
    }
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|n| valid_key_name(n))
        .unwrap_or("key");
    Ok(vec![load_key_file(path, name)?])
}

/// Every `<NAME>.pub` of `dir`, sorted by name. Fails closed: a malformed key
/// file, a `.pub` file with an invalid name or two files with the same key id are
/// errors.
fn load_key_dir(dir: &Path) -> Result<Vec<TrustedKey>, SignError> {
    let entries = fs::read_dir(dir).map_err(io_err(dir))?;
    let mut keys = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".pub")) else {
            continue; // not a key file
        };
        if name.starts_with('.') {
            continue; // hidden files are never keys (invalid names)
        }
        if !valid_key_name(name) {
            return Err(SignError::MalformedKey {
                path,
                reason: "the file name is not a valid key name".into(),
            });
        }
        keys.push(load_key_file(&path, name)?);
    }
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    for (i, a) in keys.iter().enumerate() {
        if let Some(b) = keys[i + 1..].iter().find(|b| b.key_id == a.key_id) {
            return Err(SignError::ConflictingKeyId {
                key_id: a.key_id.clone(),
                first: PathBuf::from(&a.origin),
                second: PathBuf::from(&b.origin),
            });
        }
    }
    Ok(keys)
}

/// What a file's policy says happened to its key: (state, when), furthest last.
fn file_states(p: &KeyPolicy) -> Vec<(KeyState, String)> {
    let now = || chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut out = Vec::new();
    if p.state >= KeyState::Retired && (p.retired_at.is_some() || p.state == KeyState::Retired) {
        out.push((KeyState::Retired, p.retired_at.clone().unwrap_or_else(now)));
    }
    if p.state == KeyState::Revoked {
        out.push((KeyState::Revoked, p.revoked_at.clone().unwrap_or_else(now)));
    }
    out
}

/// Imports the key files of `DATA_DIR/keys/` into the catalog (see the module
/// doc). Nothing to do without the directory.
pub fn import_key_files(cat: &dyn Catalog, data_dir: &Path) -> anyhow::Result<()> {
    let dir = data_dir.join("keys");
    match fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(&dir)(e).into()),
    }
    let files = load_key_dir(&dir).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n(the trusted keys are in the catalog; {} is read once to import its keys, and \
             for revocations written there: fix the file, or move it out of the directory)",
            dir.display()
        )
    })?;
    let marker = dir.join(MARKER_FILE);
    let imported = marker.exists();
    let mut carried = 0;
    for f in &files {
        carried += carry(cat, f, imported)?;
    }
    if !imported {
        write_marker(&dir, &marker, &files);
    }
    if carried > 0 {
        log::info!(
            "trusted keys: {carried} change(s) from {} recorded in the catalog",
            dir.display()
        );
    }
    Ok(())
}

/// One key file into the catalog: the number of changes made.
fn carry(cat: &dyn Catalog, f: &TrustedKey, imported: bool) -> anyhow::Result<usize> {
    let audit = |action: &str, detail: serde_json::Value| {
        crate::admin_cli::record(cat, action, &f.name, detail)
    };
    let listed = |cat: &dyn Catalog| -> Result<Option<KeyRecord>, CatalogError> {
        Ok(cat
            .trusted_keys()?
            .into_iter()
            .find(|r| r.key_id == f.key_id))
    };
    let mut changes = 0;
    if listed(cat)?.is_none() && !imported {
        let states = file_states(&f.policy);
        let at = |s: KeyState| states.iter().find(|(k, _)| *k == s).map(|(_, t)| t.clone());
        let record = KeyRecord {
            name: f.name.clone(),
            key_id: f.key_id.clone(),
            public_key: f.public_key_text(),
            scopes: f.policy.scopes.clone(),
            added_at: crate::catalog::now(),
            retired_at: at(KeyState::Retired),
            revoked_at: at(KeyState::Revoked),
        };
        match cat.add_trusted_key(&record) {
            Ok(()) => {
                audit(
                    "key.import",
                    serde_json::json!({
                        "key_id": f.key_id,
                        "scopes": f.policy.scopes,
                        "state": f.policy.state,
                        "from": f.origin,
                    }),
                )?;
                log::info!(
                    "trusted keys: imported {} ({}, {}) from {}",
                    f.name,
                    f.key_id,
                    f.policy.state.as_str(),
                    f.origin
                );
                return Ok(1);
            }
            // added meanwhile (another instance importing its copy), or the name is
            // another key's: the states below still hold
            Err(CatalogError::AlreadyExists(_)) => {}
            // retired or revoked in the catalog before, and removed
            Err(CatalogError::Precondition(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let present = listed(cat)?;
    for (state, at) in file_states(&f.policy) {
        if present.as_ref().is_some_and(|r| r.state() >= state) {
            continue;
        }
        let name = present.as_ref().map_or(&f.name, |r| &r.name);
        match cat.record_key_state(&f.key_id, name, state, &at) {
            Ok(true) => {
                changes += 1;
                audit(
                    &format!(
                        "key.{}",
                        if state == KeyState::Revoked {
                            "revoke"
                        } else {
                            "retire"
                        }
                    ),
                    serde_json::json!({ "key_id": f.key_id, "from": f.origin }),
                )?;
                log::warn!(
                    "trusted keys: key {} ({}) is {} in {}: recorded in the catalog",
                    name,
                    f.key_id,
                    state.as_str(),
                    f.origin
                );
            }
            Ok(false) | Err(CatalogError::Precondition(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if present.is_none() && f.policy.state == KeyState::Active {
        log::warn!(
            "trusted keys: {} ({}) is not trusted: the trusted keys are in the catalog, and \
             this directory is only a record since its import; trust the key with `imgsrv key \
             add --data DIR {}` (refused if the catalog retired or revoked it before)",
            f.origin,
            f.key_id,
            f.origin
        );
    }
    Ok(changes)
}

/// The marker, and the files made read-only: best effort (a read-only directory
/// only means the import runs again, finding its work done).
fn write_marker(dir: &Path, marker: &Path, files: &[TrustedKey]) {
    use std::os::unix::fs::PermissionsExt;
    let text = format!(
        "The trusted publisher keys of this directory were imported into the catalog on {}\n\
         (imgsrv {}). They are no longer read from here: list and manage them with\n\
         `imgsrv key list|add|scope|retire|revoke|remove --data DIR`, which every imgsrv\n\
         instance sharing the catalog sees at its next request.\n\
         \n\
         The files stay as a record. A retirement or revocation written into a .toml here\n\
         later is still recorded in the catalog the next time imgsrv opens it (forward\n\
         only); a key file added here is not trusted.\n",
        crate::catalog::now(),
        env!("CARGO_PKG_VERSION")
    );
    if let Err(e) = fs::write(marker, text) {
        log::warn!(
            "trusted keys: writing {}: {e} (the import runs again at the next open)",
            marker.display()
        );
        return;
    }
    for f in files {
        let key = PathBuf::from(&f.origin);
        for p in [policy_path(&key), key] {
            if p.exists() {
                let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o444));
            }
        }
    }
    log::info!(
        "trusted keys: {} key file(s) of {} imported into the catalog; the files stay as a \
         record ({MARKER_FILE})",
        files.len(),
        dir.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{AuditCatalog, AuditQuery, KeyCatalog, SqliteCatalog};
    use crate::sign::tests::minisign_keygen;
    use crate::sign::{add_trusted_key, load_trusted_keys};

    #[test]
    fn malformed_key_files_fail_closed() {
        let t = tempfile::tempdir().unwrap();
        let (pk, _) = minisign_keygen(t.path(), "k", None);
        let keys = t.path().join("keys");
        fs::create_dir(&keys).unwrap();
        fs::copy(&pk, keys.join("k.pub")).unwrap();
        assert_eq!(load_keys_from(&keys).unwrap().len(), 1);
        // Non-.pub files are ignored; a broken .pub file fails the whole load.
        fs::write(keys.join("README"), "not a key").unwrap();
        assert_eq!(load_keys_from(&keys).unwrap().len(), 1);
        fs::write(keys.join("broken.pub"), "untrusted comment: x\nRWQ=\n").unwrap();
        let e = load_keys_from(&keys).unwrap_err();
        assert!(e.to_string().contains("broken.pub"), "{e}");
        fs::write(keys.join("broken.pub"), "hello\n").unwrap();
        assert!(load_keys_from(&keys).is_err());
        // Same key under two names: ambiguous, refused.
        fs::copy(&pk, keys.join("broken.pub")).unwrap();
        let e = load_keys_from(&keys).unwrap_err();
        assert!(matches!(e, SignError::ConflictingKeyId { .. }), "{e}");
        // and the import of such a directory stops the open, naming the file
        let cat = SqliteCatalog::open(&t.path().join("catalog.db")).unwrap();
        let e = import_key_files(&cat, t.path()).unwrap_err().to_string();
        assert!(e.contains("broken.pub") && e.contains("catalog"), "{e}");
        assert!(cat.trusted_keys().unwrap().is_empty());
    }

    fn policy(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(format!("{name}.toml")), text).unwrap();
    }

    #[test]
    fn key_files_are_imported_once_and_no_revocation_is_lost() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        let keys = data.join("keys");
        fs::create_dir_all(&keys).unwrap();
        let gen = t.path().join("gen");
        fs::create_dir(&gen).unwrap();
        let mut pubs = Vec::new();
        for n in ["active", "retired", "revoked", "later", "lost", "edited"] {
            pubs.push(minisign_keygen(&gen, n, None).0);
        }
        for p in &pubs[..3] {
            fs::copy(p, keys.join(p.file_name().unwrap())).unwrap();
        }
        policy(
            &keys,
            "active",
            "scopes = [\"debian-*\"]\nstate = \"active\"\n",
        );
        policy(
            &keys,
            "retired",
            "scopes = [\"*\"]\nstate = \"retired\"\nretired_at = \"2025-01-02T03:04:05Z\"\n",
        );
        policy(
            &keys,
            "revoked",
            "scopes = [\"*\"]\nstate = \"revoked\"\nrevoked_at = \"2025-02-03T04:05:06Z\"\n",
        );
        let cat = SqliteCatalog::open(&data.join("catalog.db")).unwrap();
        // a key the catalog already has (another instance imported it) is not doubled
        add_trusted_key(&cat, Some("edited"), &pubs[5], &[]).unwrap();
        fs::copy(&pubs[5], keys.join("edited.pub")).unwrap();
        import_key_files(&cat, &data).unwrap();

        let got = load_trusted_keys(&cat).unwrap();
        let summary: Vec<_> = got
            .iter()
            .map(|k| (k.name.as_str(), k.policy.state, k.policy.scopes.join(",")))
            .collect();
        assert_eq!(
            summary,
            [
                ("active", KeyState::Active, "debian-*".to_string()),
                ("edited", KeyState::Active, "*".to_string()),
                ("retired", KeyState::Retired, "*".to_string()),
                ("revoked", KeyState::Revoked, "*".to_string()),
            ]
        );
        assert_eq!(
            got[3].policy.revoked_at.as_deref(),
            Some("2025-02-03T04:05:06Z")
        );
        assert_eq!(
            got[2].policy.retired_at.as_deref(),
            Some("2025-01-02T03:04:05Z")
        );
        assert!(keys.join(MARKER_FILE).is_file());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(keys.join("active.pub"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444, "the files stay as a read-only record");
        let imports = cat
            .query_audit(&AuditQuery {
                action: Some("key.import".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(imports.len(), 3, "{imports:?}");

        // once: opening again changes nothing, and a file added since is not trusted
        fs::copy(&pubs[3], keys.join("later.pub")).unwrap();
        import_key_files(&cat, &data).unwrap();
        assert_eq!(load_trusted_keys(&cat).unwrap().len(), 4);
        let audit_rows = cat.query_audit(&AuditQuery::default()).unwrap().len();
        assert_eq!(audit_rows, 3);

        // a revocation written into a file later is still carried over, forward only
        fs::remove_file(keys.join("edited.toml")).ok();
        policy(
            &keys,
            "edited",
            "scopes = [\"*\"]\nstate = \"revoked\"\nrevoked_at = \"2025-03-04T05:06:07Z\"\n",
        );
        // and so is one of a key the catalog never had: it can never be added
        fs::copy(&pubs[4], keys.join("lost.pub")).unwrap();
        policy(&keys, "lost", "scopes = [\"*\"]\nstate = \"revoked\"\n");
        import_key_files(&cat, &data).unwrap();
        let edited = load_trusted_keys(&cat)
            .unwrap()
            .into_iter()
            .find(|k| k.name == "edited")
            .unwrap();
        assert_eq!(edited.policy.state, KeyState::Revoked);
        let e = add_trusted_key(&cat, None, &pubs[4], &[]).unwrap_err();
        assert!(matches!(e, SignError::NeverAgain { .. }), "{e}");
        let revokes = cat
            .query_audit(&AuditQuery {
                action: Some("key.revoke".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(revokes.len(), 2, "{revokes:?}");
        // a file saying "active" does not undo the catalog's revocation
        policy(&keys, "edited", "scopes = [\"*\"]\nstate = \"active\"\n");
        import_key_files(&cat, &data).unwrap();
        let edited = load_trusted_keys(&cat)
            .unwrap()
            .into_iter()
            .find(|k| k.name == "edited")
            .unwrap();
        assert_eq!(edited.policy.state, KeyState::Revoked);
    }
}
