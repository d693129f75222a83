//! External programs the black-box tests drive. A missing tool fails the test
//! with instructions; it is never a skip.

use std::path::{Path, PathBuf};

/// Finds `name`: the env var override, then the project-local `.tools`
/// install that `scripts/test` makes, then PATH.
pub(crate) fn require(name: &str, env_var: &str, local: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(local);
    if local.is_file() {
        return local;
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    }) {
        return found;
    }
    panic!(
        "{name} is required by this test but was not found. Run `scripts/test` \
         (it installs it into .tools/), or set {env_var} to its path."
    );
}

pub(crate) fn moto_server() -> PathBuf {
    require("moto_server", "MOTO_SERVER", ".tools/venv/bin/moto_server")
}

pub(crate) fn grpcurl() -> PathBuf {
    require("grpcurl", "GRPCURL", ".tools/venv/bin/grpcurl")
}
