//! Local administration on the server's data directory (`--data DIR`):
//! principals, grants, tokens, the identity matrix and the audit log. These
//! work without the HTTP API (and without a token), for the operator who owns
//! the files; every change is written to the audit log as `local:<user>`.

use crate::auth::{self, ROLE_AUTH_MANAGER};
use crate::catalog::{AuditCatalog, AuditEntry, AuditQuery, AuthCatalog};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Opens the catalog of an initialised data directory.
pub fn open_catalog(data_dir: &Path) -> Result<std::sync::Arc<dyn crate::catalog::Catalog>> {
    crate::maint::restore::refuse_incomplete(data_dir)?;
    let config = crate::config::Config::load(data_dir, None)?;
    let db = data_dir.join(crate::app::CATALOG_FILE);
    if config.storage.catalog == crate::config::CatalogBackend::Sqlite && !db.exists() {
        bail!(
            "{} has no catalog: run `imgsrv init --data {}` first",
            data_dir.display(),
            data_dir.display()
        );
    }
    let catalog = crate::catalog::open(&config.storage, data_dir)?;
    crate::maint::migrate::refuse_unfinished(catalog.as_ref())?;
    Ok(catalog)
}

/// The audit name of whoever runs a local command.
pub fn local_actor() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| {
            // SAFETY: getuid has no preconditions.
            format!("uid{}", unsafe { libc::getuid() })
        });
    format!("local:{user}")
}

/// Records a local change in the audit log.
pub fn record(
    cat: &dyn AuditCatalog,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> Result<()> {
    record_as(cat, &local_actor(), action, target, detail)
}

/// Records a change made by `actor` (e.g. a scheduled mirror job) in the audit log.
pub fn record_as(
    cat: &dyn AuditCatalog,
    actor: &str,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> Result<()> {
    cat.append_audit(&AuditEntry {
        principal_name: Some(actor.to_string()),
        action: action.to_string(),
        target: target.to_string(),
        outcome: "ok".into(),
        detail: detail.to_string(),
        ..Default::default()
    })
    .context("writing the audit log")
}

pub fn principal_add(
    data_dir: &Path,
    name: &str,
    kind: &str,
    display_name: Option<&str>,
) -> Result<()> {
    if !crate::names::principal_name(name) {
        bail!("invalid principal name {name:?}: 1 to 64 of [a-z0-9._-], starting with a letter or digit");
    }
    if !matches!(kind, "user" | "service") {
        bail!("--kind is user or service");
    }
    let cat = open_catalog(data_dir)?;
    let p = cat.create_principal(name, kind, display_name.unwrap_or(name), "{}")?;
    record(
        cat.as_ref(),
        "principal.add",
        name,
        serde_json::json!({ "id": p.id, "kind": kind }),
    )?;
    println!(
        "principal {} added (id {}); give it roles with `imgsrv grant add`",
        p.name, p.id
    );
    Ok(())
}

pub fn principal_list(data_dir: &Path) -> Result<()> {
    let cat = open_catalog(data_dir)?;
    println!("{:<24} {:<8} {:<38} GRANTS", "NAME", "KIND", "ID");
    for p in cat.list_principals()? {
        let grants: Vec<String> = p
            .grants
            .iter()
            .map(|g| format!("{}:{}", g.role, g.scope))
            .collect();
        println!(
            "{:<24} {:<8} {:<38} {}",
            p.name,
            p.kind,
            p.id,
            grants.join(" ")
        );
    }
    Ok(())
}

pub fn principal_remove(data_dir: &Path, name: &str) -> Result<()> {
    let cat = open_catalog(data_dir)?;
    let p = cat.get_principal(name)?;
    refuse_last_manager(
        cat.as_ref(),
        &p.id,
        p.grants.iter().any(|g| g.role == ROLE_AUTH_MANAGER),
    )?;
    cat.delete_principal(&p.id)?;
    record(
        cat.as_ref(),
        "principal.remove",
        &p.name,
        serde_json::json!({ "id": p.id }),
    )?;
    println!("principal {} removed with its grants and tokens", p.name);
    Ok(())
}

/// Removing the last auth-manager would leave nobody able to manage access
/// through the API; the operator can still do it here, but not by accident.
fn refuse_last_manager(cat: &dyn AuthCatalog, principal_id: &str, is_manager: bool) -> Result<()> {
    if !is_manager {
        return Ok(());
    }
    let managers = cat
        .list_principals()?
        .into_iter()
        .filter(|p| p.id != principal_id && p.grants.iter().any(|g| g.role == ROLE_AUTH_MANAGER))
        .count();
    if managers == 0 {
        bail!("refusing: this is the last principal holding auth-manager; grant it to another principal first");
    }
    Ok(())
}

fn check_grant(cat: &dyn AuthCatalog, role: &str, scope: &str) -> Result<()> {
    let roles = cat.roles()?;
    if !roles.iter().any(|r| r.id == role) {
        let known: Vec<&str> = roles.iter().map(|r| r.id.as_str()).collect();
        bail!("unknown role {role:?} (roles: {})", known.join(", "));
    }
    if !crate::names::scope(scope) {
        bail!("invalid scope {scope:?}: an image-name glob such as debian-* or * (quote it in the shell)");
    }
    if role == ROLE_AUTH_MANAGER && scope != "*" {
        bail!("auth-manager applies to the whole server: use scope *");
    }
    Ok(())
}

pub fn grant_add(data_dir: &Path, principal: &str, role: &str, scope: &str) -> Result<()> {
    let cat = open_catalog(data_dir)?;
    check_grant(cat.as_ref(), role, scope)?;
    let p = cat.get_principal(principal)?;
    cat.grant(&p.id, role, scope)?;
    record(
        cat.as_ref(),
        "grant.add",
        &p.name,
        serde_json::json!({ "role": role, "scope": scope }),
    )?;
    println!("{} may now act as {role} on {scope}", p.name);
    Ok(())
}

pub fn grant_rm(data_dir: &Path, principal: &str, role: &str, scope: &str) -> Result<()> {
    let cat = open_catalog(data_dir)?;
    let p = cat.get_principal(principal)?;
    if role == ROLE_AUTH_MANAGER {
        refuse_last_manager(cat.as_ref(), &p.id, true)?;
    }
    cat.revoke_grant(&p.id, role, scope)?;
    record(
        cat.as_ref(),
        "grant.remove",
        &p.name,
        serde_json::json!({ "role": role, "scope": scope }),
    )?;
    println!("{} no longer holds {role} on {scope}", p.name);
    Ok(())
}

/// Parses `30d`, `12h`, `90m`, `2w`, `3600s`, `never`, or an RFC 3339 time.
pub fn parse_expiry(s: &str) -> Result<Option<String>> {
    if s == "never" {
        return Ok(None);
    }
    let at = if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        t.with_timezone(&chrono::Utc)
    } else {
        let (num, unit) = s.split_at(s.len().saturating_sub(1));
        let n: i64 = num
            .parse()
            .with_context(|| format!("--expires {s:?}: expected e.g. 30d, 12h, never"))?;
        let secs = match unit {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86400,
            "w" => n * 7 * 86400,
            _ => bail!("--expires {s:?}: unit must be s, m, h, d or w"),
        };
        if n <= 0 {
            bail!("--expires must be in the future");
        }
        chrono::Utc::now() + chrono::Duration::seconds(secs)
    };
    if at <= chrono::Utc::now() {
        bail!("--expires must be in the future");
    }
    Ok(Some(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
}

pub fn token_issue(
    data_dir: &Path,
    principal: &str,
    expires: &str,
    name: Option<&str>,
) -> Result<()> {
    let cat = open_catalog(data_dir)?;
    let p = cat.get_principal(principal)?;
    let expires_at = parse_expiry(expires)?;
    let (t, plaintext) = auth::issue_token(
        cat.as_ref(),
        &p.id,
        name.unwrap_or("cli"),
        expires_at.clone(),
    )?;
    record(
        cat.as_ref(),
        "token.issue",
        &p.name,
        serde_json::json!({ "token_id": t.id, "expires_at": expires_at }),
    )?;
    println!(
        "token {} for {} (expires {}); it is shown once, on the next line:",
        t.id,
        p.name,
        expires_at.as_deref().unwrap_or("never")
    );
    println!("{plaintext}");
    Ok(())
}

pub fn token_revoke(data_dir: &Path, token_id: &str) -> Result<()> {
    let cat = open_catalog(data_dir)?;
    let t = cat
        .get_token(token_id)
        .with_context(|| format!("no token with id {token_id}"))?;
    cat.revoke_token(token_id)?;
    let p = cat.get_principal(&t.principal_id)?;
    record(
        cat.as_ref(),
        "token.revoke",
        &p.name,
        serde_json::json!({ "token_id": token_id }),
    )?;
    println!("token {token_id} of {} revoked", p.name);
    Ok(())
}

/// The identity matrix: one row per principal, one column per role, the
/// scopes in the cells.
pub fn matrix(data_dir: &Path) -> Result<String> {
    let cat = open_catalog(data_dir)?;
    let roles: Vec<String> = cat.roles()?.into_iter().map(|r| r.id).collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["PRINCIPAL".to_string(), "KIND".to_string()];
    header.extend(roles.iter().map(|r| r.to_uppercase()));
    header.push("TOKENS".into());
    rows.push(header);
    let now = chrono::Utc::now();
    for p in cat.list_principals()? {
        let mut row = vec![p.name.clone(), p.kind.clone()];
        for r in &roles {
            let scopes: Vec<&str> = p
                .grants
                .iter()
                .filter(|g| &g.role == r)
                .map(|g| g.scope.as_str())
                .collect();
            row.push(if scopes.is_empty() {
                "-".into()
            } else {
                scopes.join(",")
            });
        }
        let active = cat
            .list_tokens(&p.id)?
            .iter()
            .filter(|t| t.revoked_at.is_none())
            .filter(|t| {
                t.expires_at
                    .as_deref()
                    .map(|e| chrono::DateTime::parse_from_rfc3339(e).is_ok_and(|e| e > now))
                    .unwrap_or(true)
            })
            .count();
        row.push(active.to_string());
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// An `imgsrv audit --since/--until` time as the audit log stores it (UTC,
/// RFC 3339 with nanoseconds, so that it compares as text): an RFC 3339 time
/// (any offset), a date `YYYY-MM-DD` (midnight UTC), or a duration ago (`90m`,
/// `24h`, `7d`). Anything else is refused, saying what is accepted.
pub fn parse_audit_time(s: &str) -> Result<String> {
    let s = s.trim();
    let at = if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        t.with_timezone(&chrono::Utc)
    } else if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
    } else if s.ends_with(|c: char| c.is_ascii_alphabetic())
        && s.starts_with(|c: char| c.is_ascii_digit())
    {
        let ago = crate::config::parse_duration(s)
            .ok()
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
            .with_context(|| {
                format!("{s:?} is not a duration: use e.g. 90m, 24h or 7d (that long ago)")
            })?;
        ago
    } else {
        bail!(
            "{s:?} is not a time: use a date (2026-11-01), an RFC 3339 time \
             (2026-11-01T12:00:00Z) or a duration ago (24h, 7d)"
        );
    };
    Ok(at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
}

/// Prints audit rows, as a table or as JSON lines (`json`).
pub fn audit(data_dir: &Path, q: &AuditQuery, json: bool) -> Result<()> {
    let rows = open_catalog(data_dir)?.query_audit(q)?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    for r in rows {
        let res = if json {
            serde_json::to_writer(&mut out, &r)
                .map_err(std::io::Error::other)
                .and_then(|()| writeln!(out))
        } else {
            writeln!(
                out,
                "{:>6} {} {:<24} {:<18} {:<7} {:<4} {} {}",
                r.id,
                r.at,
                r.entry.principal_name.as_deref().unwrap_or("-"),
                r.entry.action,
                r.entry.outcome,
                r.entry
                    .status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.entry.target,
                if r.entry.detail == "{}" {
                    ""
                } else {
                    &r.entry.detail
                }
            )
        };
        match res {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_times() {
        assert_eq!(
            parse_audit_time("2026-11-01").unwrap(),
            "2026-11-01T00:00:00.000000000Z"
        );
        assert_eq!(
            parse_audit_time("2026-11-01T14:00:00+02:00").unwrap(),
            "2026-11-01T12:00:00.000000000Z"
        );
        let day_ago = parse_audit_time("24h").unwrap();
        let t = chrono::DateTime::parse_from_rfc3339(&day_ago).unwrap();
        let hours = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_minutes();
        assert!((24 * 60 - 1..=24 * 60 + 1).contains(&hours), "{hours}");
        assert!(parse_audit_time("7d").is_ok());
        for bad in [
            "yesterday",
            "2026-13-45",
            "2026-02-30",
            "24y",
            "",
            "7 d",
            "-1d",
        ] {
            let e = parse_audit_time(bad).unwrap_err().to_string();
            assert!(e.contains("24h") || e.contains("7d"), "{bad}: {e}");
        }
    }

    #[test]
    fn expiry_parsing() {
        assert_eq!(parse_expiry("never").unwrap(), None);
        let in30 = parse_expiry("30d").unwrap().unwrap();
        let t = chrono::DateTime::parse_from_rfc3339(&in30).unwrap();
        let days = (t.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_hours();
        assert!((29 * 24..=30 * 24).contains(&days), "{days}");
        assert!(parse_expiry("2999-01-01T00:00:00Z").unwrap().is_some());
        for bad in ["", "30", "30y", "-1d", "0d", "2000-01-01T00:00:00Z", "soon"] {
            assert!(parse_expiry(bad).is_err(), "{bad}");
        }
    }
}
