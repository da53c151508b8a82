//! The SQLite catalog's transparency log rows (migrations/0007-log.sql): appends inside
//! the transaction of the event they record, and the reads tiles, proofs and
//! checkpoints need.

use super::*;
use crate::tlog::entry::Entry;
use crate::tlog::tree::{Hash, Node};

fn size(c: &Connection) -> Result<u64> {
    let n: i64 = c
        .query_row(
            "SELECT coalesce(max(idx) + 1, 0) FROM log_entries",
            [],
            |r| r.get(0),
        )
        .ctx("log size")?;
    Ok(n as u64)
}

fn hashes(c: &Connection, nodes: &[Node]) -> Result<Vec<Hash>> {
    let missing = |n: &Node| {
        CatalogError::NotFound(format!("log hash at level {} index {}", n.level, n.index))
    };
    let mut out = Vec::with_capacity(nodes.len());
    let mut rest = nodes;
    while let Some(first) = rest.first() {
        // a run of consecutive nodes of one level (a hash tile): one range scan
        let run = rest
            .iter()
            .enumerate()
            .take_while(|(i, n)| n.level == first.level && n.index == first.index + *i as u64)
            .count();
        if run >= 8 {
            let mut st = c
                .prepare_cached(
                    "SELECT idx, hash FROM log_hashes WHERE level = ?1 AND idx BETWEEN ?2 AND ?3 \
                     ORDER BY idx",
                )
                .map_err(backend)?;
            let last = first.index + run as u64 - 1;
            let rows = st
                .query_map(params![first.level, first.index as i64, last as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .map_err(backend)?;
            let mut want = first.index;
            for row in rows {
                let (idx, h) = row.map_err(backend)?;
                let n = Node {
                    level: first.level,
                    index: want,
                };
                if idx as u64 != want {
                    return Err(missing(&n));
                }
                out.push(h.try_into().map_err(|_| missing(&n))?);
                want += 1;
            }
            if want != last + 1 {
                return Err(missing(&Node {
                    level: first.level,
                    index: want,
                }));
            }
        } else {
            let mut st = c
                .prepare_cached("SELECT hash FROM log_hashes WHERE level = ?1 AND idx = ?2")
                .map_err(backend)?;
            for n in &rest[..run] {
                let h: Option<Vec<u8>> = st
                    .query_row(params![n.level, n.index as i64], |r| r.get(0))
                    .optional()
                    .ctx("log hash")?;
                out.push(
                    h.and_then(|h| h.try_into().ok())
                        .ok_or_else(|| missing(n))?,
                );
            }
        }
        rest = &rest[run..];
    }
    Ok(out)
}

/// Appends `entry` in `tx`, the transaction of the event it records: its number.
pub(super) fn append(tx: &Connection, entry: &Entry) -> Result<u64> {
    let a = log_append(size(tx)?, entry, &|nodes| hashes(tx, nodes))?;
    tx.execute(
        "INSERT INTO log_entries (idx, entry, kind, image, version, key_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![a.index as i64, a.text, a.kind, a.image, a.version, a.key_id],
    )
    .ctx("log entry")?;
    let mut st = tx
        .prepare_cached("INSERT INTO log_hashes (level, idx, hash) VALUES (?1, ?2, ?3)")
        .map_err(backend)?;
    for (n, h) in &a.hashes {
        st.execute(params![n.level, n.index as i64, &h[..]])
            .ctx("log hash")?;
    }
    Ok(a.index)
}

impl LogCatalog for SqliteCatalog {
    fn log_size(&self) -> Result<u64> {
        size(&*self.conn()?)
    }

    fn log_entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>> {
        let c = self.conn()?;
        let mut st = c
            .prepare_cached(
                "SELECT entry FROM log_entries WHERE idx >= ?1 AND idx < ?2 ORDER BY idx",
            )
            .map_err(backend)?;
        let end = end.min(i64::MAX as u64) as i64;
        let rows = st
            .query_map(params![start as i64, end], |r| r.get(0))
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn log_hashes(&self, nodes: &[Node]) -> Result<Vec<Hash>> {
        hashes(&*self.conn()?, nodes)
    }

    fn log_entries_of(&self, image: &str, version: &str) -> Result<Vec<(u64, String)>> {
        let c = self.conn()?;
        let mut st = c
            .prepare_cached(
                "SELECT idx, kind FROM log_entries WHERE image = ?1 AND version = ?2 ORDER BY idx",
            )
            .map_err(backend)?;
        let rows = st
            .query_map(params![image, version], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
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
        let c = self.conn()?;
        c.execute(
            "INSERT INTO log_checkpoints (size, note, created_at) SELECT ?1, ?2, ?3 \
             WHERE NOT EXISTS (SELECT 1 FROM log_checkpoints WHERE size = ?1)",
            params![size as i64, note, now()],
        )
        .ctx("checkpoint")
        .map(|n| n > 0)
    }

    fn latest_checkpoint(&self) -> Result<Option<(u64, String)>> {
        let c = self.conn()?;
        c.query_row(
            "SELECT size, note FROM log_checkpoints ORDER BY size DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
        )
        .optional()
        .ctx("checkpoint")
    }

    fn checkpoints(&self) -> Result<Vec<(u64, String)>> {
        let c = self.conn()?;
        let mut st = c
            .prepare("SELECT size, note FROM log_checkpoints ORDER BY size")
            .map_err(backend)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn log_vkey(&self) -> Result<Option<String>> {
        self.conn()?
            .query_row("SELECT vkey FROM log_identity WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .ctx("the log's key")
    }

    fn claim_log_vkey(&self, vkey: &str) -> Result<String> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO log_identity (id, vkey, created_at) SELECT 1, ?1, ?2 \
                 WHERE NOT EXISTS (SELECT 1 FROM log_identity)",
                params![vkey, now()],
            )
            .ctx("the log's key")?;
            tx.query_row("SELECT vkey FROM log_identity WHERE id = 1", [], |r| {
                r.get(0)
            })
            .ctx("the log's key")
        })
    }
}
