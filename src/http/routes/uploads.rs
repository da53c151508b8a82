//! `/v1/uploads/*` and `/v1/blobs/{digest}`: the upload sessions (orchestrated by
//! [`crate::uploads`] in `App`) and blob downloads through the one download rule.

use super::*;
// ------------------------------------------------------------ uploads

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BeginUpload {
    expected_digest: String,
    expected_size_bytes: u64,
    media_type_hint: Option<String>,
    filename_hint: Option<String>,
    /// The Incus metadata tarball a root is published with: its fingerprint is
    /// then taken while it arrives (docs/api.md).
    incus_metadata: Option<String>,
}

pub(super) fn begin_upload(app: &App, req: &mut Request<'_>, ctx: &mut Ctx) -> Res {
    ctx.op("upload.begin", "");
    let who = ctx.write_anywhere()?.principal_id.clone();
    let b: BeginUpload = read_json(req)?;
    let digest = parse_digest(&b.expected_digest)?;
    ctx.target = digest.to_string();
    ctx.note("size", b.expected_size_bytes);
    let (s, ready) = app.begin_upload(NewUpload {
        digest,
        size: b.expected_size_bytes,
        media_type_hint: b.media_type_hint,
        filename_hint: b.filename_hint,
        principal_id: who,
        incus_metadata: b.incus_metadata.as_deref().map(parse_digest).transpose()?,
    })?;
    Ok(json(if ready { 200 } else { 201 }, &s))
}

/// `POST /v1/blobs`: a blob sent whole, its digest not declared (docs/api.md).
pub(super) fn upload_whole(app: &App, req: &mut Request<'_>, ctx: &mut Ctx) -> Res {
    ctx.op("upload.whole", "");
    let who = ctx.write_anywhere()?.principal_id.clone();
    let size = req.content_length.ok_or_else(|| {
        ApiError::new(
            411,
            "a blob sent whole needs a Content-Length (or send it in parts: POST /v1/uploads)",
        )
    })?;
    let mut incus_metadata = None;
    let mut filename_hint = None;
    for (k, v) in query_pairs(req) {
        match k.as_str() {
            "incus_metadata" => incus_metadata = Some(parse_digest(&v)?),
            "filename" => filename_hint = Some(v),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {k:?} (known: incus_metadata, filename)"
                )))
            }
        }
    }
    let media_type_hint = req
        .header("content-type")
        .map(str::trim)
        .filter(|t| !t.is_empty() && *t != "application/octet-stream")
        .map(String::from);
    ctx.note("size", size);
    let (s, fresh, fp) = app.upload_whole(
        WholeUpload {
            size,
            media_type_hint,
            filename_hint,
            principal_id: who,
            incus_metadata,
        },
        &mut req.body,
    )?;
    ctx.target = s.expected_digest.to_string();
    #[derive(serde::Serialize)]
    struct Out {
        #[serde(flatten)]
        session: catalog::UploadSession,
        #[serde(skip_serializing_if = "Option::is_none")]
        incus_fingerprint: Option<String>,
    }
    let out = Out {
        session: s,
        incus_fingerprint: fp.map(|d| d.hex().to_string()),
    };
    Ok(json(if fresh { 201 } else { 200 }, &out))
}

pub(super) fn put_part(app: &App, req: &mut Request<'_>, ctx: &mut Ctx, id: &str, n: &str) -> Res {
    ctx.op("upload.part", format!("{id}/{n}"));
    ctx.write_anywhere()?;
    let n: u32 = n
        .parse()
        .ok()
        .filter(|n| (1..=10000).contains(n))
        .ok_or_else(|| ApiError::bad_request("part number must be 1..10000"))?;
    let len = req
        .content_length
        .ok_or_else(|| ApiError::new(411, "upload parts need a Content-Length"))?;
    Ok(json(200, &app.put_part(id, n, len, &mut req.body)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteUpload {
    parts: Vec<CompletePart>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletePart {
    number: u32,
    etag: String,
    size_bytes: u64,
}

pub(super) fn complete_upload(app: &App, req: &mut Request<'_>, ctx: &mut Ctx, id: &str) -> Res {
    ctx.op("upload.complete", id);
    ctx.write_anywhere()?;
    let body: CompleteUpload = read_json(req)?;
    let listed: Vec<ListedPart> = body
        .parts
        .into_iter()
        .map(|p| ListedPart {
            number: p.number,
            etag: p.etag,
            size_bytes: p.size_bytes,
        })
        .collect();
    Ok(json(200, &app.complete_upload(id, &listed)?))
}

pub(super) fn abort_upload(app: &App, ctx: &mut Ctx, id: &str) -> Res {
    ctx.op("upload.abort", id);
    ctx.write_anywhere()?;
    Ok(json(200, &app.abort_upload(id)?))
}

/// `GET /v1/blobs/{digest}`: the bytes, if [`crate::download`]'s rule lets this
/// caller have them through some version citing them.
pub(super) fn get_blob(app: &App, req: &Request<'_>, ctx: &mut Ctx, digest: &str) -> Res {
    let digest = parse_digest(digest)?;
    let what = format!("blob {digest}");
    let blob = app
        .catalog
        .get_blob(&digest)?
        .ok_or_else(|| ApiError::not_found(format!("{what} not found")))?;
    let refs = app.catalog.blob_references(&digest)?;
    let public = download_allowed(app, ctx, &refs, true, &what)?;
    let mt = blob
        .media_type
        .as_deref()
        .unwrap_or("application/octet-stream");
    serve_blob(app, req, &digest, blob.size_bytes, mt, public)
}

/// Applies the download rule; `Ok(public)` when the bytes may be served.
pub(crate) fn download_allowed(
    app: &App,
    ctx: &mut Ctx,
    citing: &[catalog::BlobRef],
    orphan: bool,
    what: &str,
) -> Result<bool, ApiError> {
    use crate::download::Verdict;
    let verdict = app
        .download_verdict(ctx.caller.as_ref(), citing, orphan)
        .map_err(|e| ApiError::internal("checking what may be downloaded", format!("{e:#}")))?;
    match verdict {
        Verdict::Serve { public } => Ok(public),
        Verdict::Hidden => Err(ctx.deny(ApiError::not_found(format!("{what} not found")))),
        Verdict::Withheld(why) => Err(ApiError::new(410, format!("{what}: {why}"))),
    }
}
