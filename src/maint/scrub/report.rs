//! What a scrub reports ([`ScrubReport`]: the plan, the problems, the
//! notes, the counts), how it prints them, and the rates and samples it
//! reads from the command line and `[scrub]`.

use anyhow::{bail, Context, Result};
use indicatif::HumanBytes;
use serde::Serialize;
use std::io::Write;

/// A read rate: `50MB/s`, `50MB`, `1GiB/s`, `500kB/s`; a bare number is MB/s
/// (10^6 bytes per second). Units as the `bytesize` crate reads them.
pub fn parse_rate(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let bytes = match t.parse::<f64>() {
        Ok(mb) if mb.is_finite() && mb > 0.0 => (mb * 1e6) as u64,
        Ok(_) => 0,
        Err(_) => t
            .parse::<bytesize::ByteSize>()
            .map_err(|e| anyhow::anyhow!("rate {s:?}: {e} (expected e.g. 50MB/s)"))?
            .as_u64(),
    };
    if bytes < 1_000_000 {
        bail!("rate {s:?}: at least 1MB/s, or leave it out for no limit");
    }
    Ok(bytes)
}

/// A `--sample` percentage, in (0, 100].
pub fn parse_sample(s: &str) -> Result<f64> {
    let t = s.trim();
    let p: f64 = t
        .strip_suffix('%')
        .unwrap_or(t)
        .trim()
        .parse()
        .with_context(|| format!("sample {s:?}: a percentage such as 10 or 100"))?;
    if !(p > 0.0 && p <= 100.0) {
        bail!("sample {s:?}: a percentage above 0 and at most 100");
    }
    Ok(p)
}

/// What the scrub will do, printed before it does it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    pub blobs_stored: u64,
    pub bytes_stored: u64,
    /// What it reads: the sample, plus every blob whose size the catalog
    /// disputes.
    pub blobs_to_read: u64,
    pub bytes_to_read: u64,
    pub sample_percent: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_bytes_per_second: Option<u64>,
    pub blob_rows: u64,
    pub published_versions: u64,
    pub draft_versions: u64,
    /// Quarantine records from earlier scrubs.
    pub quarantined_before: u64,
}

/// Something wrong, which makes the scrub fail (exit 1).
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// A blob digest, or `image@version`.
    pub subject: String,
    pub detail: String,
    /// The versions it affects (`image@version`, drafts marked).
    pub affects: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// Its bytes do not hash to its name: quarantined by this run.
    Damaged,
    /// Reading it failed (an I/O error): left in place.
    Unreadable,
    /// Quarantined by an earlier run, and the right bytes are not back yet.
    Quarantined,
    /// Cited (or with a catalog row) but not in the store.
    Missing,
    /// The store, the blob row and the citing versions disagree on its size.
    WrongSize,
    /// The stored manifest no longer matches its digest or its catalog rows.
    Manifest,
    /// The signature does not verify with the trusted keys.
    Signature,
    /// The trusted keys cannot be read: no signature was checked.
    Keys,
}

impl ProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Damaged => "damaged",
            ProblemKind::Unreadable => "unreadable",
            ProblemKind::Quarantined => "quarantined",
            ProblemKind::Missing => "missing",
            ProblemKind::WrongSize => "wrong-size",
            ProblemKind::Manifest => "manifest",
            ProblemKind::Signature => "signature",
            ProblemKind::Keys => "keys",
        }
    }
}

/// Worth knowing, not a failure.
#[derive(Debug, Clone, Serialize)]
pub struct Note {
    pub kind: NoteKind,
    pub subject: String,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoteKind {
    /// A blob file no catalog row names: garbage collection removes it.
    Unreferenced,
    /// Published with verification `off` or `warn` and no valid signature.
    Unsigned,
    /// Signed by a key revoked since: its bytes are not served.
    Withheld,
    /// Quarantined earlier; the right bytes are back. Its damaged copy is
    /// still kept for the operator.
    Repaired,
    /// Read back right, but the store had not stamped it as its own (S3: no
    /// `x-amz-meta-sha256`, so not served): stamped now.
    Restamped,
    /// The scrub's job lock was lost under it (its database session ended): taken
    /// again, or the run stopped because another scrub has it now.
    LockLost,
}

/// What the scrub found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub blobs_read: u64,
    pub bytes_read: u64,
    pub blobs_ok: u64,
    /// Quarantined by this run.
    pub damaged: u64,
    /// Cited or with a row, not in the store (quarantined earlier or not).
    pub missing: u64,
    pub wrong_size: u64,
    pub manifests_bad: u64,
    pub signatures_verified: u64,
    pub signatures_failed: u64,
    pub unsigned: u64,
    pub withheld: u64,
    pub unreferenced: u64,
    pub repaired: u64,
    /// Read back right and stamped by this run ([`NoteKind::Restamped`]).
    pub restamped: u64,
    /// Listed, then removed before it was read (a GC beside it).
    pub gone: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ScrubReport {
    pub plan: Plan,
    pub dry_run: bool,
    /// Stopped before the end (the server shut down): the checks not made
    /// are not counted.
    pub stopped: bool,
    pub problems: Vec<Problem>,
    pub notes: Vec<Note>,
    pub counts: Counts,
    pub seconds: f64,
    /// Bytes read per second while reading, in MB/s (10^6).
    pub read_mb_per_second: f64,
}

impl ScrubReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub(super) fn print_plan(out: &mut dyn Write, p: &Plan) -> Result<()> {
    let what = if p.sample_percent >= 100.0 {
        "all of them".to_string()
    } else {
        format!("a {}% sample", p.sample_percent)
    };
    let rate = p
        .rate_bytes_per_second
        .map_or("no rate limit".to_string(), |r| {
            format!("at most {:.1} MB/s", r as f64 / 1e6)
        });
    writeln!(
        out,
        "scrub plan: {} blob(s) stored ({}); reading {} blob(s) ({}), {what}, {rate}",
        p.blobs_stored,
        HumanBytes(p.bytes_stored),
        p.blobs_to_read,
        HumanBytes(p.bytes_to_read)
    )?;
    writeln!(
        out,
        "scrub plan: checking {} blob row(s), {} published version(s) (their blobs, manifests and \
         signatures) and {} draft(s); {} blob(s) quarantined earlier",
        p.blob_rows, p.published_versions, p.draft_versions, p.quarantined_before
    )?;
    Ok(())
}

pub(super) fn print_summary(out: &mut dyn Write, r: &ScrubReport) -> Result<()> {
    let c = &r.counts;
    if r.dry_run {
        writeln!(out, "scrub: dry run, nothing was read or changed")?;
        return Ok(());
    }
    writeln!(
        out,
        "scrub: read {} blob(s) ({}) in {:.1} s ({:.1} MB/s): {} ok, {} damaged and quarantined; \
         {} missing, {} of the wrong size; {} manifest(s) altered; signatures: {} verified, {} \
         failed, {} unsigned, {} withheld; {} unreferenced, {} repaired since quarantined{}",
        c.blobs_read,
        HumanBytes(c.bytes_read),
        r.seconds,
        r.read_mb_per_second,
        c.blobs_ok,
        c.damaged,
        c.missing,
        c.wrong_size,
        c.manifests_bad,
        c.signatures_verified,
        c.signatures_failed,
        c.unsigned,
        c.withheld,
        c.unreferenced,
        c.repaired,
        if c.restamped > 0 {
            format!(", {} stamped again", c.restamped)
        } else {
            String::new()
        }
    )?;
    if r.stopped {
        writeln!(
            out,
            "scrub: STOPPED before the end; the rest was not checked"
        )?;
    }
    if r.ok() {
        writeln!(out, "scrub: no problem found")?;
        return Ok(());
    }
    writeln!(out, "scrub: {} problem(s)", r.problems.len())?;
    let any = |kinds: &[ProblemKind]| r.problems.iter().any(|p| kinds.contains(&p.kind));
    use ProblemKind::*;
    if any(&[Damaged, Quarantined, Missing, Unreadable]) {
        writeln!(
            out,
            "scrub: to repair a blob, put its right bytes back: `imgsrv import` a bundle that \
             carries it, run the mirror again, or upload the same file again (e.g. `imgsrv \
             publish` it as a new version); then scrub again"
        )?;
    }
    if any(&[WrongSize, Manifest, Signature]) {
        writeln!(
            out,
            "scrub: catalog rows disagree with what was published and signed: the catalog was \
             changed outside imgsrv; restore it from a backup (clients that verify signatures \
             refuse what it serves now)"
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_samples() {
        assert_eq!(parse_rate("50MB/s").unwrap(), 50_000_000);
        assert_eq!(parse_rate("50").unwrap(), 50_000_000);
        assert_eq!(parse_rate(" 2.5 /s").unwrap(), 2_500_000);
        assert_eq!(parse_rate("1GiB/s").unwrap(), 1 << 30);
        assert_eq!(parse_rate("100MiB").unwrap(), 100 << 20);
        assert_eq!(parse_rate("1MB/s").unwrap(), 1_000_000);
        for bad in ["", "fast", "0", "-5", "10kB/s", "50MB/h"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_sample("10").unwrap(), 10.0);
        assert_eq!(parse_sample("0.5%").unwrap(), 0.5);
        assert_eq!(parse_sample("100").unwrap(), 100.0);
        for bad in ["0", "101", "-1", "x", "NaN"] {
            assert!(parse_sample(bad).is_err(), "{bad}");
        }
    }
}
