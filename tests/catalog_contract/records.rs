//! The contract: blob rows and upload sessions, principals, grants and tokens, the audit log.

use super::*;

// ------------------------------------------------------------------------ blobs

pub fn blob_rows_and_upload_sessions(f: &Fixture) {
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

pub fn principals_grants_and_tokens(f: &Fixture) {
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

pub fn the_audit_log_appends_and_filters(f: &Fixture) {
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
