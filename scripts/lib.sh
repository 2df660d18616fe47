# Shared by the scripts: where builds go, and installing what the project
# needs on a bare Debian machine. Source it; do not run it.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Build outputs live outside the clone, so a second run (or CI on a fresh
# clone) reuses them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tenet/target}"
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Debian packages the build, the tests and the demo use. Installed only when
# missing, so a second run does nothing.
DEBIAN_PACKAGES=(
  git           # the policy directory is a git checkout in the operator tests
  openssh-client  # ssh-keygen: SSH-signed commits (--require-signed-commits)
  debootstrap   # a real Debian root for the real-terminal tests (scripts/debian-root)
  debian-archive-keyring  # ... verified against Debian's archive keys
  dpkg          # the package manager terminals run; its ordering is tested against ours
  pkg-config
  gcc           # the linker driver for Rust
  libtss2-dev   # tss-esapi: the agent's TPM-held identity key
  swtpm         # a software TPM for the TPM tests
  swtpm-tools
  clang lld wasi-libc libclang-rt-14-dev-wasm32  # payloads written in C (examples/payloads/c)
  dpkg-dev lintian  # the agent's Debian package: dpkg-shlibdeps, and its check (scripts/agent-deb)
  umoci skopeo      # the operator's OCI image, written and read without a container engine
)

ensure_debian_packages() {
  local missing=()
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return
  fi
  say "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    echo "error: cargo is not on PATH. Install Rust (rustup) first: https://rustup.rs" >&2
    exit 1
  fi
}

setup() {
  ensure_debian_packages
  ensure_rust
}
