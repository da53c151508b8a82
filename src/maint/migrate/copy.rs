//! Applying the plan: the blobs (copied, read back, checked, then their rows),
//! then the catalog's rows in dependency order (trusted keys first). An item that
//! fails is counted and reported, and what depends on it is not loaded (said
//! so); a catalog or store that cannot be used stops the run (it resumes).

use super::plan::{AuditPages, Have, Inventory, Plan};
use super::{MigrateReport, Source, Target};
use crate::cas::CasError;
use crate::catalog::{Blob, Catalog, CatalogError, VersionState};
use crate::digest::{Digest, Hasher};
use anyhow::{anyhow, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

/// Why an item was not copied.
enum Fail {
    /// This item only: counted, reported, the run goes on.
    Item(String),
    /// The run cannot go on (the target catalog or store cannot be used).
    Stop(anyhow::Error),
}

/// A catalog error: the item's, unless the catalog itself is unusable.
fn catalog_fail(e: CatalogError) -> Fail {
    match e {
        CatalogError::Unavailable(_) | CatalogError::Full(_) => {
            Fail::Stop(anyhow!(e).context("the target catalog"))
        }
        e => Fail::Item(e.to_string()),
    }
}

/// An error of the target store: it stops the run.
fn store_stop(e: CasError) -> Fail {
    Fail::Stop(anyhow!(e).context(
        "the target blob store failed (run `imgsrv migrate` again once it works: it goes on \
         where it stopped)",
    ))
}

/// Reads the source's bytes, remembering whether the source failed (rather than
/// the store written to).
struct Tracked<R> {
    inner: R,
    failed: Option<String>,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            self.failed = Some(e.to_string());
        })
    }
}

pub(super) struct Run<'a> {
    src: &'a Source,
    dst: &'a Target,
    /// The snapshot the inventory was read from (its audit log is read again).
    snapshot: &'a dyn Catalog,
    inv: &'a Inventory,
    plan: &'a Plan,
    report: &'a mut MigrateReport,
    out: &'a mut dyn Write,
    /// Blobs whose bytes could not be copied, and why.
    bad_blobs: BTreeMap<Digest, String>,
    failed_images: BTreeSet<String>,
    /// By id.
    failed_versions: BTreeSet<String>,
    /// Everything not copied, by [`super::check::Item`] key.
    not_copied: BTreeSet<String>,
}

impl<'a> Run<'a> {
    pub fn new(
        src: &'a Source,
        dst: &'a Target,
        snapshot: &'a dyn Catalog,
        inv: &'a Inventory,
        plan: &'a Plan,
        report: &'a mut MigrateReport,
        out: &'a mut dyn Write,
    ) -> Run<'a> {
        Run {
            src,
            dst,
            snapshot,
            inv,
            plan,
            report,
            out,
            bad_blobs: BTreeMap::new(),
            failed_images: BTreeSet::new(),
            failed_versions: BTreeSet::new(),
            not_copied: BTreeSet::new(),
        }
    }

    /// The keys of the items that failed (reported already): the check after the
    /// copy does not report them again.
    pub fn not_copied(&self) -> BTreeSet<String> {
        self.not_copied.clone()
    }

    /// The trusted keys, each with its retirement and revocation in one load (a
    /// revoked key is never an active one in the target), then the records of keys
    /// no longer listed.
    fn keys(&mut self) -> Result<()> {
        let cat = self.dst.catalog.as_ref();
        let (inv, a) = (self.inv, &self.plan.a);
        self.report.keys.loaded = 0;
        for (k, h) in inv.keys.iter().zip(&a.keys) {
            if *h == Have::Missing {
                let done = cat.load_trusted_key(k, &inv.states_of(&k.key_id));
                if !self.count(
                    done,
                    |r| &mut r.keys.loaded,
                    || format!("trusted key {} ({})", k.name, k.key_id),
                )? {
                    self.not_copied.insert(super::check::key_key(&k.key_id));
                }
            }
        }
        self.report.key_states.loaded = 0;
        for (st, h) in inv.loose_states().into_iter().zip(&a.loose_states) {
            if *h == Have::Missing {
                let done = cat.load_key_state(st);
                if !self.count(
                    done,
                    |r| &mut r.key_states.loaded,
                    || format!("{} record of key {}", st.state.as_str(), st.key_id),
                )? {
                    self.not_copied.insert(super::check::key_key_state(st));
                }
            }
        }
        Ok(())
    }

    /// Every blob: one whose row the target lacks is copied (unless the store has
    /// it already), read back from the target and hashed, then its row loaded; one
    /// an earlier run recorded is read back from the target and hashed, and copied
    /// again from the appliance if the target's bytes are missing or damaged.
    pub fn blobs(&mut self) -> Result<()> {
        self.report.copied = Default::default();
        self.report.found = Default::default();
        self.report.verified = Default::default();
        let todo = self.inv.blobs.len();
        for (done, (b, h)) in self.inv.blobs.iter().zip(&self.plan.a.blobs).enumerate() {
            let recorded = *h == Have::Same;
            match self.blob(b, recorded) {
                Ok(sent) => {
                    self.report.verified.add(b.size_bytes);
                    match (sent, recorded) {
                        (true, true) => self.report.notes.push(format!(
                            "blob {}: recorded by an earlier run, but missing or damaged in the \
                             target store: copied again from the appliance",
                            b.digest
                        )),
                        (true, false) => self.report.copied.add(b.size_bytes),
                        (false, false) => self.report.found.add(b.size_bytes),
                        (false, true) => {}
                    }
                }
                Err(Fail::Item(why)) => {
                    self.not_copied.insert(super::check::key_blob(&b.digest));
                    self.bad_blobs.insert(b.digest, why);
                }
                Err(Fail::Stop(e)) => return Err(e),
            }
            if (done + 1) % 100 == 0 && done + 1 < todo {
                writeln!(self.out, "blobs: {} of {todo}", done + 1)?;
                self.out.flush()?;
            }
        }
        if !self.bad_blobs.is_empty() {
            let map = super::super::backup::citing_versions(self.snapshot)?;
            for (d, why) in &self.bad_blobs {
                self.report.failed.push(format!(
                    "blob {d}: {why}; {}",
                    super::super::backup::affected(&map, d)
                ));
            }
        }
        Ok(())
    }

    /// One blob (see [`Run::blobs`]): `true` when its bytes were sent now. The
    /// store never replaces an object: bytes under the key that are not the blob's
    /// are moved to the store's quarantine first.
    fn blob(&mut self, b: &Blob, recorded: bool) -> Result<bool, Fail> {
        let (cat, store) = (self.dst.catalog.as_ref(), self.dst.blobs.as_ref());
        let _key = crate::app::digest_write_lock(cat, store, &b.digest).map_err(catalog_fail)?;
        let mut sent = false;
        match store.stat(&b.digest).map_err(store_stop)? {
            Some(n) if n == b.size_bytes => {
                if let Err(why) = self.read_back(b)? {
                    // a damaged object under the key (put there behind imgsrv's back):
                    // out of the way, then the source's bytes
                    self.quarantine(b, &why)?;
                    self.send(b)?;
                    sent = true;
                }
            }
            Some(n) => {
                self.quarantine(b, &format!("{n} bytes under the key, not {}", b.size_bytes))?;
                self.send(b)?;
                sent = true;
            }
            None => {
                self.send(b)?;
                sent = true;
            }
        }
        if sent {
            if let Err(why) = self.read_back(b)? {
                self.quarantine(b, &why)?;
                return Err(Fail::Item(format!(
                    "copied, but the target store gives other bytes back ({why}): moved to its \
                     quarantine"
                )));
            }
        }
        if !recorded {
            cat.load_blob(b).map_err(catalog_fail)?;
        }
        Ok(sent)
    }

    /// The source's bytes into the target store (which checks their sha256 and size
    /// as it writes, and keeps nothing else).
    fn send(&self, b: &Blob) -> Result<(), Fail> {
        let reader = match self.src.blobs.open_range(&b.digest, 0, b.size_bytes) {
            Ok(r) => r,
            Err(CasError::NotFound(_)) => {
                return Err(Fail::Item("missing from the appliance's store".into()))
            }
            Err(e) => return Err(Fail::Item(format!("cannot be read in the appliance: {e}"))),
        };
        let mut r = Tracked {
            inner: reader,
            failed: None,
        };
        match self.dst.blobs.put(&b.digest, b.size_bytes, &mut r) {
            Ok(()) => Ok(()),
            Err(_) if r.failed.is_some() => Err(Fail::Item(format!(
                "reading it in the appliance failed: {}",
                r.failed.unwrap_or_default()
            ))),
            Err(e @ (CasError::Mismatch { .. } | CasError::Truncated { .. })) => Err(Fail::Item(
                format!("damaged in the appliance's store ({e}): nothing was stored"),
            )),
            Err(e) => Err(store_stop(e)),
        }
    }

    /// Reads the blob back from the target store and hashes it: the inner error
    /// says how it differs.
    fn read_back(&self, b: &Blob) -> Result<Result<(), String>, Fail> {
        let mut r = match self.dst.blobs.open_range(&b.digest, 0, b.size_bytes) {
            Ok(r) => r,
            Err(CasError::NotFound(_)) => return Ok(Err("not in the target store".into())),
            Err(e) => return Err(store_stop(e)),
        };
        let mut h = Hasher::new();
        crate::digest::read_chunks(&mut r, |c| h.update(c)).map_err(|e| {
            store_stop(CasError::Io {
                op: "read back",
                path: b.digest.to_string(),
                source: e,
            })
        })?;
        let n = h.len();
        let d = h.finish();
        if (d, n) != (b.digest, b.size_bytes) {
            return Ok(Err(format!(
                "read back from the target: {d} ({n} bytes), not {} ({} bytes)",
                b.digest, b.size_bytes
            )));
        }
        Ok(Ok(()))
    }

    fn quarantine(&self, b: &Blob, why: &str) -> Result<(), Fail> {
        self.dst
            .blobs
            .quarantine(&b.digest, &format!("imgsrv migrate: {why}"))
            .map_err(store_stop)?;
        Ok(())
    }

    /// The catalog's rows, in dependency order.
    pub fn rows(&mut self) -> Result<()> {
        self.keys()?;
        let cat = self.dst.catalog.as_ref();
        let (inv, a) = (self.inv, &self.plan.a);
        self.report.principals.loaded = 0;
        for (p, h) in inv.principals.iter().zip(&a.principals) {
            if *h == Have::Missing {
                let done = cat.load_principal(p);
                if !self.count(
                    done,
                    |r| &mut r.principals.loaded,
                    || format!("principal {}", p.name),
                )? {
                    self.not_copied.insert(super::check::key_principal(p));
                }
            }
        }
        self.report.images.loaded = 0;
        for (i, h) in inv.images.iter().zip(&a.images) {
            if *h == Have::Missing {
                let done = cat.load_image(i);
                if !self.count(
                    done,
                    |r| &mut r.images.loaded,
                    || format!("image {}", i.name),
                )? {
                    self.failed_images.insert(i.name.clone());
                    self.not_copied.insert(super::check::key_image(i));
                }
            }
        }
        self.report.versions.loaded = 0;
        for (v, h) in inv.versions.iter().zip(&a.versions) {
            if *h != Have::Missing {
                continue;
            }
            if let Some(why) = self.blocked(v) {
                self.report
                    .failed
                    .push(format!("version {}: not copied: {why}", v.name()));
                self.failed_versions.insert(v.version.id.clone());
                self.not_copied.insert(super::check::key_version(v));
                continue;
            }
            let done = cat.load_version(v);
            if !self.count(
                done,
                |r| &mut r.versions.loaded,
                || format!("version {}", v.name()),
            )? {
                self.failed_versions.insert(v.version.id.clone());
                self.not_copied.insert(super::check::key_version(v));
            }
        }
        self.report.aliases.loaded = 0;
        for ((image, al), h) in inv.aliases.iter().zip(&a.aliases) {
            if *h != Have::Missing {
                continue;
            }
            if self.failed_versions.contains(&al.version_id) {
                self.report.failed.push(format!(
                    "alias {image}:{}: not copied: its version {} was not",
                    al.alias, al.version
                ));
                self.not_copied.insert(super::check::key_alias(image, al));
                continue;
            }
            let done = cat.load_alias(al);
            if !self.count(
                done,
                |r| &mut r.aliases.loaded,
                || format!("alias {image}:{}", al.alias),
            )? {
                self.not_copied.insert(super::check::key_alias(image, al));
            }
        }
        self.audit()?;
        self.report.job_runs.loaded = 0;
        for (j, h) in inv.job_runs.iter().zip(&a.job_runs) {
            if *h != Have::Same {
                let done = cat.load_job_run(j);
                if !self.count(
                    done,
                    |r| &mut r.job_runs.loaded,
                    || format!("job run {}", j.job),
                )? {
                    self.not_copied.insert(super::check::key_job(j));
                }
            }
        }
        Ok(())
    }

    /// Why version `v` cannot be loaded now, if it cannot.
    fn blocked(&self, v: &crate::catalog::transfer::VersionRecord) -> Option<String> {
        if self.failed_images.contains(&v.version.image_name) {
            return Some("its image was not".into());
        }
        // a publishing or published version needs its blob rows (a collected one's
        // may be gone; a draft may cite blobs still uploading)
        if v.version.state == VersionState::Draft || v.collected() {
            return None;
        }
        v.cited()
            .iter()
            .find(|(d, _)| self.bad_blobs.contains_key(d))
            .map(|(d, _)| format!("its blob {d} was not"))
    }

    /// The audit rows after the target's last one, a page at a time.
    fn audit(&mut self) -> Result<()> {
        let mut pages = AuditPages::new(self.snapshot, self.plan.a.audit.target_max);
        self.report.audit_rows.loaded = 0;
        loop {
            let batch = pages.batch()?;
            if batch.is_empty() {
                return Ok(());
            }
            let (first, last) = (batch[0].id, batch[batch.len() - 1].id);
            let n = batch.len() as u64;
            let done = self.dst.catalog.load_audit(&batch);
            if !self.count(
                done,
                |r| &mut r.audit_rows.loaded,
                || format!("audit rows {first} to {last}"),
            )? {
                // later rows cannot come before these
                self.not_copied.insert(super::check::KEY_AUDIT.to_string());
                return Ok(());
            }
            self.report.audit_rows.loaded += n - 1;
        }
    }

    /// Counts a load into the report: `true` when it went in; an item's failure is
    /// listed, an unusable catalog stops the run.
    fn count(
        &mut self,
        done: Result<(), CatalogError>,
        counter: impl FnOnce(&mut MigrateReport) -> &mut u64,
        what: impl FnOnce() -> String,
    ) -> Result<bool> {
        match done.map_err(catalog_fail) {
            Ok(()) => {
                *counter(self.report) += 1;
                Ok(true)
            }
            Err(Fail::Item(why)) => {
                self.report.failed.push(format!("{}: {why}", what()));
                Ok(false)
            }
            Err(Fail::Stop(e)) => Err(e).with_context(what),
        }
    }
}
