//! Reloads files that other systems rotate under us (cert-manager secrets,
//! ConfigMaps) while the server runs.
//!
//! Deliberately polling rather than the `notify` crate: Kubernetes updates a
//! mounted Secret or ConfigMap by swapping a `..data` symlink, which inotify on
//! the file path never reports, and some volume types have no inotify at all.
//! Reading a few small files every few seconds is cheap and always works.

use std::{io, path::PathBuf, time::Duration};

use crate::metrics::Metrics;

/// Why new contents are unusable: whatever error the kind's parser returns.
pub type ApplyError = Box<dyn std::error::Error + Send + Sync>;

/// Builds and installs new state from files' contents, or says why the
/// contents are unusable.
pub type Apply = Box<dyn Fn(&[Vec<u8>]) -> Result<(), ApplyError> + Send + Sync>;

/// A watched file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct ReadError {
    /// The file.
    pub path: PathBuf,
    /// What the OS said.
    pub source: io::Error,
}

/// Files that are read together (a certificate and its key) and what to do
/// with their contents.
pub struct Watched {
    /// Names this set in logs and the reload metric (`tls`, `authz_policy`).
    pub kind: &'static str,
    /// Read in this order and handed over in this order.
    pub paths: Vec<PathBuf>,
    /// Builds and installs the new state, or says why the contents are unusable
    /// (the old state then stays in force).
    pub apply: Apply,
}

/// Reads `watched.paths` every `interval` and calls `apply` whenever their
/// contents differ from the last ones seen. A failure is logged once per
/// change, not once per poll. `initial` is what was loaded at start.
pub async fn watch(watched: Watched, initial: Vec<Vec<u8>>, interval: Duration, metrics: &Metrics) {
    let mut seen = initial;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; `initial` covers it
    loop {
        ticker.tick().await;
        // A few KiB from a tmpfs mount: not worth a blocking-pool hop.
        let contents = match read_files(&watched.paths) {
            Ok(contents) => contents,
            // Mid-rotation a file may be briefly missing; the next poll sees it.
            Err(error) => {
                tracing::debug!(kind = watched.kind, %error, "reload: cannot read yet");
                continue;
            }
        };
        if contents == seen {
            continue;
        }
        let result = (watched.apply)(&contents);
        metrics.record_reload(watched.kind, result.is_ok());
        match result {
            Ok(()) => tracing::info!(kind = watched.kind, "reloaded from disk"),
            Err(error) => {
                tracing::error!(kind = watched.kind, %error, "reload failed; keeping the previous one");
            }
        }
        seen = contents;
    }
}

/// Reads every file, in order; the error names the file.
pub fn read_files(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, ReadError> {
    paths
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(|source| ReadError {
                path: path.clone(),
                source,
            })
        })
        .collect()
}
