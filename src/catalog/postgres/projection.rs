//! The PostgreSQL catalog's Incus projection queries: the published artifacts with
//! their fingerprints, for the Simple Streams documents and the Incus REST API.

use super::*;

impl PgCatalog {
    /// The projection entries of the versions matching `cond` (SQL over the aliases `v`
    /// version, `i` image, `a` artifact, `t` metadata attachment, `p` projection row),
    /// with `param` as `$1` if given, each with its version metadata; one moment of the
    /// catalog.
    pub(super) fn projection_where(
        &self,
        cond: &str,
        param: Option<&str>,
    ) -> Result<Vec<ProjectionEntry>> {
        self.read(|c| {
            let sql = format!(
                "SELECT {IMAGE_COLS}, {VERSION_COLS}, {ARTIFACT_COLS}, {ATTACHMENT_COLS}, p.ftype, \
                 p.combined_sha256, r.signer_key_id \
                 FROM incus_projection p \
                 JOIN image_versions v ON v.id = p.version_id \
                 LEFT JOIN publish_records r ON r.version_id = v.id \
                 JOIN images i ON i.id = v.image_id \
                 JOIN release_artifacts a ON a.id = p.artifact_id \
                 JOIN artifact_attachments t ON t.id = p.metadata_attachment_id \
                 WHERE {cond} \
                 ORDER BY i.name, v.version, a.variant, a.architecture, a.id"
            );
            let found = match param {
                Some(p) => c.query(&sql, &[&p]),
                None => c.query(&sql, &[]),
            }
            .ctx("projection")?;
            // columns: image 0..7, version 7..15, artifact 15..26, attachment 26..34,
            // ftype 34, combined 35, signer 36
            let mut out = rows(found, |r| {
                let version = version_row(r, 7)?;
                Ok(ProjectionEntry {
                    image: image_row(r, 0)?,
                    published_at: version.published_at.clone().unwrap_or_default(),
                    version,
                    artifact: artifact_row(r, 15)?,
                    metadata: attachment_row(r, 26)?,
                    ftype: get(r, 34)?,
                    combined_sha256: hex_digest_col(r, 35)?,
                    signer_key_id: get(r, 36)?,
                })
            })?;
            if out.is_empty() {
                return Ok(out);
            }
            // metadata of all published versions in one query
            let mut meta: std::collections::HashMap<String, BTreeMap<String, String>> =
                Default::default();
            for r in c
                .query(
                    "SELECT m.version_id, m.key, m.value FROM version_metadata m \
                     JOIN image_versions v ON v.id = m.version_id WHERE v.state = 'published'",
                    &[],
                )
                .ctx("metadata")?
            {
                meta.entry(get(&r, 0)?)
                    .or_default()
                    .insert(get(&r, 1)?, get(&r, 2)?);
            }
            for e in &mut out {
                if let Some(m) = meta.get(&e.version.id) {
                    e.version.metadata = m.clone();
                }
            }
            Ok(out)
        })
    }

    /// [`ContentCatalog::projection_by_fingerprint`].
    pub(super) fn projection_matching(&self, prefix: &str) -> Result<Vec<ProjectionEntry>> {
        if prefix.is_empty()
            || prefix.len() > 64
            || !prefix
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(CatalogError::Invalid(format!(
                "{prefix:?} is not a fingerprint (1 to 64 lowercase hex digits)"
            )));
        }
        self.projection_where(
            "v.state = 'published' AND starts_with(p.combined_sha256, $1)",
            Some(prefix),
        )
    }
}
