//! The contract: images, versions, artifacts, attachments, publishing, aliases.

use super::*;

// ------------------------------------------------------------------------ content

pub fn drafts_are_composed_read_back_and_deleted(f: &Fixture) {
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

pub fn a_published_version_cannot_be_changed_through_the_trait(f: &Fixture) {
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

pub fn publish_refuses_a_changed_draft_and_missing_blobs(f: &Fixture) {
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

pub fn aliases_point_only_at_published_versions(f: &Fixture) {
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
