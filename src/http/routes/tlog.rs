//! The transparency log over HTTP (issue 11), read by anyone, as C2SP tlog-tiles
//! lays it out under the prefix `/log/`:
//!
//! * `/log/vkey`: the log's verifier key (signed-note `vkey`), what consumers trust;
//! * `/log/checkpoint`: the newest signed checkpoint;
//! * `/log/tile/<L>/<N>[.p/<W>]` and `/log/tile/entries/<N>[.p/<W>]`: hash tiles and
//!   entry bundles. A full tile never changes (cached for a year, `immutable`); a
//!   partial one of a given width never changes either, but is replaced by wider ones
//!   as the log grows (cached briefly);
//! * `/log/consistency/<old>/<new>`: the RFC 6962 consistency proof between two tree
//!   sizes, one base64 hash per line (tlog-tiles clients compute it from tiles; this
//!   saves a monitor the fetches);
//! * `.../versions/{version}/manifest.tlog-proof` (in [`super::version_routes`]): the
//!   C2SP tlog-proof of a version's publication.
//!
//! * `POST /witness/add-checkpoint`: this server as a witness of other logs
//!   ([`crate::tlog::witness`], C2SP tlog-witness), when `[witness]` is configured.
//!
//! The log is public, private images' entries included: an entry names an image, a
//! version, a manifest digest and a key id, never bytes; a consumer or monitor can
//! only trust a history that everyone sees the same (docs/transparency-log.md).

use super::*;
use crate::ledger::Ledger;

fn ledger(app: &App) -> Result<&Ledger, ApiError> {
    app.ledger.as_deref().ok_or_else(|| {
        ApiError::not_found(
            "this server keeps no transparency log yet: run `imgsrv init` on its data \
             directory (it makes the log's key)",
        )
    })
}

fn text(body: String, cache: &str) -> Response {
    Response::new(200)
        .with_header("Content-Type", "text/plain; charset=utf-8")
        .with_header("Cache-Control", cache)
        .with_body(Body::Bytes(body.into_bytes()))
}

const NO_CACHE: &str = "no-cache";
const FOREVER: &str = "public, max-age=31536000, immutable";
const BRIEFLY: &str = "public, max-age=60";

pub(super) fn log_routes(app: &App, req: &mut Request<'_>, m: &str, rest: &[&str]) -> Res {
    match rest {
        ["vkey"] => methods!(req, "/log/vkey", m; "GET" => {
            Ok(text(format!("{}\n", ledger(app)?.vkey()), NO_CACHE))
        }),
        ["checkpoint"] => methods!(req, "/log/checkpoint", m; "GET" => {
            let (_, note) = ledger(app)?.checkpoint(app.catalog.as_ref())?;
            Ok(text(note, NO_CACHE))
        }),
        ["consistency", old, new] => methods!(req, "/log/consistency/{old}/{new}", m; "GET" => {
            ledger(app)?;
            let size = |s: &str| {
                s.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("tree size {s:?} is not a number"))
                })
            };
            let hashes = Ledger::consistency(app.catalog.as_ref(), size(old)?, size(new)?)?;
            let mut body = String::new();
            for h in hashes {
                body.push_str(&base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    h,
                ));
                body.push('\n');
            }
            Ok(text(body, FOREVER))
        }),
        ["tile", ..] => methods!(req, "/log/tile/{tile}", m; "GET" => {
            let path = rest.join("/");
            let size = app.catalog.log_size()?;
            let (tile, bytes) = ledger(app)?
                .cached_tile(app.catalog.as_ref(), &path, size)?
                .ok_or_else(|| ApiError::not_found(format!(
                    "the log ({size} entries) has no tile {path}"
                )))?;
            Ok(Response::new(200)
                .with_header("Content-Type", "application/octet-stream")
                .with_header("Cache-Control", if tile.is_full() { FOREVER } else { BRIEFLY })
                .with_body(Body::Shared(bytes)))
        }),
        _ => Err(no_route(m, req)),
    }
}

/// `GET .../manifest.tlog-proof`: the proof that the version's publication is in the
/// log, against its newest checkpoint.
pub(super) fn tlog_proof(app: &App, ctx: &mut Ctx, name: &str, ver: &str) -> Res {
    let view = readable_view(app, ctx, name, ver)?;
    if view.version.state != VersionState::Published {
        return Err(ApiError::not_found(format!(
            "{name}@{ver} is not published"
        )));
    }
    let proof = ledger(app)?
        .proof(app.catalog.as_ref(), name, ver)?
        .ok_or_else(|| ApiError::not_found(format!("{name}@{ver} has no entry in the log")))?;
    Ok(text(proof, NO_CACHE))
}

/// The largest `add-checkpoint` body read (63 proof lines and a checkpoint with its
/// signatures fit in a few KiB).
const MAX_WITNESS_BODY: u64 = 64 << 10;

pub(super) fn witness_add_checkpoint(app: &App, req: &mut Request<'_>) -> Res {
    let w = app.witness.as_deref().ok_or_else(|| {
        ApiError::not_found("this server is no witness: it has no [witness] in its configuration")
    })?;
    let mut buf = Vec::new();
    use std::io::Read as _;
    (&mut req.body)
        .take(MAX_WITNESS_BODY + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
    if buf.len() as u64 > MAX_WITNESS_BODY {
        return Err(ApiError::new(
            413,
            "the body is larger than a checkpoint request",
        ));
    }
    let body =
        String::from_utf8(buf).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    match w.add_checkpoint(&body, now) {
        Ok(line) => Ok(text(line, NO_CACHE)),
        Err(crate::tlog::witness::Refusal::SizeMismatch(size)) => Ok(Response::new(409)
            .with_header("Content-Type", "text/x.tlog.size")
            .with_header("Cache-Control", NO_CACHE)
            .with_body(Body::Bytes(format!("{size}\n").into_bytes()))),
        Err(e) => Err(ApiError::new(e.status(), e.to_string())),
    }
}
