//! API tokens and the bootstrap principal.
//!
//! A token reads `imgsrv_<id>_<secret>`: `id` (16 hex) finds the row, `secret`
//! (64 hex, 256 random bits) is checked against its stored SHA-256 in
//! constant time. The plaintext is shown once and never stored. A plain hash
//! is enough here because the secret is random, not a password.

use crate::catalog::{self, ApiToken, AuthCatalog, CatalogError, Principal};
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::path::Path;

pub const ACTION_CONTENT_WRITE: &str = "content.write";
pub const ACTION_AUTH_MANAGE: &str = "auth.manage";
pub const ROLE_AUTH_MANAGER: &str = "auth-manager";
pub const ROLE_CONTENT_WRITER: &str = "content-writer";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The bootstrap token is meant to be replaced by tokens issued per
/// publisher; a year keeps a fresh homelab install working meanwhile.
const BOOTSTRAP_TOKEN_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid bearer token")]
    InvalidToken,
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal_id: String,
    pub token_id: String,
    pub actions: Vec<String>,
}

impl Caller {
    pub fn can(&self, action: &str) -> bool {
        self.actions.iter().any(|a| a == action)
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::getrandom(&mut b).expect("the OS random generator is available");
    hex::encode(b)
}

fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits `imgsrv_<id>_<secret>`.
fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("imgsrv_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| c.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

/// Issues a token for `principal_id`; returns the stored row and the
/// plaintext (to show once).
pub fn issue_token(
    cat: &dyn AuthCatalog,
    principal_id: &str,
    name: &str,
    expires_at: Option<String>,
) -> Result<(ApiToken, String), CatalogError> {
    cat.get_principal(principal_id)?;
    let id = random_hex(8);
    let secret = random_hex(32);
    let t = ApiToken {
        id: id.clone(),
        principal_id: principal_id.to_string(),
        name: name.to_string(),
        secret_hash: hash_secret(&secret),
        expires_at,
        last_used_at: None,
        revoked_at: None,
        created_at: catalog::now(),
    };
    cat.insert_token(&t)?;
    Ok((t, format!("imgsrv_{id}_{secret}")))
}

/// Checks a bearer token: known, secret matches, not revoked, not expired.
pub fn authenticate(cat: &dyn AuthCatalog, token: &str) -> Result<Caller, AuthError> {
    let (id, secret) = parse_token(token.trim()).ok_or(AuthError::InvalidToken)?;
    let row = match cat.get_token(id) {
        Ok(r) => r,
        Err(CatalogError::NotFound(_)) => return Err(AuthError::InvalidToken),
        Err(e) => return Err(e.into()),
    };
    if !ct_eq(&row.secret_hash, &hash_secret(secret)) || row.revoked_at.is_some() {
        return Err(AuthError::InvalidToken);
    }
    if let Some(exp) = &row.expires_at {
        match chrono::DateTime::parse_from_rfc3339(exp) {
            Ok(t) if t > chrono::Utc::now() => {}
            _ => return Err(AuthError::InvalidToken),
        }
    }
    let actions = cat.principal_actions(&row.principal_id)?;
    // last-used is advisory: a failure to record it must not fail the request
    if let Err(e) = cat.touch_token(&row.id) {
        log::warn!("recording token use: {e}");
    }
    Ok(Caller {
        principal_id: row.principal_id,
        token_id: row.id,
        actions,
    })
}

/// First start: when no principal holds `auth-manager`, creates one holding
/// both roles and writes its token to `DATA_DIR/admin.token` (mode 0600).
/// Returns the principal when one was made.
pub fn bootstrap(cat: &dyn AuthCatalog, data_dir: &Path) -> anyhow::Result<Option<Principal>> {
    if cat.count_principals_with_role(ROLE_AUTH_MANAGER)? > 0 {
        return Ok(None);
    }
    let p = cat.create_principal("service", "bootstrap admin", r#"{"bootstrap":true}"#)?;
    cat.grant_role(&p.id, ROLE_AUTH_MANAGER)?;
    cat.grant_role(&p.id, ROLE_CONTENT_WRITER)?;
    let expires = (chrono::Utc::now() + chrono::Duration::days(BOOTSTRAP_TOKEN_DAYS))
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let (_, plaintext) = issue_token(cat, &p.id, "bootstrap", Some(expires))?;
    write_secret_file(&data_dir.join(ADMIN_TOKEN_FILE), &format!("{plaintext}\n"))?;
    Ok(Some(cat.get_principal(&p.id)?))
}

/// Writes a file readable only by its owner, atomically.
pub fn write_secret_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".secret-")
        .tempfile_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    tmp.write_all(contents.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::SqliteCatalog;

    #[test]
    fn tokens_are_checked_hashed_revocable_and_expire() {
        let d = tempfile::tempdir().unwrap();
        let cat = SqliteCatalog::open(&d.path().join("c.db")).unwrap();
        let p = bootstrap(&cat, d.path())
            .unwrap()
            .expect("first start makes a principal");
        assert_eq!(p.role_ids, vec![ROLE_AUTH_MANAGER, ROLE_CONTENT_WRITER]);
        assert!(bootstrap(&cat, d.path()).unwrap().is_none(), "idempotent");
        use std::os::unix::fs::PermissionsExt;
        let f = d.path().join(ADMIN_TOKEN_FILE);
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let token = std::fs::read_to_string(&f).unwrap();
        let caller = authenticate(&cat, token.trim()).unwrap();
        assert!(caller.can(ACTION_CONTENT_WRITE) && caller.can(ACTION_AUTH_MANAGE));
        let row = cat.get_token(&caller.token_id).unwrap();
        assert!(
            !token.contains(&hex::encode(&row.secret_hash)),
            "only the hash is stored"
        );
        assert!(row.last_used_at.is_some());

        // tampered secret, garbage, unknown id
        let mut bad = token.trim().to_string();
        let last = bad.pop().unwrap();
        bad.push(if last == '0' { '1' } else { '0' });
        assert!(matches!(
            authenticate(&cat, &bad),
            Err(AuthError::InvalidToken)
        ));
        assert!(matches!(
            authenticate(&cat, "imgsrv_x_y"),
            Err(AuthError::InvalidToken)
        ));
        assert!(matches!(
            authenticate(
                &cat,
                &format!("imgsrv_{}_{}", "0".repeat(16), "0".repeat(64))
            ),
            Err(AuthError::InvalidToken)
        ));

        cat.revoke_token(&caller.token_id).unwrap();
        assert!(matches!(
            authenticate(&cat, token.trim()),
            Err(AuthError::InvalidToken)
        ));

        let (_, expired) =
            issue_token(&cat, &p.id, "old", Some("2020-01-01T00:00:00Z".into())).unwrap();
        assert!(matches!(
            authenticate(&cat, &expired),
            Err(AuthError::InvalidToken)
        ));
    }
}
