//! The contract: [`TransferCatalog`] (what `imgsrv migrate` loads with). A catalog
//! with every kind of row is copied into a fresh one on the same backend, and reads
//! back the same through every read of the traits; the loads go through the guards,
//! which stay armed for the loaded rows and refuse what they refuse for any change.

use super::*;
use imgsrv::catalog::transfer::{all_versions, version_record, KeyStateRecord, VersionRecord};

/// A catalog with drafts, published, retired and collected versions (the latter's
/// blob rows gone), a private image, aliases, principals with grants and tokens, audit
/// rows, job runs, and trusted keys: a scoped active one, a retired one, a revoked
/// one (retired first), one retired and removed, and a revocation of a key id
/// never trusted. Returns the plaintext of a token and a collected version's root.
fn populate(c: &dyn Catalog) -> (String, Digest) {
    published(c, "debian", "1");
    c.put_alias("debian", "stable", "1").unwrap();
    let v2 = published(c, "debian", "2");
    c.retire(&v2.id, "superseded", Some("id-alice"), Some("alice"))
        .unwrap();
    let v3 = published(c, "debian", "3");
    let root3 = c.version_view("debian", "3").unwrap().artifacts[0]
        .artifact
        .primary_blob_digest;
    c.retire(&v3.id, "broken", None, None).unwrap();
    c.collect_version(&v3.id).unwrap();
    let view3 = c.version_view("debian", "3").unwrap();
    let cited: Vec<Digest> = view3
        .artifacts
        .iter()
        .flat_map(|a| {
            std::iter::once(a.artifact.primary_blob_digest)
                .chain(a.attachments.iter().map(|t| t.blob_digest))
        })
        .collect();
    let gone = c.delete_blob_rows(&cited, &mut |_, _| false).unwrap();
    assert_eq!(
        gone.len(),
        2,
        "the collected version's blob rows are deleted"
    );
    draft(c, "debian", "4");
    c.create_image("secret", None, Some("internal"), "private")
        .unwrap();
    published(c, "secret", "1");
    c.put_alias("secret", "latest", "1").unwrap();

    let alice = c
        .create_principal("alice", "user", "Alice", r#"{"team":"ops"}"#)
        .unwrap();
    c.grant(&alice.id, "reader", "debian*").unwrap();
    c.grant(&alice.id, "content-writer", "secret").unwrap();
    let (_, plaintext) = imgsrv::auth::issue_token(c, &alice.id, "laptop", None).unwrap();
    let (old, _) = imgsrv::auth::issue_token(c, &alice.id, "old", None).unwrap();
    c.revoke_token(&old.id).unwrap();
    c.create_principal("ci", "service", "CI", "{}").unwrap();
    for (action, outcome) in [("publish", "ok"), ("denied", "denied"), ("alias.put", "ok")] {
        c.append_audit(&AuditEntry {
            principal_name: Some("alice".into()),
            action: action.into(),
            target: "debian@1".into(),
            outcome: outcome.into(),
            status: Some(201),
            method: Some("POST".into()),
            path: Some("/v1/x".into()),
            remote: Some("192.0.2.1".into()),
            detail: r#"{"n":1}"#.into(),
            ..Default::default()
        })
        .unwrap();
    }
    c.record_job_run("gc", true, "3 blobs").unwrap();
    c.record_job_run("scrub", false, "1 problem").unwrap();

    let mut scoped = super::keys::key("release", "A1");
    scoped.scopes = vec!["debian*".into(), "secret".into()];
    c.add_trusted_key(&scoped).unwrap();
    for (name, id) in [("old", "B2"), ("stolen", "C3"), ("gone", "D4")] {
        c.add_trusted_key(&super::keys::key(name, id)).unwrap();
    }
    c.record_key_state("B2", "old", KeyState::Retired, "2025-01-01T00:00:00Z")
        .unwrap();
    c.record_key_state("C3", "stolen", KeyState::Retired, "2025-02-01T00:00:00Z")
        .unwrap();
    c.record_key_state("C3", "stolen", KeyState::Revoked, "2025-03-01T00:00:00Z")
        .unwrap();
    c.record_key_state("D4", "gone", KeyState::Retired, "2025-04-01T00:00:00Z")
        .unwrap();
    c.remove_trusted_key("D4").unwrap();
    c.record_key_state("E5", "never", KeyState::Revoked, "2025-05-01T00:00:00Z")
        .unwrap();
    (plaintext, root3)
}

/// Loads everything of `src` into `dst`, in dependency order, as `imgsrv migrate` does.
fn copy_all(src: &dyn Catalog, dst: &dyn Catalog) -> Vec<VersionRecord> {
    src.each_blob(&mut |b| {
        dst.load_blob(&b).unwrap();
        true
    })
    .unwrap();
    for p in src.list_principals().unwrap() {
        dst.load_principal(&src.principal_record(&p.id).unwrap())
            .unwrap();
    }
    for i in src.list_images(true).unwrap() {
        dst.load_image(&i).unwrap();
    }
    let mut records = Vec::new();
    for (i, v) in all_versions(src).unwrap() {
        let r = version_record(src, &i, &v).unwrap();
        dst.load_version(&r)
            .unwrap_or_else(|e| panic!("loading {i}@{v}: {e}"));
        records.push(r);
    }
    for (_, a) in src.all_aliases().unwrap() {
        dst.load_alias(&a).unwrap();
    }
    let audit = src.query_audit(&AuditQuery::default()).unwrap();
    dst.load_audit(&audit[..1]).unwrap();
    dst.load_audit(&audit[1..]).unwrap();
    dst.load_audit(&[]).unwrap();
    for j in src.job_runs().unwrap() {
        dst.load_job_run(&j).unwrap();
    }
    let states = src.key_state_records().unwrap();
    let keys = src.trusted_keys().unwrap();
    for k in &keys {
        let mine: Vec<KeyStateRecord> = states
            .iter()
            .filter(|s| s.key_id == k.key_id)
            .cloned()
            .collect();
        dst.load_trusted_key(k, &mine).unwrap();
    }
    for s in states
        .iter()
        .filter(|s| !keys.iter().any(|k| k.key_id == s.key_id))
    {
        dst.load_key_state(s).unwrap();
    }
    records
}

pub fn a_whole_catalog_is_loaded_as_it_was_through_the_guards(f: &Fixture) {
    let src = f.cat.as_ref();
    let (token, collected_root) = populate(src);
    let (dst, _keep) = (f.fresh)();
    let dst = dst.as_ref();
    let records = copy_all(src, dst);
    assert_eq!(records.len(), 5, "every version, retired and drafts too");

    // every read of the traits gives the same back
    assert_eq!(src.blob_rows().unwrap(), dst.blob_rows().unwrap());
    assert_eq!(
        src.list_images(true).unwrap(),
        dst.list_images(true).unwrap()
    );
    assert_eq!(all_versions(src).unwrap(), all_versions(dst).unwrap());
    for r in &records {
        let (i, v) = (&r.version.image_name, &r.version.version);
        assert_eq!(&version_record(dst, i, v).unwrap(), r, "{i}@{v}");
        assert_eq!(
            src.version_view(i, v).unwrap(),
            dst.version_view(i, v).unwrap()
        );
    }
    let retired = |c: &dyn Catalog| -> Vec<_> {
        c.retirements()
            .unwrap()
            .into_iter()
            .map(|r| (r.image, r.version, r.retirement))
            .collect()
    };
    assert_eq!(retired(src), retired(dst));
    assert!(records.iter().any(|r| r.collected()));
    assert_eq!(src.all_aliases().unwrap(), dst.all_aliases().unwrap());
    let fingerprints = |c: &dyn Catalog| -> Vec<(String, String, Digest)> {
        c.projection_entries()
            .unwrap()
            .into_iter()
            .map(|e| (e.version.id, e.artifact.id, e.combined_sha256))
            .collect()
    };
    assert_eq!(fingerprints(src), fingerprints(dst));
    assert_eq!(
        fingerprints(dst).len(),
        2,
        "debian@1 and secret@1 are listed"
    );
    assert_eq!(
        src.list_principals().unwrap(),
        dst.list_principals().unwrap()
    );
    for p in src.list_principals().unwrap() {
        assert_eq!(
            src.principal_record(&p.id).unwrap(),
            dst.principal_record(&p.id).unwrap()
        );
    }
    let alice = dst
        .principal_record(&src.get_principal("alice").unwrap().id)
        .unwrap();
    assert_eq!(alice.attributes, r#"{"team":"ops"}"#);
    assert_eq!(alice.grants.len(), 2);
    assert_eq!(alice.tokens.len(), 2);
    // the same token authenticates on the copy
    let caller = imgsrv::auth::authenticate(dst, &token).expect("the token works on the copy");
    assert_eq!(caller.principal_name, "alice");
    let all = AuditQuery::default();
    assert_eq!(
        src.query_audit(&all).unwrap(),
        dst.query_audit(&all).unwrap()
    );
    assert_eq!(src.job_runs().unwrap(), dst.job_runs().unwrap());
    // the collected version's stand-in blob rows did not outlive its load
    assert_eq!(dst.get_blob(&collected_root).unwrap(), None);
    // the trusted keys, their scopes and states, and the records of keys not listed
    assert_eq!(src.trusted_keys().unwrap(), dst.trusted_keys().unwrap());
    let states = dst.key_state_records().unwrap();
    assert_eq!(src.key_state_records().unwrap(), states);
    let summary: Vec<_> = states
        .iter()
        .map(|s| (s.key_id.as_str(), s.state, s.name.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("B2", KeyState::Retired, "old"),
            ("C3", KeyState::Retired, "stolen"),
            ("C3", KeyState::Revoked, "stolen"),
            ("D4", KeyState::Retired, "gone"),
            ("E5", KeyState::Revoked, "never"),
        ]
    );
    let by_name = |n: &str| {
        dst.trusted_keys()
            .unwrap()
            .into_iter()
            .find(|k| k.name == n)
            .unwrap()
    };
    assert_eq!(by_name("stolen").state(), KeyState::Revoked);
    assert_eq!(
        by_name("stolen").revoked_at.as_deref(),
        Some("2025-03-01T00:00:00Z")
    );
    assert_eq!(by_name("old").state(), KeyState::Retired);
    assert_eq!(by_name("release").scopes, ["debian*", "secret"]);

    // the guards stay armed for the loaded rows
    let v1 = dst.get_version("debian", "1").unwrap();
    assert_err!(
        dst.add_artifact(&v1.id, &artifact(collected_root, 1, "arm64")),
        CatalogError::Precondition(_)
    );
    assert_err!(
        dst.delete_draft("debian", "1"),
        CatalogError::Precondition(_)
    );
    let (record, projection) = record_for(dst, "debian", "1");
    assert_err!(
        dst.publish(&record, &projection),
        CatalogError::Precondition(_)
    );
    let v2 = dst.get_version("debian", "2").unwrap();
    assert_err!(
        dst.put_alias("debian", "stable", "2"),
        CatalogError::Precondition(_)
    );
    assert_err!(
        dst.retire(&v2.id, "again", None, None),
        CatalogError::AlreadyExists(_)
    );
    // appends go after the loaded rows
    let last = src.query_audit(&all).unwrap().last().unwrap().id;
    dst.append_audit(&AuditEntry {
        action: "later".into(),
        outcome: "ok".into(),
        ..Default::default()
    })
    .unwrap();
    let after = dst.query_audit(&all).unwrap();
    assert!(after.last().unwrap().id > last, "{after:?}");
    assert_eq!(after.last().unwrap().entry.action, "later");
    // ... and for the loaded keys: a revoked key stays revoked and listed, a removed
    // or revoked key id is never trusted again
    assert_err!(dst.remove_trusted_key("C3"), CatalogError::Precondition(_));
    assert!(
        !dst.record_key_state("C3", "stolen", KeyState::Revoked, &now())
            .unwrap(),
        "recorded once, with its first time"
    );
    assert_err!(
        dst.record_key_state("C3", "stolen", KeyState::Active, &now()),
        CatalogError::Invalid(_)
    );
    assert_err!(
        dst.add_trusted_key(&super::keys::key("gone", "D4")),
        CatalogError::Precondition(_)
    );
    assert_err!(
        dst.add_trusted_key(&super::keys::key("never", "E5")),
        CatalogError::Precondition(_)
    );
    // the draft is still a draft: it can be published on the copy
    let (record, projection) = record_for(dst, "debian", "4");
    dst.publish(&record, &projection).unwrap();
}

pub fn loads_are_refused_where_the_guards_refuse(f: &Fixture) {
    let src = f.cat.as_ref();
    populate(src);
    let (dst, _keep) = (f.fresh)();
    let dst = dst.as_ref();
    let records = copy_all(src, dst);

    // a row that is there is not loaded again (nor replaced)
    let v1 = records
        .iter()
        .find(|r| r.version.version == "1" && r.version.image_name == "debian")
        .unwrap();
    assert_err!(dst.load_version(v1), CatalogError::AlreadyExists(_));
    let img = src.get_image("debian").unwrap();
    assert_err!(dst.load_image(&img), CatalogError::AlreadyExists(_));
    let b = &src.blob_rows().unwrap()[0];
    assert_err!(dst.load_blob(b), CatalogError::AlreadyExists(_));
    let p = src
        .principal_record(&src.get_principal("ci").unwrap().id)
        .unwrap();
    assert_err!(dst.load_principal(&p), CatalogError::AlreadyExists(_));
    // keys and key states that are there are not loaded again; a key is loaded only
    // with its own states, as they are recorded; no state of a listed key is loaded
    // apart; nothing goes back to active
    let states = src.key_state_records().unwrap();
    let keys = src.trusted_keys().unwrap();
    let of = |id: &str| -> Vec<KeyStateRecord> {
        states.iter().filter(|s| s.key_id == id).cloned().collect()
    };
    let release = keys.iter().find(|k| k.key_id == "A1").unwrap();
    assert_err!(
        dst.load_trusted_key(release, &[]),
        CatalogError::AlreadyExists(_)
    );
    // (a key id with records: the guard says never again before it finds the row)
    let stolen = keys.iter().find(|k| k.key_id == "C3").unwrap();
    assert_err!(
        dst.load_trusted_key(stolen, &of("C3")),
        CatalogError::Precondition(_)
    );
    let loose = states.iter().find(|s| s.key_id == "E5").unwrap();
    assert_err!(dst.load_key_state(loose), CatalogError::AlreadyExists(_));
    let (keyed, _keep3) = (f.fresh)();
    let keyed = keyed.as_ref();
    // (a revoked key without its revocation record, or with another key's)
    assert_err!(
        keyed.load_trusted_key(stolen, &of("C3")[..1]),
        CatalogError::Invalid(_)
    );
    let mut other_states = of("C3");
    other_states[1].key_id = "B2".into();
    assert_err!(
        keyed.load_trusted_key(stolen, &other_states),
        CatalogError::Invalid(_)
    );
    let mut active = loose.clone();
    active.state = KeyState::Active;
    assert_err!(keyed.load_key_state(&active), CatalogError::Invalid(_));
    // the guards: a key id with a record is never added again, not even by a load;
    // a retirement does not follow a revocation
    keyed.load_key_state(loose).unwrap();
    let mut never = super::keys::key("never", "E5");
    never.revoked_at = Some(loose.at.clone());
    assert_err!(
        keyed.load_trusted_key(&never, std::slice::from_ref(loose)),
        CatalogError::Precondition(_)
    );
    let mut late = loose.clone();
    late.state = KeyState::Retired;
    assert_err!(keyed.load_key_state(&late), CatalogError::Precondition(_));
    // a listed key's state is loaded with it, not apart
    keyed.load_trusted_key(release, &[]).unwrap();
    let mut of_listed = loose.clone();
    of_listed.key_id = "A1".into();
    assert_err!(keyed.load_key_state(&of_listed), CatalogError::Invalid(_));
    // nothing of a refused key load stays
    assert_eq!(
        keyed
            .trusted_keys()
            .unwrap()
            .iter()
            .map(|k| k.key_id.as_str())
            .collect::<Vec<_>>(),
        ["A1"]
    );
    assert_eq!(
        keyed.key_state_records().unwrap(),
        std::slice::from_ref(loose)
    );

    // audit rows only after the last one
    let audit = src.query_audit(&AuditQuery::default()).unwrap();
    assert_err!(
        dst.load_audit(&audit[audit.len() - 1..]),
        CatalogError::Precondition(_)
    );

    // a published version whose blob rows are missing is refused whole: nothing of it
    // stays (the publishing guard, as for a publish)
    let (other, _keep2) = (f.fresh)();
    let other = other.as_ref();
    for i in src.list_images(true).unwrap() {
        other.load_image(&i).unwrap();
    }
    assert_err!(other.load_version(v1), CatalogError::Precondition(_));
    assert_err!(other.get_version("debian", "1"), CatalogError::NotFound(_));
    // ... and so is an alias to a version that is not there, or is retired
    let (_, stable) = src
        .all_aliases()
        .unwrap()
        .into_iter()
        .find(|(_, a)| a.alias == "stable")
        .unwrap();
    assert!(other.load_alias(&stable).is_err());
    let mut to_retired = stable.clone();
    to_retired.id = "alias-to-retired".into();
    to_retired.alias = "old".into();
    to_retired.version_id = dst.get_version("debian", "2").unwrap().id;
    assert_err!(dst.load_alias(&to_retired), CatalogError::Precondition(_));
    // a retirement of a version that is a draft is refused (and the draft stays out)
    let mut retired_draft = version_record(src, "debian", "4").unwrap();
    retired_draft.version.id = "draft-retired".into();
    retired_draft.version.version = "5".into();
    retired_draft.artifacts.clear();
    retired_draft.retirement = Some(Retirement {
        version_id: "draft-retired".into(),
        reason: "x".into(),
        principal_id: None,
        principal_name: None,
        retired_at: now(),
        collected_at: None,
    });
    assert_err!(
        dst.load_version(&retired_draft),
        CatalogError::Precondition(_)
    );
    assert_err!(dst.get_version("debian", "5"), CatalogError::NotFound(_));
}
