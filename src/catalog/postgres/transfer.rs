//! The PostgreSQL catalog's side of a transfer (see `catalog/transfer.rs`): rows
//! written as another catalog had them, each load one SERIALIZABLE transaction,
//! every row through the PL/pgSQL guards of `0002-guards.sql` (they stay
//! `ENABLE ALWAYS`; nothing here disables or skips one).

use super::super::transfer::*;
use super::auth::{token_row, TOKEN_COLS};
use super::*;

impl TransferCatalog for PgCatalog {
    fn principal_record(&self, id: &str) -> Result<PrincipalRecord> {
        self.read(|c| {
            let r = one(
                c.query_opt(
                    "SELECT id, name, kind, display_name, attributes, created_at FROM principals \
                     WHERE id = $1",
                    &[&id],
                ),
                &format!("principal {id}"),
            )?;
            let grants = rows(
                c.query(
                    "SELECT role_id, scope, created_at FROM grants WHERE principal_id = $1 \
                     ORDER BY role_id, scope",
                    &[&id],
                )
                .ctx("grants")?,
                |g| {
                    Ok(GrantRecord {
                        role: get(g, 0)?,
                        scope: get(g, 1)?,
                        created_at: get(g, 2)?,
                    })
                },
            )?;
            let tokens = rows(
                c.query(
                    &format!(
                        "SELECT {TOKEN_COLS} FROM api_tokens WHERE principal_id = $1 \
                         ORDER BY created_at, id"
                    ),
                    &[&id],
                )
                .ctx("api tokens")?,
                token_row,
            )?;
            Ok(PrincipalRecord {
                id: get(&r, 0)?,
                name: get(&r, 1)?,
                kind: get(&r, 2)?,
                display_name: get(&r, 3)?,
                attributes: get(&r, 4)?,
                created_at: get(&r, 5)?,
                grants,
                tokens,
            })
        })
    }

    fn load_blob(&self, b: &Blob) -> Result<()> {
        self.write(|tx| insert_blob_row(tx, b))
    }

    fn load_principal(&self, p: &PrincipalRecord) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO principals (id, name, kind, display_name, attributes, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &p.id,
                    &p.name,
                    &p.kind,
                    &p.display_name,
                    &p.attributes,
                    &p.created_at,
                ],
            )
            .ctx(&format!("principal {}", p.name))?;
            for g in &p.grants {
                tx.execute(
                    "INSERT INTO grants (principal_id, role_id, scope, created_at) \
                     VALUES ($1, $2, $3, $4)",
                    &[&p.id, &g.role, &g.scope, &g.created_at],
                )
                .ctx(&format!("grant {} on {} (is the role known?)", g.role, g.scope))?;
            }
            for t in &p.tokens {
                tx.execute(
                    &format!(
                        "INSERT INTO api_tokens ({TOKEN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    ),
                    &[
                        &t.id,
                        &p.id,
                        &t.name,
                        &t.secret_hash,
                        &t.expires_at,
                        &t.last_used_at,
                        &t.revoked_at,
                        &t.created_at,
                    ],
                )
                .ctx(&format!("api token {}", t.id))?;
            }
            Ok(())
        })
    }

    fn load_image(&self, i: &Image) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO images (id, name, display_name, description, visibility, created_at, \
                 updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &i.id,
                    &i.name,
                    &i.display_name,
                    &i.description,
                    &i.visibility,
                    &i.created_at,
                    &i.updated_at,
                ],
            )
            .ctx(&format!("image {}", i.name))?;
            Ok(())
        })
    }

    fn load_version(&self, rec: &VersionRecord) -> Result<()> {
        self.write(|tx| load_version_in(tx, rec))
    }

    fn load_alias(&self, a: &Alias) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO aliases (id, image_id, alias, version_id, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &a.id,
                    &a.image_id,
                    &a.alias,
                    &a.version_id,
                    &a.created_at,
                    &a.updated_at,
                ],
            )
            .ctx(&format!("alias {}", a.alias))?;
            Ok(())
        })
    }

    fn load_audit(&self, rows: &[AuditRecord]) -> Result<()> {
        self.write(|tx| {
            // the identity sequence counts too: an id handed out to an append that
            // rolled back is no less taken than a row
            let r = one(
                tx.query_opt(
                    "SELECT coalesce(max(id), 0), \
                     (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END \
                        FROM audit_log_id_seq) FROM audit_log",
                    &[],
                ),
                "audit log",
            )?;
            let mut last = get::<i64>(&r, 0)?.max(get::<i64>(&r, 1)?);
            for row in rows {
                if row.id <= last {
                    return Err(audit_out_of_order(row.id, last));
                }
                let e = &row.entry;
                let status = e.status.map(i32::from);
                tx.execute(
                    "INSERT INTO audit_log (id, at, principal_id, principal_name, action, target, \
                     outcome, status, method, path, remote, detail) OVERRIDING SYSTEM VALUE \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                    &[
                        &row.id,
                        &row.at,
                        &e.principal_id,
                        &e.principal_name,
                        &e.action,
                        &e.target,
                        &e.outcome,
                        &status,
                        &e.method,
                        &e.path,
                        &e.remote,
                        &e.detail,
                    ],
                )
                .ctx(&format!("audit row {}", row.id))?;
                last = row.id;
            }
            if !rows.is_empty() {
                // later appends get ids after the loaded rows
                tx.execute(
                    "SELECT setval(pg_get_serial_sequence('audit_log', 'id'), $1)",
                    &[&last],
                )
                .ctx("audit log")?;
            }
            Ok(())
        })
    }

    fn load_job_run(&self, j: &JobRun) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO job_runs (job, last_attempt_at, last_outcome, last_success_at, \
                 last_error_at, detail) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (job) DO UPDATE SET last_attempt_at = excluded.last_attempt_at, \
                 last_outcome = excluded.last_outcome, last_success_at = excluded.last_success_at, \
                 last_error_at = excluded.last_error_at, detail = excluded.detail",
                &[
                    &j.job,
                    &j.last_attempt_at,
                    &j.last_outcome,
                    &j.last_success_at,
                    &j.last_error_at,
                    &j.detail,
                ],
            )
            .ctx(&format!("job run {}", j.job))?;
            Ok(())
        })
    }

    fn key_state_records(&self) -> Result<Vec<KeyStateRecord>> {
        let found = rows(
            self.conn()?
                .query(
                    "SELECT key_id, state, name, at FROM key_states \
                     ORDER BY key_id, CASE state WHEN 'retired' THEN 0 ELSE 1 END",
                    &[],
                )
                .ctx("key states")?,
            |r| {
                let (key_id, state, name, at): (String, String, String, String) =
                    (get(r, 0)?, get(r, 1)?, get(r, 2)?, get(r, 3)?);
                let state = key_state_of(&state).ok_or_else(|| {
                    CatalogError::Backend(format!("key {key_id}: unknown state {state:?}"))
                })?;
                Ok(KeyStateRecord {
                    key_id,
                    state,
                    name,
                    at,
                })
            },
        )?;
        Ok(found)
    }

    fn load_trusted_key(&self, k: &KeyRecord, states: &[KeyStateRecord]) -> Result<()> {
        let states = key_states_of(k, states)?;
        let scopes = serde_json::to_string(&k.scopes).map_err(backend)?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO trusted_keys (name, key_id, public_key, scopes, added_at) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[&k.name, &k.key_id, &k.public_key, &scopes, &k.added_at],
            )
            .ctx(&format!("trusted key {} ({})", k.name, k.key_id))?;
            for s in &states {
                insert_key_state(tx, s)?;
            }
            Ok(())
        })
    }

    fn load_key_state(&self, s: &KeyStateRecord) -> Result<()> {
        self.write(|tx| {
            let listed: bool = get(
                &tx.query_one(
                    "SELECT EXISTS (SELECT 1 FROM trusted_keys WHERE key_id = $1)",
                    &[&s.key_id],
                )
                .ctx("trusted keys")?,
                0,
            )?;
            if listed {
                return Err(CatalogError::Invalid(format!(
                    "key {} is listed: its states are loaded with it",
                    s.key_id
                )));
            }
            insert_key_state(tx, s)
        })
    }
}

/// One state record as it was (through the guards of migration 4).
fn insert_key_state(tx: &mut Transaction, s: &KeyStateRecord) -> Result<()> {
    if s.state == KeyState::Active {
        return Err(CatalogError::Invalid(format!(
            "key {}: a state record says active",
            s.key_id
        )));
    }
    tx.execute(
        "INSERT INTO key_states (key_id, state, name, at) VALUES ($1, $2, $3, $4)",
        &[&s.key_id, &s.state.as_str(), &s.name, &s.at],
    )
    .ctx(&format!("{} record of key {}", s.state.as_str(), s.key_id))?;
    Ok(())
}

fn insert_blob_row(tx: &mut Transaction, b: &Blob) -> Result<()> {
    tx.execute(
        &format!("INSERT INTO cas_blobs ({BLOB_COLS}) VALUES ($1, $2, $3, $4, $5, $6)"),
        &[
            &b.digest.to_string(),
            &i64_of(b.size_bytes)?,
            &b.storage_key,
            &b.media_type,
            &b.verified_at,
            &b.created_at,
        ],
    )
    .ctx(&format!("blob {}", b.digest))?;
    Ok(())
}

/// The version's life replayed in `tx` (see `catalog/transfer.rs`).
fn load_version_in(tx: &mut Transaction, rec: &VersionRecord) -> Result<()> {
    let v = &rec.version;
    let what = format!("version {}", rec.name());
    tx.execute(
        "INSERT INTO image_versions (id, image_id, version, state, published_at, created_at, \
         updated_at) VALUES ($1, $2, $3, 'draft', NULL, $4, $5)",
        &[&v.id, &v.image_id, &v.version, &v.created_at, &v.updated_at],
    )
    .ctx(&what)?;
    for (k, value) in &v.metadata {
        tx.execute(
            "INSERT INTO version_metadata (version_id, key, value) VALUES ($1, $2, $3)",
            &[&v.id, k, value],
        )
        .ctx(&format!("metadata key {k}"))?;
    }
    for a in &rec.artifacts {
        let r = &a.artifact;
        tx.execute(
            &format!(
                "INSERT INTO release_artifacts ({ARTIFACT_INSERT}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ),
            &[
                &r.id,
                &v.id,
                &r.variant,
                &r.operating_system,
                &r.architecture,
                &r.format,
                &r.primary_blob_digest.to_string(),
                &i64_of(r.primary_blob_size_bytes)?,
                &r.primary_media_type,
                &r.created_at,
                &r.updated_at,
            ],
        )
        .ctx(&format!("artifact {}", r.id))?;
        for t in &a.attachments {
            tx.execute(
                &format!(
                    "INSERT INTO artifact_attachments ({ATTACHMENT_INSERT}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                ),
                &[
                    &t.id,
                    &r.id,
                    &t.name,
                    &t.media_type,
                    &t.blob_digest.to_string(),
                    &i64_of(t.blob_size_bytes)?,
                    &t.created_at,
                    &t.updated_at,
                ],
            )
            .ctx(&format!("attachment {}", t.id))?;
        }
    }
    let placeholders = match v.state {
        VersionState::Draft => Vec::new(),
        _ => publish_in(tx, rec)?,
    };
    // (a draft's retirement is refused by the guards, as any other change's)
    if let Some(r) = &rec.retirement {
        tx.execute(
            "INSERT INTO retirements (version_id, reason, principal_id, principal_name, \
             retired_at) VALUES ($1, $2, $3, $4, $5)",
            &[
                &v.id,
                &r.reason,
                &r.principal_id,
                &r.principal_name,
                &r.retired_at,
            ],
        )
        .ctx("retirement")?;
        if let Some(at) = &r.collected_at {
            tx.execute(
                "INSERT INTO collections (version_id, collected_at) VALUES ($1, $2)",
                &[&v.id, at],
            )
            .ctx("collection")?;
        }
    }
    for d in &placeholders {
        tx.execute("DELETE FROM cas_blobs WHERE digest = $1", &[&d.to_string()])
            .ctx(&format!("placeholder blob row {d}"))?;
    }
    Ok(())
}

/// The publishing half of a version's load: to publishing (with placeholder rows
/// for the blob rows a collected version lost), its publish record and projection
/// rows, then published. Returns the placeholders, deleted once the collection row
/// is in.
fn publish_in(tx: &mut Transaction, rec: &VersionRecord) -> Result<Vec<Digest>> {
    let v = &rec.version;
    let what = format!("version {}", rec.name());
    let mut placeholders = Vec::new();
    if rec.collected() {
        for (d, size) in rec.cited() {
            if PgCatalog::blob_by_digest(tx, &d)?.is_none() {
                insert_blob_row(tx, &placeholder(d, size, &v.created_at))?;
                placeholders.push(d);
            }
        }
    }
    let publishing_at = match &rec.publication {
        Some(p) => p.record.published_at.clone(),
        None => v.updated_at.clone(),
    };
    tx.execute(
        "UPDATE image_versions SET state = 'publishing', updated_at = $2 WHERE id = $1",
        &[&v.id, &publishing_at],
    )
    .ctx(&what)?;
    if let Some(p) = &rec.publication {
        let r = &p.record;
        tx.execute(
            "INSERT INTO publish_records (version_id, manifest, manifest_digest, signature, \
             signer_key_id, signer_key_name, verification, principal_id, published_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &v.id,
                &r.manifest,
                &r.manifest_digest.to_string(),
                &r.signature,
                &r.signer_key_id,
                &r.signer_key_name,
                &r.verification.as_str(),
                &r.principal_id,
                &r.published_at,
            ],
        )
        .ctx("publish record")?;
        for row in &p.projection {
            tx.execute(
                "INSERT INTO incus_projection (artifact_id, version_id, metadata_attachment_id, \
                 ftype, combined_sha256) VALUES ($1, $2, $3, $4, $5)",
                &[
                    &row.artifact_id,
                    &v.id,
                    &row.metadata_attachment_id,
                    &row.ftype,
                    &row.combined_sha256.hex(),
                ],
            )
            .ctx("projection row")?;
        }
    }
    if v.state == VersionState::Published {
        tx.execute(
            "UPDATE image_versions SET state = 'published', published_at = $2, updated_at = $3 \
             WHERE id = $1",
            &[&v.id, &v.published_at, &v.updated_at],
        )
        .ctx(&what)?;
    } else {
        tx.execute(
            "UPDATE image_versions SET updated_at = $2 WHERE id = $1",
            &[&v.id, &v.updated_at],
        )
        .ctx(&what)?;
    }
    Ok(placeholders)
}
