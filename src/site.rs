//! Which site a command that takes `--server URL` or `--data DIR` works on,
//! when either may also come from `IMGSRV_SERVER` / `IMGSRV_DATA`.
//!
//! One shell often has both variables set (`IMGSRV_DATA` for the admin
//! commands on the server's machine, `IMGSRV_SERVER` for the client ones), so
//! a flag typed on the command line wins over the other's variable; two flags
//! typed, or two variables and no flag, are ambiguous and refused with what to
//! do. A value equal to its variable's is taken as coming from the variable
//! (clap's derive structs do not say where a value came from; typing the
//! variable's own value changes nothing).

use std::path::{Path, PathBuf};

/// The site chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Site {
    Server(String),
    Data(PathBuf),
}

/// Picks between `server` (`--server` or `IMGSRV_SERVER`) and `data`
/// (`--data` or `IMGSRV_DATA`); `None` when neither is given.
pub fn choose(server: Option<&str>, data: Option<&Path>) -> anyhow::Result<Option<Site>> {
    choose_with(server, data, |v| std::env::var_os(v))
}

/// [`choose`] with `env` for the process environment.
fn choose_with(
    server: Option<&str>,
    data: Option<&Path>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> anyhow::Result<Option<Site>> {
    let from_env = |var: &str, value: &std::ffi::OsStr| env(var).is_some_and(|v| v == value);
    Ok(Some(match (server, data) {
        (None, None) => return Ok(None),
        (Some(s), None) => Site::Server(s.to_string()),
        (None, Some(d)) => Site::Data(d.to_path_buf()),
        (Some(s), Some(d)) => {
            let s_env = from_env("IMGSRV_SERVER", s.as_ref());
            let d_env = from_env("IMGSRV_DATA", d.as_os_str());
            match (s_env, d_env) {
                (true, false) => Site::Data(d.to_path_buf()),
                (false, true) => Site::Server(s.to_string()),
                (false, false) => anyhow::bail!(
                    "--server and --data both name a site: give one of them (--server URL \
                     works through the API, --data DIR on the server's own files)"
                ),
                (true, true) => anyhow::bail!(
                    "IMGSRV_SERVER ({s}) and IMGSRV_DATA ({}) are both set: say which site \
                     with --server URL or --data DIR, or unset one of them",
                    d.display()
                ),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_flag_wins_over_the_other_variable_and_ambiguity_is_refused() {
        let env = |v: &str| match v {
            "IMGSRV_SERVER" => Some("https://env:8443".into()),
            "IMGSRV_DATA" => Some("/env/data".into()),
            _ => None,
        };
        let choose = |s, d| choose_with(s, d, env);
        let d = Path::new("/typed/data");
        let envd = Path::new("/env/data");
        assert_eq!(
            choose(Some("https://env:8443"), Some(d)).unwrap(),
            Some(Site::Data(d.into()))
        );
        assert_eq!(
            choose(Some("https://typed"), Some(envd)).unwrap(),
            Some(Site::Server("https://typed".into()))
        );
        let e = choose(Some("https://typed"), Some(d)).unwrap_err();
        assert!(e.to_string().contains("give one of them"), "{e}");
        let e = choose(Some("https://env:8443"), Some(envd)).unwrap_err();
        assert!(e.to_string().contains("both set"), "{e}");
        assert_eq!(choose(None, None).unwrap(), None);
        assert_eq!(choose(None, Some(d)).unwrap(), Some(Site::Data(d.into())));
    }
}
