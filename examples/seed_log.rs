//! Appends N synthetic entries to the transparency log of an initialised data directory,
//! through the catalog's own append (the same hashing and triggers as a publish), 10,000
//! per transaction: for `contrib/bench/tlog.sh`, which measures the log at 10 to
//! 1,000,000 entries.
//!
//! Usage: `seed_log DATA_DIR N`. The entries are retirements of versions of an image
//! `seed` that the catalog does not hold (`imgsrv log verify` would say so): use it on
//! throwaway data directories only.

use anyhow::{bail, Context, Result};
use imgsrv::digest::Digest;
use imgsrv::tlog::entry::Entry;
use std::path::Path;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, data, n] = args.as_slice() else {
        bail!("usage: seed_log DATA_DIR N");
    };
    let n: u64 = n.parse().context("N is not a number")?;
    let cat = imgsrv::admin_cli::open_catalog(Path::new(data))?;
    let time = chrono::Utc::now()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        .to_string();
    let mut at = cat.log_size()?;
    let end = at + n;
    while at < end {
        let k = (end - at).min(10_000);
        let entries: Vec<Entry> = (at..at + k)
            .map(|i| Entry::Retire {
                image: "seed".into(),
                version: i.to_string(),
                manifest: Digest::of(&i.to_be_bytes()),
                time: time.clone(),
            })
            .collect();
        if !cat.append_log_at(at, &entries)? {
            bail!("the log grew under the seeder at {at}: seed a data directory nothing else uses");
        }
        at += k;
    }
    println!("{at}");
    Ok(())
}
