//! Images, versions, artifacts, attachments, publishing and the trusted keys:
//! the content routes under `/v1/images/...` and `/v1/keys`.

use super::*;
// ------------------------------------------------------------ catalog

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateImage {
    name: String,
    display_name: Option<String>,
    description: Option<String>,
    #[serde(default = "default_visibility")]
    visibility: String,
}

pub(super) fn default_visibility() -> String {
    "public".into()
}

pub(super) fn check_visibility(v: &str) -> Result<(), ApiError> {
    match v {
        "public" | "private" => Ok(()),
        _ => Err(ApiError::bad_request(
            "visibility must be public or private",
        )),
    }
}

pub(super) fn create_image(app: &App, req: &mut Request<'_>, ctx: &mut Ctx) -> Res {
    ctx.op("image.create", "");
    ctx.caller_or_401()?;
    let b: CreateImage = read_json(req)?;
    ctx.target = b.name.clone();
    check("image name", crate::names::image_name, &b.name)?;
    ctx.write(&b.name)?;
    check_visibility(&b.visibility)?;
    ctx.note("visibility", b.visibility.clone());
    for (k, v) in [
        ("display_name", &b.display_name),
        ("description", &b.description),
    ] {
        if v.as_deref()
            .is_some_and(|s| s.trim().is_empty() || s.len() > 4096)
        {
            return Err(ApiError::bad_request(format!(
                "{k} must be non-blank and at most 4096 bytes"
            )));
        }
    }
    let img = app.catalog.create_image(
        &b.name,
        b.display_name.as_deref(),
        b.description.as_deref(),
        &b.visibility,
    )?;
    log::info!("image created: {}", img.name);
    Ok(json(201, &img))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetVisibility {
    visibility: String,
}

pub(super) fn set_visibility(app: &App, req: &mut Request<'_>, ctx: &mut Ctx, name: &str) -> Res {
    ctx.op("image.visibility", name);
    ctx.write(name)?;
    let b: SetVisibility = read_json(req)?;
    check_visibility(&b.visibility)?;
    ctx.note("visibility", b.visibility.clone());
    let img = app.catalog.set_visibility(name, &b.visibility)?;
    log::info!("image {name} is now {}", img.visibility);
    Ok(json(200, &img))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVersion {
    version: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

pub(super) fn create_version(app: &App, req: &mut Request<'_>, ctx: &mut Ctx, name: &str) -> Res {
    ctx.op("version.create", name);
    ctx.write(name)?;
    let b: CreateVersion = read_json(req)?;
    ctx.target = format!("{name}@{}", b.version);
    check("version", crate::names::version, &b.version)?;
    if b.metadata.len() > 256 {
        return Err(ApiError::bad_request("at most 256 metadata entries"));
    }
    for (k, v) in &b.metadata {
        if k.is_empty() || k.len() > 128 || v.len() > 4096 || k.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "invalid metadata entry {k:?}"
            )));
        }
    }
    let v = app.catalog.create_version(name, &b.version, &b.metadata)?;
    Ok(json(201, &v))
}

/// A version view the caller may read: published versions of images it may
/// read; drafts only for writers of the image. Anything else is 404, so
/// drafts and private images are not revealed.
pub(super) fn readable_view(
    app: &App,
    ctx: &mut Ctx,
    name: &str,
    ver: &str,
) -> Result<VersionView, ApiError> {
    ctx.readable_image(app, name)?;
    let view = app.catalog.version_view(name, ver)?;
    if view.version.state != VersionState::Published && !ctx.can_write(name) {
        return Err(ctx.deny(ApiError::not_found(format!(
            "version {name}@{ver} not found"
        ))));
    }
    Ok(view)
}

pub(super) fn publication_json(
    app: &App,
    view: &VersionView,
) -> Result<Option<serde_json::Value>, ApiError> {
    if view.version.state != VersionState::Published {
        return Ok(None);
    }
    let rec = app.catalog.publish_record(&view.version.id)?;
    let rows = app.catalog.projection_rows(&view.version.id)?;
    Ok(Some(publish_record_json(
        &view.image.name,
        &view.version.version,
        &rec,
        &rows,
    )))
}

pub(super) fn publish_record_json(
    image: &str,
    version: &str,
    rec: &PublishRecord,
    rows: &[catalog::ProjectionRow],
) -> serde_json::Value {
    let fps: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            j!({
                "artifact_id": r.artifact_id,
                "type": if r.ftype == "disk-kvm.img" { "virtual-machine" } else { "container" },
                "fingerprint": r.combined_sha256.hex(),
            })
        })
        .collect();
    let mut v = j!({
        "image": image,
        "version": version,
        "state": "published",
        "published_at": rec.published_at,
        "manifest_digest": rec.manifest_digest.to_string(),
        "verification": rec.verification.as_str(),
        "fingerprints": fps,
    });
    if let Some(k) = &rec.signer_key_id {
        v["signer_key_id"] = j!(k);
    }
    if let Some(k) = &rec.signer_key_name {
        v["signer_key_name"] = j!(k);
    }
    v
}

pub(super) fn view_response(app: &App, view: VersionView) -> Res {
    let publication = publication_json(app, &view)?;
    let retirement = app.catalog.retirement(&view.version.id)?;
    let mut v = serde_json::to_value(&view).map_err(|e| ApiError::internal("serializing", e))?;
    if let Some(p) = publication {
        v["publication"] = p;
    }
    if let Some(t) = retirement {
        v["retirement"] =
            serde_json::to_value(&t).map_err(|e| ApiError::internal("serializing", e))?;
    }
    Ok(json(200, &v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetireBody {
    reason: String,
}

/// `POST .../versions/{ver}/retire {"reason": "..."}`: 200 with the retirement.
pub(super) fn retire(
    app: &App,
    req: &mut Request<'_>,
    ctx: &mut Ctx,
    name: &str,
    ver: &str,
) -> Res {
    ctx.op("version.retire", format!("{name}@{ver}"));
    let c = ctx.write(name)?;
    let (id, who) = (c.principal_id.clone(), c.principal_name.clone());
    let b: RetireBody = read_json(req)?;
    ctx.note("reason", b.reason.clone());
    let t = app.retire(name, ver, &b.reason, Some(&id), Some(&who))?;
    Ok(json(200, &t))
}

pub(super) fn manifest(app: &App, ctx: &mut Ctx, name: &str, ver: &str) -> Res {
    let view = readable_view(app, ctx, name, ver)?;
    let bytes = if view.version.state == VersionState::Published {
        app.catalog.publish_record(&view.version.id)?.manifest
    } else {
        crate::manifest::canonical(&view)
    };
    let etag = format!("\"{}\"", Digest::of(&bytes));
    Ok(Response::new(200)
        .with_header("Content-Type", "application/json")
        .with_header("ETag", etag)
        .with_body(Body::Bytes(bytes)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddArtifact {
    #[serde(default = "default_variant")]
    variant: String,
    operating_system: String,
    architecture: String,
    format: String,
    primary_blob_digest: String,
    primary_blob_size_bytes: u64,
    primary_media_type: String,
}

pub(super) fn default_variant() -> String {
    "default".into()
}

pub(super) fn add_artifact(
    app: &App,
    req: &mut Request<'_>,
    ctx: &mut Ctx,
    name: &str,
    ver: &str,
) -> Res {
    ctx.op("artifact.add", format!("{name}@{ver}"));
    ctx.write(name)?;
    let b: AddArtifact = read_json(req)?;
    check("variant", crate::names::token, &b.variant)?;
    check("operating_system", crate::names::token, &b.operating_system)?;
    check("architecture", crate::names::token, &b.architecture)?;
    if !INCUS_ARCHES.contains(&b.architecture.as_str()) {
        return Err(ApiError::bad_request(format!(
            "architecture {:?} is not one the Incus client knows ({})",
            b.architecture,
            INCUS_ARCHES.join(", ")
        )));
    }
    if !matches!(
        b.format.as_str(),
        "squashfs" | "qcow2" | "tar.xz" | "raw" | "raw.gz"
    ) {
        return Err(ApiError::bad_request(
            "format must be squashfs, qcow2, tar.xz, raw or raw.gz",
        ));
    }
    if b.primary_media_type.trim().is_empty() || b.primary_media_type.len() > 255 {
        return Err(ApiError::bad_request(
            "primary_media_type must be non-blank",
        ));
    }
    let v = app.catalog.get_version(name, ver)?;
    let a = app.catalog.add_artifact(
        &v.id,
        &NewArtifact {
            variant: b.variant,
            operating_system: b.operating_system,
            architecture: b.architecture,
            format: b.format,
            primary_blob_digest: parse_digest(&b.primary_blob_digest)?,
            primary_blob_size_bytes: b.primary_blob_size_bytes,
            primary_media_type: b.primary_media_type,
        },
    )?;
    Ok(json(201, &a))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddAttachment {
    name: String,
    media_type: String,
    blob_digest: String,
    blob_size_bytes: u64,
}

pub(super) fn add_attachment(
    app: &App,
    req: &mut Request<'_>,
    ctx: &mut Ctx,
    name: &str,
    ver: &str,
    artifact: &str,
) -> Res {
    ctx.op("attachment.add", format!("{name}@{ver}/{artifact}"));
    ctx.write(name)?;
    let b: AddAttachment = read_json(req)?;
    check("attachment name", crate::names::attachment_name, &b.name)?;
    if b.media_type.trim().is_empty() || b.media_type.len() > 255 {
        return Err(ApiError::bad_request("media_type must be non-blank"));
    }
    let v = app.catalog.get_version(name, ver)?;
    let a = app.catalog.add_attachment(
        &v.id,
        artifact,
        &NewAttachment {
            name: b.name,
            media_type: b.media_type,
            blob_digest: parse_digest(&b.blob_digest)?,
            blob_size_bytes: b.blob_size_bytes,
        },
    )?;
    Ok(json(201, &a))
}

pub(super) fn download(
    app: &App,
    req: &Request<'_>,
    ctx: &mut Ctx,
    name: &str,
    ver: &str,
    artifact: &str,
    attachment: Option<&str>,
) -> Res {
    // The rule decides first (a private image the caller may not read is a 404 that
    // is audited, and says nothing of what the version holds); then the artifact.
    let view = app.catalog.version_view(name, ver)?;
    let citing = [catalog::BlobRef {
        image: view.image.clone(),
        version_id: view.version.id.clone(),
        published: view.version.state == VersionState::Published,
    }];
    let public = download_allowed(app, ctx, &citing, false, &format!("{name}@{ver}"))?;
    let a = view
        .artifacts
        .iter()
        .find(|a| a.artifact.id == artifact)
        .ok_or_else(|| ApiError::not_found(format!("artifact {artifact} not found")))?;
    let (digest, size, media_type) = match attachment {
        None => (
            &a.artifact.primary_blob_digest,
            a.artifact.primary_blob_size_bytes,
            &a.artifact.primary_media_type,
        ),
        Some(att) => {
            let t = a
                .attachments
                .iter()
                .find(|t| t.id == att)
                .ok_or_else(|| ApiError::not_found(format!("attachment {att} not found")))?;
            (&t.blob_digest, t.blob_size_bytes, &t.media_type)
        }
    };
    serve_blob(app, req, digest, size, media_type, public)
}

// ------------------------------------------------------------ publish

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    signature: Option<String>,
}

pub(super) fn publish(
    app: &App,
    req: &mut Request<'_>,
    ctx: &mut Ctx,
    name: &str,
    ver: &str,
) -> Res {
    ctx.op("publish", format!("{name}@{ver}"));
    let who = ctx.write(name)?.principal_id.clone();
    let body: PublishBody = read_json(req)?;
    match app.publish_version(name, ver, body.signature, Some(&who)) {
        Ok(p) => {
            ctx.note("manifest_digest", p.record.manifest_digest.to_string());
            ctx.note("verification", p.record.verification.as_str());
            if let Some(k) = &p.record.signer_key_id {
                ctx.note("signer_key_id", k.clone());
            }
            Ok(json(
                200,
                &publish_record_json(name, ver, &p.record, &p.projection),
            ))
        }
        Err(e) => {
            if let crate::app::PublishError::Refused {
                manifest_digest: Some(d),
                ..
            } = &e
            {
                ctx.note("manifest_digest", d.to_string());
            }
            ctx.note("refused", e.to_string());
            Err(match e {
                crate::app::PublishError::Refused { reason, .. } => ApiError::precondition(reason),
                crate::app::PublishError::Catalog(e) => e.into(),
                crate::app::PublishError::Store(e) => e.into(),
            })
        }
    }
}

/// The trusted publisher keys with their scopes and states: public
/// information that lets consumers notice a revoked key.
pub(super) fn trusted_keys(app: &App) -> Res {
    let keys = app.trusted_keys().map_err(|e| match e {
        // the database down: 503 with Retry-After, as for every catalog read
        crate::sign::SignError::Catalog(e @ crate::catalog::CatalogError::Unavailable(_)) => {
            ApiError::from(e)
        }
        e => ApiError::internal("reading trusted keys", e),
    })?;
    let list: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            j!({
                "name": k.name,
                "key_id": k.key_id,
                "public_key": k.public_key_text(),
                "scopes": k.policy.scopes,
                "state": k.policy.state,
                "retired_at": k.policy.retired_at,
                "revoked_at": k.policy.revoked_at,
            })
        })
        .collect();
    Ok(json(200, &j!({ "keys": list })))
}
