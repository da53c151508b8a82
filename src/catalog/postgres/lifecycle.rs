//! The PostgreSQL catalog's lifecycle: draft deletion, retirement (append-only,
//! guarded by triggers), collection.

use super::*;

const RETIREMENT_COLS: &str = "r.version_id, r.reason, r.principal_id, r.principal_name, \
     r.retired_at, (SELECT c.collected_at FROM collections c WHERE c.version_id = r.version_id)";

fn retirement_row(r: &Row, o: usize) -> Result<Retirement> {
    Ok(Retirement {
        version_id: get(r, o)?,
        reason: get(r, o + 1)?,
        principal_id: get(r, o + 2)?,
        principal_name: get(r, o + 3)?,
        retired_at: get(r, o + 4)?,
        collected_at: get(r, o + 5)?,
    })
}

impl LifecycleCatalog for PgCatalog {
    fn delete_draft(&self, image: &str, version: &str) -> Result<()> {
        self.write(|tx| {
            let v = Self::load_version(tx, image, version)?;
            if v.state != VersionState::Draft {
                return Err(CatalogError::Precondition(format!(
                    "{image}@{version} is {}: only drafts can be deleted (retire a published version instead)",
                    v.state.as_str()
                )));
            }
            tx.execute(
                "DELETE FROM artifact_attachments WHERE artifact_id IN \
                 (SELECT id FROM release_artifacts WHERE version_id = $1)",
                &[&v.id],
            )
            .ctx("attachments")?;
            tx.execute(
                "DELETE FROM release_artifacts WHERE version_id = $1",
                &[&v.id],
            )
            .ctx("artifacts")?;
            tx.execute(
                "DELETE FROM version_metadata WHERE version_id = $1",
                &[&v.id],
            )
            .ctx("metadata")?;
            tx.execute("DELETE FROM image_versions WHERE id = $1", &[&v.id])
                .ctx(&format!("version {image}@{version}"))?;
            Ok(())
        })
    }

    fn retire(
        &self,
        version_id: &str,
        reason: &str,
        principal_id: Option<&str>,
        principal_name: Option<&str>,
    ) -> Result<Retirement> {
        let now = now();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO retirements (version_id, reason, principal_id, principal_name, retired_at) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[&version_id, &reason, &principal_id, &principal_name, &now],
            )
            .ctx("retirement")?;
            let r = one(
                tx.query_opt(
                    "SELECT i.name, v.version, p.manifest_digest FROM image_versions v \
                     JOIN images i ON i.id = v.image_id \
                     JOIN publish_records p ON p.version_id = v.id WHERE v.id = $1",
                    &[&version_id],
                ),
                "retired version",
            )?;
            let entry = log_entry::retired(get(&r, 0)?, get(&r, 1)?, digest_col(&r, 2)?, &now);
            super::tlog::append(tx, &entry)?;
            Ok(Retirement {
                version_id: version_id.to_string(),
                reason: reason.to_string(),
                principal_id: principal_id.map(str::to_string),
                principal_name: principal_name.map(str::to_string),
                retired_at: now.clone(),
                collected_at: None,
            })
        })
    }

    fn retirement(&self, version_id: &str) -> Result<Option<Retirement>> {
        self.conn()?
            .query_opt(
                &format!("SELECT {RETIREMENT_COLS} FROM retirements r WHERE r.version_id = $1"),
                &[&version_id],
            )
            .ctx("retirement")?
            .map(|r| retirement_row(&r, 0))
            .transpose()
    }

    fn retirements(&self) -> Result<Vec<RetiredVersion>> {
        rows(
            self.conn()?
                .query(
                    &format!(
                        "SELECT i.name, v.version, {RETIREMENT_COLS} FROM retirements r \
                         JOIN image_versions v ON v.id = r.version_id JOIN images i ON i.id = v.image_id \
                         ORDER BY r.retired_at, i.name, v.version"
                    ),
                    &[],
                )
                .ctx("retirements")?,
            |r| {
                Ok(RetiredVersion {
                    image: get(r, 0)?,
                    version: get(r, 1)?,
                    retirement: retirement_row(r, 2)?,
                })
            },
        )
    }

    fn collect_version(&self, version_id: &str) -> Result<()> {
        let now = now();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO collections (version_id, collected_at) SELECT $1::text, $2::text \
                 WHERE NOT EXISTS (SELECT 1 FROM collections WHERE version_id = $1::text)",
                &[&version_id, &now],
            )
            .ctx("collection")?;
            Ok(())
        })
    }
}
