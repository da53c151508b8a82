//! API tokens and the bootstrap principal.
//!
//! Who may do what is the identity matrix: a principal holds grants, each a
//! role on the images matching a scope glob. `auth-manager` (auth.manage,
//! global), `content-writer` (content.write + content.read in its scope),
//! `reader` (content.read in its scope, private images included).
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
pub const ACTION_CONTENT_READ: &str = "content.read";
pub const ACTION_AUTH_MANAGE: &str = "auth.manage";
pub const ROLE_AUTH_MANAGER: &str = "auth-manager";
pub const ROLE_CONTENT_WRITER: &str = "content-writer";
pub const ROLE_READER: &str = "reader";
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

/// Who is calling, once authenticated: the principal and, per grant, the
/// actions it allows on which scope.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal_id: String,
    pub principal_name: String,
    pub token_id: String,
    /// (action, scope) pairs from the principal's grants.
    pub permissions: Vec<(String, String)>,
}

impl Caller {
    /// May the caller do `action` on image `image`?
    pub fn can_on(&self, action: &str, image: &str) -> bool {
        self.permissions
            .iter()
            .any(|(a, scope)| a == action && crate::names::scope_matches(scope, image))
    }

    /// May the caller do `action` on at least one image (uploads, which
    /// belong to no image yet)? For `auth.manage`, only a `*` grant counts.
    pub fn can_somewhere(&self, action: &str) -> bool {
        self.permissions
            .iter()
            .any(|(a, scope)| a == action && (action != ACTION_AUTH_MANAGE || scope == "*"))
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
    // the principal may be named by id or by name; the token row holds the id
    let principal_id = cat.get_principal(principal_id)?.id;
    let id = random_hex(8);
    let secret = random_hex(32);
    let t = ApiToken {
        id: id.clone(),
        principal_id,
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
    // a token whose principal is gone (removed, or its row edited by hand) is no token
    let principal = match cat.get_principal(&row.principal_id) {
        Ok(p) => p,
        Err(CatalogError::NotFound(_)) => return Err(AuthError::InvalidToken),
        Err(e) => return Err(e.into()),
    };
    let role_actions = cat.role_actions()?;
    let permissions = principal
        .grants
        .iter()
        .flat_map(|g| {
            role_actions
                .iter()
                .filter(move |(r, _)| *r == g.role)
                .map(move |(_, a)| (a.clone(), g.scope.clone()))
        })
        .collect();
    // last-used is advisory: a failure to record it must not fail the request
    if let Err(e) = cat.touch_token(&row.id) {
        log::warn!("recording token use: {e}");
    }
    Ok(Caller {
        principal_id: principal.id,
        principal_name: principal.name,
        token_id: row.id,
        permissions,
    })
}

/// Checks HTTP basic credentials `NAME:TOKEN` (what the Incus client sends
/// for a remote URL `https://NAME:TOKEN@host`): the token must belong to the
/// principal named NAME.
pub fn authenticate_basic(
    cat: &dyn AuthCatalog,
    name: &str,
    token: &str,
) -> Result<Caller, AuthError> {
    let c = authenticate(cat, token)?;
    if c.principal_name != name {
        return Err(AuthError::InvalidToken);
    }
    Ok(c)
}

/// How long a client address's failures are remembered without a new one.
pub const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(900);

/// The delay before answering the `n`th failure in a row (from 1): 100 ms,
/// doubling with each failure, at most 5 s.
pub fn failure_delay(n: u32) -> std::time::Duration {
    use std::time::Duration;
    Duration::from_millis(100u64.saturating_mul(1 << n.saturating_sub(1).min(6)))
        .min(Duration::from_secs(5))
}

/// Slows down repeated failed authentications per client address: each
/// failure doubles the delay before the 401 ([`failure_delay`]), forgotten
/// after [`FAILURE_WINDOW`] without failures. The failures are counted in the
/// catalog ([`AuthCatalog::note_auth_failure`]), so failures against one
/// instance slow the next attempt on every other sharing it; while the catalog
/// cannot count them, this process counts them alone. The delay runs on the
/// failing connection's own thread, so other clients are not held up.
#[derive(Default)]
pub struct FailureThrottle {
    local: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (u32, std::time::Instant)>>,
}

impl FailureThrottle {
    /// Records a failure from `ip` and returns how long to wait before answering.
    pub fn failed(&self, cat: &dyn AuthCatalog, ip: std::net::IpAddr) -> std::time::Duration {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let window_ms = i64::try_from(FAILURE_WINDOW.as_millis()).unwrap_or(i64::MAX);
        match cat.note_auth_failure(&ip.to_string(), now_ms, window_ms) {
            Ok(n) => failure_delay(n),
            Err(e) => {
                log::warn!(
                    "counting a failed authentication in the catalog: {e}; counted here alone"
                );
                self.failed_here(ip)
            }
        }
    }

    /// The count of this process alone.
    fn failed_here(&self, ip: std::net::IpAddr) -> std::time::Duration {
        use std::time::Instant;
        let mut m = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        m.retain(|_, (_, t)| now.duration_since(*t) < FAILURE_WINDOW);
        let e = m.entry(ip).or_insert((0, now));
        e.0 = e.0.saturating_add(1);
        e.1 = now;
        failure_delay(e.0)
    }
}

/// First start: when no principal holds `auth-manager`, creates one holding
/// both roles and writes its token to `DATA_DIR/admin.token` (mode 0600).
/// Returns the principal when one was made.
pub fn bootstrap(cat: &dyn AuthCatalog, data_dir: &Path) -> anyhow::Result<Option<Principal>> {
    if cat.count_principals_with_role(ROLE_AUTH_MANAGER)? > 0 {
        return Ok(None);
    }
    let name = if cat.get_principal("admin").is_ok() {
        format!("admin-{}", random_hex(3))
    } else {
        "admin".into()
    };
    let p = cat.create_principal(&name, "service", "bootstrap admin", r#"{"bootstrap":true}"#)?;
    cat.grant(&p.id, ROLE_AUTH_MANAGER, "*")?;
    cat.grant(&p.id, ROLE_CONTENT_WRITER, "*")?;
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
    fn failures_back_off_per_address_through_the_catalog() {
        use std::time::Duration;
        let ms = |n| failure_delay(n).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(6), ms(7), ms(50)],
            [100, 200, 400, 3200, 5000, 5000]
        );
        let d = tempfile::tempdir().unwrap();
        let cat = SqliteCatalog::open(&d.path().join("c.db")).unwrap();
        let t = FailureThrottle::default();
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(t.failed(&cat, a), Duration::from_millis(100));
        assert_eq!(t.failed(&cat, a), Duration::from_millis(200));
        assert_eq!(t.failed(&cat, b), Duration::from_millis(100));
        // another process (instance) on the same catalog goes on counting
        let other = FailureThrottle::default();
        assert_eq!(other.failed(&cat, a), Duration::from_millis(400));
        assert!(t.local.lock().unwrap().is_empty(), "counted in the catalog");
    }

    #[test]
    fn tokens_are_checked_hashed_revocable_and_expire() {
        let d = tempfile::tempdir().unwrap();
        let cat = SqliteCatalog::open(&d.path().join("c.db")).unwrap();
        let p = bootstrap(&cat, d.path())
            .unwrap()
            .expect("first start makes a principal");
        assert_eq!(p.role_ids, vec![ROLE_AUTH_MANAGER, ROLE_CONTENT_WRITER]);
        assert_eq!(p.name, "admin");
        assert!(bootstrap(&cat, d.path()).unwrap().is_none(), "idempotent");
        use std::os::unix::fs::PermissionsExt;
        let f = d.path().join(ADMIN_TOKEN_FILE);
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let token = std::fs::read_to_string(&f).unwrap();
        let caller = authenticate(&cat, token.trim()).unwrap();
        assert!(
            caller.can_on(ACTION_CONTENT_WRITE, "x") && caller.can_somewhere(ACTION_AUTH_MANAGE)
        );
        assert!(caller.can_on(ACTION_CONTENT_READ, "x"));
        assert_eq!(caller.principal_name, "admin");
        assert!(authenticate_basic(&cat, "admin", token.trim()).is_ok());
        assert!(matches!(
            authenticate_basic(&cat, "other", token.trim()),
            Err(AuthError::InvalidToken)
        ));
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
