//! Loading the TLS files and the authorization policy at start, and the
//! reloaders that keep them current.

use std::{path::PathBuf, sync::Arc};

use super::{Checked, StartupError};
use crate::{
    authz::{CurrentPolicy, Policy},
    config::SecurityConfig,
    reload::{self, Watched},
    tls::{self, CurrentTlsConfig, TlsFiles},
};

/// Something built from files, with the contents it was built from (the
/// reloader's starting point).
pub struct Loaded<Source, Value> {
    /// Where it came from.
    pub source: Source,
    /// The files' contents at load time.
    pub contents: Vec<Vec<u8>>,
    /// What was built.
    pub value: Value,
}

pub(super) fn load_tls(
    files: TlsFiles,
) -> Result<Loaded<TlsFiles, Arc<rustls::ServerConfig>>, StartupError> {
    let contents = reload::read_files(&files.paths()).map_err(StartupError::TlsFiles)?;
    let value = tls::server_config(&contents).map_err(StartupError::Tls)?;
    Ok(Loaded {
        source: files,
        contents,
        value,
    })
}

pub(super) fn load_policy(path: PathBuf) -> Result<Loaded<PathBuf, Policy>, StartupError> {
    let contents = reload::read_files(std::slice::from_ref(&path)).map_err(|source| {
        StartupError::PolicyFile {
            path: path.display().to_string(),
            source,
        }
    })?;
    let value = Policy::parse(&path, &contents[0]).map_err(|source| StartupError::Policy {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Loaded {
        source: path,
        contents,
        value,
    })
}

/// Says at start, once, what protects the API and what does not.
pub(super) fn log_security_posture(security: &SecurityConfig, checked: &Checked) {
    let transport = match (&checked.tls, &security.tls_client_ca) {
        (None, _) => "plaintext",
        (Some(_), None) => "TLS",
        (Some(_), Some(_)) => "mTLS",
    };
    match &checked.policy {
        Some(policy) => tracing::info!(
            transport,
            trust_forwarded_client_cert = security.trust_forwarded_client_cert,
            rules = policy.value.len(),
            "authorization policy in force"
        ),
        None => tracing::warn!(
            transport,
            "no --authz-policy: every caller that reaches this port may sign out users of every allowed pool"
        ),
    }
    if checked.policy.as_ref().is_some_and(|p| p.value.is_empty()) {
        tracing::warn!("the authorization policy has no rules: every call is refused");
    }
}

/// Reloads the TLS files into `current` when they change.
pub(super) fn tls_reload(files: TlsFiles, current: Arc<CurrentTlsConfig>) -> Watched {
    Watched {
        kind: "tls",
        paths: files.paths(),
        apply: Box::new(move |contents| {
            current.store(tls::server_config(contents)?);
            Ok(())
        }),
    }
}

/// Reloads the policy file into `current` when it changes.
pub(super) fn policy_reload(path: PathBuf, current: Arc<CurrentPolicy>) -> Watched {
    Watched {
        kind: "authz_policy",
        paths: vec![path.clone()],
        apply: Box::new(move |contents| {
            let policy = Policy::parse(&path, &contents[0])?;
            tracing::info!(rules = policy.len(), "authorization policy replaced");
            current.store(Arc::new(policy));
            Ok(())
        }),
    }
}
