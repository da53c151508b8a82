//! In-process API tests: the real App, catalog and blob store in a temp dir,
//! handlers called without sockets. Signatures come from the real `minisign`
//! CLI so that what a publisher's stock tool produces is what is tested.

mod support;

use imgsrv::digest::Digest;
use imgsrv::http::message::Request;
use imgsrv::http::routes::handle;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use support::inproc::*;

#[test]
fn signed_publish_projects_incus_fingerprints_and_serves_downloads() {
    let e = env();
    let key = keypair();
    trust(e.dir.path(), &key, "release");
    e.draft("demo", "20250101_0000", META, Some(ROOT), Some(DISK));

    // drafts are invisible to anonymous callers
    assert_eq!(
        e.anon("GET", "/v1/images/demo/versions/20250101_0000")
            .status,
        404
    );
    assert_eq!(
        e.anon("GET", "/v1/images/demo/versions/20250101_0000/manifest")
            .status,
        404
    );
    assert_eq!(e.images_json()["products"].as_object().unwrap().len(), 0);

    let manifest = e.manifest("demo", "20250101_0000");
    let r = e.publish(
        "demo",
        "20250101_0000",
        Some(minisign_sign(&key, &manifest)),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let p = r.json();
    assert_eq!(p["verification"], "verified");
    assert_eq!(p["signer_key_name"], "release");
    assert_eq!(p["manifest_digest"], Digest::of(&manifest).to_string());
    let mut fps: Vec<&str> = p["fingerprints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["fingerprint"].as_str().unwrap())
        .collect();
    fps.sort();
    assert_eq!(fps, [FP_CONTAINER, FP_VM]);

    // the published manifest and signature stay readable and verify with minisign -V
    let m2 = e.anon("GET", "/v1/images/demo/versions/20250101_0000/manifest");
    assert_eq!(m2.body, manifest);
    let sig = e.anon(
        "GET",
        "/v1/images/demo/versions/20250101_0000/manifest.minisig",
    );
    assert_eq!(sig.status, 200);
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("m.json"), &m2.body).unwrap();
    std::fs::write(d.path().join("m.json.minisig"), &sig.body).unwrap();
    support::run_ok(
        Command::new("minisign")
            .args(["-V", "-H", "-p"])
            .arg(&key.public)
            .arg("-m")
            .arg(d.path().join("m.json")),
    );

    // simplestreams
    let ij = e.images_json();
    let products = ij["products"].as_object().unwrap();
    assert_eq!(products.len(), 1);
    let (key_name, prod) = products.iter().next().unwrap();
    assert!(key_name.starts_with("demo:20250101_0000:"));
    let aliases: Vec<&str> = prod["aliases"].as_str().unwrap().split(',').collect();
    for a in [
        "demo/20250101_0000",
        "demo",
        "debian/bookworm/default",
        "debian/bookworm",
    ] {
        assert!(aliases.contains(&a), "{a} missing from {aliases:?}");
    }
    assert_eq!(prod["arch"], "x86_64");
    let items = prod["versions"]["20250101_0000"]["items"]
        .as_object()
        .unwrap();
    assert_eq!(
        items["incus.tar.xz"]["combined_squashfs_sha256"],
        FP_CONTAINER
    );
    assert_eq!(items["incus.tar.xz"]["combined_disk-kvm-img_sha256"], FP_VM);
    assert_eq!(
        items["lxd.tar.xz"]["combined_squashfs_sha256"],
        FP_CONTAINER
    );
    assert_eq!(items["lxd.tar.xz"]["path"], items["incus.tar.xz"]["path"]);
    assert_eq!(items["root.squashfs"]["ftype"], "squashfs");
    assert_eq!(items["root.squashfs"]["size"], 4);
    assert_eq!(items["disk.qcow2"]["ftype"], "disk-kvm.img");
    let idx = e.anon("GET", "/streams/v1/index.json").json();
    assert_eq!(idx["index"]["images"]["products"][0], key_name.as_str());

    // downloads via the paths in the stream, also over plain HTTP (Incus tries it first)
    let root_path = format!("/{}", items["root.squashfs"]["path"].as_str().unwrap());
    let meta_path = format!("/{}", items["incus.tar.xz"]["path"].as_str().unwrap());
    let full = e.anon("GET", &root_path);
    assert_eq!((full.status, full.body.as_slice()), (200, ROOT));
    assert_eq!(
        full.header("etag").unwrap(),
        format!("\"{}\"", Digest::of(ROOT))
    );
    assert_eq!(e.anon("GET", &meta_path).body, META);
    let plain = e.call_full("GET", &root_path, None, &[], &[], false);
    assert_eq!((plain.status, plain.body.as_slice()), (200, ROOT));
    let head = e.anon("HEAD", &root_path);
    assert_eq!(head.status, 200);
    let range = e.call_full(
        "GET",
        &root_path,
        None,
        &[],
        &[("range", "bytes=1-2")],
        true,
    );
    assert_eq!((range.status, range.body.as_slice()), (206, &b"OO"[..]));
    assert_eq!(range.header("content-range"), Some("bytes 1-2/4"));
    let bad = e.call_full("GET", &root_path, None, &[], &[("range", "bytes=9-")], true);
    assert_eq!(bad.status, 416);
    assert_eq!(bad.header("content-range"), Some("bytes */4"));
    let etag = full.header("etag").unwrap().to_string();
    assert_eq!(
        e.call_full(
            "GET",
            &root_path,
            None,
            &[],
            &[("if-none-match", &etag)],
            true
        )
        .status,
        304
    );
    // the blob route serves published blobs anonymously
    assert_eq!(
        e.anon("GET", &format!("/v1/blobs/{}", Digest::of(ROOT)))
            .body,
        ROOT
    );
}

#[test]
fn enforce_refuses_unsigned_wrong_and_unknown_key_and_keeps_the_draft() {
    let e = env();
    let key = keypair();
    let stranger = keypair();
    trust(e.dir.path(), &key, "release");
    e.draft("demo", "20250101_0000", META, Some(ROOT), None);
    let manifest = e.manifest("demo", "20250101_0000");

    let r = e.publish("demo", "20250101_0000", None);
    assert_eq!(r.status, 412);
    assert!(r.detail().contains("no signature"), "{}", r.detail());
    let r = e.publish(
        "demo",
        "20250101_0000",
        Some(minisign_sign(&key, b"some other bytes")),
    );
    assert_eq!(r.status, 412);
    let r = e.publish(
        "demo",
        "20250101_0000",
        Some(minisign_sign(&stranger, &manifest)),
    );
    assert_eq!(r.status, 412);
    assert!(r.detail().to_lowercase().contains("key"), "{}", r.detail());
    let r = e.publish("demo", "20250101_0000", Some("garbage".into()));
    assert_eq!(r.status, 412);
    assert_eq!(e.state("demo", "20250101_0000"), "draft");
    assert_eq!(e.images_json()["products"].as_object().unwrap().len(), 0);

    // a signature over a manifest that changed since it was signed is refused
    let d = e.upload(DISK);
    let a = e.call(
        "POST",
        "/v1/images/demo/versions/20250101_0000/artifacts",
        json!({"operating_system": "debian", "architecture": "x86_64", "format": "qcow2",
               "primary_blob_digest": d.to_string(), "primary_blob_size_bytes": 4, "primary_media_type": "application/x-qemu-disk"}),
    );
    assert_eq!(a.status, 201);
    assert_eq!(
        e.publish(
            "demo",
            "20250101_0000",
            Some(minisign_sign(&key, &manifest))
        )
        .status,
        412
    );
    assert_eq!(e.state("demo", "20250101_0000"), "draft");

    let manifest = e.manifest("demo", "20250101_0000");
    let r = e.publish(
        "demo",
        "20250101_0000",
        Some(minisign_sign(&key, &manifest)),
    );
    assert_eq!(r.status, 200, "{}", r.detail());
    assert_eq!(e.state("demo", "20250101_0000"), "published");
    // published is forever
    assert_eq!(
        e.publish(
            "demo",
            "20250101_0000",
            Some(minisign_sign(&key, &manifest))
        )
        .status,
        412
    );
}

#[test]
fn verification_mode_comes_only_from_the_config_file_and_fails_closed() {
    let warn = env_with("[image_verification]\nmode = \"warn\"\n");
    warn.draft("demo", "20250101_0000", META, Some(ROOT), None);
    let r = warn.publish("demo", "20250101_0000", None);
    assert_eq!(r.status, 200, "{}", r.detail());
    assert_eq!(r.json()["verification"], "unverified");

    let off = env_with("[image_verification]\nmode = \"off\"\n");
    off.draft("demo", "20250101_0000", META, Some(ROOT), None);
    let r = off.publish("demo", "20250101_0000", None);
    assert_eq!(r.json()["verification"], "skipped");

    for unreadable in [
        "[image_verification]\nmode = \"of\"\n",
        "[image_verification]\nmode = false\n",
        "image_verification = 1\n",
    ] {
        let e = env_with(unreadable);
        e.draft("demo", "20250101_0000", META, Some(ROOT), None);
        assert_eq!(
            e.publish("demo", "20250101_0000", None).status,
            412,
            "{unreadable}"
        );
        assert_eq!(e.state("demo", "20250101_0000"), "draft");
    }
}

#[test]
fn published_versions_are_immutable_through_the_api_and_in_sqlite() {
    let e = env_with("[image_verification]\nmode = \"off\"\n");
    e.draft("demo", "20250101_0000", META, Some(ROOT), None);
    assert_eq!(e.publish("demo", "20250101_0000", None).status, 200);
    let view = e
        .call("GET", "/v1/images/demo/versions/20250101_0000", Value::Null)
        .json();
    let art = view["artifacts"][0]["artifact"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let att = view["artifacts"][0]["attachments"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d = e.upload(DISK);
    let add = e.call(
        "POST",
        "/v1/images/demo/versions/20250101_0000/artifacts",
        json!({"operating_system": "debian", "architecture": "x86_64", "format": "qcow2",
               "primary_blob_digest": d.to_string(), "primary_blob_size_bytes": 4, "primary_media_type": "x"}),
    );
    assert_eq!(add.status, 412);
    assert_eq!(
        e.call(
            "DELETE",
            &format!("/v1/images/demo/versions/20250101_0000/artifacts/{art}"),
            Value::Null
        )
        .status,
        412
    );
    assert_eq!(
        e.call(
            "DELETE",
            &format!("/v1/images/demo/versions/20250101_0000/artifacts/{art}/attachments/{att}"),
            Value::Null
        )
        .status,
        412
    );
    let before = e.manifest("demo", "20250101_0000");

    // even the sqlite3 shell cannot change what was published
    let db = e.dir.path().join("catalog.db");
    let root = Digest::of(ROOT).to_string();
    for sql in [
        "UPDATE image_versions SET state = 'draft'".to_string(),
        "UPDATE image_versions SET version = 'x'".to_string(),
        "DELETE FROM image_versions".to_string(),
        "UPDATE release_artifacts SET primary_blob_size_bytes = 5".to_string(),
        format!(
            "UPDATE release_artifacts SET primary_blob_digest = '{}'",
            Digest::of(DISK)
        ),
        "DELETE FROM release_artifacts".to_string(),
        "UPDATE artifact_attachments SET name = 'x'".to_string(),
        "DELETE FROM artifact_attachments".to_string(),
        "UPDATE version_metadata SET value = 'x'".to_string(),
        "DELETE FROM version_metadata".to_string(),
        "INSERT INTO version_metadata SELECT id, 'new', 'x' FROM image_versions".to_string(),
        "UPDATE publish_records SET signature = 'x'".to_string(),
        "DELETE FROM publish_records".to_string(),
        "UPDATE incus_projection SET combined_sha256 = substr(combined_sha256, 2) || '0'"
            .to_string(),
        "DELETE FROM incus_projection".to_string(),
        format!("DELETE FROM cas_blobs WHERE digest = '{root}'"),
        "UPDATE cas_blobs SET size_bytes = 1".to_string(),
        "UPDATE images SET name = 'other'".to_string(),
        "DELETE FROM images".to_string(),
    ] {
        let out = Command::new("sqlite3")
            .arg(&db)
            .arg(&sql)
            .output()
            .expect("sqlite3 CLI installed");
        assert!(!out.status.success(), "sqlite3 accepted: {sql}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("immutable")
                || String::from_utf8_lossy(&out.stderr).contains("precondition"),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(e.manifest("demo", "20250101_0000"), before);
    assert_eq!(e.state("demo", "20250101_0000"), "published");
}

#[test]
fn uploads_refuse_bad_input_and_store_nothing() {
    let e = env();
    let d = Digest::of(b"hello world");
    // wrong bytes for the declared digest
    let s = e.begin_upload(&d, 11).json();
    let id = s["id"].as_str().unwrap();
    let p = e.put_part(id, 1, b"hello WORLD").json();
    let c = e.call(
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        json!({"parts": [{"number": 1, "etag": p["etag"], "size_bytes": 11}]}),
    );
    assert_eq!(c.status, 412);
    assert_eq!(
        e.call("GET", &format!("/v1/uploads/{id}"), Value::Null)
            .json()["state"],
        "failed"
    );
    assert_eq!(
        e.call("GET", &format!("/v1/blobs/{d}"), Value::Null).status,
        404
    );
    assert!(!e.dir.path().join(d.cas_path()).exists());

    // truncated body: Content-Length says more than arrives
    let s = e.begin_upload(&d, 11).json();
    let id = s["id"].as_str().unwrap().to_string();
    let mut req = Request::for_test(
        "PUT",
        &format!("/v1/uploads/{id}/parts/1"),
        &[("authorization", &format!("Bearer {}", e.token))],
        b"hello".to_vec(),
    );
    req.content_length = Some(11);
    let r = handle(&e.app, &mut req);
    assert_eq!(r.status, 400);
    // parts that do not add up
    let p = e.put_part(&id, 1, b"hello").json();
    let c = e.call(
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        json!({"parts": [{"number": 1, "etag": p["etag"], "size_bytes": 5}]}),
    );
    assert_eq!(c.status, 412);
    // a part list that does not match what was uploaded
    let s = e.begin_upload(&d, 11).json();
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(e.put_part(&id, 1, b"hello ").status, 200);
    let p2 = e.put_part(&id, 2, b"world").json();
    let c = e.call("POST", &format!("/v1/uploads/{id}/complete"), json!({"parts": [{"number": 1, "etag": p2["etag"], "size_bytes": 6}, {"number": 2, "etag": p2["etag"], "size_bytes": 5}]}));
    assert_eq!(c.status, 400);
    // re-sending a part replaces it; then a two-part upload completes
    assert_eq!(e.put_part(&id, 1, b"HELLO ").status, 200);
    let p1 = e.put_part(&id, 1, b"hello ").json();
    let c = e.call("POST", &format!("/v1/uploads/{id}/complete"), json!({"parts": [{"number": 1, "etag": p1["etag"], "size_bytes": 6}, {"number": 2, "etag": p2["etag"], "size_bytes": 5}]}));
    assert_eq!(c.status, 200, "{}", c.detail());
    assert_eq!(
        std::fs::read(e.dir.path().join(d.cas_path())).unwrap(),
        b"hello world"
    );
    // completing again returns the ready session
    assert_eq!(
        e.call(
            "POST",
            &format!("/v1/uploads/{id}/complete"),
            json!({"parts": []})
        )
        .json()["state"],
        "ready"
    );
    // a known digest short-circuits; the same digest with another size is refused
    let r = e.begin_upload(&d, 11);
    assert_eq!((r.status, r.json()["state"].as_str()), (200, Some("ready")));
    assert_eq!(e.begin_upload(&d, 12).status, 412);
    // abort
    let s = e.begin_upload(&Digest::of(b"x"), 1).json();
    let id = s["id"].as_str().unwrap();
    assert_eq!(
        e.call("POST", &format!("/v1/uploads/{id}/abort"), Value::Null)
            .json()["state"],
        "aborted"
    );
    assert_eq!(e.put_part(id, 1, b"x").status, 412);
    // nothing half-written is left in tmp/
    assert_eq!(
        std::fs::read_dir(e.dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn malformed_requests_get_clear_errors() {
    let e = env();
    let bad = |body: &[u8]| e.call_full("POST", "/v1/images", Some(&e.token), body, &[], true);
    assert_eq!(bad(b"{not json").status, 400);
    assert_eq!(bad(br#"{"name":"a","unknown":1}"#).status, 400);
    assert_eq!(bad(br#"{"name":"a"} {"name":"b"}"#).status, 400);
    assert_eq!(bad(br#"{"name":"../etc"}"#).status, 400);
    assert_eq!(bad(br#"{"name":"UPPER"}"#).status, 400);
    let big = vec![b' '; (1 << 20) + 10];
    assert_eq!(bad(&big).status, 413);
    let r = bad(b"{bad");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.json()["status"], 400);
    assert_eq!(
        e.call(
            "POST",
            "/v1/uploads",
            json!({"expected_digest": "sha256:XYZ", "expected_size_bytes": 1})
        )
        .status,
        400
    );
    assert_eq!(
        e.call("GET", "/v1/blobs/sha256:..%2F..%2Fetc", Value::Null)
            .status,
        400
    );
    assert_eq!(e.anon("GET", "/v1/images/%2e%2e/versions").status, 400);
    assert_eq!(
        e.call("POST", "/v1/images", json!({"name": "demo"})).status,
        201
    );
    assert_eq!(
        e.call("POST", "/v1/images", json!({"name": "demo"})).status,
        409
    );
    let arch = e.call("POST", "/v1/images/demo/versions", json!({"version": "1"}));
    assert_eq!(arch.status, 201);
    let r = e.call(
        "POST",
        "/v1/images/demo/versions/1/artifacts",
        json!({"operating_system": "debian", "architecture": "z80", "format": "qcow2",
               "primary_blob_digest": Digest::of(b"x").to_string(), "primary_blob_size_bytes": 1, "primary_media_type": "x"}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(e.anon("GET", "/no/such/route").status, 404);
}

#[test]
fn authentication_and_roles() {
    let e = env();
    assert_eq!(e.anon("POST", "/v1/images").status, 401);
    let r = e.call_full(
        "POST",
        "/v1/images",
        Some("imgsrv_0000000000000000_0000"),
        br#"{"name":"a"}"#,
        &[],
        true,
    );
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    // an auth-manager creates a principal without roles and a token for it
    let p = e
        .call(
            "POST",
            "/v1/auth/principals",
            json!({"name": "ci", "kind": "service", "display_name": "ci"}),
        )
        .json();
    let pid = p["id"].as_str().unwrap().to_string();
    let t = e.call(
        "POST",
        &format!("/v1/auth/principals/{pid}/api-tokens"),
        json!({"name": "ci", "expires_at": "2999-01-01T00:00:00Z"}),
    );
    assert_eq!(t.status, 201);
    let tok = t.json()["plaintext"].as_str().unwrap().to_string();
    let tid = t.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        e.call_full(
            "POST",
            "/v1/images",
            Some(&tok),
            br#"{"name":"a"}"#,
            &[],
            true
        )
        .status,
        403
    );
    assert_eq!(
        e.call_full("GET", "/v1/auth/principals", Some(&tok), b"", &[], true)
            .status,
        403
    );
    assert_eq!(
        e.call(
            "PUT",
            &format!("/v1/auth/principals/{pid}/roles/content-writer"),
            Value::Null
        )
        .status,
        204
    );
    assert_eq!(
        e.call_full(
            "POST",
            "/v1/images",
            Some(&tok),
            br#"{"name":"a"}"#,
            &[],
            true
        )
        .status,
        201
    );
    let list = e
        .call(
            "GET",
            &format!("/v1/auth/principals/{pid}/api-tokens"),
            Value::Null,
        )
        .json();
    assert!(list["api_tokens"][0].get("plaintext").is_none());
    assert!(list["api_tokens"][0]["last_used_at"].is_string());
    assert_eq!(
        e.call("DELETE", &format!("/v1/auth/api-tokens/{tid}"), Value::Null)
            .status,
        204
    );
    assert_eq!(
        e.call_full(
            "POST",
            "/v1/images",
            Some(&tok),
            br#"{"name":"b"}"#,
            &[],
            true
        )
        .status,
        401
    );
    assert_eq!(
        e.call(
            "PUT",
            &format!("/v1/auth/principals/{pid}/roles/superuser"),
            Value::Null
        )
        .status,
        400
    );
    assert_eq!(
        e.call(
            "POST",
            &format!("/v1/auth/principals/{pid}/api-tokens"),
            json!({"expires_at": "2000-01-01T00:00:00Z"})
        )
        .status,
        400
    );
    // plain HTTP never carries credentials or writes
    let r = e.call_full(
        "POST",
        "/v1/images",
        Some(&e.token),
        br#"{"name":"c"}"#,
        &[],
        false,
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        e.call_full("GET", "/streams/v1/images.json", None, b"", &[], false)
            .status,
        400
    );
}

#[test]
fn aliases_move_and_pin_versions_in_the_projection() {
    let e = env_with("[image_verification]\nmode = \"off\"\n");
    e.draft("demo", "20250101_0000", META, Some(ROOT), None);
    assert_eq!(
        e.call(
            "PUT",
            "/v1/images/demo/aliases/stable",
            json!({"version": "20250101_0000"})
        )
        .status,
        412,
        "alias to a draft"
    );
    assert_eq!(
        e.call(
            "PUT",
            "/v1/images/demo/aliases/stable",
            json!({"version": "nope"})
        )
        .status,
        404
    );
    assert_eq!(e.publish("demo", "20250101_0000", None).status, 200);
    e.draft("demo", "20250102_0000", b"META2", Some(b"ROOT2"), None);
    assert_eq!(e.publish("demo", "20250102_0000", None).status, 200);
    let r = e.call(
        "PUT",
        "/v1/images/demo/aliases/stable",
        json!({"version": "20250101_0000"}),
    );
    assert_eq!(r.status, 200);
    let etag1 = e
        .anon("GET", "/streams/v1/images.json")
        .header("etag")
        .unwrap()
        .to_string();

    let ij = e.images_json();
    let prods = ij["products"].as_object().unwrap();
    assert_eq!(prods.len(), 2);
    let aliases_of = |ver: &str| -> Vec<String> {
        let p = prods.iter().find(|(k, _)| k.contains(ver)).unwrap().1;
        p["aliases"]
            .as_str()
            .unwrap()
            .split(',')
            .map(String::from)
            .collect()
    };
    let old = aliases_of("20250101_0000");
    let new = aliases_of("20250102_0000");
    assert!(old.contains(&"demo/stable".to_string()) && !new.contains(&"demo/stable".to_string()));
    assert!(
        new.contains(&"demo".to_string()) && !old.contains(&"demo".to_string()),
        "{old:?} {new:?}"
    );
    assert!(
        new.contains(&"debian/bookworm".to_string())
            && !old.contains(&"debian/bookworm".to_string())
    );

    // moving the alias changes the document and its ETag
    assert_eq!(
        e.call(
            "PUT",
            "/v1/images/demo/aliases/stable",
            json!({"version": "20250102_0000"})
        )
        .status,
        200
    );
    let r = e.anon("GET", "/streams/v1/images.json");
    assert_ne!(r.header("etag").unwrap(), etag1);
    assert_eq!(
        e.call_full(
            "GET",
            "/streams/v1/images.json",
            None,
            b"",
            &[("if-none-match", &etag1)],
            true
        )
        .status,
        200
    );
    let etag2 = r.header("etag").unwrap().to_string();
    assert_eq!(
        e.call_full(
            "GET",
            "/streams/v1/images.json",
            None,
            b"",
            &[("if-none-match", &etag2)],
            true
        )
        .status,
        304
    );
    let gz = e.call_full(
        "GET",
        "/streams/v1/images.json",
        None,
        b"",
        &[("accept-encoding", "gzip")],
        true,
    );
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz.body[..]), &mut plain)
        .unwrap();
    assert_eq!(plain, r.body);
    assert_eq!(
        e.anon("GET", "/v1/images/demo/refs/stable").json()["version"]["version"],
        "20250102_0000"
    );
    assert_eq!(
        e.call("DELETE", "/v1/images/demo/aliases/stable", Value::Null)
            .status,
        204
    );
    assert_eq!(e.anon("GET", "/v1/images/demo/aliases/stable").status, 404);
}

#[test]
fn a_fingerprint_appears_once_even_when_republished() {
    let e = env_with("[image_verification]\nmode = \"off\"\n");
    e.draft("demo", "20250101_0000", META, Some(ROOT), None);
    assert_eq!(e.publish("demo", "20250101_0000", None).status, 200);
    e.draft("demo", "20250102_0000", META, Some(ROOT), None);
    assert_eq!(e.publish("demo", "20250102_0000", None).status, 200);
    let ij = e.images_json();
    let text = serde_json::to_string(&ij).unwrap();
    assert_eq!(
        text.matches(&format!("\"combined_squashfs_sha256\":\"{FP_CONTAINER}\""))
            .count(),
        2,
        "incus + lxd items of one version"
    );
    assert!(ij["products"]
        .as_object()
        .unwrap()
        .keys()
        .all(|k| k.contains("20250102_0000")));
}

#[test]
fn keys_are_scoped_retired_and_revoked() {
    let e = env();
    let debian = keypair();
    let other = keypair();
    let cat = catalog_of(e.dir.path());
    let cat = cat.as_ref();
    imgsrv::sign::add_trusted_key(
        cat,
        Some("debian"),
        &debian.public,
        &["debian-*".to_string()],
    )
    .unwrap();
    imgsrv::sign::add_trusted_key(cat, Some("other"), &other.public, &[]).unwrap();
    e.draft("ubuntu-24", "20250101_0000", META, Some(ROOT), None);
    let m = e.manifest("ubuntu-24", "20250101_0000");
    let r = e.publish(
        "ubuntu-24",
        "20250101_0000",
        Some(minisign_sign(&debian, &m)),
    );
    assert_eq!(r.status, 412, "a debian-* key signed ubuntu-24");
    assert!(r.detail().contains("debian-*"), "{}", r.detail());
    assert_eq!(e.state("ubuntu-24", "20250101_0000"), "draft");

    e.draft("debian-12", "20250101_0000", META, Some(ROOT), None);
    let m = e.manifest("debian-12", "20250101_0000");
    assert_eq!(
        e.publish(
            "debian-12",
            "20250101_0000",
            Some(minisign_sign(&debian, &m))
        )
        .status,
        200
    );
    // debian-13: an older version by the other key, the newest by debian
    for (v, key, meta, root) in [
        ("20250101_0000", &other, b"META13a", b"ROOT13a"),
        ("20250102_0000", &debian, b"META13b", b"ROOT13b"),
    ] {
        e.draft("debian-13", v, meta, Some(root), None);
        let m = e.manifest("debian-13", v);
        assert_eq!(
            e.publish("debian-13", v, Some(minisign_sign(key, &m)))
                .status,
            200
        );
    }
    let r = e.call(
        "PUT",
        "/v1/images/debian-13/aliases/stable",
        json!({"version": "20250102_0000"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // retired: no new publications, the old one is still verified and served
    imgsrv::sign::set_key_state(cat, "debian", imgsrv::sign::KeyState::Retired).unwrap();
    e.draft("debian-12", "20250102_0000", b"META2", Some(b"ROOT2"), None);
    let m = e.manifest("debian-12", "20250102_0000");
    let r = e.publish(
        "debian-12",
        "20250102_0000",
        Some(minisign_sign(&debian, &m)),
    );
    assert_eq!(r.status, 412);
    assert!(r.detail().contains("retired"), "{}", r.detail());
    let old = e
        .anon("GET", "/v1/images/debian-12/versions/20250101_0000")
        .json();
    assert_eq!(old["publication"]["verification"], "verified");
    // the other key may sign anything
    assert_eq!(
        e.publish(
            "debian-12",
            "20250102_0000",
            Some(minisign_sign(&other, &m))
        )
        .status,
        200
    );

    let keys = e.anon("GET", "/v1/keys").json();
    let k = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "debian")
        .unwrap()
        .clone();
    assert_eq!(k["state"], "retired");
    assert_eq!(k["scopes"], json!(["debian-*"]));
    assert!(k["public_key"]
        .as_str()
        .unwrap()
        .starts_with("untrusted comment:"));
    let before = projected(&e);
    assert!(before.contains_key("debian-12:20250101_0000"), "{before:?}");
    assert!(before["debian-13:20250102_0000"].contains("debian-13"));
    assert!(before["debian-13:20250102_0000"].contains("debian-13/stable"));
    imgsrv::sign::set_key_state(cat, "debian", imgsrv::sign::KeyState::Revoked).unwrap();
    // Revoked: everything it signed leaves the Simple Streams projection at
    // once (the Incus client checks no signatures), for every caller; the
    // newest remaining version takes over the image's default aliases; the
    // versions stay published in the catalog.
    let after = projected(&e);
    let keys_of = |m: &BTreeMap<String, BTreeSet<String>>| -> BTreeSet<String> {
        m.keys().cloned().collect()
    };
    assert_eq!(
        keys_of(&after),
        ["debian-12:20250102_0000", "debian-13:20250101_0000"]
            .map(String::from)
            .into(),
        "{after:?}"
    );
    assert!(after["debian-13:20250101_0000"].contains("debian-13"));
    assert!(!after
        .values()
        .any(|a| a.contains("debian-13/stable") || a.contains("debian-13/20250102_0000")));
    let admin = e.call("GET", "/streams/v1/images.json", Value::Null);
    assert_eq!(
        keys_of(&products_of(&admin.json())),
        keys_of(&after),
        "an authenticated caller sees no more"
    );
    assert_eq!(e.state("debian-13", "20250102_0000"), "published");
    // its artifacts are withheld too (an Incus daemon caches the index for an
    // hour), also to authenticated callers; the older version still downloads
    for (v, status) in [("20250102_0000", 410), ("20250101_0000", 200)] {
        let path = format!("/v1/images/debian-13/versions/{v}");
        let view = e.call("GET", &path, Value::Null).json();
        let art = view["artifacts"][0]["artifact"]["id"].as_str().unwrap();
        let att = view["artifacts"][0]["attachments"][0]["id"]
            .as_str()
            .unwrap();
        for url in [
            format!("{path}/artifacts/{art}/download"),
            format!("{path}/artifacts/{art}/attachments/{att}/download/incus.tar.xz"),
        ] {
            for r in [e.anon("GET", &url), e.call("GET", &url, Value::Null)] {
                assert_eq!(
                    r.status,
                    status,
                    "{url}: {}",
                    String::from_utf8_lossy(&r.body)
                );
                if status == 410 {
                    assert!(r.detail().contains("revoked"), "{}", r.detail());
                }
            }
        }
        // the manifest and its signature stay readable, for inspection
        let m = e.anon("GET", &format!("{path}/manifest.minisig"));
        assert_eq!(m.status, 200);
    }
    // a trust store the server cannot read serves no projection at all (a key
    // rewritten from the sqlite3 shell, its guard dropped first: the next open
    // puts the guard back)
    let db = e.dir.path().join("catalog.db");
    let sql = |q: &str| {
        let out = Command::new("sqlite3").arg(&db).arg(q).output().unwrap();
        assert!(
            out.status.success(),
            "{q}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let good = sql("SELECT public_key FROM trusted_keys WHERE name = 'other'");
    sql("DROP TRIGGER trusted_keys_identity; \
         UPDATE trusted_keys SET public_key = 'not a minisign key' WHERE name = 'other'");
    let r = e.anon("GET", "/streams/v1/images.json");
    assert_eq!(r.status, 500, "fails closed");
    assert_eq!(e.anon("GET", "/v1/keys").status, 500, "fails closed");
    sql(&format!(
        "UPDATE trusted_keys SET public_key = '{}\n' WHERE name = 'other'",
        good.replace('\'', "''")
    ));
    assert_eq!(keys_of(&projected(&e)), keys_of(&after));
    let keys = e.anon("GET", "/v1/keys").json();
    assert!(keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["name"] == "debian" && k["state"] == "revoked"));
    assert!(
        imgsrv::sign::set_key_state(cat, "debian", imgsrv::sign::KeyState::Retired).is_err(),
        "revocation is final"
    );
}

#[test]
fn every_write_and_refusal_is_in_the_append_only_audit_log() {
    let e = env();
    let key = keypair();
    trust(e.dir.path(), &key, "release");
    e.draft("demo", "20250101_0000", META, Some(ROOT), None);
    let m = e.manifest("demo", "20250101_0000");
    assert_eq!(
        e.publish("demo", "20250101_0000", Some(minisign_sign(&key, b"wrong")))
            .status,
        412
    );
    assert_eq!(
        e.publish("demo", "20250101_0000", Some(minisign_sign(&key, &m)))
            .status,
        200
    );
    assert_eq!(
        e.call(
            "PUT",
            "/v1/images/demo/aliases/stable",
            json!({"version": "20250101_0000"})
        )
        .status,
        200
    );
    assert_eq!(
        e.call(
            "PUT",
            "/v1/images/demo/visibility",
            json!({"visibility": "private"})
        )
        .status,
        200
    );
    assert_eq!(
        e.call("DELETE", "/v1/images/demo/aliases/stable", Value::Null)
            .status,
        204
    );
    assert_eq!(e.anon("POST", "/v1/images").status, 401);
    assert_eq!(e.anon("GET", "/v1/images/demo").status, 404, "private");

    let rows = e.call("GET", "/v1/audit?limit=1000", Value::Null).json()["entries"]
        .as_array()
        .unwrap()
        .clone();
    let find = |action: &str, outcome: &str| -> Vec<Value> {
        rows.iter()
            .filter(|r| r["action"] == action && r["outcome"] == outcome)
            .cloned()
            .collect()
    };
    for (action, n) in [
        ("upload.begin", 2),
        ("upload.part", 2),
        ("upload.complete", 2),
        ("image.create", 1),
        ("version.create", 1),
        ("artifact.add", 1),
        ("attachment.add", 1),
        ("alias.put", 1),
        ("image.visibility", 1),
        ("alias.delete", 1),
    ] {
        let got = find(action, "ok");
        assert_eq!(got.len(), n, "{action}: {rows:#?}");
        assert!(
            got.iter().all(|r| r["principal_name"] == "admin"),
            "{action} without its principal"
        );
    }
    let published = find("publish", "ok");
    assert_eq!(published.len(), 1);
    let detail: Value = serde_json::from_str(published[0]["detail"].as_str().unwrap()).unwrap();
    assert_eq!(detail["manifest_digest"], Digest::of(&m).to_string());
    let minisign_id = support::minisign_key_id(&key.public);
    assert_eq!(
        detail["signer_key_id"],
        minisign_id.as_str(),
        "the id minisign printed"
    );
    let refused = find("publish", "failed");
    assert_eq!(refused.len(), 1, "the refused publish is recorded");
    assert!(refused[0]["detail"].as_str().unwrap().contains("refused"));
    let denied: Vec<&Value> = rows.iter().filter(|r| r["outcome"] == "denied").collect();
    assert_eq!(
        denied.len(),
        2,
        "the anonymous write and the hidden private read: {denied:#?}"
    );
    assert!(denied
        .iter()
        .all(|r| r["principal_name"].is_null() && r["remote"].is_string()));
    // reads that succeed are not audited
    assert!(rows
        .iter()
        .all(|r| r["method"] != "GET" || r["outcome"] == "denied"));

    // JSON lines export, and filters
    let jl = e.call("GET", "/v1/audit?format=jsonl&action=upload.", Value::Null);
    assert_eq!(jl.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = String::from_utf8(jl.body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert!(lines
        .iter()
        .all(|l| l["action"].as_str().unwrap().starts_with("upload.")));
    assert_eq!(e.call("GET", "/v1/audit?bogus=1", Value::Null).status, 400);

    // append-only, even for the sqlite3 shell
    let db = e.dir.path().join("catalog.db");
    for sql in [
        "UPDATE audit_log SET principal_name = 'someone-else'",
        "DELETE FROM audit_log",
        "UPDATE audit_log SET outcome = 'ok' WHERE outcome = 'denied'",
    ] {
        let out = Command::new("sqlite3").arg(&db).arg(sql).output().unwrap();
        assert!(!out.status.success(), "sqlite3 accepted: {sql}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("append-only"));
    }
    let after = e.call("GET", "/v1/audit?limit=1000", Value::Null).json()["entries"]
        .as_array()
        .unwrap()
        .clone();
    assert!(after.len() >= rows.len());
    // every row is still there as it was (the refused statements changed nothing)
    for r in &rows {
        assert!(after.contains(r), "changed or gone: {r}");
    }
}

/// `image:version` of each product in an images.json, with its aliases.
fn products_of(images: &Value) -> BTreeMap<String, BTreeSet<String>> {
    images["products"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, p)| {
            let image_version = key.splitn(3, ':').take(2).collect::<Vec<_>>().join(":");
            let aliases = p["aliases"]
                .as_str()
                .unwrap_or("")
                .split(',')
                .map(String::from)
                .collect();
            (image_version, aliases)
        })
        .collect()
}

/// [`products_of`] the anonymous projection.
fn projected(e: &Env) -> BTreeMap<String, BTreeSet<String>> {
    products_of(&e.images_json())
}

/// RFC 9110: a method a route does not take is 405 with `Allow` (HEAD goes with GET);
/// the engine answers 501 to unknown methods (tests/http_engine.rs).
#[test]
fn wrong_methods_get_405_with_allow() {
    let e = env();
    e.draft("demo", "20250101_0000", META, Some(ROOT), None);
    for (method, path, allow) in [
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/v1/keys", "GET, HEAD"),
        ("PUT", "/v1/images", "GET, POST, HEAD"),
        (
            "PATCH",
            "/v1/images/demo/aliases/stable",
            "GET, PUT, DELETE, HEAD",
        ),
        (
            "GET",
            "/v1/images/demo/versions/20250101_0000/publish",
            "POST",
        ),
        ("OPTIONS", "/v1/uploads", "POST"),
        ("DELETE", "/v1/auth/roles", "GET, HEAD"),
        ("POST", "/v1/auth/principals/admin", "GET, DELETE, HEAD"),
        ("TRACE", "/streams/v1/index.json", "GET, HEAD"),
    ] {
        let r = e.call(method, path, Value::Null);
        assert_eq!(r.status, 405, "{method} {path}: {}", r.detail());
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        assert!(r.detail().contains(allow), "{}", r.detail());
    }
    // HEAD runs the GET handler (the engine drops the body), also where it used to be 404
    for path in ["/v1/images", "/v1/keys", "/v1/images/demo/versions"] {
        assert_eq!(e.call("HEAD", path, Value::Null).status, 200, "HEAD {path}");
    }
    // an unknown path is still 404, whatever the method
    assert_eq!(e.call("DELETE", "/v1/nothing", Value::Null).status, 404);
}

/// A root whose upload names its metadata tarball (`incus_metadata`) has its
/// Incus fingerprint taken as it arrives, in the pass that hashes it: the publish
/// then does not read it again. Shown by changing the stored root's bytes behind
/// the server's back before the publish: the fingerprint published is the one of
/// the bytes that arrived. A root uploaded without the hint, or with a hint that
/// names other metadata than the draft attaches, is read at publish (its
/// fingerprint follows the changed bytes), so the hint never yields a fingerprint
/// of another pair.
#[test]
fn fingerprint_is_taken_while_a_hinted_root_arrives() {
    let e = env_with("[image_verification]\nmode = \"off\"\n");
    let meta = b"METADATA TARBALL".as_slice();
    let other_meta = b"OTHER METADATA".as_slice();
    let md = e.upload(meta);
    let omd = e.upload(other_meta);
    // (root bytes, the metadata its upload names, the metadata the draft attaches)
    type Case<'a> = (&'a [u8], Option<&'a Digest>, &'a [u8], bool);
    let cases: [Case; 3] = [
        (b"ROOT-HINTED", Some(&md), meta, true),
        (b"ROOT-PLAIN!", None, meta, false),
        (b"ROOT-OTHERS", Some(&omd), meta, false),
    ];
    for (i, (root, hint, attached, taken)) in cases.into_iter().enumerate() {
        let d = Digest::of(root);
        let mut begin =
            json!({"expected_digest": d.to_string(), "expected_size_bytes": root.len()});
        if let Some(h) = hint {
            begin["incus_metadata"] = json!(h.to_string());
        }
        let s = e.call("POST", "/v1/uploads", begin);
        assert_eq!(s.status, 201, "{}", String::from_utf8_lossy(&s.body));
        let id = s.json()["id"].as_str().unwrap().to_string();
        let p = e.put_part(&id, 1, root);
        assert_eq!(p.status, 200);
        let etag = p.json()["etag"].as_str().unwrap().to_string();
        let c = e.call(
            "POST",
            &format!("/v1/uploads/{id}/complete"),
            json!({"parts": [{"number": 1, "etag": etag, "size_bytes": root.len()}]}),
        );
        assert_eq!(c.status, 200);
        // the stored bytes change (same length) before the publish
        let blob = e.dir.path().join(d.cas_path());
        let mut changed = root.to_vec();
        changed[0] ^= 0x20;
        let mut perm = std::fs::metadata(&blob).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&blob, perm).unwrap();
        std::fs::write(&blob, &changed).unwrap();
        // an image each: a stream's version keys are publish times (to the second)
        let (name, ver) = (format!("fp{i}"), "20250101_0000");
        let r = e.call("POST", "/v1/images", json!({"name": name}));
        assert!(r.status == 201 || r.status == 409);
        let r = e.call(
            "POST",
            &format!("/v1/images/{name}/versions"),
            json!({"version": ver, "metadata": {"os": "Debian", "release": "bookworm", "variant": "default", "serial": ver}}),
        );
        assert_eq!(r.status, 201);
        let a = e.call(
            "POST",
            &format!("/v1/images/{name}/versions/{ver}/artifacts"),
            json!({"operating_system": "debian", "architecture": "x86_64", "format": "squashfs",
                   "primary_blob_digest": d.to_string(), "primary_blob_size_bytes": root.len(),
                   "primary_media_type": "application/octet-stream"}),
        );
        assert_eq!(a.status, 201);
        let aid = a.json()["id"].as_str().unwrap().to_string();
        let t = e.call(
            "POST",
            &format!("/v1/images/{name}/versions/{ver}/artifacts/{aid}/attachments"),
            json!({"name": "incus.tar.xz", "media_type": "application/x-xz",
                   "blob_digest": Digest::of(attached).to_string(), "blob_size_bytes": attached.len()}),
        );
        assert_eq!(t.status, 201);
        assert_eq!(e.publish(&name, ver, None).status, 200);
        let ij = e.images_json();
        let prod = ij["products"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| k.starts_with(&format!("{name}:")))
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("case {i}: no product {name}"));
        let fp = prod["versions"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| &v["items"]["incus.tar.xz"])
            .find(|it| {
                it["path"]
                    .as_str()
                    .is_some_and(|p| p.contains(&format!("/versions/{ver}/")))
            })
            .and_then(|it| it["combined_squashfs_sha256"].as_str())
            .unwrap_or_else(|| panic!("case {i}: no fingerprint in {prod:#}"))
            .to_string();
        let of = |m: &[u8], r: &[u8]| Digest::of(&[m, r].concat()).hex();
        let expected = if taken {
            of(attached, root)
        } else {
            of(attached, &changed)
        };
        assert_eq!(
            fp, expected,
            "case {i} (fingerprint taken on upload: {taken})"
        );
    }
}

#[test]
fn a_blob_sent_whole_is_stored_under_the_digest_its_bytes_make() {
    let e = env();
    let whole = |query: &str, body: &[u8], token: Option<&str>| {
        e.call_full(
            "POST",
            &format!("/v1/blobs{query}"),
            token,
            body,
            &[("content-type", "application/vnd.squashfs")],
            true,
        )
    };
    let meta = b"METADATA TARBALL".as_slice();
    let md = e.upload(meta);
    let root = b"A ROOT SENT WHOLE".as_slice();
    let d = Digest::of(root);

    // refused, nothing stored: anonymous, over plain HTTP, an unknown parameter, a bad
    // digest, a short body
    assert_eq!(whole("", root, None).status, 401);
    let plain = e.call_full("POST", "/v1/blobs", Some(&e.token), root, &[], false);
    assert_eq!(plain.status, 400, "{}", plain.detail());
    let r = whole("?digest=x", root, Some(&e.token));
    assert_eq!(r.status, 400);
    assert!(r.detail().contains("incus_metadata"), "{}", r.detail());
    assert_eq!(
        whole("?incus_metadata=sha256:zz", root, Some(&e.token)).status,
        400
    );
    let mut req = Request::for_test(
        "POST",
        "/v1/blobs",
        &[("authorization", &format!("Bearer {}", e.token))],
        root[..5].to_vec(),
    );
    req.content_length = Some(root.len() as u64);
    assert_eq!(handle(&e.app, &mut req).status, 400);
    assert!(!e.dir.path().join(d.cas_path()).exists());
    assert_eq!(e.begin_upload(&d, root.len()).json()["state"], "created");

    // stored: a ready session for the digest the bytes make, the fingerprint taken
    let r = whole(
        &format!("?incus_metadata={md}&filename=rootfs.squashfs"),
        root,
        Some(&e.token),
    );
    assert_eq!(r.status, 201, "{}", r.detail());
    let s = r.json();
    assert_eq!(s["state"], "ready");
    assert_eq!(s["expected_digest"], d.to_string());
    assert_eq!(s["expected_size_bytes"], root.len());
    assert_eq!(s["media_type_hint"], "application/vnd.squashfs");
    assert_eq!(s["filename_hint"], "rootfs.squashfs");
    assert_eq!(
        s["incus_fingerprint"],
        Digest::of(&[meta, root].concat()).hex().to_string()
    );
    assert_eq!(
        std::fs::read(e.dir.path().join(d.cas_path())).unwrap(),
        root
    );
    let id = s["id"].as_str().unwrap();
    assert_eq!(
        e.call("GET", &format!("/v1/uploads/{id}"), Value::Null)
            .json()["state"],
        "ready"
    );
    // again: 200, the same bytes; no metadata named, no fingerprint
    let r = whole("", root, Some(&e.token));
    assert_eq!(r.status, 200, "{}", r.detail());
    assert!(r.json().get("incus_fingerprint").is_none());

    // the session's claim keeps the blob from a collection with no grace at all
    let opts = imgsrv::maint::gc::GcOptions {
        grace: std::time::Duration::ZERO,
        retention: Vec::new(),
        actor: "test".into(),
    };
    imgsrv::maint::gc::run(&e.app, &opts, false, &mut |_| {}).unwrap();
    assert_eq!(
        std::fs::read(e.dir.path().join(d.cas_path())).unwrap(),
        root
    );
}
