//! The PostgreSQL catalog's transparency log rows (migrations/postgres/0005-log.sql),
//! the twin of `catalog/sqlite/tlog.rs`.
//!
//! Two instances appending at once both read the same size and write the same entry
//! number: the second insert meets the first's key in the unique index, and because
//! every write transaction here is SERIALIZABLE and read the log's size before it
//! inserted, PostgreSQL reports that as a serialization failure (not a unique
//! violation), which [`PgCatalog::write`] retries from the start, on the new size.
//! (Tested: `catalog_contract` appends from two catalogs at once.)

use super::*;
use crate::tlog::entry::Entry;
use crate::tlog::tree::{Hash, Node};

fn size(c: &mut impl GenericClient) -> Result<u64> {
    let r = c
        .query_one(
            "SELECT coalesce(max(idx) + 1, 0)::bigint FROM log_entries",
            &[],
        )
        .ctx("log size")?;
    u64_col(&r, 0)
}

fn hashes(c: &mut impl GenericClient, nodes: &[Node]) -> Result<Vec<Hash>> {
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let levels: Vec<i16> = nodes.iter().map(|n| i16::from(n.level)).collect();
    let idxs = nodes
        .iter()
        .map(|n| i64_of(n.index))
        .collect::<Result<Vec<i64>>>()?;
    // one round trip for all of them, in the order asked
    let rows = c
        .query(
            "SELECT h.hash FROM unnest($1::smallint[], $2::bigint[]) WITH ORDINALITY \
             AS n(level, idx, ord) LEFT JOIN log_hashes h ON h.level = n.level AND h.idx = n.idx \
             ORDER BY n.ord",
            &[&levels, &idxs],
        )
        .ctx("log hashes")?;
    rows.iter()
        .zip(nodes)
        .map(|(r, n)| {
            let h: Option<Vec<u8>> = get(r, 0)?;
            h.and_then(|h| h.try_into().ok()).ok_or_else(|| {
                CatalogError::NotFound(format!("log hash at level {} index {}", n.level, n.index))
            })
        })
        .collect()
}

/// Appends `entry` in `tx`, the transaction of the event it records: its number.
pub(super) fn append(tx: &mut Transaction, entry: &Entry) -> Result<u64> {
    let n = size(tx)?;
    let a = {
        let cell = std::cell::RefCell::new(&mut *tx);
        log_append(n, entry, &|nodes| hashes(&mut **cell.borrow_mut(), nodes))?
    };
    let idx = i64_of(a.index)?;
    tx.execute(
        "INSERT INTO log_entries (idx, entry, kind, image, version, key_id) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&idx, &a.text, &a.kind, &a.image, &a.version, &a.key_id],
    )
    .ctx("log entry")?;
    for (node, h) in &a.hashes {
        tx.execute(
            "INSERT INTO log_hashes (level, idx, hash) VALUES ($1, $2, $3)",
            &[&i16::from(node.level), &i64_of(node.index)?, &&h[..]],
        )
        .ctx("log hash")?;
    }
    Ok(a.index)
}

impl LogCatalog for PgCatalog {
    fn log_size(&self) -> Result<u64> {
        size(&mut *self.conn()?)
    }

    fn log_entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>> {
        let (start, end) = (i64_of(start)?, i64_of(end.min(i64::MAX as u64))?);
        let rows = self
            .conn()?
            .query(
                "SELECT entry FROM log_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                &[&start, &end],
            )
            .ctx("log entries")?;
        rows.iter().map(|r| get(r, 0)).collect()
    }

    fn log_hashes(&self, nodes: &[Node]) -> Result<Vec<Hash>> {
        hashes(&mut *self.conn()?, nodes)
    }

    fn log_entries_of(&self, image: &str, version: &str) -> Result<Vec<(u64, String)>> {
        let rows = self
            .conn()?
            .query(
                "SELECT idx, kind FROM log_entries WHERE image = $1 AND version = $2 ORDER BY idx",
                &[&image, &version],
            )
            .ctx("log entries")?;
        rows.iter()
            .map(|r| Ok((u64_col(r, 0)?, get(r, 1)?)))
            .collect()
    }

    fn append_log_at(&self, at: u64, entries: &[Entry]) -> Result<bool> {
        self.write(|tx| {
            if size(tx)? != at {
                return Ok(false);
            }
            for e in entries {
                append(tx, e)?;
            }
            Ok(true)
        })
    }

    fn put_checkpoint(&self, size: u64, note: &str) -> Result<bool> {
        let n = self
            .conn()?
            .execute(
                "INSERT INTO log_checkpoints (size, note, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (size) DO NOTHING",
                &[&i64_of(size)?, &note, &now()],
            )
            .ctx("checkpoint")?;
        Ok(n > 0)
    }

    fn latest_checkpoint(&self) -> Result<Option<(u64, String)>> {
        let r = self
            .conn()?
            .query_opt(
                "SELECT size, note FROM log_checkpoints ORDER BY size DESC LIMIT 1",
                &[],
            )
            .ctx("checkpoint")?;
        r.map(|r| Ok((u64_col(&r, 0)?, get(&r, 1)?))).transpose()
    }

    fn checkpoints(&self) -> Result<Vec<(u64, String)>> {
        let rows = self
            .conn()?
            .query("SELECT size, note FROM log_checkpoints ORDER BY size", &[])
            .ctx("checkpoints")?;
        rows.iter()
            .map(|r| Ok((u64_col(r, 0)?, get(r, 1)?)))
            .collect()
    }

    fn log_vkey(&self) -> Result<Option<String>> {
        let r = self
            .conn()?
            .query_opt("SELECT vkey FROM log_identity WHERE id = 1", &[])
            .ctx("the log's key")?;
        r.map(|r| get(&r, 0)).transpose()
    }

    fn claim_log_vkey(&self, vkey: &str) -> Result<String> {
        let mut c = self.conn()?;
        c.execute(
            "INSERT INTO log_identity (id, vkey, created_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO NOTHING",
            &[&vkey, &now()],
        )
        .ctx("the log's key")?;
        let r = c
            .query_one("SELECT vkey FROM log_identity WHERE id = 1", &[])
            .ctx("the log's key")?;
        get(&r, 0)
    }
}
