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
use std::time::Duration;

/// A catalog under test, and how to open another instance on the same storage.
struct Fixture {
    cat: Box<dyn Catalog>,
    reopen: Box<dyn Fn() -> Box<dyn Catalog>>,
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

// ------------------------------------------------------------------------ content

fn drafts_are_composed_read_back_and_deleted(f: &Fixture) {
    let c = f.cat.as_ref();
    let img = c
        .create_image("debian", Some("Debian"), Some("d"), "public")
        .unwrap();
    assert_eq!(c.get_image("debian").unwrap(), img);
    assert_err!(
        c.create_image("debian", None, None, "public"),
        CatalogError::AlreadyExists(_)
    );
    assert_err!(
        c.create_image("Bad Name", None, None, "public"),
        CatalogError::Invalid(_)
    );
    assert_err!(c.get_image("nope"), CatalogError::NotFound(_));
    assert_eq!(
        c.set_visibility("debian", "private").unwrap().visibility,
        "private"
    );
    assert!(c.get_image("debian").unwrap().is_private());
    assert_err!(
        c.set_visibility("nope", "public"),
        CatalogError::NotFound(_)
    );
    c.create_image("alpine", None, None, "public").unwrap();

    let (v, artifact_id, attachment_id, root) = draft(c, "debian", "20260101");
    assert_eq!(v.state, VersionState::Draft);
    assert_eq!(
        v.metadata.get("release").map(String::as_str),
        Some("bookworm")
    );
    assert_err!(
        c.create_version("debian", "20260101", &BTreeMap::new()),
        CatalogError::AlreadyExists(_)
    );
    assert_err!(
        c.create_version("nope", "1", &BTreeMap::new()),
        CatalogError::NotFound(_)
    );
    assert_err!(
        c.add_artifact(&v.id, &artifact(root, 4, "amd64")),
        CatalogError::AlreadyExists(_)
    );
    let view = c.version_view("debian", "20260101").unwrap();
    assert_eq!(view.image.name, "debian");
    assert_eq!(view.version, c.get_version("debian", "20260101").unwrap());
    assert_eq!(view.artifacts.len(), 1);
    assert_eq!(view.artifacts[0].artifact.id, artifact_id);
    assert_eq!(view.artifacts[0].artifact.primary_blob_digest, root);
    assert_eq!(view.artifacts[0].attachments[0].id, attachment_id);

    // listings: drafts only when asked for, images only with a published version
    assert!(c.list_versions("debian", false).unwrap().is_empty());
    assert_eq!(c.list_versions("debian", true).unwrap().len(), 1);
    assert!(c.list_images(false).unwrap().is_empty());
    let names: Vec<String> = c
        .list_images(true)
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["alpine", "debian"], "byte order on every backend");

    // a second artifact, then taken apart again
    let (d2, s2) = blob(c, "arm root");
    let a2 = c.add_artifact(&v.id, &artifact(d2, s2, "arm64")).unwrap();
    let t2 = c
        .add_attachment(&v.id, &a2.id, &attachment(d2, s2))
        .unwrap();
    assert_err!(
        c.add_attachment(&v.id, &a2.id, &attachment(d2, s2)),
        CatalogError::AlreadyExists(_)
    );
    assert_err!(
        c.delete_attachment(&v.id, &a2.id, "nope"),
        CatalogError::NotFound(_)
    );
    c.delete_attachment(&v.id, &a2.id, &t2.id).unwrap();
    c.delete_artifact(&v.id, &a2.id).unwrap();
    assert_err!(c.delete_artifact(&v.id, &a2.id), CatalogError::NotFound(_));
    assert_eq!(
        c.version_view("debian", "20260101")
            .unwrap()
            .artifacts
            .len(),
        1
    );

    c.delete_draft("debian", "20260101").unwrap();
    assert_err!(
        c.get_version("debian", "20260101"),
        CatalogError::NotFound(_)
    );
    assert_err!(
        c.delete_draft("debian", "20260101"),
        CatalogError::NotFound(_)
    );
}

fn a_published_version_cannot_be_changed_through_the_trait(f: &Fixture) {
    let c = f.cat.as_ref();
    let v = published(c, "debian", "1");
    assert_eq!(v.state, VersionState::Published);
    assert!(v.published_at.is_some());
    let view = c.version_view("debian", "1").unwrap();
    let a = &view.artifacts[0].artifact;
    let t = &view.artifacts[0].attachments[0];
    let (d, s) = blob(c, "late");

    assert_err!(
        c.add_artifact(&v.id, &artifact(d, s, "riscv64")),
        CatalogError::Precondition(_)
    );
    assert_err!(
        c.add_attachment(&v.id, &a.id, &attachment(d, s)),
        CatalogError::Precondition(_)
    );
    assert_err!(
        c.delete_attachment(&v.id, &a.id, &t.id),
        CatalogError::Precondition(_)
    );
    assert_err!(
        c.delete_artifact(&v.id, &a.id),
        CatalogError::Precondition(_)
    );
    assert_err!(c.delete_draft("debian", "1"), CatalogError::Precondition(_));
    let (again, projection) = record_for(c, "debian", "1");
    assert_err!(
        c.publish(&again, &projection),
        CatalogError::Precondition(_)
    );
    // a blob row a published version cites stays
    assert_err!(
        c.delete_blob_rows(&[a.primary_blob_digest], &mut |_, _| false),
        CatalogError::Precondition(_)
    );
    assert_eq!(
        c.version_view("debian", "1").unwrap(),
        view,
        "nothing changed"
    );

    // what the publish wrote
    let rec = c.publish_record(&v.id).unwrap();
    assert_eq!(rec.manifest, imgsrv::manifest::canonical(&view));
    assert_eq!(rec.verification, Verification::Skipped);
    let rows = c.projection_rows(&v.id).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].artifact_id, a.id);
    assert_err!(c.publish_record("nope"), CatalogError::NotFound(_));

    // listings and projection
    assert_eq!(c.list_versions("debian", false).unwrap()[0].id, v.id);
    assert_eq!(c.list_images(false).unwrap()[0].name, "debian");
    let entries = c.projection_entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0]
            .version
            .metadata
            .get("release")
            .map(String::as_str),
        Some("bookworm")
    );
    let fp = rows[0].combined_sha256.hex();
    assert_eq!(c.projection_by_fingerprint(&fp[..12]).unwrap().len(), 1);
    assert_eq!(
        c.projection_by_fingerprint(&fp).unwrap()[0].artifact.id,
        a.id
    );
    let other = if fp.starts_with('0') { "1" } else { "0" };
    assert!(c.projection_by_fingerprint(other).unwrap().is_empty());
    assert_err!(c.projection_by_fingerprint("XYZ"), CatalogError::Invalid(_));
    assert_err!(c.projection_by_fingerprint(""), CatalogError::Invalid(_));
    let refs = c.blob_references(&a.primary_blob_digest).unwrap();
    assert_eq!(refs.len(), 1);
    assert!(refs[0].published && refs[0].version_id == v.id);
    assert_eq!(c.blob_references(&t.blob_digest).unwrap().len(), 1);
    assert!(c.blob_references(&d).unwrap().is_empty());
}

fn publish_refuses_a_changed_draft_and_missing_blobs(f: &Fixture) {
    let c = f.cat.as_ref();
    let (v, a, _, _) = draft(c, "debian", "1");
    let (record, projection) = record_for(c, "debian", "1");
    // the draft changes after its manifest was taken (and signed)
    let (d, s) = blob(c, "extra");
    c.add_artifact(&v.id, &artifact(d, s, "arm64")).unwrap();
    assert_err!(
        c.publish(&record, &projection),
        CatalogError::Precondition(_)
    );
    assert_eq!(
        c.get_version("debian", "1").unwrap().state,
        VersionState::Draft
    );

    // a cited blob that is not stored
    let v2 = c.create_version("debian", "2", &BTreeMap::new()).unwrap();
    let missing = Digest::of(b"never uploaded");
    let a2 = c
        .add_artifact(&v2.id, &artifact(missing, 9, "amd64"))
        .unwrap();
    c.add_attachment(&v2.id, &a2.id, &attachment(missing, 9))
        .unwrap();
    let (record, projection) = record_for(c, "debian", "2");
    assert_err!(
        c.publish(&record, &projection),
        CatalogError::Precondition(_)
    );
    assert_eq!(
        c.get_version("debian", "2").unwrap().state,
        VersionState::Draft
    );
    // a version without artifacts
    c.create_version("debian", "3", &BTreeMap::new()).unwrap();
    let (record, _) = record_for(c, "debian", "3");
    assert_err!(c.publish(&record, &[]), CatalogError::Precondition(_));
    assert_err!(c.publish_record(&v.id), CatalogError::NotFound(_));
    assert!(c
        .version_view("debian", "1")
        .unwrap()
        .artifacts
        .iter()
        .any(|x| x.artifact.id == a));
}

fn aliases_point_only_at_published_versions(f: &Fixture) {
    let c = f.cat.as_ref();
    let v1 = published(c, "debian", "1");
    let v2 = published(c, "debian", "2");
    draft(c, "debian", "3");
    published(c, "alpine", "1");
    assert_err!(
        c.put_alias("debian", "stable", "3"),
        CatalogError::Precondition(_)
    );
    assert_err!(
        c.put_alias("debian", "stable", "9"),
        CatalogError::NotFound(_)
    );
    assert_err!(
        c.put_alias("nope", "stable", "1"),
        CatalogError::NotFound(_)
    );
    assert_err!(
        c.put_alias("debian", "bad alias", "1"),
        CatalogError::Invalid(_)
    );
    let a = c.put_alias("debian", "stable", "1").unwrap();
    assert_eq!(
        (a.version_id.as_str(), a.version.as_str()),
        (v1.id.as_str(), "1")
    );
    let moved = c.put_alias("debian", "stable", "2").unwrap();
    assert_eq!(moved.id, a.id, "moving keeps the alias");
    assert_eq!(moved.version_id, v2.id);
    c.put_alias("debian", "latest", "2").unwrap();
    c.put_alias("alpine", "latest", "1").unwrap();
    let names: Vec<String> = c
        .list_aliases("debian")
        .unwrap()
        .into_iter()
        .map(|a| a.alias)
        .collect();
    assert_eq!(names, ["latest", "stable"]);
    let all: Vec<(String, String)> = c
        .all_aliases()
        .unwrap()
        .into_iter()
        .map(|(i, a)| (i, a.alias))
        .collect();
    assert_eq!(
        all,
        [
            ("alpine".to_string(), "latest".to_string()),
            ("debian".into(), "latest".into()),
            ("debian".into(), "stable".into())
        ]
    );
    assert_eq!(c.get_alias("debian", "stable").unwrap().version, "2");
    c.delete_alias("debian", "stable").unwrap();
    assert_err!(c.get_alias("debian", "stable"), CatalogError::NotFound(_));
    assert_err!(
        c.delete_alias("debian", "stable"),
        CatalogError::NotFound(_)
    );
    assert_err!(c.list_aliases("nope"), CatalogError::NotFound(_));
}

// ------------------------------------------------------------------------ blobs

fn blob_rows_and_upload_sessions(f: &Fixture) {
    let c = f.cat.as_ref();
    let d = Digest::of(b"blob");
    assert!(c.get_blob(&d).unwrap().is_none());
    let b = c.insert_blob(&d, 4, Some("text/plain")).unwrap();
    assert_eq!((b.size_bytes, b.storage_key.clone()), (4, d.cas_path()));
    assert_eq!(c.insert_blob(&d, 4, None).unwrap(), b, "idempotent");
    assert_err!(c.insert_blob(&d, 5, None), CatalogError::Precondition(_));
    assert_eq!(c.get_blob(&d).unwrap(), Some(b));

    let now = now();
    let s = UploadSession {
        id: new_id(),
        expected_digest: Digest::of(b"upload"),
        expected_size_bytes: 6,
        state: UploadState::Created,
        expires_at: "2000-01-01T00:00:00.000000000Z".into(),
        media_type_hint: Some("application/x-xz".into()),
        filename_hint: Some("incus.tar.xz".into()),
        failure_message: None,
        principal_id: None,
        created_at: now.clone(),
        updated_at: now,
    };
    c.create_upload(&s).unwrap();
    assert_err!(c.create_upload(&s), CatalogError::AlreadyExists(_));
    assert_eq!(c.get_upload(&s.id).unwrap(), s);
    assert_err!(c.get_upload("nope"), CatalogError::NotFound(_));
    for (n, etag) in [(2, "b"), (1, "a"), (2, "c")] {
        c.put_upload_part(&UploadPart {
            upload_id: s.id.clone(),
            part_number: n,
            etag: etag.into(),
            size_bytes: 3,
        })
        .unwrap();
    }
    let parts: Vec<(u32, String)> = c
        .upload_parts(&s.id)
        .unwrap()
        .into_iter()
        .map(|p| (p.part_number, p.etag))
        .collect();
    assert_eq!(
        parts,
        [(1, "a".to_string()), (2, "c".to_string())],
        "a part sent again replaces it"
    );
    assert_eq!(c.get_upload(&s.id).unwrap().state, UploadState::Uploading);
    assert_err!(
        c.put_upload_part(&UploadPart {
            upload_id: "nope".into(),
            part_number: 1,
            etag: "x".into(),
            size_bytes: 1
        }),
        CatalogError::NotFound(_)
    );
    let failed = c
        .set_upload_state(&s.id, UploadState::Failed, Some("digest mismatch"))
        .unwrap();
    assert_eq!(failed.state, UploadState::Failed);
    assert_eq!(failed.failure_message.as_deref(), Some("digest mismatch"));
    assert_err!(
        c.set_upload_state("nope", UploadState::Aborted, None),
        CatalogError::NotFound(_)
    );

    // expiry (the session expired in 2000)
    let expired = c.expired_uploads(&imgsrv::catalog::now()).unwrap();
    let expired: Vec<&str> = expired.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(expired, [s.id.as_str()]);
    assert!(c
        .expired_uploads("1999-01-01T00:00:00Z")
        .unwrap()
        .is_empty());
    assert!(
        !c.delete_upload(&s.id, "1999-01-01T00:00:00Z").unwrap(),
        "not expired then"
    );
    assert!(c.delete_upload(&s.id, &imgsrv::catalog::now()).unwrap());
    assert_err!(c.get_upload(&s.id), CatalogError::NotFound(_));
    assert!(c.upload_parts(&s.id).unwrap().is_empty());
}

// ------------------------------------------------------------------------ auth

fn principals_grants_and_tokens(f: &Fixture) {
    let c = f.cat.as_ref();
    let roles = c.roles().unwrap();
    let ids: Vec<&str> = roles.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["auth-manager", "content-writer", "reader"]);
    assert_eq!(roles[1].actions, ["content.read", "content.write"]);
    assert_eq!(c.role_actions().unwrap().len(), 4);

    let alice = c.create_principal("alice", "user", "Alice", "{}").unwrap();
    assert!(alice.grants.is_empty());
    assert_err!(
        c.create_principal("alice", "user", "Alice", "{}"),
        CatalogError::AlreadyExists(_)
    );
    assert_err!(
        c.create_principal("Bad Name", "user", "x", "{}"),
        CatalogError::Invalid(_)
    );
    assert_err!(
        c.create_principal("bob", "robot", "x", "{}"),
        CatalogError::Invalid(_)
    );
    c.create_principal("ci", "service", "CI", "{}").unwrap();
    assert_eq!(c.get_principal("alice").unwrap().id, alice.id);
    assert_eq!(c.get_principal(&alice.id).unwrap().name, "alice");
    assert_err!(c.get_principal("nobody"), CatalogError::NotFound(_));

    c.grant(&alice.id, "reader", "debian-*").unwrap();
    c.grant("alice", "reader", "debian-*").unwrap();
    c.grant("alice", "content-writer", "*").unwrap();
    assert_err!(c.grant("alice", "god", "*"), CatalogError::Invalid(_));
    assert_err!(
        c.grant("alice", "reader", "BAD SCOPE"),
        CatalogError::Invalid(_)
    );
    assert_err!(c.grant("nobody", "reader", "*"), CatalogError::NotFound(_));
    let p = c.get_principal("alice").unwrap();
    assert_eq!(p.role_ids, ["content-writer", "reader"]);
    assert_eq!(
        p.grants,
        [
            Grant {
                role: "content-writer".into(),
                scope: "*".into()
            },
            Grant {
                role: "reader".into(),
                scope: "debian-*".into()
            }
        ]
    );
    assert_eq!(c.count_principals_with_role("reader").unwrap(), 1);
    assert_eq!(c.count_principals_with_role("auth-manager").unwrap(), 0);
    c.revoke_grant("alice", "reader", "debian-*").unwrap();
    assert_err!(
        c.revoke_grant("alice", "reader", "debian-*"),
        CatalogError::NotFound(_)
    );
    let names: Vec<String> = c
        .list_principals()
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["alice", "ci"]);

    let token = |name: &str| ApiToken {
        id: new_id(),
        principal_id: alice.id.clone(),
        name: name.into(),
        secret_hash: Digest::of(name.as_bytes()).as_bytes().to_vec(),
        expires_at: None,
        last_used_at: None,
        revoked_at: None,
        created_at: now(),
    };
    let t1 = token("laptop");
    let t2 = token("ci");
    c.insert_token(&t1).unwrap();
    c.insert_token(&t2).unwrap();
    assert_err!(c.insert_token(&t1), CatalogError::AlreadyExists(_));
    assert_err!(
        c.insert_token(&ApiToken {
            id: new_id(),
            principal_id: "nobody".into(),
            ..token("x")
        }),
        CatalogError::NotFound(_)
    );
    assert_eq!(c.get_token(&t1.id).unwrap(), t1);
    assert_eq!(c.get_token(&t1.id).unwrap().secret_hash.len(), 32);
    let listed: Vec<String> = c
        .list_tokens("alice")
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(listed, [t1.id.clone(), t2.id.clone()]);
    c.touch_token(&t1.id).unwrap();
    assert!(c.get_token(&t1.id).unwrap().last_used_at.is_some());
    c.revoke_token(&t1.id).unwrap();
    let revoked_at = c.get_token(&t1.id).unwrap().revoked_at.unwrap();
    c.revoke_token(&t1.id).unwrap();
    assert_eq!(
        c.get_token(&t1.id).unwrap().revoked_at.unwrap(),
        revoked_at,
        "first revocation stays"
    );
    assert_err!(c.revoke_token("nope"), CatalogError::NotFound(_));

    c.delete_principal("alice").unwrap();
    assert_err!(c.get_principal("alice"), CatalogError::NotFound(_));
    assert_err!(c.get_token(&t2.id), CatalogError::NotFound(_));
    assert_eq!(c.count_principals_with_role("content-writer").unwrap(), 0);
    assert_err!(c.delete_principal("alice"), CatalogError::NotFound(_));
}

// ------------------------------------------------------------------------ audit

fn the_audit_log_appends_and_filters(f: &Fixture) {
    let c = f.cat.as_ref();
    let entry = |who: &str, action: &str, target: &str, outcome: &str| AuditEntry {
        principal_id: Some(format!("id-{who}")),
        principal_name: Some(who.into()),
        action: action.into(),
        target: target.into(),
        outcome: outcome.into(),
        status: Some(if outcome == "ok" { 200 } else { 403 }),
        method: Some("POST".into()),
        path: Some("/v1/x".into()),
        remote: Some("127.0.0.1".into()),
        detail: String::new(),
    };
    c.append_audit(&entry("alice", "grant.add", "bob", "ok"))
        .unwrap();
    c.append_audit(&entry("bob", "publish", "debian@1", "denied"))
        .unwrap();
    c.append_audit(&entry("alice", "grant.remove", "bob", "ok"))
        .unwrap();
    c.append_audit(&entry("alice", "publish", "debian@2", "ok"))
        .unwrap();
    assert_err!(
        c.append_audit(&entry("x", "y", "z", "maybe")),
        CatalogError::Invalid(_)
    );

    let all = c.query_audit(&AuditQuery::default()).unwrap();
    assert_eq!(all.len(), 4);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "in append order");
    assert_eq!(
        all[0].entry.detail, "{}",
        "an empty detail is an empty object"
    );
    assert_eq!(all[1].entry.status, Some(403));
    let q = |q: AuditQuery| -> Vec<String> {
        c.query_audit(&q)
            .unwrap()
            .into_iter()
            .map(|r| r.entry.target)
            .collect()
    };
    assert_eq!(
        q(AuditQuery {
            principal: Some("alice".into()),
            ..Default::default()
        })
        .len(),
        3
    );
    assert_eq!(
        q(AuditQuery {
            principal: Some("id-bob".into()),
            ..Default::default()
        }),
        ["debian@1"]
    );
    assert_eq!(
        q(AuditQuery {
            action: Some("grant.".into()),
            ..Default::default()
        }),
        ["bob", "bob"]
    );
    assert_eq!(
        q(AuditQuery {
            action: Some("grant".into()),
            ..Default::default()
        })
        .len(),
        0
    );
    assert_eq!(
        q(AuditQuery {
            outcome: Some("denied".into()),
            ..Default::default()
        }),
        ["debian@1"]
    );
    assert_eq!(
        q(AuditQuery {
            target: Some("debian".into()),
            ..Default::default()
        }),
        ["debian@1", "debian@2"]
    );
    assert_eq!(
        q(AuditQuery {
            after_id: Some(all[1].id),
            limit: Some(1),
            ..Default::default()
        }),
        ["bob"]
    );
    assert_eq!(
        q(AuditQuery {
            since: Some(all[3].at.clone()),
            ..Default::default()
        }),
        ["debian@2"]
    );
    assert_eq!(
        q(AuditQuery {
            until: Some(all[0].at.clone()),
            ..Default::default()
        })
        .len(),
        0
    );
    // appending leaves what was there as it was
    c.append_audit(&entry("carol", "token.create", "carol", "ok"))
        .unwrap();
    assert_eq!(c.query_audit(&AuditQuery::default()).unwrap()[..4], all[..]);
    c.room_for_change().unwrap();
}

// ------------------------------------------------------------------------ lifecycle

fn retire_and_collect_published_versions(f: &Fixture) {
    let c = f.cat.as_ref();
    let v1 = published(c, "debian", "1");
    let v2 = published(c, "debian", "2");
    let (d3, ..) = draft(c, "debian", "3");
    c.put_alias("debian", "stable", "1").unwrap();

    assert_err!(
        c.retire(&d3.id, "old", None, None),
        CatalogError::Precondition(_)
    );
    assert_err!(
        c.retire(&v1.id, "old", None, None),
        CatalogError::Conflict(_)
    );
    c.put_alias("debian", "stable", "2").unwrap();
    assert_err!(
        c.retire(&v1.id, "   ", None, None),
        CatalogError::Invalid(_)
    );
    let r = c
        .retire(&v1.id, "superseded", Some("id-alice"), Some("alice"))
        .unwrap();
    assert_eq!(c.retirement(&v1.id).unwrap(), Some(r.clone()));
    assert!(c.retirement(&v2.id).unwrap().is_none());
    assert_err!(
        c.retire(&v1.id, "again", None, None),
        CatalogError::AlreadyExists(_)
    );
    assert_err!(
        c.put_alias("debian", "old", "1"),
        CatalogError::Precondition(_)
    );

    // out of the listings and the projection, still readable by name
    let listed: Vec<String> = c
        .list_versions("debian", true)
        .unwrap()
        .into_iter()
        .map(|v| v.version)
        .collect();
    assert!(
        !listed.contains(&"1".to_string()) && listed.contains(&"2".to_string()),
        "{listed:?}"
    );
    assert_eq!(
        c.get_version("debian", "1").unwrap().state,
        VersionState::Published
    );
    assert!(c
        .projection_entries()
        .unwrap()
        .iter()
        .all(|e| e.version.id != v1.id));
    let fp = c.projection_rows(&v1.id).unwrap()[0].combined_sha256.hex();
    assert_eq!(
        c.projection_by_fingerprint(&fp).unwrap().len(),
        1,
        "found by fingerprint"
    );

    // collection: idempotent, only for retired versions; its blobs are no longer cited
    let cited = |c: &dyn Catalog| {
        c.cited_blobs()
            .unwrap()
            .iter()
            .filter(|b| b.version_id == v1.id)
            .count()
    };
    assert_eq!(cited(c), 2);
    assert_err!(c.collect_version(&v2.id), CatalogError::Precondition(_));
    c.collect_version(&v1.id).unwrap();
    c.collect_version(&v1.id).unwrap();
    assert_eq!(cited(c), 0);
    let all = c.retirements().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0].image.as_str(), all[0].version.as_str()),
        ("debian", "1")
    );
    assert!(all[0].retirement.collected_at.is_some());
    assert_eq!(all[0].retirement.reason, "superseded");
    assert_eq!(all[0].retirement.principal_name.as_deref(), Some("alice"));
    // a collected version's blob rows may go now
    let root = c.version_view("debian", "1").unwrap().artifacts[0]
        .artifact
        .primary_blob_digest;
    let gone = c.delete_blob_rows(&[root], &mut |_, _| false).unwrap();
    assert_eq!(gone.len(), 1);
    assert!(c.get_blob(&root).unwrap().is_none());
}

// ------------------------------------------------------------------------ maint

fn claims_pins_and_guarded_blob_deletion(f: &Fixture) {
    let c = f.cat.as_ref();
    let (v, _, _, root) = draft(c, "debian", "1");
    let (loose, _) = blob(c, "loose");
    let (pinned, _) = blob(c, "pinned");
    let (uploaded, _) = blob(c, "uploaded");
    let now = now();
    c.create_upload(&UploadSession {
        id: "up-1".into(),
        expected_digest: uploaded,
        expected_size_bytes: 8,
        state: UploadState::Ready,
        expires_at: "2999-01-01T00:00:00Z".into(),
        media_type_hint: None,
        filename_hint: None,
        failure_message: None,
        principal_id: None,
        created_at: now.clone(),
        updated_at: now,
    })
    .unwrap();
    c.pin_blob(&pinned, "mirror:1", "2999-01-01T00:00:00Z")
        .unwrap();
    c.pin_blob(&pinned, "mirror:1", "2100-01-01T00:00:00Z")
        .unwrap();
    c.pin_blob(&pinned, "old:1", "2000-01-01T00:00:00Z")
        .unwrap();

    let claims = c.blob_claims(Some(&root)).unwrap();
    assert_eq!(claims.len(), 1);
    assert!(
        matches!(&claims[0].1, Claim::Version { version_id, state: VersionState::Draft, collected: false, .. } if *version_id == v.id)
    );
    let claims = c.blob_claims(Some(&uploaded)).unwrap();
    assert!(
        matches!(&claims[..], [(_, Claim::Upload { id, state: UploadState::Ready, .. })] if id == "up-1")
    );
    let mut pins: Vec<(String, String)> = c
        .blob_claims(Some(&pinned))
        .unwrap()
        .into_iter()
        .filter_map(|(_, cl)| match cl {
            Claim::Pin { holder, expires_at } => Some((holder, expires_at)),
            _ => None,
        })
        .collect();
    pins.sort();
    assert_eq!(
        pins,
        [
            ("mirror:1".to_string(), "2999-01-01T00:00:00Z".to_string()),
            ("old:1".into(), "2000-01-01T00:00:00Z".into())
        ],
        "the later expiry wins"
    );
    assert!(c.blob_claims(Some(&loose)).unwrap().is_empty());
    assert!(c.blob_claims(None).unwrap().len() >= 5);

    // keep decides, with the claims read in the same transaction
    let mut seen = Vec::new();
    let deleted = c
        .delete_blob_rows(
            &[root, loose, pinned, uploaded, Digest::of(b"absent")],
            &mut |b, claims| {
                seen.push(b.digest);
                !claims.is_empty()
            },
        )
        .unwrap();
    assert_eq!(
        deleted.iter().map(|b| b.digest).collect::<Vec<_>>(),
        [loose]
    );
    assert_eq!(seen.len(), 4, "absent rows are skipped");
    assert!(c.get_blob(&loose).unwrap().is_none() && c.get_blob(&root).unwrap().is_some());

    c.release_pins("mirror:1").unwrap();
    assert!(
        c.blob_claims(Some(&pinned)).unwrap().is_empty(),
        "the holder's and the expired pins go"
    );

    let rows: Vec<Digest> = c
        .blob_rows()
        .unwrap()
        .into_iter()
        .map(|b| b.digest)
        .collect();
    let mut sorted = rows.clone();
    sorted.sort_by_key(|d| d.to_string());
    assert_eq!(rows, sorted, "in digest order");
    let (n, bytes) = c.blob_totals().unwrap();
    assert_eq!(n as usize, rows.len());
    assert_eq!(
        bytes,
        c.blob_rows()
            .unwrap()
            .iter()
            .map(|b| b.size_bytes)
            .sum::<u64>()
    );
    let mut walked = Vec::new();
    c.each_blob(&mut |b| {
        walked.push(b.digest);
        true
    })
    .unwrap();
    assert_eq!(walked, rows);
    let mut first = 0;
    c.each_blob(&mut |_| {
        first += 1;
        false
    })
    .unwrap();
    assert_eq!(first, 1, "false stops the walk");
    let cited = c.cited_blobs().unwrap();
    assert_eq!(cited.len(), 2);
    assert_eq!(
        (cited[0].digest, cited[0].attachment.as_deref()),
        (root, None),
        "the artifact's own blob first"
    );
    assert_eq!(cited[1].attachment.as_deref(), Some("incus.tar.xz"));
    assert!(cited
        .iter()
        .all(|b| !b.published && b.artifact == "default amd64 squashfs"));
}

fn job_locks_exclude_by_mode_across_two_holders(f: &Fixture) {
    let a = f.cat.as_ref();
    let b = (f.reopen)();
    let s1 = a.job_lock("blobs", LockMode::Shared, false).unwrap();
    assert!(s1.is_some());
    let s2 = b.job_lock("blobs", LockMode::Shared, false).unwrap();
    assert!(s2.is_some(), "shared holders together");
    assert!(b
        .job_lock("blobs", LockMode::Exclusive, false)
        .unwrap()
        .is_none());
    drop(s1);
    assert!(
        a.job_lock("blobs", LockMode::Exclusive, false)
            .unwrap()
            .is_none(),
        "one shared holder left"
    );
    drop(s2);
    let x = b.job_lock("blobs", LockMode::Exclusive, false).unwrap();
    assert!(x.is_some());
    assert!(a
        .job_lock("blobs", LockMode::Shared, false)
        .unwrap()
        .is_none());
    assert!(a
        .job_lock("blobs", LockMode::Exclusive, false)
        .unwrap()
        .is_none());
    assert!(
        b.job_lock("blobs", LockMode::Exclusive, false)
            .unwrap()
            .is_none(),
        "not reentrant"
    );
    assert!(
        a.job_lock("gc", LockMode::Exclusive, false)
            .unwrap()
            .is_some(),
        "names are apart"
    );
    drop(x);
    assert!(a
        .job_lock("blobs", LockMode::Exclusive, false)
        .unwrap()
        .is_some());
    assert_err!(
        a.job_lock("../x", LockMode::Shared, false),
        CatalogError::Invalid(_)
    );
    assert_err!(
        a.job_lock("", LockMode::Shared, false),
        CatalogError::Invalid(_)
    );
}

fn a_waiting_job_lock_is_granted_when_the_holder_lets_go(f: &Fixture) {
    let held = f
        .cat
        .job_lock("gc", LockMode::Shared, true)
        .unwrap()
        .unwrap();
    let other = (f.reopen)();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let lock = other.job_lock("gc", LockMode::Exclusive, true).unwrap();
        tx.send(lock.is_some()).unwrap();
        drop(lock);
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "granted while held"
    );
    drop(held);
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(true));
    waiter.join().unwrap();
    assert!(
        f.cat
            .job_lock("gc", LockMode::Exclusive, false)
            .unwrap()
            .is_some(),
        "released"
    );
}

fn the_generation_moves_and_another_instance_sees_it(f: &Fixture) {
    let a = f.cat.as_ref();
    let b = (f.reopen)();
    let g0 = a.generation().unwrap().unwrap();
    assert_eq!(b.generation().unwrap(), Some(g0));
    draft(a, "debian", "1");
    assert_eq!(b.generation().unwrap(), Some(g0), "a draft shows nowhere");
    let (record, projection) = record_for(a, "debian", "1");
    a.publish(&record, &projection).unwrap();
    let g1 = b.generation().unwrap().unwrap();
    assert!(
        g1 > g0,
        "a publish on one instance is seen by the next call on the other"
    );
    assert!(b
        .projection_entries()
        .unwrap()
        .iter()
        .any(|e| e.version.version == "1"));
    b.put_alias("debian", "stable", "1").unwrap();
    let g2 = a.generation().unwrap().unwrap();
    assert!(g2 > g1);
    a.set_visibility("debian", "private").unwrap();
    let g3 = b.generation().unwrap().unwrap();
    assert!(g3 > g2);
    let renewed = b.renew_generation(g3 + 1000).unwrap();
    assert!(renewed > g3 + 1000);
    assert_eq!(a.generation().unwrap(), Some(renewed));
    assert_eq!(
        a.renew_generation(0).unwrap(),
        renewed,
        "already above: kept"
    );
}

fn job_runs_probe_and_integrity(f: &Fixture) {
    let c = f.cat.as_ref();
    c.record_job_run("gc", true, "deleted 3").unwrap();
    c.record_job_run("scrub", false, "2 damaged").unwrap();
    c.record_job_run("gc", false, &"x".repeat(5000)).unwrap();
    let runs = c.job_runs().unwrap();
    assert_eq!(
        runs.iter().map(|r| r.job.as_str()).collect::<Vec<_>>(),
        ["gc", "scrub"]
    );
    assert_eq!(runs[0].last_outcome, "error");
    assert!(runs[0].last_success_at.is_some() && runs[0].last_error_at.is_some());
    assert_eq!(runs[0].detail.len(), 1000, "details are cut");
    assert!(runs[1].last_success_at.is_none());
    assert_err!(
        c.record_job_run(&"j".repeat(40), true, ""),
        CatalogError::Invalid(_)
    );
    c.probe_writable().unwrap();
    assert_eq!(c.check_integrity().unwrap(), Vec::<String>::new());
}

// ------------------------------------------------------------------------ PostgreSQL

#[cfg(feature = "postgres")]
mod pg {
    //! The throwaway cluster (one per test binary, through tests/fixtures/pg-harness,
    //! purged by the harness's watcher when this process ends) and its databases.
    use super::*;
    use imgsrv::catalog::postgres::PgCatalog;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;

    pub const HARNESS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pg-harness");

    /// `pg-harness ARGS...`: its stdout, trimmed; panics with its stderr on failure.
    pub fn harness(args: &[&str]) -> String {
        let out = Command::new(HARNESS)
            .args(args)
            .output()
            .expect("running pg-harness");
        assert!(
            out.status.success(),
            "pg-harness {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A new cluster in a fresh directory, purged when this process ends.
    pub fn cluster() -> PathBuf {
        let dir = tempfile::Builder::new()
            .prefix("imgsrv-pg-")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        harness(&[
            "up",
            dir.to_str().unwrap(),
            "--watch",
            &std::process::id().to_string(),
        ]);
        dir
    }

    /// The cluster shared by the tests that do not stop it.
    pub fn shared() -> &'static Path {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(cluster)
    }

    /// A fresh database in `dir`'s cluster: its URL.
    pub fn database(dir: &Path) -> String {
        let name = format!("t_{}", new_id().replace('-', ""));
        harness(&["createdb", dir.to_str().unwrap(), &name])
    }

    pub fn fixture() -> Fixture {
        let url = database(shared());
        let cat = Box::new(PgCatalog::open(&url).unwrap());
        Fixture {
            cat,
            reopen: Box::new(move || Box::new(PgCatalog::open(&url).unwrap())),
            _keep: Box::new(()),
        }
    }
}

#[cfg(feature = "postgres")]
mod pg_only {
    use super::pg::*;
    use super::*;
    use imgsrv::catalog::postgres::PgCatalog;
    use std::process::Command;

    /// The real `psql` on `url`: (success, stdout + stderr).
    fn psql(url: &str, sql: &str) -> (bool, String) {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", url, "-c", sql])
            .output()
            .expect("running psql");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    #[test]
    fn published_rows_cannot_be_changed_or_deleted_from_psql() {
        let url = database(shared());
        let c = PgCatalog::open(&url).unwrap();
        let v = published(&c, "debian", "1");
        let v2 = published(&c, "debian", "2");
        c.retire(&v2.id, "superseded", None, None).unwrap();
        c.collect_version(&v2.id).unwrap();
        c.append_audit(&AuditEntry {
            action: "publish".into(),
            target: "debian@1".into(),
            outcome: "ok".into(),
            ..Default::default()
        })
        .unwrap();
        let before = c.version_view("debian", "1").unwrap();
        let record = c.publish_record(&v.id).unwrap();
        let audit = c.query_audit(&AuditQuery::default()).unwrap();
        let id = &v.id;
        let id2 = &v2.id;
        for (sql, says) in [
            (format!("UPDATE image_versions SET version = '9' WHERE id = '{id}'"), "immutable: version identity never changes"),
            (format!("UPDATE image_versions SET updated_at = 'x' WHERE id = '{id}'"), "immutable: version is published"),
            (format!("UPDATE image_versions SET state = 'draft' WHERE id = '{id}'"), "immutable"),
            (format!("DELETE FROM image_versions WHERE id = '{id}'"), "immutable: only drafts can be deleted"),
            (format!("UPDATE release_artifacts SET architecture = 'x' WHERE version_id = '{id}'"), "precondition: version is not a draft"),
            (format!("DELETE FROM release_artifacts WHERE version_id = '{id}'"), "precondition: version is not a draft"),
            ("UPDATE artifact_attachments SET name = 'x'".into(), "precondition: version is not a draft"),
            ("DELETE FROM artifact_attachments".into(), "precondition: version is not a draft"),
            (format!("UPDATE version_metadata SET value = 'x' WHERE version_id = '{id}'"), "precondition: version is not a draft"),
            (format!("DELETE FROM version_metadata WHERE version_id = '{id}'"), "precondition: version is not a draft"),
            (format!("INSERT INTO version_metadata VALUES ('{id}', 'k', 'v')"), "precondition: version is not a draft"),
            ("UPDATE publish_records SET signature = 'forged'".into(), "immutable: publish records never change"),
            ("DELETE FROM publish_records".into(), "immutable: publish records never change"),
            ("UPDATE incus_projection SET combined_sha256 = repeat('0', 64)".into(), "immutable: projection rows never change"),
            ("DELETE FROM incus_projection".into(), "immutable: projection rows never change"),
            ("UPDATE audit_log SET outcome = 'denied'".into(), "immutable: the audit log is append-only"),
            ("DELETE FROM audit_log".into(), "immutable: the audit log is append-only"),
            ("UPDATE retirements SET reason = 'x'".into(), "immutable: retirements are append-only"),
            ("DELETE FROM retirements".into(), "immutable: retirements are append-only"),
            ("UPDATE collections SET collected_at = 'x'".into(), "immutable: collections are append-only"),
            ("DELETE FROM collections".into(), "immutable: collections are append-only"),
            ("UPDATE cas_blobs SET size_bytes = 0".into(), "immutable: cas_blobs rows never change"),
            (format!("DELETE FROM cas_blobs WHERE digest = '{}'", before.artifacts[0].artifact.primary_blob_digest), "immutable: blob is referenced by a published version"),
            ("UPDATE catalog_state SET generation = 0".into(), "immutable: the generation counter only moves forward"),
            ("DELETE FROM catalog_state".into(), "immutable: the generation counter is never deleted"),
            ("UPDATE images SET id = 'other'".into(), "immutable: image identity cannot change"),
            ("DELETE FROM images".into(), "immutable: image has versions"),
            (format!("INSERT INTO aliases VALUES ('x', (SELECT image_id FROM image_versions WHERE id = '{id2}'), 'old', '{id2}', 't', 't')"), "precondition: the version is retired"),
            ("TRUNCATE audit_log".into(), "immutable: the audit log is append-only"),
            ("TRUNCATE publish_records CASCADE".into(), "immutable"),
            ("TRUNCATE image_versions CASCADE".into(), "immutable"),
            ("TRUNCATE retirements, collections".into(), "immutable"),
            // the guards fire ALWAYS: not skipped in a replication session
            ("BEGIN; SET LOCAL session_replication_role = replica; DELETE FROM audit_log; COMMIT".into(), "immutable: the audit log is append-only"),
        ] {
            let (ok, out) = psql(&url, &sql);
            assert!(!ok, "psql accepted {sql}: {out}");
            assert!(out.contains(says), "{sql}: {out}");
        }
        assert_eq!(c.version_view("debian", "1").unwrap(), before);
        assert_eq!(c.publish_record(&v.id).unwrap(), record);
        assert_eq!(c.query_audit(&AuditQuery::default()).unwrap(), audit);
        assert!(c
            .retirement(&v2.id)
            .unwrap()
            .unwrap()
            .collected_at
            .is_some());
        // drafts stay writable from psql
        let (d, ..) = draft(&c, "debian", "3");
        let (ok, out) = psql(
            &url,
            &format!(
                "UPDATE version_metadata SET value = 'trixie' WHERE version_id = '{}'",
                d.id
            ),
        );
        assert!(ok, "{out}");
    }

    #[test]
    fn guards_dropped_by_hand_are_reported_and_re_armed_at_open() {
        let url = database(shared());
        let c = PgCatalog::open(&url).unwrap();
        assert_eq!(c.check_integrity().unwrap(), Vec::<String>::new());
        let (ok, out) = psql(
            &url,
            "DROP TRIGGER audit_log_no_change ON audit_log; \
             ALTER TABLE publish_records DISABLE TRIGGER publish_records_no_change; \
             CREATE OR REPLACE FUNCTION imgsrv_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END; $$; \
             DELETE FROM role_actions WHERE role_id = 'reader'",
        );
        assert!(ok, "{out}");
        let problems = c.check_integrity().unwrap();
        let text = problems.join("\n");
        for want in [
            "trigger audit_log_no_change on audit_log is missing",
            "trigger publish_records_no_change on publish_records is disabled",
            "function imgsrv_refuse was changed",
        ] {
            assert!(text.contains(want), "{want} not in {text}");
        }
        drop(c);
        let c = PgCatalog::open(&url).unwrap();
        assert_eq!(c.check_integrity().unwrap(), Vec::<String>::new());
        assert_eq!(c.roles().unwrap()[2].actions, ["content.read"]);
        c.append_audit(&AuditEntry {
            action: "x".into(),
            outcome: "ok".into(),
            ..Default::default()
        })
        .unwrap();
        let (ok, out) = psql(&url, "DELETE FROM audit_log");
        assert!(!ok && out.contains("append-only"), "{out}");
        // a schema from a newer imgsrv is refused, with what to do
        let (ok, out) = psql(
            &url,
            "INSERT INTO schema_migrations VALUES (99, '0099-future', 't')",
        );
        assert!(ok, "{out}");
        let e = PgCatalog::open(&url)
            .err()
            .expect("a newer schema opened")
            .to_string();
        assert!(
            e.contains("newer than this imgsrv") && e.contains("upgrade imgsrv"),
            "{e}"
        );
    }

    #[test]
    fn instances_starting_at_once_migrate_once() {
        let url = database(shared());
        let opened: Vec<_> = (0..6)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || {
                    PgCatalog::open(&url).map(|_| ()).map_err(|e| e.to_string())
                })
            })
            .collect();
        for t in opened {
            t.join().unwrap().unwrap();
        }
        let (ok, out) = psql(&url, "SELECT string_agg(version || ' ' || name, ',' ORDER BY version) FROM schema_migrations");
        assert!(ok, "{out}");
        assert_eq!(out.trim(), "1 0001-schema,2 0002-guards,3 0003-isolation");
        let (ok, out) = psql(&url, "SHOW transaction_isolation");
        assert!(ok, "{out}");
        assert_eq!(
            out.trim(),
            "serializable",
            "other clients are serializable by default"
        );
    }

    #[test]
    fn concurrent_changes_from_two_instances_are_serialized() {
        let url = database(shared());
        let a = PgCatalog::open(&url).unwrap();
        a.create_image("debian", None, None, "public").unwrap();
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let c = PgCatalog::open(&url).unwrap();
                    for i in 0..5 {
                        published(&c, "debian", &format!("{w}.{i}"));
                        c.put_alias("debian", "latest", &format!("{w}.{i}"))
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(a.list_versions("debian", false).unwrap().len(), 20);
        assert_eq!(a.projection_entries().unwrap().len(), 20);
        assert_eq!(a.list_aliases("debian").unwrap().len(), 1);
    }

    /// A psql-like client adds an artifact to a draft inside an open transaction while
    /// imgsrv publishes the draft: one of the two fails, and a published version holds
    /// exactly what its signed manifest lists. At the database's default isolation
    /// (SERIALIZABLE for every client, migration 3) and at READ COMMITTED, which a
    /// client may still ask for (the guards lock and write the version row).
    #[test]
    fn a_client_racing_a_publish_cannot_slip_an_artifact_in() {
        use ::postgres::IsolationLevel::{ReadCommitted, Serializable};
        for level in [Serializable, ReadCommitted] {
            let url = database(shared());
            let c = PgCatalog::open(&url).unwrap();
            let (v, ..) = draft(&c, "debian", "1");
            let (d, s) = blob(&c, "sneaked");
            let (record, projection) = record_for(&c, "debian", "1");
            let mut other = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
            let mut tx = other
                .build_transaction()
                .isolation_level(level)
                .start()
                .unwrap();
            tx.execute(
                "INSERT INTO release_artifacts VALUES ('sneaked', $1, 'default', 'debian', 'arm64', \
                 'squashfs', $2, $3, 'x', 't', 't')",
                &[&v.id, &d.to_string(), &(s as i64)],
            )
            .unwrap();
            let (published, committed) = std::thread::scope(|scope| {
                let publishing = scope.spawn(|| c.publish(&record, &projection));
                std::thread::sleep(Duration::from_millis(300));
                let committed = tx.commit();
                (publishing.join().unwrap(), committed)
            });
            assert!(
                published.is_ok() != committed.is_ok(),
                "{level:?}: exactly one of the two goes through: {published:?} / {committed:?}"
            );
            let view = c.version_view("debian", "1").unwrap();
            if published.is_ok() {
                assert_eq!(
                    imgsrv::manifest::canonical(&view),
                    record.manifest,
                    "{level:?}"
                );
                assert_eq!(view.artifacts.len(), 1);
            } else {
                assert_err!(published, CatalogError::Precondition(_));
                assert_eq!(view.version.state, VersionState::Draft);
                assert_eq!(view.artifacts.len(), 2);
            }
        }
    }

    /// A client deleting a blob row while imgsrv publishes a version citing it: the
    /// version is never published without its blob row.
    #[test]
    fn a_client_racing_a_publish_cannot_delete_its_blob() {
        use ::postgres::IsolationLevel::{ReadCommitted, Serializable};
        for level in [Serializable, ReadCommitted] {
            let url = database(shared());
            let c = PgCatalog::open(&url).unwrap();
            let (_, _, _, root) = draft(&c, "debian", "1");
            let (record, projection) = record_for(&c, "debian", "1");
            let mut other = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
            let mut tx = other
                .build_transaction()
                .isolation_level(level)
                .start()
                .unwrap();
            let deleted = tx
                .execute(
                    "DELETE FROM cas_blobs WHERE digest = $1",
                    &[&root.to_string()],
                )
                .unwrap();
            assert_eq!(deleted, 1);
            let (published, committed) = std::thread::scope(|scope| {
                let publishing = scope.spawn(|| c.publish(&record, &projection));
                std::thread::sleep(Duration::from_millis(300));
                let committed = tx.commit();
                (publishing.join().unwrap(), committed)
            });
            assert!(
                published.is_ok() != committed.is_ok(),
                "{level:?}: exactly one of the two goes through: {published:?} / {committed:?}"
            );
            assert_eq!(
                c.get_blob(&root).unwrap().is_some(),
                published.is_ok(),
                "{level:?}"
            );
        }
    }

    #[test]
    fn a_catalog_reconnects_by_itself_after_the_database_restarted() {
        let dir = cluster();
        let d = dir.to_str().unwrap();
        let url = harness(&["url", d]);
        let c = PgCatalog::open(&url).unwrap();
        published(&c, "debian", "1");
        let lock = c.job_lock("gc", LockMode::Exclusive, false).unwrap();
        assert!(lock.is_some());
        // several pooled connections, all broken by the restart
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| c.list_images(false).unwrap());
            }
        });

        harness(&["stop", d]);
        assert_err!(c.get_image("debian"), CatalogError::Unavailable(_));
        assert_err!(c.generation(), CatalogError::Unavailable(_));
        assert_err!(
            c.create_image("alpine", None, None, "public"),
            CatalogError::Unavailable(_)
        );
        assert_err!(
            c.job_lock("scrub", LockMode::Shared, false),
            CatalogError::Unavailable(_)
        );
        assert_err!(c.probe_writable(), CatalogError::Unavailable(_));
        let e = c.get_image("debian").unwrap_err().to_string();
        assert!(e.contains("unavailable"), "{e}");
        drop(lock);

        harness(&["start", d]);
        // the first call after the restart answers: no broken connection is handed out
        assert_eq!(c.get_image("debian").unwrap().name, "debian");
        for _ in 0..20 {
            assert_eq!(c.list_versions("debian", false).unwrap().len(), 1);
        }
        c.create_image("alpine", None, None, "public").unwrap();
        assert!(
            c.job_lock("gc", LockMode::Exclusive, false)
                .unwrap()
                .is_some(),
            "the lock went with the old session"
        );
        c.probe_writable().unwrap();

        // restarted while idle: every pooled connection is stale, none is used
        harness(&["restart", d]);
        assert_eq!(c.list_images(true).unwrap().len(), 2);
        harness(&["purge", d]);
    }

    #[test]
    fn a_bad_url_says_what_a_good_one_looks_like() {
        let e = PgCatalog::open("postgresql://localhost:notaport/imgsrv")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("postgres_url") && e.contains("postgresql://"),
            "{e}"
        );
        let missing = format!(
            "{}/no_such_database",
            harness(&["url", shared().to_str().unwrap()])
                .rsplit_once('/')
                .unwrap()
                .0
        );
        match PgCatalog::open(&missing) {
            Err(CatalogError::Backend(m)) => assert!(m.contains("does not exist"), "{m}"),
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("opened a database that does not exist"),
        }
        // a role that does not own the database cannot make the schema: told how to fix it
        let url = database(shared());
        let (ok, out) = psql(
            &url,
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'visitor') \
             THEN CREATE ROLE visitor LOGIN; END IF; END $$",
        );
        assert!(ok, "{out}");
        match PgCatalog::open(&url.replacen("postgres@", "visitor@", 1)) {
            Err(CatalogError::Backend(m)) => {
                assert!(
                    m.contains("permission denied") && m.contains("createdb --owner"),
                    "{m}"
                )
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("a role without rights made the schema"),
        }
        let nobody = "postgresql://postgres@%2Ftmp%2Fimgsrv-no-such-dir/imgsrv";
        assert_err!(PgCatalog::open(nobody), CatalogError::Unavailable(_));
    }
}
