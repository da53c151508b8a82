//! The PostgreSQL catalog's CAS blob rows and upload sessions.

use super::*;

impl BlobCatalog for PgCatalog {
    fn get_blob(&self, digest: &Digest) -> Result<Option<Blob>> {
        Self::blob_by_digest(&mut *self.conn()?, digest)
    }

    fn insert_blob(&self, digest: &Digest, size: u64, media_type: Option<&str>) -> Result<Blob> {
        let now = now();
        let size_i = i64_of(size)?;
        self.write(|tx| {
            // only a digest not stored yet: a row never changes
            tx.execute(
                "INSERT INTO cas_blobs (digest, size_bytes, storage_key, media_type, verified_at, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (digest) DO NOTHING",
                &[&digest.to_string(), &size_i, &digest.cas_path(), &media_type, &now],
            )
            .ctx("blob")?;
            Ok(())
        })?;
        let b = self
            .get_blob(digest)?
            .ok_or_else(|| CatalogError::NotFound(format!("blob {digest}")))?;
        if b.size_bytes != size {
            return Err(CatalogError::Precondition(format!(
                "blob {digest} is stored with size {} not {size}",
                b.size_bytes
            )));
        }
        Ok(b)
    }

    fn create_upload(&self, s: &UploadSession) -> Result<()> {
        let digest = s.expected_digest.to_string();
        let size = i64_of(s.expected_size_bytes)?;
        self.write(|tx| {
            tx.execute(
                &format!(
                    "INSERT INTO upload_sessions ({UPLOAD_COLS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                ),
                &[
                    &s.id,
                    &digest,
                    &size,
                    &s.state.as_str(),
                    &s.expires_at,
                    &s.media_type_hint,
                    &s.filename_hint,
                    &s.failure_message,
                    &s.principal_id,
                    &s.created_at,
                    &s.updated_at,
                ],
            )
            .ctx("upload session")?;
            Ok(())
        })
    }

    fn get_upload(&self, id: &str) -> Result<UploadSession> {
        let r = one(
            self.conn()?.query_opt(
                &format!("SELECT {UPLOAD_COLS} FROM upload_sessions WHERE id = $1"),
                &[&id],
            ),
            &format!("upload {id}"),
        )?;
        upload_row(&r)
    }

    fn set_upload_state(
        &self,
        id: &str,
        state: UploadState,
        failure: Option<&str>,
    ) -> Result<UploadSession> {
        let now = now();
        self.write(|tx| {
            let r = tx
                .query_opt(
                    &format!(
                        "UPDATE upload_sessions SET state = $2, failure_message = $3, updated_at = $4 \
                         WHERE id = $1 RETURNING {UPLOAD_COLS}"
                    ),
                    &[&id, &state.as_str(), &failure, &now],
                )
                .ctx("upload")?
                .ok_or_else(|| CatalogError::NotFound(format!("upload {id}")))?;
            upload_row(&r)
        })
    }

    fn put_upload_part(&self, p: &UploadPart) -> Result<()> {
        let now = now();
        let part = i32::try_from(p.part_number)
            .map_err(|_| CatalogError::Invalid(format!("part number {}", p.part_number)))?;
        let size = i64_of(p.size_bytes)?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO upload_parts (upload_id, part_number, etag, size_bytes, uploaded_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (upload_id, part_number) DO UPDATE SET etag = excluded.etag, \
                 size_bytes = excluded.size_bytes, uploaded_at = excluded.uploaded_at",
                &[&p.upload_id, &part, &p.etag, &size, &now],
            )
            .ctx("upload part")?;
            tx.execute(
                "UPDATE upload_sessions SET state = 'uploading', updated_at = $2 \
                 WHERE id = $1 AND state = 'created'",
                &[&p.upload_id, &now],
            )
            .ctx("upload")?;
            Ok(())
        })
    }

    fn upload_parts(&self, id: &str) -> Result<Vec<UploadPart>> {
        rows(
            self.conn()?
                .query(
                    "SELECT upload_id, part_number, etag, size_bytes FROM upload_parts \
                     WHERE upload_id = $1 ORDER BY part_number",
                    &[&id],
                )
                .ctx("upload parts")?,
            |r| {
                let n: i32 = get(r, 1)?;
                Ok(UploadPart {
                    upload_id: get(r, 0)?,
                    part_number: u32::try_from(n).map_err(backend)?,
                    etag: get(r, 2)?,
                    size_bytes: u64_col(r, 3)?,
                })
            },
        )
    }
}
