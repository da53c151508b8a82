//! The checks on the far side, once everything was copied: every item read back
//! from the target and compared with the source, and every published version's
//! manifest, signature and blobs checked in the target.

use super::plan::{assess, Have, Inventory};
use super::{MigrateReport, Target};
use crate::catalog::transfer::{KeyStateRecord, PrincipalRecord, VersionRecord};
use crate::catalog::{Alias, Catalog, Image, JobRun, Verification};
use crate::digest::Digest;
use anyhow::{Context, Result};
use std::collections::BTreeSet;

/// The key of an item that was not copied (and was reported so).
pub(super) fn key_blob(d: &Digest) -> String {
    format!("blob {d}")
}
pub(super) fn key_principal(p: &PrincipalRecord) -> String {
    format!("principal {}", p.id)
}
pub(super) fn key_image(i: &Image) -> String {
    format!("image {}", i.name)
}
pub(super) fn key_version(v: &VersionRecord) -> String {
    format!("version {}", v.version.id)
}
pub(super) fn key_alias(image: &str, a: &Alias) -> String {
    format!("alias {image}:{}", a.alias)
}
pub(super) fn key_job(j: &JobRun) -> String {
    format!("job run {}", j.job)
}
pub(super) fn key_key(key_id: &str) -> String {
    format!("trusted key {key_id}")
}
pub(super) fn key_key_state(s: &KeyStateRecord) -> String {
    format!("{} record of key {}", s.state.as_str(), s.key_id)
}
pub(super) const KEY_AUDIT: &str = "audit log";

/// Reads everything back from the target (see the module doc), adding what is not
/// as it should be to `report.failed` (but the items in `not_copied`, reported
/// already).
pub(super) fn after(
    dst: &Target,
    snapshot: &dyn Catalog,
    inv: &Inventory,
    not_copied: &BTreeSet<String>,
    report: &mut MigrateReport,
) -> Result<()> {
    let a = assess(inv, snapshot, dst.catalog.as_ref()).context("reading the target back")?;
    let mut check = |h: &Have, key: String, what: String| {
        if *h != Have::Same && !not_copied.contains(&key) {
            report.failed.push(format!(
                "{what}: read back from the target, it {} the source's",
                match h {
                    Have::Missing => "is missing, unlike",
                    _ => "differs from",
                }
            ));
        }
    };
    for (b, h) in inv.blobs.iter().zip(&a.blobs) {
        check(h, key_blob(&b.digest), format!("blob row {}", b.digest));
    }
    for (p, h) in inv.principals.iter().zip(&a.principals) {
        check(h, key_principal(p), format!("principal {}", p.name));
    }
    for (i, h) in inv.images.iter().zip(&a.images) {
        check(h, key_image(i), format!("image {}", i.name));
    }
    for (v, h) in inv.versions.iter().zip(&a.versions) {
        check(h, key_version(v), format!("version {}", v.name()));
    }
    for ((image, al), h) in inv.aliases.iter().zip(&a.aliases) {
        check(
            h,
            key_alias(image, al),
            format!("alias {image}:{}", al.alias),
        );
    }
    for (j, h) in inv.job_runs.iter().zip(&a.job_runs) {
        check(h, key_job(j), format!("job run {}", j.job));
    }
    for (k, h) in inv.keys.iter().zip(&a.keys) {
        check(
            h,
            key_key(&k.key_id),
            format!("trusted key {} ({})", k.name, k.key_id),
        );
    }
    for (st, h) in inv.loose_states().into_iter().zip(&a.loose_states) {
        check(
            h,
            key_key_state(st),
            format!("{} record of key {}", st.state.as_str(), st.key_id),
        );
    }
    let au = &a.audit;
    let audit_wrong = au.to_load > 0 || !au.differs.is_empty() || !au.gaps.is_empty();
    if audit_wrong && !not_copied.contains(KEY_AUDIT) {
        report.failed.push(format!(
            "audit log: read back from the target, {} rows are missing and {} differ from the \
             source's",
            au.to_load + au.gaps.len() as u64,
            au.differs.len()
        ));
    }
    // the migration's own audit row comes after this check
    if au.extra > 0 {
        report.failed.push(format!(
            "audit log: the target has {} rows the source does not",
            au.extra
        ));
    }
    for e in &a.extras {
        report
            .failed
            .push(format!("{e}: in the target, but not in the source"));
    }
    publications(dst, inv, not_copied, report)
}

/// Every published version that was copied: its blobs are in the target store
/// with their sizes (unless collected), its stored manifest hashes to its digest,
/// and its signature verifies with the trusted keys, by the key it records.
fn publications(
    dst: &Target,
    inv: &Inventory,
    not_copied: &BTreeSet<String>,
    report: &mut MigrateReport,
) -> Result<()> {
    let keys = super::trusted_keys(dst)?;
    let cat = dst.catalog.as_ref();
    let mut unsigned = Vec::new();
    for v in &inv.versions {
        if v.publication.is_none() || not_copied.contains(&key_version(v)) {
            continue;
        }
        let name = v.name();
        if !v.collected() {
            for (d, size) in v.cited() {
                if dst.blobs.stat(&d)? != Some(size) {
                    report.failed.push(format!(
                        "{name}: blob {d} ({size} bytes) is not in the target store with that size"
                    ));
                }
            }
        }
        let rec = cat
            .publish_record(&v.version.id)
            .with_context(|| format!("reading the publish record of {name} in the target"))?;
        if Digest::of(&rec.manifest) != rec.manifest_digest {
            report.failed.push(format!(
                "{name}: the manifest in the target does not hash to its recorded digest {}",
                rec.manifest_digest
            ));
            continue;
        }
        let (Verification::Verified, Some(sig)) = (rec.verification, &rec.signature) else {
            unsigned.push(name);
            continue;
        };
        match crate::sign::verify_signed_by(&keys, &rec.manifest, sig) {
            Ok((k, _)) if Some(&k.key_id) == rec.signer_key_id.as_ref() => {
                report.signatures_verified += 1;
                if k.policy.state == crate::sign::KeyState::Revoked {
                    report.notes.push(format!(
                        "{name}: signed by key {} ({}), which is revoked: it stays withheld \
                         from the index, as on the appliance",
                        k.name, k.key_id
                    ));
                }
            }
            Ok((k, _)) => report.failed.push(format!(
                "{name}: the signature verifies with key {} but the publication records {}",
                k.key_id,
                rec.signer_key_id.as_deref().unwrap_or("-")
            )),
            Err(crate::sign::SignError::UnknownKey(id)) => report.notes.push(format!(
                "{name}: signed by key {id}, which the trusted keys no longer hold (removed \
                 with `imgsrv key remove`?): signature not checked"
            )),
            Err(e) => report
                .failed
                .push(format!("{name}: manifest signature: {e}")),
        }
    }
    if !unsigned.is_empty() {
        report.notes.push(format!(
            "published without a verified signature (verification mode warn or off), nothing to \
             check: {}",
            unsigned.join(", ")
        ));
    }
    Ok(())
}
