//! PostgreSQL only: what psql can and cannot do to the rows, guards re-armed, migrations
//! of instances starting at once, races with other clients, reconnection after a restart.

use super::pg::*;
use super::*;
use imgsrv::catalog::postgres::PgCatalog;
use std::process::Command;
use std::time::Duration;

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
            std::thread::spawn(move || PgCatalog::open(&url).map(|_| ()).map_err(|e| e.to_string()))
        })
        .collect();
    for t in opened {
        t.join().unwrap().unwrap();
    }
    let (ok, out) = psql(
        &url,
        "SELECT string_agg(version || ' ' || name, ',' ORDER BY version) FROM schema_migrations",
    );
    assert!(ok, "{out}");
    assert_eq!(
        out.trim(),
        "1 0001-schema,2 0002-guards,3 0003-isolation,4 0004-trusted-keys,5 0005-log"
    );
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
    // the log: appends that raced each other were retried, none lost or doubled, and
    // the stored hashes make the tree of the entries
    assert_eq!(a.log_size().unwrap(), 20);
    for w in 0..4 {
        for i in 0..5 {
            assert_eq!(
                a.log_entries_of("debian", &format!("{w}.{i}"))
                    .unwrap()
                    .len(),
                1
            );
        }
    }
    let leaves: Vec<_> = a
        .log_entries(0, 20)
        .unwrap()
        .iter()
        .map(|t| imgsrv::tlog::tree::leaf_hash(t))
        .collect();
    assert_eq!(
        imgsrv::tlog::tree::tree_hash(20, &super::log::Stored(&a)).unwrap(),
        super::log::mth(&leaves)
    );
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
    let lock = c
        .job_lock("gc", LockMode::Exclusive, false)
        .unwrap()
        .unwrap();
    lock.check().unwrap();
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
    assert_err!(lock.check(), CatalogError::Unavailable(_));

    harness(&["start", d]);
    // the first call after the restart answers: no broken connection is handed out
    assert_eq!(c.get_image("debian").unwrap().name, "debian");
    for _ in 0..20 {
        assert_eq!(c.list_versions("debian", false).unwrap().len(), 1);
    }
    c.create_image("alpine", None, None, "public").unwrap();
    let again = c.job_lock("gc", LockMode::Exclusive, false).unwrap();
    assert!(again.is_some(), "the lock went with the old session");
    again.unwrap().check().unwrap();
    // the holder of the old one is told, also once the database is back
    let e = lock.check().unwrap_err().to_string();
    assert!(e.contains("job lock gc was lost"), "{e}");
    drop(lock);
    c.probe_writable().unwrap();

    // restarted while idle: every pooled connection is stale, none is used
    harness(&["restart", d]);
    assert_eq!(c.list_images(true).unwrap().len(), 2);
    harness(&["purge", d]);
}

#[test]
fn a_job_lock_whose_session_was_ended_says_so_and_another_holder_gets_it() {
    let url = database(shared());
    let a = PgCatalog::open(&url).unwrap();
    let b = PgCatalog::open(&url).unwrap();
    let held = a
        .job_lock("blobs", LockMode::Exclusive, false)
        .unwrap()
        .unwrap();
    held.check().unwrap();
    assert!(b
        .job_lock("blobs", LockMode::Shared, false)
        .unwrap()
        .is_none());
    // what an administrator's pg_terminate_backend does to the session holding it
    let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let ended = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid() \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert!(ended >= 1, "{ended}");
    let e = held.check().unwrap_err().to_string();
    assert!(
        e.contains("was lost") && e.contains("another process"),
        "{e}"
    );
    assert!(
        b.job_lock("blobs", LockMode::Exclusive, false)
            .unwrap()
            .is_some(),
        "the lost lock is free for another holder"
    );
    drop(held);
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

/// The HTTP side of an outage, in process (the real App and routes, the catalog swapped
/// for a PostgreSQL one): `/readyz` says the catalog database cannot be reached and
/// catalog-backed routes answer 503 with Retry-After while it is down; both recover by
/// themselves once it is back.
#[test]
fn while_the_database_is_down_requests_answer_503_and_readyz_says_why() {
    use imgsrv::app::{self, App};
    use imgsrv::http::message::Request;
    use imgsrv::http::routes::handle;
    let dir = cluster();
    let d = dir.to_str().unwrap();
    let url = harness(&["url", d]);
    let data = tempfile::tempdir().unwrap();
    app::init(data.path(), &[]).unwrap();
    let mut served = App::open(imgsrv::config::Config::load(data.path(), None).unwrap()).unwrap();
    served.catalog = std::sync::Arc::new(PgCatalog::open(&url).unwrap());
    published(served.catalog.as_ref(), "debian", "1");
    let get = |path: &str| {
        let mut req = Request::for_test("GET", path, &[], Vec::new());
        req.secure = true;
        let r = handle(&served, &mut req);
        let retry = r.headers.iter().any(|(k, _)| k == "Retry-After");
        (
            r.status,
            retry,
            String::from_utf8_lossy(&r.body_bytes()).into_owned(),
        )
    };
    assert_eq!(get("/readyz").0, 204);
    let (status, _, body) = get("/v1/images");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("debian"), "{body}");

    harness(&["stop", d]);
    let (status, retry, body) = get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(retry);
    assert!(
        body.contains("the catalog database cannot be reached"),
        "{body}"
    );
    let (status, retry, body) = get("/v1/images");
    assert_eq!(status, 503, "{body}");
    assert!(retry, "clients are told to retry");
    assert!(!body.contains(d), "no paths for the client: {body}");

    harness(&["start", d]);
    assert_eq!(get("/readyz").0, 204);
    assert_eq!(get("/v1/images").0, 200);
    harness(&["purge", d]);
}

/// What the real `psql` cannot do to the trusted keys' records: the same guards as
/// SQLite's (a revoked key never becomes active again and stays listed; retirements
/// and revocations are never changed, deleted or truncated, not even in a
/// replication session), re-armed at open when dropped.
#[test]
fn key_revocations_cannot_be_undone_from_psql() {
    let url = database(shared());
    let c = PgCatalog::open(&url).unwrap();
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
        ("TRUNCATE key_states".into(), "immutable: key retirements and revocations are append-only"),
        ("TRUNCATE trusted_keys CASCADE".into(), "immutable: trusted_keys is not truncated"),
        ("INSERT INTO key_states VALUES ('A1', 'revoked', 'x', 'later')".into(), "exists"),
        ("INSERT INTO key_states VALUES ('A1', 'retired', 'x', 't')".into(), "precondition: the key is revoked"),
        ("DELETE FROM trusted_keys WHERE name = 'release'".into(), "immutable: a revoked key stays listed"),
        ("UPDATE trusted_keys SET key_id = 'C3'".into(), "immutable: a trusted key's name, key id and public key never change"),
        ("UPDATE trusted_keys SET public_key = 'x'".into(), "immutable"),
        (format!("INSERT INTO trusted_keys VALUES ('old', 'B2', '{pk}', '[]', 't')"), "precondition: this key was retired or revoked"),
        (format!("INSERT INTO trusted_keys VALUES ('new', 'A1', '{pk}', '[]', 't') ON CONFLICT (key_id) DO UPDATE SET name = 'new'"), "a key is never trusted again"),
        ("BEGIN; SET LOCAL session_replication_role = replica; DELETE FROM key_states; COMMIT".into(), "append-only"),
    ] {
        let (ok, out) = psql(&url, &sql);
        assert!(!ok, "psql accepted {sql}: {out}");
        assert!(out.contains(says), "{sql}: {out}");
    }
    let keys = c.trusted_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        (keys[0].key_id.as_str(), keys[0].state()),
        ("A1", KeyState::Revoked)
    );
    // scopes stay writable (`imgsrv key scope`)
    let (ok, out) = psql(&url, "UPDATE trusted_keys SET scopes = '[\"debian-*\"]'");
    assert!(ok, "{out}");
    // a guard dropped by hand is reported, and back at the next open
    let (ok, out) = psql(&url, "DROP TRIGGER key_states_no_change ON key_states");
    assert!(ok, "{out}");
    let problems = c.check_integrity().unwrap().join("\n");
    assert!(
        problems.contains("trigger key_states_no_change on key_states is missing"),
        "{problems}"
    );
    drop(c);
    let c = PgCatalog::open(&url).unwrap();
    assert_eq!(c.check_integrity().unwrap(), Vec::<String>::new());
    let (ok, out) = psql(&url, "DELETE FROM key_states");
    assert!(!ok && out.contains("append-only"), "{out}");
    assert_eq!(c.trusted_keys().unwrap()[0].scopes, ["debian-*"]);
}
