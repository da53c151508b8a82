//! What the appliance holds ([`Inventory`]), how the target compares with it
//! item by item ([`assess`]), and the plan made from that ([`Plan`]): which
//! target is accepted, what is copied, what an earlier run copied already.

use super::{Marker, MigrateReport, Tally, Target};
use crate::catalog::transfer::{
    all_versions, version_record, KeyStateRecord, PrincipalRecord, VersionRecord,
};
use crate::catalog::{
    Alias, AuditQuery, AuditRecord, Blob, Catalog, CatalogError, Image, JobRun, KeyRecord,
    KeyState, VersionState,
};
use anyhow::{bail, Context, Result};
use indicatif::HumanBytes;
use std::collections::{BTreeSet, VecDeque};
use std::io::Write;
use std::path::Path;

/// Everything of the appliance's catalog that is copied (the audit log is read
/// in pages when it is copied).
pub(in crate::maint) struct Inventory {
    /// In digest order.
    pub blobs: Vec<Blob>,
    pub principals: Vec<PrincipalRecord>,
    pub images: Vec<Image>,
    /// By image, then creation: a version's image is loaded before it.
    pub versions: Vec<VersionRecord>,
    /// With their image's name.
    pub aliases: Vec<(String, Alias)>,
    pub audit_rows: u64,
    pub job_runs: Vec<JobRun>,
    /// The trusted keys, by name.
    pub keys: Vec<KeyRecord>,
    /// Every retirement and revocation, by key id then state.
    pub key_states: Vec<KeyStateRecord>,
    /// Upload sessions in progress, which are not copied.
    pub uploads: u64,
}

impl Inventory {
    pub fn read(cat: &dyn Catalog) -> Result<Inventory> {
        let mut blobs = Vec::new();
        cat.each_blob(&mut |b| {
            blobs.push(b);
            true
        })?;
        let principals = cat
            .list_principals()?
            .iter()
            .map(|p| cat.principal_record(&p.id))
            .collect::<Result<_, _>>()?;
        let images = cat.list_images(true)?;
        let versions = all_versions(cat)?
            .iter()
            .map(|(i, v)| version_record(cat, i, v))
            .collect::<Result<_, _>>()?;
        let mut audit_rows = 0;
        let mut pages = AuditPages::new(cat, 0);
        while pages.next()?.is_some() {
            audit_rows += 1;
        }
        let job_runs = cat
            .job_runs()?
            .into_iter()
            .filter(|j| j.job != super::MARKER_JOB)
            .collect();
        // every session expires before the year 9999; those in progress (not
        // completed, failed or aborted, not expired) are the ones lost
        let now = crate::catalog::now();
        let uploads = cat
            .expired_uploads("9999")?
            .iter()
            .filter(|u| {
                matches!(
                    u.state,
                    crate::catalog::UploadState::Created | crate::catalog::UploadState::Uploading
                ) && u.expires_at > now
            })
            .count() as u64;
        let keys = cat.trusted_keys()?;
        let key_states = cat.key_state_records()?;
        Ok(Inventory {
            keys,
            key_states,
            blobs,
            principals,
            images,
            versions,
            aliases: cat.all_aliases()?,
            audit_rows,
            job_runs,
            uploads,
        })
    }

    /// The state records of the key with this key id.
    pub fn states_of(&self, key_id: &str) -> Vec<KeyStateRecord> {
        states_of(&self.key_states, key_id)
    }

    /// The state records of keys no longer listed (removed, or never trusted).
    pub fn loose_states(&self) -> Vec<&KeyStateRecord> {
        self.key_states
            .iter()
            .filter(|s| !self.keys.iter().any(|k| k.key_id == s.key_id))
            .collect()
    }

    /// Blob rows and their bytes.
    pub fn blob_counts(&self) -> super::Counts {
        let mut c = super::Counts::default();
        for b in &self.blobs {
            c.add(b.size_bytes);
        }
        c
    }
}

fn states_of(all: &[KeyStateRecord], key_id: &str) -> Vec<KeyStateRecord> {
    all.iter().filter(|s| s.key_id == key_id).cloned().collect()
}

/// The audit log read in id order, a page at a time.
pub(super) struct AuditPages<'a> {
    cat: &'a dyn Catalog,
    after: i64,
    buf: VecDeque<AuditRecord>,
    done: bool,
}

const AUDIT_PAGE: u32 = 500;

impl<'a> AuditPages<'a> {
    /// The rows after id `after`.
    pub fn new(cat: &'a dyn Catalog, after: i64) -> AuditPages<'a> {
        AuditPages {
            cat,
            after,
            buf: VecDeque::new(),
            done: false,
        }
    }

    pub fn next(&mut self) -> Result<Option<AuditRecord>> {
        if self.buf.is_empty() && !self.done {
            let page = self.cat.query_audit(&AuditQuery {
                after_id: Some(self.after),
                limit: Some(AUDIT_PAGE),
                ..Default::default()
            })?;
            self.done = page.len() < AUDIT_PAGE as usize;
            if let Some(last) = page.last() {
                self.after = last.id;
            }
            self.buf.extend(page);
        }
        Ok(self.buf.pop_front())
    }

    /// Up to a page of rows.
    pub fn batch(&mut self) -> Result<Vec<AuditRecord>> {
        let mut out = Vec::new();
        while out.len() < AUDIT_PAGE as usize {
            match self.next()? {
                Some(r) => out.push(r),
                None => break,
            }
        }
        Ok(out)
    }
}

/// How the target has one item of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::maint) enum Have {
    Missing,
    /// As the source has it (an earlier run copied it).
    Same,
    /// Under the same key, but not the same.
    Differs,
}

/// The target's audit log against the source's.
#[derive(Debug, Clone, Default)]
pub(in crate::maint) struct AuditState {
    /// The last id in the target's log (0: empty).
    pub target_max: i64,
    /// Source rows the target has, the same.
    pub present: u64,
    /// Source rows after the target's last one: to load.
    pub to_load: u64,
    /// Ids the target has otherwise than the source.
    pub differs: Vec<i64>,
    /// Source rows the target lacks although it has later ones.
    pub gaps: Vec<i64>,
    /// Target rows the source does not have.
    pub extra: u64,
}

/// The target against the inventory, item by item (parallel to the inventory's
/// lists), and what it holds that the source does not.
pub(in crate::maint) struct Assessment {
    pub blobs: Vec<Have>,
    pub principals: Vec<Have>,
    pub images: Vec<Have>,
    pub versions: Vec<Have>,
    pub aliases: Vec<Have>,
    pub job_runs: Vec<Have>,
    /// Parallel to the inventory's keys.
    pub keys: Vec<Have>,
    /// Parallel to [`Inventory::loose_states`].
    pub loose_states: Vec<Have>,
    pub audit: AuditState,
    /// Items only the target has, named.
    pub extras: Vec<String>,
    /// Items of the source whose name the target gives to another id (another
    /// catalog's: ids are random), named.
    pub other_ids: Vec<String>,
    /// The target holds nothing at all (but a migrate marker).
    pub empty: bool,
}

fn have<T: PartialEq>(found: Result<T, CatalogError>, want: &T) -> Result<Have> {
    match found {
        Ok(t) if &t == want => Ok(Have::Same),
        Ok(_) => Ok(Have::Differs),
        Err(CatalogError::NotFound(_)) => Ok(Have::Missing),
        Err(e) => Err(e.into()),
    }
}

/// Compares the target catalog `dst` with the inventory `inv` read from `src`
/// (whose audit log is read again, not kept in memory: it can be long).
pub(in crate::maint) fn assess(
    inv: &Inventory,
    src: &dyn Catalog,
    dst: &dyn Catalog,
) -> Result<Assessment> {
    let mut blobs = Vec::new();
    for b in &inv.blobs {
        blobs.push(match dst.get_blob(&b.digest)? {
            None => Have::Missing,
            Some(t) if &t == b => Have::Same,
            Some(_) => Have::Differs,
        });
    }
    let mut principals = Vec::new();
    for p in &inv.principals {
        let mut h = have(dst.principal_record(&p.id), p)?;
        if h == Have::Missing && dst.get_principal(&p.name).is_ok() {
            h = Have::Differs; // the name is another principal's
        }
        principals.push(h);
    }
    let images = inv
        .images
        .iter()
        .map(|i| have(dst.get_image(&i.name), i))
        .collect::<Result<_>>()?;
    let mut versions = Vec::new();
    for v in &inv.versions {
        let (image, version) = (&v.version.image_name, &v.version.version);
        versions.push(match dst.get_version(image, version) {
            Ok(_) => have(version_record(dst, image, version), v)?,
            Err(CatalogError::NotFound(_)) => Have::Missing,
            Err(e) => return Err(e.into()),
        });
    }
    let aliases = inv
        .aliases
        .iter()
        .map(|(image, a)| have(dst.get_alias(image, &a.alias), a))
        .collect::<Result<_>>()?;
    let target_runs: Vec<JobRun> = dst
        .job_runs()?
        .into_iter()
        .filter(|j| j.job != super::MARKER_JOB)
        .collect();
    let job_runs = inv
        .job_runs
        .iter()
        .map(|j| match target_runs.iter().find(|t| t.job == j.job) {
            None => Have::Missing,
            Some(t) if t == j => Have::Same,
            Some(_) => Have::Differs,
        })
        .collect();
    let target_keys = dst.trusted_keys()?;
    let target_states = dst.key_state_records()?;
    let keys = inv
        .keys
        .iter()
        .map(
            |k| match target_keys.iter().find(|t| t.key_id == k.key_id) {
                Some(t)
                    if t == k
                        && states_of(&target_states, &k.key_id) == inv.states_of(&k.key_id) =>
                {
                    Have::Same
                }
                Some(_) => Have::Differs,
                // the name another key's, or the key id retired or revoked there
                None if target_keys.iter().any(|t| t.name == k.name)
                    || target_states.iter().any(|s| s.key_id == k.key_id) =>
                {
                    Have::Differs
                }
                None => Have::Missing,
            },
        )
        .collect();
    let loose_states = inv
        .loose_states()
        .into_iter()
        .map(|s| {
            let found = target_states
                .iter()
                .find(|t| t.key_id == s.key_id && t.state == s.state);
            match found {
                Some(t) if t == s && !target_keys.iter().any(|k| k.key_id == s.key_id) => {
                    Have::Same
                }
                Some(_) => Have::Differs,
                None if target_keys.iter().any(|k| k.key_id == s.key_id) => Have::Differs,
                // a retirement after the revocation would be refused
                None if s.state == KeyState::Retired
                    && target_states
                        .iter()
                        .any(|t| t.key_id == s.key_id && t.state == KeyState::Revoked) =>
                {
                    Have::Differs
                }
                None => Have::Missing,
            }
        })
        .collect();
    let other_ids = other_ids(inv, dst, &target_keys)?;
    let (mut extras, mut holds) = extras(inv, dst, &target_runs)?;
    for k in &target_keys {
        holds = true;
        if !inv.keys.iter().any(|s| s.key_id == k.key_id) {
            extras.push(format!("trusted key {} ({})", k.name, k.key_id));
        }
    }
    for t in &target_states {
        holds = true;
        if !inv
            .key_states
            .iter()
            .any(|s| s.key_id == t.key_id && s.state == t.state)
        {
            extras.push(format!("{} record of key {}", t.state.as_str(), t.key_id));
        }
    }
    Ok(Assessment {
        other_ids,
        keys,
        loose_states,
        blobs,
        principals,
        images,
        versions,
        aliases,
        job_runs,
        audit: compare_audit(src, dst)?,
        extras,
        empty: !holds,
    })
}

/// The source's items the target has under their name with another id.
fn other_ids(inv: &Inventory, dst: &dyn Catalog, keys: &[KeyRecord]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let other = |found: Result<String, CatalogError>, id: &str| -> Result<bool> {
        match found {
            Ok(t) => Ok(t != id),
            Err(CatalogError::NotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    };
    for p in &inv.principals {
        if other(dst.get_principal(&p.name).map(|t| t.id), &p.id)? {
            out.push(format!("principal {} (another id)", p.name));
        }
    }
    for i in &inv.images {
        if other(dst.get_image(&i.name).map(|t| t.id), &i.id)? {
            out.push(format!("image {} (another id)", i.name));
        }
    }
    for v in &inv.versions {
        let found = dst
            .get_version(&v.version.image_name, &v.version.version)
            .map(|t| t.id);
        if other(found, &v.version.id)? {
            out.push(format!("version {} (another id)", v.name()));
        }
    }
    for k in &inv.keys {
        if keys
            .iter()
            .any(|t| t.name == k.name && t.key_id != k.key_id)
        {
            out.push(format!("trusted key {} (another key)", k.name));
        }
    }
    Ok(out)
}

/// What the target holds that the source does not, and whether it holds anything.
fn extras(inv: &Inventory, dst: &dyn Catalog, runs: &[JobRun]) -> Result<(Vec<String>, bool)> {
    let mut out = Vec::new();
    let mut holds = !runs.is_empty();
    let names: BTreeSet<&str> = inv.images.iter().map(|i| i.name.as_str()).collect();
    for i in dst.list_images(true)? {
        holds = true;
        if !names.contains(i.name.as_str()) {
            out.push(format!("image {}", i.name));
        }
    }
    let ids: BTreeSet<&str> = inv.principals.iter().map(|p| p.id.as_str()).collect();
    for p in dst.list_principals()? {
        holds = true;
        if !ids.contains(p.id.as_str()) {
            out.push(format!("principal {} ({})", p.name, p.id));
        }
    }
    let digests: BTreeSet<_> = inv.blobs.iter().map(|b| b.digest).collect();
    let mut blobs = Vec::new();
    dst.each_blob(&mut |b| {
        if !digests.contains(&b.digest) {
            blobs.push(format!("blob row {}", b.digest));
        }
        true
    })?;
    holds |= dst.blob_totals()?.0 > 0;
    out.extend(blobs);
    let versions: BTreeSet<(&str, &str)> = inv
        .versions
        .iter()
        .map(|v| (v.version.image_name.as_str(), v.version.version.as_str()))
        .collect();
    for (i, v) in all_versions(dst)? {
        if !versions.contains(&(i.as_str(), v.as_str())) {
            out.push(format!("version {i}@{v}"));
        }
    }
    let aliases: BTreeSet<(&str, &str)> = inv
        .aliases
        .iter()
        .map(|(i, a)| (i.as_str(), a.alias.as_str()))
        .collect();
    for (i, a) in dst.all_aliases()? {
        if !aliases.contains(&(i.as_str(), a.alias.as_str())) {
            out.push(format!("alias {i}:{}", a.alias));
        }
    }
    for r in runs {
        if !inv.job_runs.iter().any(|j| j.job == r.job) {
            out.push(format!("job run {}", r.job));
        }
    }
    holds |= !dst
        .query_audit(&AuditQuery {
            limit: Some(1),
            ..Default::default()
        })?
        .is_empty();
    Ok((out, holds))
}

/// The two audit logs side by side, in id order.
pub(in crate::maint) fn compare_audit(src: &dyn Catalog, dst: &dyn Catalog) -> Result<AuditState> {
    let mut st = AuditState::default();
    let mut s = AuditPages::new(src, 0);
    let mut t = AuditPages::new(dst, 0);
    let mut s_row = s.next()?;
    while let Some(tr) = t.next()? {
        st.target_max = tr.id;
        while let Some(r) = s_row.as_ref().filter(|r| r.id < tr.id) {
            st.gaps.push(r.id);
            s_row = s.next()?;
        }
        match &s_row {
            Some(r) if r.id == tr.id => {
                if *r == tr {
                    st.present += 1;
                } else {
                    st.differs.push(tr.id);
                }
                s_row = s.next()?;
            }
            _ => st.extra += 1,
        }
    }
    while s_row.is_some() {
        st.to_load += 1;
        s_row = s.next()?;
    }
    Ok(st)
}

/// What a run does: the assessment of an accepted target, and the store sizes of
/// the blobs it lacks rows for.
pub(in crate::maint) struct Plan {
    pub a: Assessment,
    /// For each blob: the size of what the target store holds under its digest
    /// (`None`: nothing), read for the blobs whose row is missing.
    pub stored: Vec<Option<u64>>,
}

fn count(h: &[Have], which: &Have) -> u64 {
    h.iter().filter(|x| *x == which).count() as u64
}

pub(super) fn tally(h: &[Have]) -> Tally {
    Tally {
        total: h.len() as u64,
        loaded: count(h, &Have::Missing),
        present: count(h, &Have::Same),
    }
}

impl Plan {
    /// Assesses the target and decides whether it may be written (see the module
    /// doc of `migrate`): refused with what to do unless it is empty, a partial copy
    /// of this source, or a completed one (then with nothing missing).
    pub fn make(
        inv: &Inventory,
        snapshot: &dyn Catalog,
        dst: &Target,
        marker: Option<&Marker>,
        src_dir: &Path,
    ) -> Result<Plan> {
        let a = assess(inv, snapshot, dst.catalog.as_ref())?;
        match marker {
            None if !a.empty => bail!(foreign(&a, dst, src_dir)),
            Some(m) if m.complete() => {
                let mut missing = missing(inv, &a);
                missing.extend(a.other_ids.iter().cloned());
                if !missing.is_empty() {
                    bail!(
                        "the target holds a completed migration of {} (completed {}), and {} \
                         items of --from {} are not in it ({}{}): it is another appliance, or \
                         it has changed since. The deployment may have been serving since, and \
                         migrate does not add to it: publish what is new on the deployment \
                         itself, or migrate into an empty database and bucket",
                        m.source.display(),
                        m.completed_at.as_deref().unwrap_or("?"),
                        missing.len(),
                        src_dir.display(),
                        missing
                            .iter()
                            .take(8)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                        if missing.len() > 8 { ", ..." } else { "" }
                    );
                }
            }
            _ => {
                let conflicts = conflicts(inv, &a);
                if !conflicts.is_empty() {
                    bail!(
                        "the target is not a partial copy of {}: {} of its items are not the \
                         appliance's ({}{}). migrate only fills an empty catalog or goes on with \
                         a copy of the same appliance; give an empty database (and bucket), or \
                         the --from of the migration that began this one{}",
                        src_dir.display(),
                        conflicts.len(),
                        conflicts
                            .iter()
                            .take(8)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                        if conflicts.len() > 8 { ", ..." } else { "" },
                        match marker {
                            Some(m) =>
                                format!(" ({} began it {})", m.source.display(), m.started_at),
                            None => String::new(),
                        }
                    );
                }
            }
        }
        let mut stored = Vec::with_capacity(inv.blobs.len());
        for (b, h) in inv.blobs.iter().zip(&a.blobs) {
            stored.push(match h {
                Have::Missing => dst.blobs.stat(&b.digest).with_context(|| {
                    format!("looking for blob {} in the target store", b.digest)
                })?,
                _ => None,
            });
        }
        Ok(Plan { a, stored })
    }

    /// The report before anything is applied: what the plan says.
    pub fn report(&self, inv: &Inventory) -> MigrateReport {
        let mut r = MigrateReport {
            blobs: inv.blob_counts(),
            principals: tally(&self.a.principals),
            images: tally(&self.a.images),
            versions: tally(&self.a.versions),
            aliases: tally(&self.a.aliases),
            job_runs: tally(&self.a.job_runs),
            keys: tally(&self.a.keys),
            key_states: tally(&self.a.loose_states),
            audit_rows: Tally {
                total: inv.audit_rows,
                loaded: self.a.audit.to_load,
                present: self.a.audit.present,
            },
            uploads_skipped: inv.uploads,
            ..Default::default()
        };
        for ((b, h), stored) in inv.blobs.iter().zip(&self.a.blobs).zip(&self.stored) {
            match (h, stored) {
                (Have::Same, _) => r.skipped.add(b.size_bytes),
                (_, Some(n)) if *n == b.size_bytes => r.found.add(b.size_bytes),
                _ => r.copied.add(b.size_bytes),
            }
        }
        r
    }

    pub fn print(&self, inv: &Inventory, out: &mut dyn Write) -> Result<()> {
        let r = self.report(inv);
        let state = |s: VersionState| {
            inv.versions
                .iter()
                .filter(|v| v.version.state == s && v.retirement.is_none())
                .count()
        };
        let retired = inv
            .versions
            .iter()
            .filter(|v| v.retirement.is_some())
            .count();
        let key_state = |s: KeyState| inv.keys.iter().filter(|k| k.state() == s).count();
        writeln!(
            out,
            "source: {} images, {} versions ({} published, {} retired, {} drafts), {} aliases, {}, \
             {} principals with {} grants and {} tokens, {} trusted keys ({} active, {} retired, \
             {} revoked; {} records of keys no longer listed), {} audit rows, {} job runs",
            inv.images.len(),
            inv.versions.len(),
            state(VersionState::Published),
            retired,
            state(VersionState::Draft) + state(VersionState::Publishing),
            inv.aliases.len(),
            r.blobs,
            inv.principals.len(),
            inv.principals.iter().map(|p| p.grants.len()).sum::<usize>(),
            inv.principals.iter().map(|p| p.tokens.len()).sum::<usize>(),
            inv.keys.len(),
            key_state(KeyState::Active),
            key_state(KeyState::Retired),
            key_state(KeyState::Revoked),
            r.key_states.total,
            inv.audit_rows,
            inv.job_runs.len()
        )?;
        if inv.uploads > 0 {
            writeln!(
                out,
                "not copied: {} upload sessions (uploads in progress are not part of a \
                 migration; their clients upload again to the deployment)",
                inv.uploads
            )?;
        }
        writeln!(
            out,
            "target: {}",
            if self.a.empty {
                "empty".to_string()
            } else {
                format!(
                    "holds (from an earlier run) {} of the {} blobs ({}), {} of {} trusted keys, \
                     {} of {} principals, {} of {} images, {} of {} versions, {} of {} aliases, \
                     {} of {} audit rows",
                    r.skipped.count,
                    r.blobs.count,
                    HumanBytes(r.skipped.bytes),
                    r.keys.present,
                    r.keys.total,
                    r.principals.present,
                    r.principals.total,
                    r.images.present,
                    r.images.total,
                    r.versions.present,
                    r.versions.total,
                    r.aliases.present,
                    r.aliases.total,
                    r.audit_rows.present,
                    r.audit_rows.total
                )
            }
        )?;
        writeln!(
            out,
            "plan: copy {} blobs ({}), check {} already in the store ({}), re-check {} an \
             earlier run recorded; load {} trusted keys and {} key records, {} principals, {} images, {} \
             versions, {} aliases, {} audit rows, {} job runs; then read everything back and \
             verify every blob and signature on the target",
            r.copied.count,
            HumanBytes(r.copied.bytes),
            r.found.count,
            HumanBytes(r.found.bytes),
            r.skipped.count,
            r.keys.loaded,
            r.key_states.loaded,
            r.principals.loaded,
            r.images.loaded,
            r.versions.loaded,
            r.aliases.loaded,
            r.audit_rows.loaded,
            r.job_runs.loaded
        )?;
        Ok(())
    }
}

/// Items of the source the target has otherwise than the source, or that only
/// the target has: what makes it something else than a partial copy.
fn conflicts(inv: &Inventory, a: &Assessment) -> Vec<String> {
    let mut out = Vec::new();
    let differs = |h: &Have| *h == Have::Differs;
    for (b, h) in inv.blobs.iter().zip(&a.blobs) {
        if differs(h) {
            out.push(format!("blob row {}", b.digest));
        }
    }
    for (p, h) in inv.principals.iter().zip(&a.principals) {
        if differs(h) {
            out.push(format!("principal {}", p.name));
        }
    }
    for (i, h) in inv.images.iter().zip(&a.images) {
        if differs(h) {
            out.push(format!("image {}", i.name));
        }
    }
    for (v, h) in inv.versions.iter().zip(&a.versions) {
        if differs(h) {
            out.push(format!("version {}", v.name()));
        }
    }
    for ((i, al), h) in inv.aliases.iter().zip(&a.aliases) {
        if differs(h) {
            out.push(format!("alias {i}:{}", al.alias));
        }
    }
    for (j, h) in inv.job_runs.iter().zip(&a.job_runs) {
        if differs(h) {
            out.push(format!("job run {}", j.job));
        }
    }
    for (k, h) in inv.keys.iter().zip(&a.keys) {
        if differs(h) {
            out.push(format!("trusted key {} ({})", k.name, k.key_id));
        }
    }
    for (st, h) in inv.loose_states().into_iter().zip(&a.loose_states) {
        if differs(h) {
            out.push(format!("{} record of key {}", st.state.as_str(), st.key_id));
        }
    }
    out.extend(a.audit.differs.iter().map(|id| format!("audit row {id}")));
    out.extend(
        a.audit
            .gaps
            .iter()
            .map(|id| format!("audit row {id} (missing before later ones)")),
    );
    if a.audit.extra > 0 {
        out.push(format!("{} audit rows of its own", a.audit.extra));
    }
    out.extend(a.extras.iter().map(|e| format!("{e} (not in the source)")));
    out
}

/// Items of the source the target does not have at all.
fn missing(inv: &Inventory, a: &Assessment) -> Vec<String> {
    let mut out = Vec::new();
    let gone = |h: &Have| *h == Have::Missing;
    for (b, h) in inv.blobs.iter().zip(&a.blobs) {
        if gone(h) {
            out.push(format!("blob {}", b.digest));
        }
    }
    for (p, h) in inv.principals.iter().zip(&a.principals) {
        if gone(h) {
            out.push(format!("principal {}", p.name));
        }
    }
    for (i, h) in inv.images.iter().zip(&a.images) {
        if gone(h) {
            out.push(format!("image {}", i.name));
        }
    }
    for (v, h) in inv.versions.iter().zip(&a.versions) {
        if gone(h) {
            out.push(format!("version {}", v.name()));
        }
    }
    for ((i, al), h) in inv.aliases.iter().zip(&a.aliases) {
        if gone(h) {
            out.push(format!("alias {i}:{}", al.alias));
        }
    }
    for (k, h) in inv.keys.iter().zip(&a.keys) {
        if gone(h) {
            out.push(format!("trusted key {} ({})", k.name, k.key_id));
        }
    }
    for (st, h) in inv.loose_states().into_iter().zip(&a.loose_states) {
        if gone(h) {
            out.push(format!("{} record of key {}", st.state.as_str(), st.key_id));
        }
    }
    if a.audit.to_load > 0 || !a.audit.gaps.is_empty() {
        out.push(format!(
            "{} audit rows",
            a.audit.to_load + a.audit.gaps.len() as u64
        ));
    }
    out
}

/// Why a target that no migrate wrote into is refused.
fn foreign(a: &Assessment, dst: &Target, src_dir: &Path) -> String {
    let mut sample: Vec<String> = a.extras.iter().take(6).cloned().collect();
    if a.audit.extra > 0 {
        sample.push(format!("{} audit rows", a.audit.extra));
    }
    format!(
        "the target catalog ({}) is not empty, and no `imgsrv migrate` wrote into it: it holds \
         {}{}. migrate fills an empty catalog only (the appliance's rows keep their ids, which \
         must not meet other rows). If this is a new deployment that `imgsrv init` or `imgsrv \
         serve` set up already, drop and create its database again (e.g. `dropdb imgsrv && \
         createdb --owner=imgsrv imgsrv`), then run `imgsrv migrate --from {} --to {}` before \
         `imgsrv init`",
        dst.describe(),
        if sample.is_empty() {
            "rows of its own".to_string()
        } else {
            sample.join(", ")
        },
        if a.extras.len() > 6 { ", ..." } else { "" },
        src_dir.display(),
        dst.config.display()
    )
}
