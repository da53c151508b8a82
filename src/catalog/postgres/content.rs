//! The PostgreSQL catalog's content: images, versions, artifacts, attachments,
//! publishing, aliases and the generation counter.

use super::*;

impl ContentCatalog for PgCatalog {
    fn create_image(
        &self,
        name: &str,
        display_name: Option<&str>,
        description: Option<&str>,
        visibility: &str,
    ) -> Result<Image> {
        let now = now();
        let img = Image {
            id: new_id(),
            name: name.to_string(),
            display_name: display_name.map(str::to_string),
            description: description.map(str::to_string),
            visibility: visibility.to_string(),
            created_at: now.clone(),
            updated_at: now,
        };
        self.write(|tx| {
            tx.execute(
                "INSERT INTO images (id, name, display_name, description, visibility, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&img.id, &img.name, &img.display_name, &img.description, &img.visibility, &img.created_at, &img.updated_at],
            )
            .ctx(&format!("image {name}"))
        })?;
        Ok(img)
    }

    fn set_visibility(&self, name: &str, visibility: &str) -> Result<Image> {
        let now = now();
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE images SET visibility = $2, updated_at = $3 WHERE name = $1",
                    &[&name, &visibility, &now],
                )
                .ctx("image")?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!("image {name}")));
            }
            Self::image_by_name(tx, name)
        })
    }

    fn get_image(&self, name: &str) -> Result<Image> {
        Self::image_by_name(&mut *self.conn()?, name)
    }

    fn list_images(&self, include_unpublished: bool) -> Result<Vec<Image>> {
        let sql = if include_unpublished {
            format!("SELECT {IMAGE_COLS} FROM images i ORDER BY i.name")
        } else {
            format!(
                "SELECT {IMAGE_COLS} FROM images i WHERE EXISTS (SELECT 1 FROM image_versions v \
                 WHERE v.image_id = i.id AND v.state = 'published' AND {NOT_RETIRED}) ORDER BY i.name"
            )
        };
        rows(self.conn()?.query(&sql, &[]).ctx("images")?, |r| {
            image_row(r, 0)
        })
    }

    fn create_version(
        &self,
        image: &str,
        version: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<ImageVersion> {
        let id = new_id();
        let now = now();
        self.write(|tx| {
            let image_id = Self::image_id(tx, image)?;
            tx.execute(
                "INSERT INTO image_versions (id, image_id, version, state, published_at, created_at, updated_at) \
                 VALUES ($1, $2, $3, 'draft', NULL, $4, $4)",
                &[&id, &image_id, &version, &now],
            )
            .ctx(&format!("version {image}@{version}"))?;
            for (k, v) in metadata {
                tx.execute(
                    "INSERT INTO version_metadata (version_id, key, value) VALUES ($1, $2, $3)",
                    &[&id, k, v],
                )
                .ctx(&format!("metadata key {k}"))?;
            }
            Self::load_version_by_id(tx, &id)
        })
    }

    fn get_version(&self, image: &str, version: &str) -> Result<ImageVersion> {
        Self::load_version(&mut *self.conn()?, image, version)
    }

    fn list_versions(&self, image: &str, include_unpublished: bool) -> Result<Vec<ImageVersion>> {
        self.read(|c| {
            let image_id = Self::image_id(c, image)?;
            let filter = if include_unpublished {
                ""
            } else {
                "AND v.state = 'published'"
            };
            let mut out = rows(
                c.query(
                    &format!(
                        "SELECT {VERSION_COLS} FROM image_versions v JOIN images i ON i.id = v.image_id \
                         WHERE v.image_id = $1 {filter} AND {NOT_RETIRED} \
                         ORDER BY v.created_at DESC, v.version, v.id"
                    ),
                    &[&image_id],
                )
                .ctx("versions")?,
                |r| version_row(r, 0),
            )?;
            let mut meta: std::collections::HashMap<String, BTreeMap<String, String>> =
                Default::default();
            for r in c
                .query(
                    "SELECT m.version_id, m.key, m.value FROM version_metadata m \
                     JOIN image_versions v ON v.id = m.version_id WHERE v.image_id = $1",
                    &[&image_id],
                )
                .ctx("metadata")?
            {
                meta.entry(get(&r, 0)?)
                    .or_default()
                    .insert(get(&r, 1)?, get(&r, 2)?);
            }
            for v in &mut out {
                v.metadata = meta.remove(&v.id).unwrap_or_default();
            }
            Ok(out)
        })
    }

    fn version_view(&self, image: &str, version: &str) -> Result<VersionView> {
        self.read(|c| Self::view(c, image, version))
    }

    fn add_artifact(&self, version_id: &str, a: &NewArtifact) -> Result<Artifact> {
        let id = new_id();
        let now = now();
        let digest = a.primary_blob_digest.to_string();
        let size = i64_of(a.primary_blob_size_bytes)?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO release_artifacts (id, version_id, variant, operating_system, architecture, format, \
                 primary_blob_digest, primary_blob_size_bytes, primary_media_type, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)",
                &[
                    &id,
                    &version_id,
                    &a.variant,
                    &a.operating_system,
                    &a.architecture,
                    &a.format,
                    &digest,
                    &size,
                    &a.primary_media_type,
                    &now,
                ],
            )
            .ctx(&format!(
                "artifact ({}, {}, {}, {})",
                a.variant, a.operating_system, a.architecture, a.format
            ))?;
            Self::artifact_in_version(tx, version_id, &id)
        })
    }

    fn delete_artifact(&self, version_id: &str, artifact_id: &str) -> Result<()> {
        self.write(|tx| {
            Self::artifact_in_version(tx, version_id, artifact_id)?;
            tx.execute(
                "DELETE FROM artifact_attachments WHERE artifact_id = $1",
                &[&artifact_id],
            )
            .ctx("attachments")?;
            tx.execute(
                "DELETE FROM release_artifacts WHERE id = $1",
                &[&artifact_id],
            )
            .ctx("artifact")?;
            Ok(())
        })
    }

    fn add_attachment(
        &self,
        version_id: &str,
        artifact_id: &str,
        a: &NewAttachment,
    ) -> Result<Attachment> {
        let id = new_id();
        let now = now();
        let digest = a.blob_digest.to_string();
        let size = i64_of(a.blob_size_bytes)?;
        self.write(|tx| {
            Self::artifact_in_version(tx, version_id, artifact_id)?;
            tx.execute(
                "INSERT INTO artifact_attachments (id, artifact_id, name, media_type, blob_digest, blob_size_bytes, \
                 created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                &[&id, &artifact_id, &a.name, &a.media_type, &digest, &size, &now],
            )
            .ctx(&format!("attachment {}", a.name))?;
            let r = one(
                tx.query_opt(
                    &format!("SELECT {ATTACHMENT_COLS} FROM artifact_attachments t WHERE t.id = $1"),
                    &[&id],
                ),
                "attachment",
            )?;
            attachment_row(&r, 0)
        })
    }

    fn delete_attachment(
        &self,
        version_id: &str,
        artifact_id: &str,
        attachment_id: &str,
    ) -> Result<()> {
        self.write(|tx| {
            Self::artifact_in_version(tx, version_id, artifact_id)?;
            let n = tx
                .execute(
                    "DELETE FROM artifact_attachments WHERE id = $1 AND artifact_id = $2",
                    &[&attachment_id, &artifact_id],
                )
                .ctx("attachment")?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!(
                    "attachment {attachment_id}"
                )));
            }
            Ok(())
        })
    }

    fn publish(
        &self,
        record: &PublishRecord,
        projection: &[ProjectionRow],
    ) -> Result<ImageVersion> {
        self.write(|tx| {
            let v = Self::load_version_by_id(tx, &record.version_id)?;
            if v.state != VersionState::Draft {
                return Err(CatalogError::Precondition("version is not a draft".into()));
            }
            let view = Self::view(tx, &v.image_name, &v.version)?;
            if crate::manifest::canonical(&view) != record.manifest {
                return Err(CatalogError::Precondition(
                    "the draft changed while it was being published; fetch the manifest and sign it again".into(),
                ));
            }
            let now = &record.published_at;
            tx.execute(
                "UPDATE image_versions SET state = 'publishing', updated_at = $2 WHERE id = $1",
                &[&v.id, now],
            )
            .ctx("version")?;
            tx.execute(
                "INSERT INTO publish_records (version_id, manifest, manifest_digest, signature, signer_key_id, \
                 signer_key_name, verification, principal_id, published_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &v.id,
                    &record.manifest,
                    &record.manifest_digest.to_string(),
                    &record.signature,
                    &record.signer_key_id,
                    &record.signer_key_name,
                    &record.verification.as_str(),
                    &record.principal_id,
                    now,
                ],
            )
            .ctx("publish record")?;
            for p in projection {
                tx.execute(
                    "INSERT INTO incus_projection (artifact_id, version_id, metadata_attachment_id, ftype, combined_sha256) \
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&p.artifact_id, &v.id, &p.metadata_attachment_id, &p.ftype, &p.combined_sha256.hex()],
                )
                .ctx("projection row")?;
            }
            tx.execute(
                "UPDATE image_versions SET state = 'published', published_at = $2, updated_at = $2 WHERE id = $1",
                &[&v.id, now],
            )
            .ctx("version")?;
            super::tlog::append(tx, &log_entry::published(&v, record))?;
            Self::load_version_by_id(tx, &v.id)
        })
    }

    fn publish_record(&self, version_id: &str) -> Result<PublishRecord> {
        let r = one(
            self.conn()?.query_opt(
                "SELECT version_id, manifest, manifest_digest, signature, signer_key_id, signer_key_name, \
                 verification, principal_id, published_at FROM publish_records WHERE version_id = $1",
                &[&version_id],
            ),
            "publish record",
        )?;
        let verification: String = get(&r, 6)?;
        Ok(PublishRecord {
            version_id: get(&r, 0)?,
            manifest: get(&r, 1)?,
            manifest_digest: digest_col(&r, 2)?,
            signature: get(&r, 3)?,
            signer_key_id: get(&r, 4)?,
            signer_key_name: get(&r, 5)?,
            verification: match verification.as_str() {
                "verified" => Verification::Verified,
                "skipped" => Verification::Skipped,
                _ => Verification::Unverified,
            },
            principal_id: get(&r, 7)?,
            published_at: get(&r, 8)?,
        })
    }

    fn projection_rows(&self, version_id: &str) -> Result<Vec<ProjectionRow>> {
        rows(
            self.conn()?
                .query(
                    "SELECT artifact_id, metadata_attachment_id, ftype, combined_sha256 FROM incus_projection \
                     WHERE version_id = $1 ORDER BY artifact_id",
                    &[&version_id],
                )
                .ctx("projection rows")?,
            |r| {
                Ok(ProjectionRow {
                    artifact_id: get(r, 0)?,
                    metadata_attachment_id: get(r, 1)?,
                    ftype: get(r, 2)?,
                    combined_sha256: hex_digest_col(r, 3)?,
                })
            },
        )
    }

    fn put_alias(&self, image: &str, alias: &str, version: &str) -> Result<Alias> {
        let now = now();
        self.write(|tx| {
            let image_id = Self::image_id(tx, image)?;
            let v = Self::load_version(tx, image, version)?;
            if v.state != VersionState::Published {
                return Err(CatalogError::Precondition(format!(
                    "version {version} is not published"
                )));
            }
            let n = tx
                .execute(
                    "UPDATE aliases SET version_id = $3, updated_at = $4 WHERE image_id = $1 AND alias = $2",
                    &[&image_id, &alias, &v.id, &now],
                )
                .ctx("alias")?;
            if n == 0 {
                tx.execute(
                    "INSERT INTO aliases (id, image_id, alias, version_id, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $5)",
                    &[&new_id(), &image_id, &alias, &v.id, &now],
                )
                .ctx(&format!("alias {alias}"))?;
            }
            Self::alias_by_name(tx, image, alias)
        })
    }

    fn get_alias(&self, image: &str, alias: &str) -> Result<Alias> {
        Self::alias_by_name(&mut *self.conn()?, image, alias)
    }

    fn delete_alias(&self, image: &str, alias: &str) -> Result<()> {
        self.write(|tx| {
            let a = Self::alias_by_name(tx, image, alias)?;
            tx.execute("DELETE FROM aliases WHERE id = $1", &[&a.id])
                .ctx("alias")?;
            Ok(())
        })
    }

    fn list_aliases(&self, image: &str) -> Result<Vec<Alias>> {
        self.read(|c| {
            Self::image_id(c, image)?;
            rows(
                c.query(
                    &format!(
                        "SELECT {ALIAS_COLS} FROM aliases l JOIN images i ON i.id = l.image_id \
                         JOIN image_versions v ON v.id = l.version_id WHERE i.name = $1 \
                         ORDER BY l.alias, l.id"
                    ),
                    &[&image],
                )
                .ctx("aliases")?,
                |r| alias_row(r, 0),
            )
        })
    }

    fn all_aliases(&self) -> Result<Vec<(String, Alias)>> {
        rows(
            self.conn()?
                .query(
                    &format!(
                        "SELECT i.name, {ALIAS_COLS} FROM aliases l JOIN images i ON i.id = l.image_id \
                         JOIN image_versions v ON v.id = l.version_id ORDER BY i.name, l.alias"
                    ),
                    &[],
                )
                .ctx("aliases")?,
            |r| Ok((get(r, 0)?, alias_row(r, 1)?)),
        )
    }

    fn generation(&self) -> Result<Option<i64>> {
        let r = self
            .conn()?
            .query_opt("SELECT generation FROM catalog_state WHERE id = 1", &[])
            .ctx("generation")?;
        r.map(|r| get::<i64>(&r, 0)).transpose()
    }

    fn renew_generation(&self, above: i64) -> Result<i64> {
        self.write(|tx| migrate::ensure_generation(tx, Some(above)))
    }

    fn projection_entries(&self) -> Result<Vec<ProjectionEntry>> {
        self.projection_where(&format!("v.state = 'published' AND {NOT_RETIRED}"), None)
    }

    fn projection_by_fingerprint(&self, prefix: &str) -> Result<Vec<ProjectionEntry>> {
        self.projection_matching(prefix)
    }

    fn blob_references(&self, digest: &Digest) -> Result<Vec<BlobRef>> {
        rows(
            self.conn()?
                .query(
                    &format!(
                        "SELECT DISTINCT {IMAGE_COLS}, v.id, v.state = 'published' FROM image_versions v \
                         JOIN images i ON i.id = v.image_id JOIN release_artifacts a ON a.version_id = v.id \
                         LEFT JOIN artifact_attachments t ON t.artifact_id = a.id \
                         WHERE a.primary_blob_digest = $1 OR t.blob_digest = $1"
                    ),
                    &[&digest.to_string()],
                )
                .ctx("blob references")?,
            |r| {
                Ok(BlobRef {
                    image: image_row(r, 0)?,
                    version_id: get(r, 7)?,
                    published: get(r, 8)?,
                })
            },
        )
    }
}
