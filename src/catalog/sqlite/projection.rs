//! The SQLite catalog's Incus projection queries: the published artifacts with
//! their fingerprints, for the Simple Streams documents and the Incus REST API.

use super::*;

impl SqliteCatalog {
    /// The projection entries of the versions matching `cond` (SQL over the aliases
    /// `v` version, `i` image, `a` artifact, `t` metadata attachment, `p` projection
    /// row), with `param` as `?1` if given, each with its version metadata.
    pub(super) fn projection_where(
        &self,
        cond: &str,
        param: Option<&str>,
    ) -> Result<Vec<ProjectionEntry>> {
        let c = self.conn()?;
        let mut st = c
            .prepare(&format!(
                "SELECT {IMAGE_COLS}, {VERSION_COLS}, {ARTIFACT_COLS}, {ATTACHMENT_COLS}, p.ftype, p.combined_sha256, \
                 r.signer_key_id \
                 FROM incus_projection p \
                 JOIN image_versions v ON v.id = p.version_id \
                 LEFT JOIN publish_records r ON r.version_id = v.id \
                 JOIN images i ON i.id = v.image_id \
                 JOIN release_artifacts a ON a.id = p.artifact_id \
                 JOIN artifact_attachments t ON t.id = p.metadata_attachment_id \
                 WHERE {cond} \
                 ORDER BY i.name, v.version, a.variant, a.architecture, a.id"
            ))
            .map_err(backend)?;
        let row = |r: &Row| {
            // columns: image 0..7, version 7..15, artifact 15..26, attachment 26..34,
            // ftype 34, combined 35, signer 36
            let version = version_row(r, 7)?;
            Ok(ProjectionEntry {
                image: image_row(r, 0)?,
                published_at: version.published_at.clone().unwrap_or_default(),
                version,
                artifact: artifact_row(r, 15)?,
                metadata: attachment_row(r, 26)?,
                ftype: r.get(34)?,
                combined_sha256: hex_digest_col(r, 35)?,
                signer_key_id: r.get(36)?,
            })
        };
        let rows = match param {
            Some(p) => st.query_map([p], row),
            None => st.query_map([], row),
        }
        .map_err(backend)?;
        let mut out: Vec<ProjectionEntry> =
            rows.collect::<rusqlite::Result<_>>().map_err(backend)?;
        if out.is_empty() {
            return Ok(out);
        }
        // metadata of all published versions in one query
        let mut st = c
            .prepare(
                "SELECT m.version_id, m.key, m.value FROM version_metadata m \
                 JOIN image_versions v ON v.id = m.version_id WHERE v.state = 'published'",
            )
            .map_err(backend)?;
        let mut meta: std::collections::HashMap<String, BTreeMap<String, String>> =
            Default::default();
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(backend)?;
        for row in rows {
            let (vid, k, v) = row.map_err(backend)?;
            meta.entry(vid).or_default().insert(k, v);
        }
        for e in &mut out {
            if let Some(m) = meta.get(&e.version.id) {
                e.version.metadata = m.clone();
            }
        }
        Ok(out)
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
            "v.state = 'published' AND substr(p.combined_sha256, 1, length(?1)) = ?1",
            Some(prefix),
        )
    }
}
