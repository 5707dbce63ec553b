#!/usr/bin/env bash
# Installs what tether's tests need and runs them all: formatting, clippy with
# warnings denied, the deployment files against the Kubernetes schemas, the check
# that the committed browser worker (web/pkg) is what the sources build, and every
# test (release build: the tests train real models; the browser tests drive
# Debian's Chromium). This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Installs Debian packages: waits for a dpkg lock held by someone else (a fresh
# machine may be running its own apt) and retries, and shows apt's own words if
# it still fails.
apt_install() {
  local sudo="" log attempt
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo"
  log=$(mktemp)
  for attempt in 1 2 3; do
    if { $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq &&
         $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "$@"; } >"$log" 2>&1; then
      rm -f "$log"
      return 0
    fi
    echo "apt-get install $* failed (attempt $attempt of 3):" >&2
    tail -n 5 "$log" >&2
    sleep 10
  done
  rm -f "$log"
  return 1
}

# A software Vulkan adapter (lavapipe), so the wgpu backend is tested without a GPU.
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  step "installing mesa-vulkan-drivers (lavapipe) for the wgpu tests"
  apt_install mesa-vulkan-drivers && echo "lavapipe installed" \
    || echo "warning: could not install mesa-vulkan-drivers; the wgpu test will be skipped" >&2
fi
if ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  export TETHER_REQUIRE_WGPU=1 # an adapter exists: the wgpu test must run, not skip
fi

# Debian's Chromium and playwright-core for the browser tests (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
  step "installing Debian's chromium for the browser tests"
  apt_install chromium || echo "warning: could not install chromium; the browser tests will fail" >&2
fi
step "playwright-core (npm ci in tests/browser)"
(cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
export TETHER_REQUIRE_BROWSER=1

step "toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
rustup target add wasm32-unknown-unknown >/dev/null

step "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path xtask/Cargo.toml -- --check # its own workspace

step "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --release --locked -- -D warnings
cargo clippy --manifest-path xtask/Cargo.toml --release --locked -- -D warnings

step "web/pkg is what the browser worker's sources build (cargo xtask web --check)"
cargo xtask web --check

step "deployment files: Kubernetes schemas (kubernetes-validate from PyPI), kustomization, compose, every command line"
cargo build --release --locked -p tether
deploy_venv="$HOME/.cache/tether-deploy-venv"
if [ ! -x "$deploy_venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$deploy_venv" 2>/dev/null || {
    rm -rf "$deploy_venv"; apt_install python3-venv && python3 -m venv "$deploy_venv"; }
  "$deploy_venv/bin/pip" install -q kubernetes-validate
fi
"$deploy_venv/bin/python" scripts/validate_deploy.py --tether "${CARGO_TARGET_DIR:-target}/release/tether"

step "bench link, short: an honest worker on a slow link is never refused, overlap loses ≤ 1 point"
# Alone on the machine (before the tests): overlap's timing is part of what it checks.
"${CARGO_TARGET_DIR:-target}/release/tether" bench link --tau 64 --encoding q8 --epochs 0.25 --check 1

step "cargo test (release)"
log=$(mktemp)
cargo test --workspace --release --locked 2>&1 | tee "$log"
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s += $1} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s += $1} END {print s + 0}')
rm -f "$log"
echo "tests: $passed passed, $failed failed"
