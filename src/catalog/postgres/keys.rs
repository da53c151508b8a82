//! The PostgreSQL catalog's trusted publisher keys (append-only states, guarded by the
//! triggers of migration 4).

use super::*;

/// The columns of a [`KeyRecord`], from `trusted_keys k`.
const KEY_COLS: &str = "k.name, k.key_id, k.public_key, k.scopes, k.added_at, \
     (SELECT s.at FROM key_states s WHERE s.key_id = k.key_id AND s.state = 'retired'), \
     (SELECT s.at FROM key_states s WHERE s.key_id = k.key_id AND s.state = 'revoked')";

fn key_row(r: &Row) -> Result<KeyRecord> {
    let scopes: String = get(r, 3)?;
    Ok(KeyRecord {
        name: get(r, 0)?,
        key_id: get(r, 1)?,
        public_key: get(r, 2)?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        added_at: get(r, 4)?,
        retired_at: get(r, 5)?,
        revoked_at: get(r, 6)?,
    })
}

fn insert_state(
    tx: &mut Transaction,
    key_id: &str,
    name: &str,
    state: KeyState,
    at: &str,
) -> Result<bool> {
    if state == KeyState::Active {
        return Err(CatalogError::Invalid(
            "a key's state only moves forward: nothing makes it active again".into(),
        ));
    }
    let recorded = tx
        .execute(
            "INSERT INTO key_states (key_id, state, name, at) SELECT $1::text, $2::text, $3::text, $4::text \
             WHERE NOT EXISTS (SELECT 1 FROM key_states WHERE key_id = $1::text AND state = $2::text)",
            &[&key_id, &state.as_str(), &name, &at],
        )
        .ctx(&format!("key {key_id}"))?
        > 0;
    if recorded {
        super::tlog::append(tx, &log_entry::key_state(key_id, name, state, at))?;
    }
    Ok(recorded)
}

impl KeyCatalog for PgCatalog {
    fn trusted_keys(&self) -> Result<Vec<KeyRecord>> {
        // one statement: one moment of both tables
        rows(
            self.conn()?
                .query(
                    &format!("SELECT {KEY_COLS} FROM trusted_keys k ORDER BY k.name"),
                    &[],
                )
                .ctx("trusted keys")?,
            key_row,
        )
    }

    fn add_trusted_key(&self, k: &KeyRecord) -> Result<()> {
        let scopes = serde_json::to_string(&k.scopes).map_err(backend)?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO trusted_keys (name, key_id, public_key, scopes, added_at) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[&k.name, &k.key_id, &k.public_key, &scopes, &k.added_at],
            )
            .ctx(&format!("trusted key {} ({})", k.name, k.key_id))?;
            super::tlog::append(tx, &log_entry::key_added(k))?;
            // (the key row first: the insert guard refuses a key id with states)
            if let Some(at) = &k.retired_at {
                insert_state(tx, &k.key_id, &k.name, KeyState::Retired, at)?;
            }
            if let Some(at) = &k.revoked_at {
                insert_state(tx, &k.key_id, &k.name, KeyState::Revoked, at)?;
            }
            Ok(())
        })
    }

    fn set_key_scopes(&self, key_id: &str, scopes: &[String]) -> Result<()> {
        let list = serde_json::to_string(scopes).map_err(backend)?;
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE trusted_keys SET scopes = $2 WHERE key_id = $1",
                    &[&key_id, &list],
                )
                .ctx(&format!("trusted key {key_id}"))?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!("trusted key {key_id}")));
            }
            Ok(())
        })
    }

    fn record_key_state(
        &self,
        key_id: &str,
        name: &str,
        state: KeyState,
        at: &str,
    ) -> Result<bool> {
        self.write(|tx| insert_state(tx, key_id, name, state, at))
    }

    fn remove_trusted_key(&self, key_id: &str) -> Result<()> {
        self.write(|tx| {
            let n = tx
                .execute("DELETE FROM trusted_keys WHERE key_id = $1", &[&key_id])
                .ctx(&format!("trusted key {key_id}"))?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!("trusted key {key_id}")));
            }
            Ok(())
        })
    }
}
