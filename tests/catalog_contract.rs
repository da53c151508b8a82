//! Issue 10: one contract for the [`Catalog`] traits, run on every backend: SQLite (in a
//! temp dir, always) and, with `--features postgres`, PostgreSQL 15 (a throwaway cluster
//! started by `tests/fixtures/pg-harness`, one fresh database per test). Each test takes
//! a `&dyn Catalog` and a way to open a second instance on the same storage (another
//! process or imgsrv instance sharing it), and asserts what callers rely on: the
//! results, the order of listings, and the [`CatalogError`] variant of each refusal.
//!
//! PostgreSQL only (module `pg_only`): published rows cannot be changed or deleted from
//! the real `psql`, guards dropped by hand are reported and re-armed, instances starting
//! at once migrate once, and a catalog reconnects by itself after the database restarted
//! (failing with [`CatalogError::Unavailable`] while it is down).
//!
//! Run: `cargo test --features postgres --test catalog_contract` (as root: the harness
//! runs initdb as the user postgres).

use imgsrv::catalog::*;
use imgsrv::digest::Digest;
use std::collections::BTreeMap;

/// A new catalog, and what must live as long as it.
type Fresh = (Box<dyn Catalog>, Box<dyn std::any::Any>);

/// A catalog under test, and how to open another instance on the same storage.
struct Fixture {
    cat: Box<dyn Catalog>,
    reopen: Box<dyn Fn() -> Box<dyn Catalog>>,
    /// A new, empty catalog on the same backend (with what must live as long as it).
    fresh: Box<dyn Fn() -> Fresh>,
    /// What must live as long as the catalog (a temp dir).
    _keep: Box<dyn std::any::Any>,
}

fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    let cat = Box::new(SqliteCatalog::open(&path).unwrap());
    Fixture {
        cat,
        reopen: Box::new(move || Box::new(SqliteCatalog::open(&path).unwrap())),
        fresh: Box::new(|| {
            let dir = tempfile::tempdir().unwrap();
            let cat = SqliteCatalog::open(&dir.path().join("catalog.db")).unwrap();
            (Box::new(cat), Box::new(dir))
        }),
        _keep: Box::new(dir),
    }
}

/// Runs each named contract test on every backend.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $( #[test] fn $name() { super::$name(&super::sqlite()) } )*
        }
        #[cfg(feature = "postgres")]
        mod on_postgres {
            $( #[test] fn $name() { super::$name(&super::pg::fixture()) } )*
        }
    };
}

contract!(
    drafts_are_composed_read_back_and_deleted,
    a_published_version_cannot_be_changed_through_the_trait,
    publish_refuses_a_changed_draft_and_missing_blobs,
    aliases_point_only_at_published_versions,
    blob_rows_and_upload_sessions,
    principals_grants_and_tokens,
    the_audit_log_appends_and_filters,
    retire_and_collect_published_versions,
    claims_pins_and_guarded_blob_deletion,
    job_locks_exclude_by_mode_across_two_holders,
    a_waiting_job_lock_is_granted_when_the_holder_lets_go,
    the_generation_moves_and_another_instance_sees_it,
    job_runs_probe_and_integrity,
    a_whole_catalog_is_loaded_as_it_was_through_the_guards,
    loads_are_refused_where_the_guards_refuse,
    trusted_keys_and_their_states,
    failed_logins_are_counted_per_client_across_instances,
    the_log_records_each_event_in_its_transaction,
    checkpoints_are_stored_once_per_size_and_the_log_key_once,
);

// ------------------------------------------------------------------------ helpers

fn blob(c: &dyn Catalog, tag: &str) -> (Digest, u64) {
    let d = Digest::of(tag.as_bytes());
    let size = tag.len() as u64;
    c.insert_blob(&d, size, Some("application/octet-stream"))
        .unwrap();
    (d, size)
}

fn artifact(digest: Digest, size: u64, arch: &str) -> NewArtifact {
    NewArtifact {
        variant: "default".into(),
        operating_system: "debian".into(),
        architecture: arch.into(),
        format: "squashfs".into(),
        primary_blob_digest: digest,
        primary_blob_size_bytes: size,
        primary_media_type: "application/vnd.squashfs".into(),
    }
}

fn attachment(digest: Digest, size: u64) -> NewAttachment {
    NewAttachment {
        name: "incus.tar.xz".into(),
        media_type: "application/x-xz".into(),
        blob_digest: digest,
        blob_size_bytes: size,
    }
}

/// A draft `image@version` with one artifact (root blob + metadata attachment), both
/// blobs stored: (version, artifact id, metadata attachment id, root digest).
fn draft(c: &dyn Catalog, image: &str, version: &str) -> (ImageVersion, String, String, Digest) {
    if c.get_image(image).is_err() {
        c.create_image(image, Some("Debian"), None, "public")
            .unwrap();
    }
    let meta: BTreeMap<String, String> = [("release".to_string(), "bookworm".to_string())]
        .into_iter()
        .collect();
    let v = c.create_version(image, version, &meta).unwrap();
    let (root, root_size) = blob(c, &format!("root {image} {version}"));
    let (m, m_size) = blob(c, &format!("meta {image} {version}"));
    let a = c
        .add_artifact(&v.id, &artifact(root, root_size, "amd64"))
        .unwrap();
    let t = c
        .add_attachment(&v.id, &a.id, &attachment(m, m_size))
        .unwrap();
    (v, a.id, t.id, root)
}

/// The record and projection rows that publish `image@version` as it is now.
fn record_for(c: &dyn Catalog, image: &str, version: &str) -> (PublishRecord, Vec<ProjectionRow>) {
    let view = c.version_view(image, version).unwrap();
    let manifest = imgsrv::manifest::canonical(&view);
    let projection = view
        .artifacts
        .iter()
        .map(|a| ProjectionRow {
            artifact_id: a.artifact.id.clone(),
            metadata_attachment_id: a.attachments[0].id.clone(),
            ftype: "squashfs".into(),
            combined_sha256: Digest::of(format!("fp {}", a.artifact.id).as_bytes()),
        })
        .collect();
    (
        PublishRecord {
            version_id: view.version.id.clone(),
            manifest_digest: Digest::of(&manifest),
            manifest,
            signature: None,
            signer_key_id: None,
            signer_key_name: None,
            verification: Verification::Skipped,
            principal_id: None,
            published_at: now(),
        },
        projection,
    )
}

/// Publishes a new version with one artifact: the published version.
fn published(c: &dyn Catalog, image: &str, version: &str) -> ImageVersion {
    draft(c, image, version);
    let (record, projection) = record_for(c, image, version);
    c.publish(&record, &projection).unwrap()
}

macro_rules! assert_err {
    ($e:expr, $pat:pat) => {
        match $e {
            Err($pat) => {}
            other => panic!(
                "{}: expected {}, got {:?}",
                stringify!($e),
                stringify!($pat),
                other.map(|_| "Ok(..)")
            ),
        }
    };
}

// ------------------------------------------------------------------------ the suites

// after the helpers and assert_err!, which they use (macros are in scope in textual order)
#[path = "catalog_contract/content.rs"]
mod content;
#[path = "catalog_contract/keys.rs"]
mod keys;
#[path = "catalog_contract/log.rs"]
mod log;
#[path = "catalog_contract/maint.rs"]
mod maint;
#[cfg(feature = "postgres")]
#[path = "catalog_contract/pg_only.rs"]
mod pg_only;
#[path = "catalog_contract/records.rs"]
mod records;
#[path = "catalog_contract/transfer.rs"]
mod transfer;
use content::*;
use keys::*;
use log::*;
use maint::*;
use records::*;
use transfer::*;

// ------------------------------------------------------------------------ SQLite only

mod sqlite_only {
    use super::*;

    /// What the real `sqlite3` shell cannot do to the trusted keys' records: a revoked
    /// key never becomes active again and stays listed, retirements and revocations
    /// are never changed or deleted (nor replaced: INSERT OR REPLACE deletes without
    /// firing a delete guard).
    #[test]
    fn key_revocations_cannot_be_undone_from_sqlite3() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("catalog.db");
        let c = SqliteCatalog::open(&db).unwrap();
        c.add_trusted_key(&key("release", "A1")).unwrap();
        c.record_key_state("A1", "release", KeyState::Revoked, "t")
            .unwrap();
        c.add_trusted_key(&key("old", "B2")).unwrap();
        c.record_key_state("B2", "old", KeyState::Retired, "t")
            .unwrap();
        c.remove_trusted_key("B2").unwrap();
        let pk = "untrusted comment: x\nRWQ\n";
        for (sql, says) in [
            ("DELETE FROM key_states".to_string(), "immutable: key retirements and revocations are append-only"),
            ("UPDATE key_states SET state = 'retired'".into(), "immutable: key retirements and revocations are append-only"),
            ("INSERT OR REPLACE INTO key_states VALUES ('A1', 'revoked', 'x', 'later')".into(), "exists"),
            ("REPLACE INTO key_states VALUES ('A1', 'revoked', 'x', 'later')".into(), "exists"),
            ("INSERT INTO key_states VALUES ('A1', 'retired', 'x', 't')".into(), "precondition: the key is revoked"),
            ("DELETE FROM trusted_keys WHERE name = 'release'".into(), "immutable: a revoked key stays listed"),
            (format!("INSERT OR REPLACE INTO trusted_keys VALUES ('release', 'C3', '{pk}', '[]', 't')"), "exists: a revoked key stays listed"),
            (format!("INSERT OR REPLACE INTO trusted_keys VALUES ('new', 'A1', '{pk}', '[]', 't')"), "a key is never trusted again"),
            ("UPDATE trusted_keys SET key_id = 'C3'".into(), "immutable: a trusted key's name, key id and public key never change"),
            ("UPDATE OR REPLACE trusted_keys SET public_key = 'x'".into(), "immutable"),
            (format!("INSERT INTO trusted_keys VALUES ('old', 'B2', '{pk}', '[]', 't')"), "precondition: this key was retired or revoked"),
        ] {
            let out = std::process::Command::new("sqlite3")
                .arg(&db)
                .arg(&sql)
                .output()
                .expect("the sqlite3 CLI");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "sqlite3 accepted {sql}");
            assert!(err.contains(says), "{sql}: {err}");
        }
        let keys = c.trusted_keys().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key_id, "A1");
        assert_eq!(keys[0].state(), KeyState::Revoked);
        assert_eq!(keys[0].revoked_at.as_deref(), Some("t"));
        // guards dropped by hand come back at the next open
        let out = std::process::Command::new("sqlite3")
            .arg(&db)
            .arg("DROP TRIGGER key_states_no_delete")
            .output()
            .unwrap();
        assert!(out.status.success());
        let again = SqliteCatalog::open(&db).unwrap();
        let out = std::process::Command::new("sqlite3")
            .arg(&db)
            .arg("DELETE FROM key_states")
            .output()
            .unwrap();
        assert!(!out.status.success(), "the guard was not put back");
        assert_eq!(again.trusted_keys().unwrap()[0].state(), KeyState::Revoked);
    }
}

// ------------------------------------------------------------------------ PostgreSQL

#[cfg(feature = "postgres")]
#[path = "support/pg.rs"]
mod pg_cluster;

#[cfg(feature = "postgres")]
mod pg {
    //! The catalog fixtures on the throwaway cluster of `support/pg.rs`.
    pub use super::pg_cluster::*;
    use super::*;
    use imgsrv::catalog::postgres::PgCatalog;

    pub fn fixture() -> Fixture {
        let url = database(shared());
        let cat = Box::new(PgCatalog::open(&url).unwrap());
        Fixture {
            cat,
            reopen: Box::new(move || Box::new(PgCatalog::open(&url).unwrap())),
            fresh: Box::new(|| {
                let cat = PgCatalog::open(&database(shared())).unwrap();
                (Box::new(cat), Box::new(()))
            }),
            _keep: Box::new(()),
        }
    }
}
