//! External programs the black-box tests drive. A missing tool fails the test
//! with instructions; it is never a skip.

use std::path::{Path, PathBuf};

/// Finds `name`: the env var override, then the project-local `.tools`
/// install that `scripts/test` makes (if it makes one), then PATH.
pub(crate) fn require(name: &str, env_var: &str, local: Option<&str>) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    if let Some(local) = local.map(|l| Path::new(env!("CARGO_MANIFEST_DIR")).join(l))
        && local.is_file()
    {
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
         (it installs it), or set {env_var} to its path."
    );
}

pub(crate) fn moto_server() -> PathBuf {
    require(
        "moto_server",
        "MOTO_SERVER",
        Some(".tools/venv/bin/moto_server"),
    )
}

pub(crate) fn grpcurl() -> PathBuf {
    require("grpcurl", "GRPCURL", Some(".tools/venv/bin/grpcurl"))
}

/// Debian's `prometheus` package; `scripts/test` installs it with apt.
pub(crate) fn prometheus() -> PathBuf {
    require("prometheus", "PROMETHEUS", None)
}

pub(crate) fn promtool() -> PathBuf {
    require("promtool", "PROMTOOL", None)
}

/// util-linux's `prlimit` (Essential on Debian): the hostile tests and the
/// open-files cli test start the binary under it.
pub(crate) fn prlimit() -> PathBuf {
    require("prlimit", "PRLIMIT", None)
}
