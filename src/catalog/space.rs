//! A full disk and the SQLite catalog: telling it from other faults
//! ([`full_disk`]), and room kept in reserve for the audit log, so that a
//! full disk never costs an audit row ("no change succeeds without its
//! audit row; no denial is dropped").
//!
//! An audit row is appended after the request it records (its outcome and
//! status are known only then), in its own transaction. On a full disk the
//! change could go through and its row not, and denials would be dropped.
//! Writing every change and its row in one transaction would thread the
//! HTTP outcome through every catalog method, and would still drop the
//! rows of refusals; a reserve covers both. It is kept *inside* the
//! database, as free pages of `catalog.db`:
//!
//! * SQLite fills free pages before it grows the file, and nothing but the
//!   catalog can take them. (A preallocated file released when the disk
//!   fills does not do: whatever filled the disk takes the released space
//!   too, and the next audit rows are lost, as the full-disk test showed.)
//!   The reserve is kept between half of [`RESERVE_BYTES`] and all of it:
//!   10,000 to 20,000 audit rows;
//! * a change is let through only while the reserve is in place and at
//!   least [`HEADROOM`] is free on the disk ([`room_for_change`]; HTTP 507
//!   otherwise, before anything changes): changes do not live off the
//!   reserve, and a change that went through finds room for its row even if
//!   the disk fills meanwhile. Refusals and failures go on being recorded
//!   into the reserve while the disk stays full;
//! * the reserve is topped up, before a change, whenever it fell below half
//!   (changes use free pages first too) and there is room on the disk: once
//!   space is freed, changes resume without a restart.
//!
//! The WAL: every write appends frames to it, and it must not need to grow
//! on a full disk either. Topping up writes the reserve through the WAL,
//! which keeps that size afterwards (no `journal_size_limit`, deliberately),
//! and later commits rewrite it from the start after each checkpoint; the
//! connections keep it on close (`SQLITE_FCNTL_PERSIST_WAL`), so a server
//! restarted on a full disk still has it. A checkpoint copies pages into
//! the file in place (the free pages are inside it), so it needs no room.
//! On copy-on-write filesystems (btrfs, ZFS) an overwrite needs new blocks
//! and no reserve of this kind holds: a quota or a dedicated filesystem is
//! then the guard.

use super::CatalogError;
use crate::cas::fs::available_bytes;
use indicatif::HumanBytes;
use rusqlite::{Connection, TransactionBehavior};
use std::path::Path;

/// `e`, or [`CatalogError::Full`] when what failed was a full disk. `code`
/// is the SQLite result code of the failure on `c`. A write that comes up
/// short is SQLITE_FULL (the catalog maps that wherever it sees the error;
/// this catches it where it was taken for a backend fault); failing to grow
/// the `-shm` index (or the database by a size hint) is an SQLITE_IOERR_*,
/// whose errno then tells.
pub fn full_disk(c: &Connection, code: std::os::raw::c_int, e: CatalogError) -> CatalogError {
    let CatalogError::Backend(m) = e else {
        return e;
    };
    match code & 0xff {
        rusqlite::ffi::SQLITE_FULL => CatalogError::Full(m),
        rusqlite::ffi::SQLITE_IOERR => {
            // SAFETY: the handle of an open connection, used by this thread only.
            let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(c.handle()) };
            match errno {
                libc::ENOSPC | libc::EDQUOT => {
                    CatalogError::Full(format!("{m}: {}", std::io::Error::from_raw_os_error(errno)))
                }
                _ => CatalogError::Backend(m),
            }
        }
        _ => CatalogError::Backend(m),
    }
}

/// The result code of the last call on `c` that failed.
pub fn last_code(c: &Connection) -> std::os::raw::c_int {
    // SAFETY: as in `full_disk`.
    unsafe { rusqlite::ffi::sqlite3_extended_errcode(c.handle()) }
}

/// Makes the WAL of `c`'s database keep its size when the last connection
/// closes (`SQLITE_FCNTL_PERSIST_WAL`; see the module doc).
pub fn keep_wal(c: &Connection) {
    let mut persist: std::os::raw::c_int = 1;
    // SAFETY: an open connection's handle, a NUL-terminated schema name and
    // a pointer to an int, as SQLITE_FCNTL_PERSIST_WAL takes.
    unsafe {
        rusqlite::ffi::sqlite3_file_control(
            c.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&mut persist as *mut std::os::raw::c_int).cast(),
        );
    }
}

/// Free pages kept for the audit log (topped up when below half of it).
pub const RESERVE_BYTES: u64 = 8 << 20;
/// What must be free on the disk for a change to be let through: room for
/// the change itself, which does not come out of the reserve.
pub const HEADROOM: u64 = 1 << 20;

fn sql_err(e: rusqlite::Error) -> CatalogError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
            CatalogError::Full(format!("topping up the reserve for the audit log: {e}"))
        }
        _ => CatalogError::Backend(format!("the reserve for the audit log: {e}")),
    }
}

/// Bytes of free pages in the database.
pub fn reserved(c: &Connection) -> Result<u64, CatalogError> {
    let pages: i64 = c
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .map_err(sql_err)?;
    let size: i64 = c
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(sql_err)?;
    Ok(u64::try_from(pages * size).unwrap_or(0))
}

/// Makes `bytes` of free pages: a table holding a zero blob of that size,
/// dropped in the same transaction, leaves its pages on the free list (the
/// blob takes the free pages there were first, so they count in `bytes`).
fn top_up(c: &mut Connection, bytes: u64) -> Result<(), CatalogError> {
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    // (a leftover table of that name, from whatever, is not a reason to fail)
    tx.execute_batch(
        "DROP TABLE IF EXISTS reserve_pages; CREATE TABLE reserve_pages (b BLOB NOT NULL)",
    )
    .map_err(sql_err)?;
    tx.execute(
        "INSERT INTO reserve_pages VALUES (zeroblob(?1))",
        [i64::try_from(bytes).unwrap_or(i64::MAX)],
    )
    .map_err(sql_err)?;
    tx.execute_batch("DROP TABLE reserve_pages")
        .map_err(sql_err)?;
    tx.commit().map_err(sql_err)
}

/// Ok when a change may go through now: the reserve is in place (topped
/// up first if it fell below half and the disk holding the catalog, in
/// `dir`, has room for that) and [`HEADROOM`] is free there.
/// [`CatalogError::Full`] otherwise, saying what is short.
pub fn room_for_change(c: &mut Connection, dir: &Path) -> Result<(), CatalogError> {
    let available = || {
        available_bytes(dir)
            .map_err(|e| CatalogError::Backend(format!("statvfs {}: {e}", dir.display())))
    };
    let mut free = available()?;
    let held = reserved(c)?;
    if held < RESERVE_BYTES / 2 {
        // all of it goes through the WAL, and the file grows by what is new
        let needed = RESERVE_BYTES + (RESERVE_BYTES - held) + HEADROOM;
        if free < needed {
            return Err(CatalogError::Full(format!(
                "{} available; the catalog keeps {} in reserve for its audit log, holds {} now, \
                 and changes resume once {} are free",
                HumanBytes(free),
                HumanBytes(RESERVE_BYTES),
                HumanBytes(held),
                HumanBytes(needed)
            )));
        }
        top_up(c, RESERVE_BYTES)?;
        log::info!(
            "catalog: {} of free pages in reserve for the audit log",
            HumanBytes(reserved(c)?)
        );
        free = available()?;
    }
    if free < HEADROOM {
        return Err(CatalogError::Full(format!(
            "{} available; changes need {} (the catalog's reserve is kept for its audit log)",
            HumanBytes(free),
            HumanBytes(HEADROOM)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_free_pages_topped_up_below_half() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Connection::open(d.path().join("c.db")).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (x BLOB); \
             CREATE TABLE reserve_pages (left_by TEXT); INSERT INTO reserve_pages VALUES ('x')",
        )
        .unwrap();
        assert_eq!(reserved(&c).unwrap(), 0);
        // a leftover table of the scratch table's name does not stop it
        room_for_change(&mut c, d.path()).unwrap();
        let full = reserved(&c).unwrap();
        assert!(full >= RESERVE_BYTES, "{full}");
        // the scratch table is gone again
        let tables: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'reserve_pages'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0);
        // rows come out of the free pages; above half, nothing is added
        c.execute(
            "INSERT INTO t VALUES (zeroblob(?1))",
            [(RESERVE_BYTES / 4) as i64],
        )
        .unwrap();
        let used = reserved(&c).unwrap();
        assert!(used < full && used >= RESERVE_BYTES / 2, "{used}");
        room_for_change(&mut c, d.path()).unwrap();
        assert_eq!(reserved(&c).unwrap(), used);
        // below half, it is topped up again
        c.execute(
            "INSERT INTO t VALUES (zeroblob(?1))",
            [(RESERVE_BYTES / 2) as i64],
        )
        .unwrap();
        assert!(reserved(&c).unwrap() < RESERVE_BYTES / 2);
        room_for_change(&mut c, d.path()).unwrap();
        assert!(reserved(&c).unwrap() >= RESERVE_BYTES);
    }
}
