//! `imgsrv list` and `imgsrv token list`: what a server publishes, and the API
//! tokens of a data directory, as a table (as `incus-simplestreams list` and
//! `incus image list` draw theirs), as JSON or as CSV.
//!
//! The image rows are one per artifact, read through the API (what the caller
//! may read: published versions; drafts too for a writer of the image). The
//! token rows never hold a secret: the catalog keeps only hashes.

use crate::catalog::{ApiToken, AuthCatalog};
use crate::client::{ApiClient, ClientError, VersionView};
use serde::Serialize;
use std::collections::HashMap;
use std::io::{self, Write};

/// How to print the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// One artifact of a version, as listed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ArtifactRow {
    pub image: String,
    pub version: String,
    /// `published`, or `draft` (shown to writers of the image).
    pub state: String,
    pub os: String,
    pub release: String,
    pub variant: String,
    pub architecture: String,
    /// `container` or `virtual-machine`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The Incus fingerprint (once published).
    pub fingerprint: Option<String>,
    /// The root file's size (squashfs, qcow2 or tarball).
    pub size_bytes: u64,
    pub published_at: Option<String>,
    /// The catalog's aliases naming the version.
    pub aliases: Vec<String>,
    pub format: String,
    pub artifact_id: String,
}

/// The rows of every image the caller may read, or of `image` alone.
pub fn image_rows(c: &ApiClient, image: Option<&str>) -> Result<Vec<ArtifactRow>, ClientError> {
    let names: Vec<String> = match image {
        Some(i) => vec![i.to_string()],
        None => c.list_images()?.into_iter().map(|i| i.name).collect(),
    };
    let mut rows = Vec::new();
    for name in &names {
        let aliases = c.list_aliases(name)?;
        for v in c.list_versions(name)? {
            let view = c.get_version(name, &v.version)?;
            let named: Vec<String> = aliases
                .iter()
                .filter(|a| a.version == v.version)
                .map(|a| a.alias.clone())
                .collect();
            version_rows(name, &view, named, &mut rows);
        }
    }
    Ok(rows)
}

/// One row per artifact of `view` (one with blanks for a draft without any).
fn version_rows(image: &str, view: &VersionView, aliases: Vec<String>, out: &mut Vec<ArtifactRow>) {
    let v = &view.version;
    let meta = |k: &str| v.metadata.get(k).filter(|s| !s.is_empty()).cloned();
    let fingerprints: HashMap<&str, (&str, &str)> = view
        .publication
        .iter()
        .flat_map(|p| &p.fingerprints)
        .map(|f| {
            (
                f.artifact_id.as_str(),
                (f.fingerprint.as_str(), f.kind.as_str()),
            )
        })
        .collect();
    let published_at = view
        .publication
        .as_ref()
        .and_then(|p| p.published_at.clone())
        .or_else(|| v.published_at.clone());
    let row = |os: String| ArtifactRow {
        image: image.to_string(),
        version: v.version.clone(),
        state: v.state.clone(),
        os: meta("os").unwrap_or(os),
        release: meta("release").unwrap_or_else(|| v.version.clone()),
        variant: String::new(),
        architecture: String::new(),
        kind: String::new(),
        fingerprint: None,
        size_bytes: 0,
        published_at: published_at.clone(),
        aliases: aliases.clone(),
        format: String::new(),
        artifact_id: String::new(),
    };
    if view.artifacts.is_empty() {
        out.push(row(String::new()));
    }
    let mut rows: Vec<ArtifactRow> = view
        .artifacts
        .iter()
        .map(|e| {
            let a = &e.artifact;
            let (fingerprint, kind) = match fingerprints.get(a.id.as_str()) {
                Some((fp, kind)) => (Some(fp.to_string()), kind.to_string()),
                None if a.format == "qcow2" => (None, "virtual-machine".to_string()),
                None => (None, "container".to_string()),
            };
            ArtifactRow {
                variant: a.variant.clone(),
                architecture: a.architecture.clone(),
                kind,
                fingerprint,
                size_bytes: a.primary_blob_size_bytes,
                format: a.format.clone(),
                artifact_id: a.id.clone(),
                ..row(a.operating_system.clone())
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.architecture, &a.variant, &a.kind).cmp(&(&b.architecture, &b.variant, &b.kind))
    });
    out.extend(rows);
}

/// Prints image rows in `format`.
pub fn print_images(rows: &[ArtifactRow], format: Format, out: &mut dyn Write) -> io::Result<()> {
    let header = [
        "IMAGE",
        "VERSION",
        "OS",
        "RELEASE",
        "VARIANT",
        "ARCHITECTURE",
        "TYPE",
        "FINGERPRINT",
        "SIZE",
        "DATE",
        "ALIASES",
    ];
    match format {
        Format::Json => json(rows, out),
        Format::Table => {
            let cells = rows.iter().map(|r| {
                vec![
                    r.image.clone(),
                    r.version.clone(),
                    r.os.clone(),
                    r.release.clone(),
                    r.variant.clone(),
                    r.architecture.clone(),
                    r.kind.clone(),
                    r.fingerprint
                        .as_deref()
                        .map_or("-".to_string(), |f| f[..f.len().min(12)].to_string()),
                    bytesize::ByteSize::b(r.size_bytes)
                        .display()
                        .iec()
                        .to_string(),
                    match r.published_at.as_deref() {
                        Some(t) if r.state == "published" => date(t),
                        _ => r.state.clone(),
                    },
                    r.aliases.join(", "),
                ]
            });
            table(&header, cells, out)
        }
        Format::Csv => {
            let mut header: Vec<String> = header.iter().map(|h| h.to_lowercase()).collect();
            header[6] = "type".into();
            header[8] = "size_bytes".into();
            header[9] = "published_at".into();
            header.extend(["state".into(), "format".into(), "artifact_id".into()]);
            let cells = rows.iter().map(|r| {
                vec![
                    r.image.clone(),
                    r.version.clone(),
                    r.os.clone(),
                    r.release.clone(),
                    r.variant.clone(),
                    r.architecture.clone(),
                    r.kind.clone(),
                    r.fingerprint.clone().unwrap_or_default(),
                    r.size_bytes.to_string(),
                    r.published_at.clone().unwrap_or_default(),
                    r.aliases.join(" "),
                    r.state.clone(),
                    r.format.clone(),
                    r.artifact_id.clone(),
                ]
            });
            csv(&header, cells, out)
        }
    }
}

/// One API token, as listed: everything but its secret (which is not kept).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub principal: String,
    pub name: String,
    pub created_at: String,
    /// `None`: never expires.
    pub expires_at: Option<String>,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
    /// `active`, `expired` or `revoked`.
    pub state: String,
}

/// The tokens of every principal, or of `principal` (a name or an id), by
/// principal then creation.
pub fn token_rows(
    cat: &dyn AuthCatalog,
    principal: Option<&str>,
) -> crate::catalog::Result<Vec<TokenRow>> {
    let principals = match principal {
        Some(p) => vec![cat.get_principal(p)?],
        None => cat.list_principals()?,
    };
    let now = chrono::Utc::now();
    let mut rows = Vec::new();
    for p in principals {
        let mut tokens: Vec<ApiToken> = cat.list_tokens(&p.id)?;
        tokens.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        for t in tokens {
            let expired = t.expires_at.as_deref().is_some_and(|e| {
                chrono::DateTime::parse_from_rfc3339(e).map_or(true, |e| e <= now)
            });
            let state = match (&t.revoked_at, expired) {
                (Some(_), _) => "revoked",
                (None, true) => "expired",
                (None, false) => "active",
            };
            rows.push(TokenRow {
                id: t.id,
                principal: p.name.clone(),
                name: t.name,
                created_at: t.created_at,
                expires_at: t.expires_at,
                last_used_at: t.last_used_at,
                revoked_at: t.revoked_at,
                state: state.into(),
            });
        }
    }
    Ok(rows)
}

/// Prints token rows in `format`.
pub fn print_tokens(rows: &[TokenRow], format: Format, out: &mut dyn Write) -> io::Result<()> {
    match format {
        Format::Json => json(rows, out),
        Format::Table => {
            let opt = |t: &Option<String>, none: &str| t.as_deref().map_or(none.to_string(), date);
            let cells = rows.iter().map(|r| {
                vec![
                    r.id.clone(),
                    r.principal.clone(),
                    r.name.clone(),
                    r.state.clone(),
                    date(&r.created_at),
                    opt(&r.expires_at, "never"),
                    opt(&r.last_used_at, "never"),
                    opt(&r.revoked_at, "-"),
                ]
            });
            let header = [
                "ID",
                "PRINCIPAL",
                "NAME",
                "STATE",
                "CREATED",
                "EXPIRES",
                "LAST USED",
                "REVOKED",
            ];
            table(&header, cells, out)
        }
        Format::Csv => {
            let header = [
                "id",
                "principal",
                "name",
                "state",
                "created_at",
                "expires_at",
                "last_used_at",
                "revoked_at",
            ]
            .map(String::from);
            let cells = rows.iter().map(|r| {
                vec![
                    r.id.clone(),
                    r.principal.clone(),
                    r.name.clone(),
                    r.state.clone(),
                    r.created_at.clone(),
                    r.expires_at.clone().unwrap_or_default(),
                    r.last_used_at.clone().unwrap_or_default(),
                    r.revoked_at.clone().unwrap_or_default(),
                ]
            });
            csv(&header, cells, out)
        }
    }
}

/// `2026/03/01 12:00 UTC` (as the Incus client prints times), from RFC 3339.
fn date(t: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y/%m/%d %H:%M UTC")
                .to_string()
        })
        .unwrap_or_else(|_| t.to_string())
}

fn json<T: Serialize>(rows: &[T], out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, rows)?;
    writeln!(out)
}

/// The box table the Incus tools print: a rule above, below and between rows.
fn table(
    header: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
    out: &mut dyn Write,
) -> io::Result<()> {
    use comfy_table::{ContentLineStyle, LineStyle, TableStyle};
    let rule = LineStyle::new('+', '-', '+', '+');
    let cells = ContentLineStyle::new('|', '|', '|');
    let style = TableStyle::new()
        .top_border(rule)
        .header_lines(cells)
        .header_separator(rule)
        .content_lines(cells)
        .row_separator(rule)
        .bottom_border(rule);
    let mut t = comfy_table::Table::new();
    t.load_style(style).set_header(header.iter().copied());
    for r in rows {
        t.add_row(r);
    }
    writeln!(out, "{t}")
}

fn csv(
    header: &[String],
    rows: impl Iterator<Item = Vec<String>>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(header)?;
    for r in rows {
        w.write_record(&r)?;
    }
    w.flush()
}
