//! The PostgreSQL catalog's principals, roles, grants and API tokens.

use super::*;

pub(super) const TOKEN_COLS: &str =
    "id, principal_id, name, secret_hash, expires_at, last_used_at, revoked_at, created_at";
pub(super) fn token_row(r: &Row) -> Result<ApiToken> {
    Ok(ApiToken {
        id: get(r, 0)?,
        principal_id: get(r, 1)?,
        name: get(r, 2)?,
        secret_hash: get(r, 3)?,
        expires_at: get(r, 4)?,
        last_used_at: get(r, 5)?,
        revoked_at: get(r, 6)?,
        created_at: get(r, 7)?,
    })
}

/// The roles and their actions as stored.
fn read_roles(c: &mut impl GenericClient) -> Result<Vec<Role>> {
    let roles = c
        .query(
            "SELECT id, display_name, description FROM roles ORDER BY id",
            &[],
        )
        .ctx("roles")?;
    let actions = c
        .query(
            "SELECT role_id, action FROM role_actions ORDER BY role_id, action",
            &[],
        )
        .ctx("role actions")?;
    roles
        .iter()
        .map(|r| {
            let id: String = get(r, 0)?;
            let mut mine = Vec::new();
            for a in &actions {
                if get::<&str>(a, 0)? == id {
                    mine.push(get(a, 1)?);
                }
            }
            Ok(Role {
                display_name: get(r, 1)?,
                description: get(r, 2)?,
                actions: mine,
                id,
            })
        })
        .collect()
}

impl AuthCatalog for PgCatalog {
    fn roles(&self) -> Result<Vec<Role>> {
        self.read(|c| read_roles(c))
    }

    fn create_principal(
        &self,
        name: &str,
        kind: &str,
        display_name: &str,
        attributes: &str,
    ) -> Result<Principal> {
        let id = new_id();
        let now = now();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO principals (id, name, kind, display_name, attributes, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id, &name, &kind, &display_name, &attributes, &now],
            )
            .ctx(&format!("principal {name}"))?;
            Self::principal(tx, &id)
        })
    }

    fn get_principal(&self, id_or_name: &str) -> Result<Principal> {
        self.read(|c| Self::principal(c, id_or_name))
    }

    fn list_principals(&self) -> Result<Vec<Principal>> {
        self.read(|c| {
            let ids: Vec<String> = rows(
                c.query("SELECT id FROM principals ORDER BY name", &[])
                    .ctx("principals")?,
                |r| get(r, 0),
            )?;
            ids.iter().map(|id| Self::principal(c, id)).collect()
        })
    }

    fn delete_principal(&self, id: &str) -> Result<()> {
        self.write(|tx| {
            let p = Self::principal(tx, id)?;
            tx.execute("DELETE FROM api_tokens WHERE principal_id = $1", &[&p.id])
                .ctx("tokens")?;
            tx.execute("DELETE FROM grants WHERE principal_id = $1", &[&p.id])
                .ctx("grants")?;
            tx.execute("DELETE FROM principals WHERE id = $1", &[&p.id])
                .ctx("principal")?;
            Ok(())
        })
    }

    fn grant(&self, principal_id: &str, role: &str, scope: &str) -> Result<()> {
        let now = now();
        self.write(|tx| {
            let p = Self::principal(tx, principal_id)?;
            let known: bool = get(
                &tx.query_one(
                    "SELECT EXISTS (SELECT 1 FROM roles WHERE id = $1)",
                    &[&role],
                )
                .ctx("roles")?,
                0,
            )?;
            if !known {
                return Err(CatalogError::Invalid(format!("unknown role {role}")));
            }
            tx.execute(
                "INSERT INTO grants (principal_id, role_id, scope, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
                &[&p.id, &role, &scope, &now],
            )
            .ctx("grant")?;
            Ok(())
        })
    }

    fn revoke_grant(&self, principal_id: &str, role: &str, scope: &str) -> Result<()> {
        self.write(|tx| {
            let p = Self::principal(tx, principal_id)?;
            let n = tx
                .execute(
                    "DELETE FROM grants WHERE principal_id = $1 AND role_id = $2 AND scope = $3",
                    &[&p.id, &role, &scope],
                )
                .ctx("grant")?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!(
                    "grant {role} on {scope} for {}",
                    p.name
                )));
            }
            Ok(())
        })
    }

    fn role_actions(&self) -> Result<Vec<(String, String)>> {
        rows(
            self.conn()?
                .query(
                    "SELECT role_id, action FROM role_actions ORDER BY role_id, action",
                    &[],
                )
                .ctx("role actions")?,
            |r| Ok((get(r, 0)?, get(r, 1)?)),
        )
    }

    fn count_principals_with_role(&self, role: &str) -> Result<u64> {
        let r = self
            .conn()?
            .query_one(
                "SELECT count(DISTINCT principal_id) FROM grants WHERE role_id = $1",
                &[&role],
            )
            .ctx("grants")?;
        u64_col(&r, 0)
    }

    fn insert_token(&self, t: &ApiToken) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                &format!(
                    "INSERT INTO api_tokens ({TOKEN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                ),
                &[
                    &t.id,
                    &t.principal_id,
                    &t.name,
                    &t.secret_hash,
                    &t.expires_at,
                    &t.last_used_at,
                    &t.revoked_at,
                    &t.created_at,
                ],
            )
            .ctx("api token")?;
            Ok(())
        })
    }

    fn get_token(&self, id: &str) -> Result<ApiToken> {
        let r = one(
            self.conn()?.query_opt(
                &format!("SELECT {TOKEN_COLS} FROM api_tokens WHERE id = $1"),
                &[&id],
            ),
            "api token",
        )?;
        token_row(&r)
    }

    fn list_tokens(&self, principal_id: &str) -> Result<Vec<ApiToken>> {
        self.read(|c| {
            let principal_id = Self::principal(c, principal_id)?.id;
            rows(
                c.query(
                    &format!(
                        "SELECT {TOKEN_COLS} FROM api_tokens WHERE principal_id = $1 ORDER BY created_at, id"
                    ),
                    &[&principal_id],
                )
                .ctx("api tokens")?,
                token_row,
            )
        })
    }

    fn revoke_token(&self, id: &str) -> Result<()> {
        let now = now();
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1",
                    &[&id, &now],
                )
                .ctx("api token")?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!("api token {id}")));
            }
            Ok(())
        })
    }

    fn touch_token(&self, id: &str) -> Result<()> {
        let now = now();
        // one statement, outside a serializable transaction: a lost race between two
        // touches leaves one of the two times, which is what either would have written
        self.conn()?
            .execute(
                "UPDATE api_tokens SET last_used_at = $2 WHERE id = $1",
                &[&id, &now],
            )
            .ctx("api token")?;
        Ok(())
    }

    fn note_auth_failure(&self, client: &str, at_ms: i64, forget_ms: i64) -> Result<u32> {
        // Single statements outside a serializable transaction (the upsert locks its
        // row, so failures racing on several instances are all counted): a brute force
        // from one address must not turn into serialization retries.
        let since = at_ms.saturating_sub(forget_ms);
        let mut c = self.conn()?;
        c.execute("DELETE FROM auth_failures WHERE last_ms < $1", &[&since])
            .ctx("auth failures")?;
        let n: i32 = get(
            &c.query_one(
                "INSERT INTO auth_failures (client, failures, last_ms) VALUES ($1, 1, $2) \
                 ON CONFLICT (client) DO UPDATE SET \
                 failures = CASE WHEN auth_failures.last_ms < $3 THEN 1 \
                                 ELSE auth_failures.failures + 1 END, \
                 last_ms = greatest(auth_failures.last_ms, excluded.last_ms) \
                 RETURNING failures",
                &[&client, &at_ms, &since],
            )
            .ctx("auth failures")?,
            0,
        )?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}
