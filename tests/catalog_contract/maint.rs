//! The contract: retirement and collection, claims and pins, job locks, the generation
//! counter, job runs, the write probe and the integrity check.

use super::*;
use std::time::Duration;

// ------------------------------------------------------------------------ lifecycle

pub fn retire_and_collect_published_versions(f: &Fixture) {
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

pub fn claims_pins_and_guarded_blob_deletion(f: &Fixture) {
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

pub fn job_locks_exclude_by_mode_across_two_holders(f: &Fixture) {
    let a = f.cat.as_ref();
    let b = (f.reopen)();
    let s1 = a.job_lock("blobs", LockMode::Shared, false).unwrap();
    assert!(s1.is_some());
    let s2 = b.job_lock("blobs", LockMode::Shared, false).unwrap();
    assert!(s2.is_some(), "shared holders together");
    for held in [&s1, &s2] {
        held.as_ref().unwrap().check().unwrap();
    }
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
    x.as_ref().unwrap().check().unwrap();
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

pub fn a_waiting_job_lock_is_granted_when_the_holder_lets_go(f: &Fixture) {
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

pub fn the_generation_moves_and_another_instance_sees_it(f: &Fixture) {
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

pub fn job_runs_probe_and_integrity(f: &Fixture) {
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
