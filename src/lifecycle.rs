//! Taking versions out of service without breaking immutability: drafts are
//! deleted; published versions are retired (an append-only record of who,
//! when and why). A retired version leaves the Simple Streams projection and
//! the listings at the next request (the newest remaining version carries the
//! image's default aliases from then on); its manifest, signature and publish
//! record stay readable forever. Its bytes still download until garbage
//! collection, after the grace, collects it ([`crate::maint::gc`]); from then
//! on they answer `410 Gone` ([`crate::download`]).

use crate::app::App;
use crate::catalog::{CatalogError, Retirement, VersionState};

/// Longest retirement reason kept.
pub const MAX_REASON: usize = 1024;

impl App {
    /// Deletes a draft version (with its artifacts, attachments and
    /// metadata). A published version cannot be deleted: retire it.
    pub fn delete_draft(&self, image: &str, version: &str) -> Result<(), CatalogError> {
        self.room_for_change()?;
        self.catalog.delete_draft(image, version)?;
        log::info!("deleted draft {image}@{version}");
        Ok(())
    }

    /// Retires published version `image@version`. Refused while a movable
    /// alias points at it (409 naming the aliases: move them first), for a
    /// draft (delete it instead) and for a version already retired.
    pub fn retire(
        &self,
        image: &str,
        version: &str,
        reason: &str,
        principal_id: Option<&str>,
        principal_name: Option<&str>,
    ) -> Result<Retirement, CatalogError> {
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > MAX_REASON {
            return Err(CatalogError::Invalid(format!(
                "a retirement needs a reason of 1 to {MAX_REASON} bytes (it is kept forever \
                 and shown to whoever asks why the version went away)"
            )));
        }
        self.room_for_change()?;
        let v = self.catalog.get_version(image, version)?;
        if v.state != VersionState::Published {
            return Err(CatalogError::Precondition(format!(
                "{image}@{version} is a {}: only published versions are retired (delete a draft \
                 with `imgsrv version delete {image} {version}`)",
                v.state.as_str()
            )));
        }
        if let Some(t) = self.catalog.retirement(&v.id)? {
            return Err(CatalogError::Conflict(format!(
                "{image}@{version} was already retired at {} ({})",
                t.retired_at, t.reason
            )));
        }
        let pointing: Vec<String> = self
            .catalog
            .list_aliases(image)?
            .into_iter()
            .filter(|a| a.version_id == v.id)
            .map(|a| a.alias)
            .collect();
        if !pointing.is_empty() {
            return Err(CatalogError::Conflict(format!(
                "alias {} of {image} points at {version}: move it to another version first \
                 (`imgsrv alias set {image} {} VERSION`), then retire {version}",
                pointing.join(", "),
                pointing[0]
            )));
        }
        let t = self
            .catalog
            .retire(&v.id, reason, principal_id, principal_name)?;
        log::info!(
            "retired {image}@{version} by {}: {reason}",
            principal_name.unwrap_or("-")
        );
        Ok(t)
    }
}
