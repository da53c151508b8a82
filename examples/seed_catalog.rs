//! Benchmark fixture: fills a data directory's catalog with N published
//! versions, fast, for measuring `/streams/v1/images.json` at scale
//! (contrib/bench/bench.sh sets `BENCH_SEED_CMD` to this).
//!
//!     cargo run --release --example seed_catalog -- DATA_DIR N [IMAGES] [--files] [--garbage M]
//!
//! `--files` also writes each blob's file into the store (for garbage collection
//! and scrub benchmarks, contrib/bench/gc.sh); `--garbage M` adds M blobs (rows
//! and files) that no version cites.
//!
//! It writes catalog rows in one transaction through the same triggers as the
//! server (draft -> publishing -> published, publish record, projection rows).
//! Only catalog rows are written (the projection never reads blobs); the
//! server must be stopped. Signatures are not involved: the records say
//! `skipped`.

use imgsrv::catalog::{ContentCatalog, SqliteCatalog};
use imgsrv::digest::Digest;
use rusqlite::params;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    let files = take_flag(&mut args, "--files");
    let garbage: usize = match args.iter().position(|a| a == "--garbage") {
        Some(i) => {
            anyhow::ensure!(i + 1 < args.len(), "--garbage needs a count");
            let m = args[i + 1].parse()?;
            args.drain(i..i + 2);
            m
        }
        None => 0,
    };
    anyhow::ensure!(
        args.len() >= 3,
        "usage: seed_catalog DATA_DIR N [IMAGES] [--files] [--garbage M]"
    );
    let data = PathBuf::from(&args[1]);
    let n: usize = args[2].parse()?;
    let images: usize = args
        .get(3)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10)
        .max(1);
    let db = data.join("catalog.db");
    // applies migrations if needed
    SqliteCatalog::open(&db)?;
    let mut conn = rusqlite::Connection::open(&db)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF; PRAGMA foreign_keys = ON;",
    )?;
    let tx = conn.transaction()?;
    let now = imgsrv::catalog::now();
    for i in 0..images {
        tx.execute(
            "INSERT OR IGNORE INTO images (id, name, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
            params![format!("seed-image-{i}"), format!("seed-{i}"), now],
        )?;
    }
    for v in 0..n {
        let image = v % images;
        let version = format!("20260101_{v:06}");
        let vid = format!("seed-v-{v}");
        let meta = format!("metadata {v}");
        let root = format!("rootfs {v}");
        let (md, rd) = (Digest::of(meta.as_bytes()), Digest::of(root.as_bytes()));
        for (d, body) in [(md, &meta), (rd, &root)] {
            blob(&tx, &data, d, body.as_bytes(), files, &now)?;
        }
        tx.execute(
            "INSERT INTO image_versions (id, image_id, version, state, created_at, updated_at) \
             VALUES (?1, ?2, ?3, 'draft', ?4, ?4)",
            params![vid, format!("seed-image-{image}"), version, now],
        )?;
        for (k, val) in [("os", "Seed"), ("release", "1"), ("variant", "default")] {
            tx.execute(
                "INSERT INTO version_metadata VALUES (?1, ?2, ?3)",
                params![vid, k, val],
            )?;
        }
        let aid = format!("seed-a-{v}");
        tx.execute(
            "INSERT INTO release_artifacts (id, version_id, variant, operating_system, architecture, format, \
             primary_blob_digest, primary_blob_size_bytes, primary_media_type, created_at, updated_at) \
             VALUES (?1, ?2, 'default', 'seed', 'x86_64', 'squashfs', ?3, ?4, 'application/vnd.squashfs', ?5, ?5)",
            params![aid, vid, rd.to_string(), root.len() as i64, now],
        )?;
        let tid = format!("seed-t-{v}");
        tx.execute(
            "INSERT INTO artifact_attachments (id, artifact_id, name, media_type, blob_digest, blob_size_bytes, \
             created_at, updated_at) VALUES (?1, ?2, 'incus.tar.xz', 'application/x-xz', ?3, ?4, ?5, ?5)",
            params![tid, aid, md.to_string(), meta.len() as i64, now],
        )?;
        tx.execute(
            "UPDATE image_versions SET state = 'publishing' WHERE id = ?1",
            [&vid],
        )?;
        let manifest = format!("seed manifest {v}");
        tx.execute(
            "INSERT INTO publish_records (version_id, manifest, manifest_digest, verification, published_at) \
             VALUES (?1, ?2, ?3, 'skipped', ?4)",
            params![vid, manifest.as_bytes(), Digest::of(manifest.as_bytes()).to_string(), now],
        )?;
        let combined = Digest::of(format!("{meta}{root}").as_bytes());
        tx.execute(
            "INSERT INTO incus_projection VALUES (?1, ?2, ?3, 'squashfs', ?4)",
            params![aid, vid, tid, combined.hex()],
        )?;
        tx.execute(
            "UPDATE image_versions SET state = 'published', published_at = ?2, updated_at = ?2 WHERE id = ?1",
            params![vid, now],
        )?;
    }
    for g in 0..garbage {
        let body = format!("garbage {g}");
        blob(
            &tx,
            &data,
            Digest::of(body.as_bytes()),
            body.as_bytes(),
            true,
            &now,
        )?;
    }
    tx.commit()?;
    let cat = SqliteCatalog::open(&db)?;
    let entries = cat.projection_entries()?;
    println!(
        "seeded {n} versions over {images} images; {} projected artifacts; {garbage} unreferenced blob(s)",
        entries.len()
    );
    Ok(())
}

fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    let had = args.iter().any(|a| a == flag);
    args.retain(|a| a != flag);
    had
}

/// A blob row, and its file when `file` (read-only, as the store leaves it).
fn blob(
    tx: &rusqlite::Transaction,
    data: &std::path::Path,
    d: Digest,
    body: &[u8],
    file: bool,
    now: &str,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO cas_blobs (digest, size_bytes, storage_key, verified_at, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?4)",
        params![d.to_string(), body.len() as i64, d.cas_path(), now],
    )?;
    if file {
        let p = data.join(d.cas_path());
        std::fs::create_dir_all(p.parent().expect("sharded path"))?;
        std::fs::write(&p, body)?;
    }
    Ok(())
}
