//! Benchmark fixture: fills a catalog with N published versions, fast, for
//! measuring `/streams/v1/images.json` and publishing at scale
//! (contrib/bench/bench.sh sets `BENCH_SEED_CMD` to this; contrib/bench/full.sh
//! uses its PostgreSQL form).
//!
//!     cargo run --release --example seed_catalog -- DATA_DIR N [IMAGES] [--files] [--garbage M]
//!     cargo run --release --features full --example seed_catalog -- --postgres URL N [IMAGES]
//!
//! The first form writes into `DATA_DIR/catalog.db` (SQLite). `--files` also
//! writes each blob's file into the store (for garbage collection and scrub
//! benchmarks, contrib/bench/gc.sh); `--garbage M` adds M blobs (rows and
//! files) that no version cites.
//!
//! The second form writes the same rows into the PostgreSQL database at URL
//! (the `postgres_url` of a full deployment's `imgsrv.toml`; its migrations are
//! applied first, as `imgsrv init` does). Rows only: no object is written into
//! the bucket, so the seeded versions suit the catalog and publish benchmarks
//! (the projection never reads blobs), not GC, scrub or downloads. It is the
//! fast way to a large PostgreSQL catalog: `imgsrv migrate` of a seeded
//! appliance also copies, reads back and hashes every blob through S3 (2 min 40 s
//! for 10,000 versions on the 2-core development machine; this takes seconds).
//!
//! Both write through the same triggers as the server (draft -> publishing ->
//! published, publish record, projection rows): SQLite in one transaction,
//! PostgreSQL in transactions of 500 versions. The
//! server should be stopped for SQLite (PostgreSQL: a running server sees the
//! versions at its next request, the guards bump the generation counter).
//! Signatures are not involved: the records say `skipped`.

use anyhow::{bail, ensure, Result};
use imgsrv::catalog::{ContentCatalog, SqliteCatalog};
use imgsrv::digest::Digest;
use std::path::{Path, PathBuf};

/// A parameter of a catalog statement.
enum Val {
    S(String),
    I(i64),
    B(Vec<u8>),
}

fn s(v: impl Into<String>) -> Val {
    Val::S(v.into())
}

/// Where the rows go: statements are written with SQLite's `?N` parameters.
trait Sink {
    fn exec(&mut self, sql: &'static str, vals: &[Val]) -> Result<()>;
}

impl Sink for rusqlite::Transaction<'_> {
    fn exec(&mut self, sql: &'static str, vals: &[Val]) -> Result<()> {
        let vals = vals.iter().map(|v| match v {
            Val::S(x) => rusqlite::types::Value::Text(x.clone()),
            Val::I(x) => rusqlite::types::Value::Integer(*x),
            Val::B(x) => rusqlite::types::Value::Blob(x.clone()),
        });
        self.prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(vals))?;
        Ok(())
    }
}

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    let files = take_flag(&mut args, "--files");
    let garbage: usize = match args.iter().position(|a| a == "--garbage") {
        Some(i) => {
            ensure!(i + 1 < args.len(), "--garbage needs a count");
            let m = args[i + 1].parse()?;
            args.drain(i..i + 2);
            m
        }
        None => 0,
    };
    let postgres = match args.iter().position(|a| a == "--postgres") {
        Some(i) => {
            ensure!(
                i + 1 < args.len(),
                "--postgres needs the database URL (postgresql://USER@HOST/DB)"
            );
            let url = args[i + 1].clone();
            args.drain(i..i + 2);
            Some(url)
        }
        None => None,
    };
    let usage = "usage: seed_catalog DATA_DIR N [IMAGES] [--files] [--garbage M]\n       \
                 seed_catalog --postgres URL N [IMAGES]";
    let (n, images) = match (&postgres, args.len()) {
        (None, 3..=4) => (&args[2], args.get(3)),
        (Some(_), 2..=3) => (&args[1], args.get(2)),
        _ => bail!("{usage}"),
    };
    let n: usize = n
        .parse()
        .map_err(|e| anyhow::anyhow!("N: {e} (a version count)\n{usage}"))?;
    let images: usize = images
        .map(|s| s.parse())
        .transpose()
        .map_err(|e| anyhow::anyhow!("IMAGES: {e} (an image count)\n{usage}"))?
        .unwrap_or(10)
        .max(1);
    let now = imgsrv::catalog::now();
    match postgres {
        None => {
            let data = PathBuf::from(&args[1]);
            let db = data.join("catalog.db");
            // applies migrations if needed
            SqliteCatalog::open(&db)?;
            let mut conn = rusqlite::Connection::open(&db)?;
            conn.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF; PRAGMA foreign_keys = ON;",
            )?;
            let mut tx = conn.transaction()?;
            seed_images(&mut tx, images, &now)?;
            seed_versions(&mut tx, files.then_some(&data), 0..n, images, &now)?;
            for g in 0..garbage {
                let body = format!("garbage {g}");
                blob(
                    &mut tx,
                    Some(&data),
                    Digest::of(body.as_bytes()),
                    body.as_bytes(),
                    &now,
                )?;
            }
            tx.commit()?;
            let entries = SqliteCatalog::open(&db)?.projection_entries()?;
            println!(
                "seeded {n} versions over {images} images; {} projected artifacts; {garbage} unreferenced blob(s)",
                entries.len()
            );
        }
        Some(url) => {
            ensure!(
                !files && garbage == 0,
                "--files and --garbage write blob files: they are for the SQLite form \
                 (seed_catalog DATA_DIR N ...), not --postgres"
            );
            let entries = seed_postgres(&url, n, images, &now)?;
            println!(
                "seeded {n} versions over {images} images into PostgreSQL; {entries} projected artifacts"
            );
        }
    }
    Ok(())
}

#[cfg(feature = "postgres")]
fn seed_postgres(url: &str, n: usize, images: usize, now: &str) -> Result<usize> {
    /// The statements of a batch, their parameters written in as literals, sent
    /// as one simple query (one round trip instead of one per row: 5 ms per
    /// version on a busy 2-core machine, most of it waiting for the socket).
    #[derive(Default)]
    struct Pg {
        sql: String,
    }
    impl Sink for Pg {
        fn exec(&mut self, sql: &'static str, vals: &[Val]) -> Result<()> {
            let mut rest = sql;
            if let Some(r) = rest.strip_prefix("INSERT OR IGNORE INTO") {
                self.sql.push_str("INSERT INTO");
                rest = r;
            }
            while let Some(q) = rest.find('?') {
                self.sql.push_str(&rest[..q]);
                let digits = rest[q + 1..].bytes().take_while(u8::is_ascii_digit).count();
                let i: usize = rest[q + 1..q + 1 + digits].parse()?;
                match vals.get(i.wrapping_sub(1)) {
                    Some(Val::S(x)) => {
                        self.sql.push('\'');
                        self.sql.push_str(&x.replace('\'', "''"));
                        self.sql.push('\'');
                    }
                    Some(Val::I(x)) => self.sql.push_str(&x.to_string()),
                    Some(Val::B(x)) => {
                        self.sql.push_str("'\\x");
                        for b in x {
                            self.sql.push_str(&format!("{b:02x}"));
                        }
                        self.sql.push_str("'::bytea");
                    }
                    None => bail!("statement without parameter ?{i}: {sql}"),
                }
                rest = &rest[q + 1 + digits..];
            }
            self.sql.push_str(rest);
            if sql.starts_with("INSERT OR IGNORE INTO") {
                self.sql.push_str(" ON CONFLICT DO NOTHING");
            }
            self.sql.push_str(";\n");
            Ok(())
        }
    }

    // connects and applies the migrations, as every imgsrv command does
    let cat = imgsrv::catalog::postgres::PgCatalog::open(url)?;
    let config: postgres::Config = url.parse()?;
    let mut client = config.connect(postgres::NoTls)?;
    // In transactions of 500 versions: each publish bumps the one generation row,
    // whose dead versions one long transaction would pile up.
    let mut done = 0;
    while done < n {
        let batch = (n - done).min(500);
        let mut pg = Pg::default();
        if done == 0 {
            seed_images(&mut pg, images, now)?;
        }
        seed_versions(&mut pg, None, done..done + batch, images, now)?;
        client.batch_execute(&format!("BEGIN;\n{}COMMIT;", pg.sql))?;
        done += batch;
    }
    Ok(cat.projection_entries()?.len())
}

#[cfg(not(feature = "postgres"))]
fn seed_postgres(_url: &str, _n: usize, _images: usize, _now: &str) -> Result<usize> {
    bail!(
        "this seed_catalog was built without PostgreSQL: build it with \
         `cargo build --release --features full --example seed_catalog`"
    )
}

/// The images `seed-0` .. `seed-{images-1}` (unless they exist).
fn seed_images(tx: &mut dyn Sink, images: usize, now: &str) -> Result<()> {
    for i in 0..images {
        tx.exec(
            "INSERT OR IGNORE INTO images (id, name, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
            &[s(format!("seed-image-{i}")), s(format!("seed-{i}")), s(now)],
        )?;
    }
    Ok(())
}

/// The published versions numbered `range`, spread over `images` images; with
/// `files`, each blob's file is written under that data directory too.
fn seed_versions(
    tx: &mut dyn Sink,
    files: Option<&Path>,
    range: std::ops::Range<usize>,
    images: usize,
    now: &str,
) -> Result<()> {
    for v in range {
        let image = v % images;
        let version = format!("20260101_{v:06}");
        let vid = format!("seed-v-{v}");
        let meta = format!("metadata {v}");
        let root = format!("rootfs {v}");
        let (md, rd) = (Digest::of(meta.as_bytes()), Digest::of(root.as_bytes()));
        for (d, body) in [(md, &meta), (rd, &root)] {
            blob(tx, files, d, body.as_bytes(), now)?;
        }
        tx.exec(
            "INSERT INTO image_versions (id, image_id, version, state, created_at, updated_at) \
             VALUES (?1, ?2, ?3, 'draft', ?4, ?4)",
            &[
                s(&vid),
                s(format!("seed-image-{image}")),
                s(version),
                s(now),
            ],
        )?;
        for (k, val) in [("os", "Seed"), ("release", "1"), ("variant", "default")] {
            tx.exec(
                "INSERT INTO version_metadata (version_id, key, value) VALUES (?1, ?2, ?3)",
                &[s(&vid), s(k), s(val)],
            )?;
        }
        let aid = format!("seed-a-{v}");
        tx.exec(
            "INSERT INTO release_artifacts (id, version_id, variant, operating_system, architecture, format, \
             primary_blob_digest, primary_blob_size_bytes, primary_media_type, created_at, updated_at) \
             VALUES (?1, ?2, 'default', 'seed', 'x86_64', 'squashfs', ?3, ?4, 'application/vnd.squashfs', ?5, ?5)",
            &[s(&aid), s(&vid), s(rd.to_string()), Val::I(root.len() as i64), s(now)],
        )?;
        let tid = format!("seed-t-{v}");
        tx.exec(
            "INSERT INTO artifact_attachments (id, artifact_id, name, media_type, blob_digest, blob_size_bytes, \
             created_at, updated_at) VALUES (?1, ?2, 'incus.tar.xz', 'application/x-xz', ?3, ?4, ?5, ?5)",
            &[s(&tid), s(&aid), s(md.to_string()), Val::I(meta.len() as i64), s(now)],
        )?;
        tx.exec(
            "UPDATE image_versions SET state = 'publishing' WHERE id = ?1",
            &[s(&vid)],
        )?;
        let manifest = format!("seed manifest {v}");
        tx.exec(
            "INSERT INTO publish_records (version_id, manifest, manifest_digest, verification, published_at) \
             VALUES (?1, ?2, ?3, 'skipped', ?4)",
            &[
                s(&vid),
                Val::B(manifest.clone().into_bytes()),
                s(Digest::of(manifest.as_bytes()).to_string()),
                s(now),
            ],
        )?;
        let combined = Digest::of(format!("{meta}{root}").as_bytes());
        tx.exec(
            "INSERT INTO incus_projection (artifact_id, version_id, metadata_attachment_id, ftype, \
             combined_sha256) VALUES (?1, ?2, ?3, 'squashfs', ?4)",
            &[s(&aid), s(&vid), s(&tid), s(combined.hex())],
        )?;
        tx.exec(
            "UPDATE image_versions SET state = 'published', published_at = ?2, updated_at = ?2 WHERE id = ?1",
            &[s(&vid), s(now)],
        )?;
    }
    Ok(())
}

fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    let had = args.iter().any(|a| a == flag);
    args.retain(|a| a != flag);
    had
}

/// A blob row, and its file under `files` (a data directory) when given
/// (read-only, as the store leaves it).
fn blob(tx: &mut dyn Sink, files: Option<&Path>, d: Digest, body: &[u8], now: &str) -> Result<()> {
    tx.exec(
        "INSERT OR IGNORE INTO cas_blobs (digest, size_bytes, storage_key, verified_at, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?4)",
        &[s(d.to_string()), Val::I(body.len() as i64), s(d.cas_path()), s(now)],
    )?;
    if let Some(data) = files {
        let p = data.join(d.cas_path());
        std::fs::create_dir_all(p.parent().expect("sharded path"))?;
        std::fs::write(&p, body)?;
    }
    Ok(())
}
