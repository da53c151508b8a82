//! The SQLite catalog's trusted publisher keys (append-only states, guarded by the
//! triggers of migration 6) and the failed-login throttle's counts.

use super::*;

/// The columns of a [`KeyRecord`], from `trusted_keys k`.
const KEY_COLS: &str = "k.name, k.key_id, k.public_key, k.scopes, k.added_at, \
     (SELECT s.at FROM key_states s WHERE s.key_id = k.key_id AND s.state = 'retired'), \
     (SELECT s.at FROM key_states s WHERE s.key_id = k.key_id AND s.state = 'revoked')";

fn key_row(r: &Row) -> rusqlite::Result<KeyRecord> {
    let scopes: String = text(r, 3)?;
    Ok(KeyRecord {
        name: text(r, 0)?,
        key_id: text(r, 1)?,
        public_key: text(r, 2)?,
        // unreadable scopes (the sqlite3 shell ignoring the CHECK) allow nothing
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        added_at: text(r, 4)?,
        retired_at: opt_text(r, 5)?,
        revoked_at: opt_text(r, 6)?,
    })
}

fn insert_state(
    tx: &Connection,
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
            "INSERT INTO key_states (key_id, state, name, at) SELECT ?1, ?2, ?3, ?4 \
             WHERE NOT EXISTS (SELECT 1 FROM key_states WHERE key_id = ?1 AND state = ?2)",
            params![key_id, state.as_str(), name, at],
        )
        .ctx(&format!("key {key_id}"))?
        > 0;
    if recorded {
        super::tlog::append(tx, &log_entry::key_state(key_id, name, state, at))?;
    }
    Ok(recorded)
}

impl KeyCatalog for SqliteCatalog {
    fn trusted_keys(&self) -> Result<Vec<KeyRecord>> {
        let c = self.conn()?;
        let mut st = c
            .prepare(&format!(
                "SELECT {KEY_COLS} FROM trusted_keys k ORDER BY k.name"
            ))
            .map_err(backend)?;
        let rows = st.query_map([], key_row).map_err(backend)?;
        rows.collect::<rusqlite::Result<_>>().map_err(backend)
    }

    fn add_trusted_key(&self, k: &KeyRecord) -> Result<()> {
        let scopes = serde_json::to_string(&k.scopes).map_err(backend)?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO trusted_keys (name, key_id, public_key, scopes, added_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![k.name, k.key_id, k.public_key, scopes, k.added_at],
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
                    "UPDATE trusted_keys SET scopes = ?2 WHERE key_id = ?1",
                    params![key_id, list],
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
                .execute("DELETE FROM trusted_keys WHERE key_id = ?1", [key_id])
                .ctx(&format!("trusted key {key_id}"))?;
            if n == 0 {
                return Err(CatalogError::NotFound(format!("trusted key {key_id}")));
            }
            Ok(())
        })
    }
}

/// [`AuthCatalog::note_auth_failure`]: one upsert and the clean-up, in one transaction.
pub(super) fn note_auth_failure(
    cat: &SqliteCatalog,
    client: &str,
    at_ms: i64,
    forget_ms: i64,
) -> Result<u32> {
    let since = at_ms.saturating_sub(forget_ms);
    cat.write(|tx| {
        tx.execute("DELETE FROM auth_failures WHERE last_ms < ?1", [since])
            .ctx("auth failures")?;
        let n: i64 = tx
            .query_row(
                "INSERT INTO auth_failures (client, failures, last_ms) VALUES (?1, 1, ?2) \
                 ON CONFLICT (client) DO UPDATE SET failures = failures + 1, \
                 last_ms = max(last_ms, excluded.last_ms) RETURNING failures",
                params![client, at_ms],
                |r| r.get(0),
            )
            .ctx("auth failures")?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    })
}
