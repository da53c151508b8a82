//! `/v1/auth/*` (auth-manager only): principals, grants, API tokens and the
//! identity matrix.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/auth/roles` | roles and their actions |
//! | `GET /v1/auth/matrix` | every principal with its grants and token counts |
//! | `GET\|POST /v1/auth/principals` | list / create `{name, kind?, display_name?}` |
//! | `GET\|DELETE /v1/auth/principals/{p}` | one principal (id or name) / remove it with its grants and tokens |
//! | `GET /v1/auth/principals/{p}/grants` | its grants |
//! | `PUT\|DELETE /v1/auth/principals/{p}/grants/{role}/{scope}` | add / remove a grant (scope glob percent-encoded if needed) |
//! | `PUT\|DELETE /v1/auth/principals/{p}/roles/{role}` | the original API: a grant on scope `*` |
//! | `GET\|POST /v1/auth/principals/{p}/api-tokens` | list / issue `{name?, expires_at}` (plaintext shown once) |
//! | `DELETE /v1/auth/api-tokens/{id}` | revoke |

use super::message::{Request, Response};
use super::response::{json, methods, read_json, ApiError};
use super::routes::Ctx;
use crate::app::App;
use crate::auth;
use crate::catalog::Catalog;
use serde::Deserialize;
use serde_json::json as j;

type Res = Result<Response, ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePrincipal {
    name: String,
    #[serde(default = "default_kind")]
    kind: String,
    display_name: Option<String>,
}

fn default_kind() -> String {
    "user".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueToken {
    name: Option<String>,
    expires_at: String,
}

fn check_grant(role: &str, scope: &str) -> Result<(), ApiError> {
    if !crate::names::scope(scope) {
        return Err(ApiError::bad_request(format!(
            "invalid scope {scope:?}: an image-name glob such as debian-* or *"
        )));
    }
    if role == auth::ROLE_AUTH_MANAGER && scope != "*" {
        return Err(ApiError::bad_request(
            "auth-manager applies to the whole server: use scope *",
        ));
    }
    Ok(())
}

pub fn auth_routes(app: &App, req: &mut Request<'_>, ctx: &mut Ctx, m: &str, segs: &[&str]) -> Res {
    ctx.op_name(&format!("auth.{}", m.to_ascii_lowercase()), segs.join("/"));
    // (refused before a route is matched: still labelled as an auth route)
    req.route = "/v1/auth/*";
    ctx.require_manage()?;
    let cat = app.catalog.as_ref();
    match segs {
        ["roles"] => {
            methods!(req, "/v1/auth/roles", m; "GET" => Ok(json(200, &j!({ "roles": cat.roles()? }))))
        }
        ["matrix"] => methods!(req, "/v1/auth/matrix", m; "GET" => {
            let mut rows = Vec::new();
            for p in cat.list_principals()? {
                let tokens = cat.list_tokens(&p.id)?;
                let active = tokens.iter().filter(|t| t.revoked_at.is_none()).count();
                rows.push(j!({ "principal": p.name, "id": p.id, "grants": p.grants, "active_tokens": active }));
            }
            Ok(json(200, &j!({ "matrix": rows })))
        }),
        ["principals"] => methods!(req, "/v1/auth/principals", m;
            "GET" => Ok(json(200, &j!({ "principals": cat.list_principals()? }))),
            "POST" => create_principal(req, ctx, cat),
        ),
        ["principals", p] => methods!(req, "/v1/auth/principals/{principal}", m;
            "GET" => Ok(json(200, &cat.get_principal(p)?)),
            "DELETE" => {
                ctx.op_name("principal.remove", p.to_string());
                cat.delete_principal(p)?;
                Ok(Response::new(204))
            },
        ),
        ["principals", p, "grants"] => {
            methods!(req, "/v1/auth/principals/{principal}/grants", m; "GET" => Ok(json(200, &j!({ "grants": cat.get_principal(p)?.grants }))))
        }
        ["principals", p, "grants", _, _] | ["principals", p, "roles", _] => {
            methods!(req, if segs[2] == "grants" { "/v1/auth/principals/{principal}/grants/{role}/{scope}" } else { "/v1/auth/principals/{principal}/roles/{role}" }, m;
                "PUT" => grant_change(ctx, cat, p, segs, true),
                "DELETE" => grant_change(ctx, cat, p, segs, false),
            )
        }
        ["principals", p, "api-tokens"] => {
            methods!(req, "/v1/auth/principals/{principal}/api-tokens", m;
                "GET" => Ok(json(200, &j!({ "api_tokens": cat.list_tokens(p)? }))),
                "POST" => issue_token(req, ctx, cat, p),
            )
        }
        ["api-tokens", id] => methods!(req, "/v1/auth/api-tokens/{token}", m; "DELETE" => {
            ctx.op_name("token.revoke", id.to_string());
            cat.revoke_token(id)?;
            Ok(Response::new(204))
        }),
        _ => Err(ApiError::not_found(format!(
            "no route for {m} {}",
            req.path
        ))),
    }
}

/// The (role, scope) a grant route names: `grants/{role}/{scope}`, or the
/// original `roles/{role}` meaning scope `*`.
fn scope_of<'a>(segs: &[&'a str]) -> Option<&'a str> {
    match segs {
        [_, _, "grants", _, scope] => Some(scope),
        [_, _, "roles", _] => Some("*"),
        _ => None,
    }
}

fn grant_change(
    ctx: &mut Ctx,
    cat: &dyn crate::catalog::Catalog,
    p: &str,
    segs: &[&str],
    add: bool,
) -> Res {
    let role = segs[3];
    let scope = scope_of(segs).unwrap_or("*");
    ctx.op_name(
        if add { "grant.add" } else { "grant.remove" },
        format!("{p} {role} {scope}"),
    );
    let known = cat.roles()?.iter().any(|r| r.id == role);
    if !known {
        return Err(ApiError::bad_request(format!("unknown role {role}")));
    }
    check_grant(role, scope)?;
    if add {
        cat.grant(p, role, scope)?;
    } else {
        cat.revoke_grant(p, role, scope)?;
    }
    Ok(Response::new(204))
}

fn create_principal(req: &mut Request<'_>, ctx: &mut Ctx, cat: &dyn Catalog) -> Res {
    let b: CreatePrincipal = read_json(req)?;
    ctx.op_name("principal.add", b.name.clone());
    if !crate::names::principal_name(&b.name) {
        return Err(ApiError::bad_request(format!(
            "invalid principal name {:?}: 1 to 64 of [a-z0-9._-], starting with a letter or digit",
            b.name
        )));
    }
    if !matches!(b.kind.as_str(), "user" | "service") {
        return Err(ApiError::bad_request("kind must be user or service"));
    }
    let display = b.display_name.unwrap_or_else(|| b.name.clone());
    if display.trim().is_empty() || display.len() > 256 {
        return Err(ApiError::bad_request("display_name must be non-blank"));
    }
    Ok(json(
        201,
        &cat.create_principal(&b.name, &b.kind, &display, "{}")?,
    ))
}

fn issue_token(req: &mut Request<'_>, ctx: &mut Ctx, cat: &dyn Catalog, p: &str) -> Res {
    ctx.op_name("token.issue", p.to_string());
    let b: IssueToken = read_json(req)?;
    let exp = chrono::DateTime::parse_from_rfc3339(&b.expires_at)
        .map_err(|_| ApiError::bad_request("expires_at must be an RFC 3339 time"))?;
    if exp <= chrono::Utc::now() {
        return Err(ApiError::bad_request("expires_at must be in the future"));
    }
    let exp = exp
        .with_timezone(&chrono::Utc)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let (t, plaintext) = auth::issue_token(cat, p, b.name.as_deref().unwrap_or("api"), Some(exp))?;
    ctx.note("token_id", t.id.clone());
    let mut v = serde_json::to_value(&t).map_err(|e| ApiError::internal("serializing", e))?;
    v["plaintext"] = j!(plaintext);
    Ok(json(201, &v))
}
