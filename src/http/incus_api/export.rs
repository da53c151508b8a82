//! `GET /1.0/images/{fingerprint}/export`: a split image as `multipart/form-data`, the
//! way an Incus server sends it: part `metadata` (the metadata tarball), then part
//! `rootfs` (a container's root) or `rootfs.img` (a VM's disk). The client hashes both
//! parts in order and checks the fingerprint, so the parts carry the stored bytes
//! exactly; they are streamed from the blob store, never held in memory.
//!
//! The boundary is `imgsrv-{fingerprint}`: bytes containing it would contain their
//! own SHA-256, so it cannot occur in them.

use super::super::message::{Body, Request, Response};
use super::super::response::ApiError;
use crate::app::App;
use crate::catalog::ProjectionEntry;
use std::io::{Cursor, Read};

/// File names of the parts, as an Incus server names them: `meta-{fp}.tar.xz` and
/// `{fp}.squashfs` / `{fp}.qcow2` / `{fp}.tar.xz`.
pub fn file_names(fingerprint: &str, ftype: &str) -> (String, String) {
    let ext = match ftype {
        "squashfs" => "squashfs",
        "disk-kvm.img" => "qcow2",
        _ => "tar.xz",
    };
    (
        format!("meta-{fingerprint}.tar.xz"),
        format!("{fingerprint}.{ext}"),
    )
}

/// The response for root `e` (fingerprint `fp`), once the download rule allowed it
/// (`public`: through a published version of a public image).
pub fn respond(
    app: &App,
    req: &Request<'_>,
    e: &ProjectionEntry,
    fp: &str,
    public: bool,
) -> Result<Response, ApiError> {
    let boundary = format!("imgsrv-{fp}");
    let (meta_name, root_name) = file_names(fp, &e.ftype);
    let root_part = if e.ftype == "disk-kvm.img" {
        "rootfs.img"
    } else {
        "rootfs"
    };
    let head = |name: &str, file: &str, first: bool| {
        format!(
            "{}--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n",
            if first { "" } else { "\r\n" }
        )
        .into_bytes()
    };
    let h1 = head("metadata", &meta_name, true);
    let h2 = head(root_part, &root_name, false);
    let tail = format!("\r\n--{boundary}--\r\n").into_bytes();
    let (md, ms) = (&e.metadata.blob_digest, e.metadata.blob_size_bytes);
    let (rd, rs) = (
        &e.artifact.primary_blob_digest,
        e.artifact.primary_blob_size_bytes,
    );
    let len = (h1.len() + h2.len() + tail.len()) as u64 + ms + rs;
    let reader: Box<dyn Read + Send> = if req.method == "HEAD" {
        app.stored_for_download(md, ms)?;
        app.stored_for_download(rd, rs)?;
        Box::new(std::io::empty())
    } else {
        // both opened (and checked) before the answer starts
        let meta = app.open_download(md, ms, 0, ms)?;
        let root = app.open_download(rd, rs, 0, rs)?;
        Box::new(
            Cursor::new(h1)
                .chain(meta)
                .chain(Cursor::new(h2))
                .chain(root)
                .chain(Cursor::new(tail)),
        )
    };
    let cache = if public {
        "public, max-age=31536000, immutable"
    } else {
        "private, max-age=0"
    };
    Ok(Response::new(200)
        .with_header(
            "Content-Type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .with_header("X-Incus-Type", "incus")
        .with_header("Cache-Control", cache)
        .with_body(Body::Reader { reader, len }))
}
