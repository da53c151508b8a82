//! Copying a whole catalog into another one (`imgsrv migrate`): the rows as they
//! were, with the same ids, timestamps, manifests and signatures, so that the copy
//! serves the same Simple Streams index and the same signatures verify.
//!
//! # How published rows get in while the guards stay armed
//! The target's guards (triggers: versions are created as drafts and only move
//! draft -> publishing -> published, publish records and projection rows are
//! written while publishing, a published version never changes, aliases point at
//! published versions, retirements and collections are append-only) are not
//! disabled, bypassed or relaxed, for anyone, and no backend code path skips them.
//! Instead [`TransferCatalog::load_version`] replays a version's life in one
//! transaction, through the same checks a publish goes through: the version row
//! is inserted as a draft (its own id and timestamps), its metadata, artifacts and
//! attachments are added while it is a draft, it moves to publishing (the guard
//! checks every cited blob row is there with its size, so blob rows are loaded
//! first), gets its publish record and projection rows, and becomes published with
//! its `published_at`; then its retirement and collection rows follow. A reader of
//! the target sees the version whole or not at all.
//!
//! Why not a bulk load with the triggers off (`session_replication_role`,
//! `DISABLE TRIGGER`, a `COPY` by the owner)? The guards are `ENABLE ALWAYS` so
//! that no session can skip them, `check_integrity` reports a disabled one, and
//! every other client would be unguarded while they are off. Replaying keeps the
//! guarantee that no published row in any imgsrv catalog was ever written other
//! than through the publish path's checks.
//!
//! A collected version's blob rows may be gone (garbage collection took its bytes),
//! yet it was published with them: for such digests the load inserts placeholder
//! rows for the span of its transaction, which the publishing guard is satisfied
//! with as it was at the time, and deletes them once the collection row is in (the
//! guard on deleting blob rows lets a collected version's go). Nobody outside the
//! transaction ever sees them.
//!
//! What the loads still allow beyond the ordinary API is choosing ids and
//! timestamps: a load of a row that exists is refused ([`CatalogError::AlreadyExists`]),
//! audit rows only go after every row already there (their ids stay the order of
//! appends), and `imgsrv migrate` uses them only on a target that is empty or holds
//! a partial copy of the same source (see `crate::maint::migrate`).
//!
//! Trusted publisher keys go the same way: [`TransferCatalog::load_trusted_key`]
//! inserts a key's row, then its retirement and revocation records, in one
//! transaction through the guards of migration 6 (PostgreSQL 4), so a revoked key
//! is never, not even for a moment, an active key in the target; the records of
//! keys no longer listed (a removed key's retirement, a revocation recorded for a
//! key id never trusted) follow with [`TransferCatalog::load_key_state`], so that
//! such a key can never be added to the target either.
//!
//! Upload sessions, blob pins and the failed-login throttle's counts are not part
//! of a transfer: they are short-lived state of a running server, not content.

use super::*;

/// A principal with everything that belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalRecord {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub display_name: String,
    /// A JSON object.
    pub attributes: String,
    pub created_at: String,
    /// Ordered by role, then scope.
    pub grants: Vec<GrantRecord>,
    /// Ordered by creation, then id; with their secret hashes (the same tokens
    /// keep working after a transfer).
    pub tokens: Vec<ApiToken>,
}

/// One grant with when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    pub role: String,
    pub scope: String,
    pub created_at: String,
}

/// A version with everything that belongs to it, in any state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    /// With its metadata.
    pub version: ImageVersion,
    pub artifacts: Vec<ArtifactWithAttachments>,
    /// A published version's publish record and projection rows.
    pub publication: Option<Publication>,
    /// With `collected_at` when garbage collection collected it.
    pub retirement: Option<Retirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub record: PublishRecord,
    pub projection: Vec<ProjectionRow>,
}

/// One retirement or revocation of a key (a row of `key_states`), as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStateRecord {
    /// Upper-case hex.
    pub key_id: String,
    /// [`KeyState::Retired`] or [`KeyState::Revoked`].
    pub state: KeyState,
    /// The key's name when the state was recorded.
    pub name: String,
    pub at: String,
}

/// Writing rows as another catalog had them (see the module doc). Each load is
/// one transaction: it is all there afterwards, or nothing of it.
pub trait TransferCatalog: Send + Sync {
    /// The principal with this id, its attributes, grants and tokens;
    /// [`CatalogError::NotFound`] when there is none.
    fn principal_record(&self, id: &str) -> Result<PrincipalRecord>;

    /// A blob row as it was (digest, size, storage key, media type, when it was
    /// verified and created). Only for a blob whose bytes the store holds,
    /// checked.
    fn load_blob(&self, b: &Blob) -> Result<()>;
    /// A principal with its grants and tokens.
    fn load_principal(&self, p: &PrincipalRecord) -> Result<()>;
    /// An image row as it was.
    fn load_image(&self, i: &Image) -> Result<()>;
    /// A version with its contents, publication, retirement and collection,
    /// through the guards (see the module doc). Its image must be there, and the
    /// blob rows a publishing or published, not collected version cites.
    fn load_version(&self, v: &VersionRecord) -> Result<()>;
    /// An alias as it was (it must point at a published, not retired version of
    /// its image, as always).
    fn load_alias(&self, a: &Alias) -> Result<()>;
    /// Audit rows with their ids and times, in id order, every id above those
    /// already in the log ([`CatalogError::Precondition`] otherwise): the log stays
    /// in the order of its appends. Later appends get ids after them.
    fn load_audit(&self, rows: &[AuditRecord]) -> Result<()>;
    /// The last run of a job as it was (replacing the row of that job).
    fn load_job_run(&self, j: &JobRun) -> Result<()>;

    /// Every retirement and revocation recorded, also of keys the catalog no
    /// longer lists, by key id, then state (retired before revoked).
    fn key_state_records(&self) -> Result<Vec<KeyStateRecord>>;
    /// A trusted key as it was (name, key id, public key, scopes, `added_at`) with
    /// its state records `states`, each as it was, in one transaction. The states
    /// must be the key's and say what `k.retired_at` and `k.revoked_at` say
    /// ([`CatalogError::Invalid`] otherwise). [`CatalogError::AlreadyExists`] when
    /// the name or key id is taken, [`CatalogError::Precondition`] when the key id
    /// has state records already (a key is never trusted again; said before a taken
    /// key id).
    fn load_trusted_key(&self, k: &KeyRecord, states: &[KeyStateRecord]) -> Result<()>;
    /// A state record of a key the catalog does not list (load a listed key's with
    /// [`TransferCatalog::load_trusted_key`]). [`CatalogError::AlreadyExists`] when
    /// that state of the key id is recorded; [`CatalogError::Precondition`] for a
    /// retirement after a revocation.
    fn load_key_state(&self, s: &KeyStateRecord) -> Result<()>;
}

/// A `key_states.state` value.
pub(super) fn key_state_of(s: &str) -> Option<KeyState> {
    match s {
        "retired" => Some(KeyState::Retired),
        "revoked" => Some(KeyState::Revoked),
        _ => None,
    }
}

/// The states of `k` in the order they are inserted (retired before revoked),
/// checked against what `k` says (see [`TransferCatalog::load_trusted_key`]).
pub(super) fn key_states_of<'a>(
    k: &KeyRecord,
    states: &'a [KeyStateRecord],
) -> Result<Vec<&'a KeyStateRecord>> {
    let bad = |why: String| {
        CatalogError::Invalid(format!("trusted key {} ({}): {why}", k.name, k.key_id))
    };
    let mut out: Vec<&KeyStateRecord> = states.iter().collect();
    out.sort_by_key(|s| s.state);
    for s in &out {
        if s.key_id != k.key_id {
            return Err(bad(format!("a state record of key {}", s.key_id)));
        }
        if s.state == KeyState::Active {
            return Err(bad("a state record says active".into()));
        }
    }
    let at = |st: KeyState| out.iter().find(|s| s.state == st).map(|s| s.at.clone());
    if at(KeyState::Retired) != k.retired_at || at(KeyState::Revoked) != k.revoked_at {
        return Err(bad(
            "its state records do not say when it was retired and revoked".into(),
        ));
    }
    if out.windows(2).any(|w| w[0].state == w[1].state) {
        return Err(bad("one state recorded twice".into()));
    }
    Ok(out)
}

/// Every version of every image: drafts, published and retired ones, by image
/// name, then creation, then version.
pub fn all_versions(cat: &dyn Catalog) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String, String)> = Vec::new();
    for img in cat.list_images(true)? {
        for v in cat.list_versions(&img.name, true)? {
            out.push((img.name.clone(), v.created_at, v.version));
        }
    }
    // the listings leave retired versions out
    for r in cat.retirements()? {
        let v = cat.get_version(&r.image, &r.version)?;
        out.push((r.image, v.created_at, r.version));
    }
    out.sort();
    out.dedup();
    Ok(out.into_iter().map(|(i, _, v)| (i, v)).collect())
}

/// The record of `image@version` as `cat` has it now.
pub fn version_record(cat: &dyn Catalog, image: &str, version: &str) -> Result<VersionRecord> {
    let view = cat.version_view(image, version)?;
    let v = view.version;
    let publication = match v.state {
        VersionState::Published => Some(Publication {
            record: cat.publish_record(&v.id)?,
            projection: cat.projection_rows(&v.id)?,
        }),
        _ => None,
    };
    let retirement = cat.retirement(&v.id)?;
    Ok(VersionRecord {
        version: v,
        artifacts: view.artifacts,
        publication,
        retirement,
    })
}

impl VersionRecord {
    /// `image@version`
    pub fn name(&self) -> String {
        format!("{}@{}", self.version.image_name, self.version.version)
    }

    /// Every digest the version cites with the size it declares (artifacts'
    /// primary blobs and attachments), once each.
    pub fn cited(&self) -> Vec<(Digest, u64)> {
        let mut out: Vec<(Digest, u64)> = Vec::new();
        for a in &self.artifacts {
            let each = std::iter::once((
                a.artifact.primary_blob_digest,
                a.artifact.primary_blob_size_bytes,
            ))
            .chain(
                a.attachments
                    .iter()
                    .map(|t| (t.blob_digest, t.blob_size_bytes)),
            );
            for c in each {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        out
    }

    /// Retired and collected: its blobs are no longer kept for it.
    pub fn collected(&self) -> bool {
        self.retirement
            .as_ref()
            .is_some_and(|r| r.collected_at.is_some())
    }
}

/// The columns an artifact row is inserted with, in this order.
pub(super) const ARTIFACT_INSERT: &str = "id, version_id, variant, operating_system, architecture, \
     format, primary_blob_digest, primary_blob_size_bytes, primary_media_type, created_at, updated_at";
/// The columns an attachment row is inserted with, in this order.
pub(super) const ATTACHMENT_INSERT: &str =
    "id, artifact_id, name, media_type, blob_digest, blob_size_bytes, created_at, updated_at";

/// The refusal of an audit row that would not come after the log's last one.
pub(super) fn audit_out_of_order(id: i64, last: i64) -> CatalogError {
    CatalogError::Precondition(format!(
        "audit row {id} would not come after the log's last row ({last}): audit rows are \
         loaded only after every row already there"
    ))
}

/// A blob row standing in, within one transaction, for one that garbage
/// collection took from a collected version (see the module doc).
pub(super) fn placeholder(digest: Digest, size: u64, at: &str) -> Blob {
    Blob {
        digest,
        size_bytes: size,
        storage_key: digest.cas_path(),
        media_type: None,
        verified_at: at.to_string(),
        created_at: at.to_string(),
    }
}
