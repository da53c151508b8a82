#!/bin/sh
# test-all.sh: the whole check, as CI runs it (.ci/run execs this) and as the README says.
#
# Usage: contrib/test-all.sh
#
#   1. contrib/install-test-deps.sh (as root; idempotent, a no-op once all is installed)
#   2. checks every tool the tests use is present: a missing tool fails the run, no test is
#      ever skipped for lack of one
#   3. shellcheck on the project's shell scripts
#   4. cargo fmt --all -- --check
#   5. cargo clippy --all-targets --locked -- -D warnings, also with --features full
#   6. the doc tests, the default build's tests/storage.rs, then cargo test --all-targets
#      --locked --features full (PostgreSQL and Garage started by the tests' own
#      harnesses); the last line sums up every test binary's results ("tests: N passed,
#      M failed")
#
# Tests that share the machine's single Incus daemon serialise themselves (a file lock in
# tests/support), so the default test threads are fine.
# Environment: IMGSRV_TEST_THREADS (cargo test --test-threads), IMGSRV_TEST_TIMEOUT (seconds
# for the test run, default 1800), IMGSRV_SKIP_INSTALL=1 (do not run install-test-deps.sh).
set -eu

cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\ntest-all: FAILED: %s\n' "$*" >&2; exit 1; }

case ${1:-} in
  -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  '') ;;
  *) echo "usage: contrib/test-all.sh" >&2; exit 2 ;;
esac

# On exit (also on failure or interruption) stop any test Incus daemon a test left behind.
harness=$root/tests/fixtures/incusd-harness
cleanup() {
  if [ "$(id -u)" = 0 ] && "$harness" status >/dev/null 2>&1; then
    echo "test-all: stopping the Incus daemon a test left running" >&2
    "$harness" down >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start=$(date +%s)

# --- 1. system packages -------------------------------------------------------------------
if [ "${IMGSRV_SKIP_INSTALL:-0}" = 1 ]; then
  step "install-test-deps.sh skipped (IMGSRV_SKIP_INSTALL=1)"
elif [ "$(id -u)" = 0 ]; then
  step "contrib/install-test-deps.sh"
  sh contrib/install-test-deps.sh || die "contrib/install-test-deps.sh failed"
else
  step "not root: contrib/install-test-deps.sh not run (the Incus tests need root anyway)"
fi

# --- 2. every tool the tests need -----------------------------------------------------------
step "checking tools"
missing=
for t in cargo script incus incus-simplestreams minisign mksquashfs unsquashfs qemu-img busybox xz \
  tar nginx openssl curl sqlite3 sstream-query shellcheck setsid findmnt sha256sum mount umount \
  promtool systemd-analyze garage psql ss; do
  command -v "$t" >/dev/null 2>&1 || missing="$missing $t"
done
[ -x /usr/libexec/incus/incusd ] || missing="$missing /usr/libexec/incus/incusd"
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing="$missing /usr/lib/postgresql/15/bin/initdb"
[ -z "$missing" ] || die "missing tools:$missing (run contrib/install-test-deps.sh as root)"
if file_out=$(file -L "$(command -v busybox)" 2>/dev/null); then
  case $file_out in *dynamically*) die "busybox is dynamically linked: install busybox-static" ;; esac
fi
[ "$(id -u)" = 0 ] || echo "test-all: warning: not root: the Incus daemon tests will fail" >&2

# rustfmt and clippy: present, else try rustup (its dist server may be unreachable).
for comp in fmt:rustfmt clippy:clippy; do
  sub=${comp%%:*} pkg=${comp#*:}
  if ! cargo "$sub" --version >/dev/null 2>&1; then
    echo "test-all: cargo $sub missing, trying: rustup component add $pkg" >&2
    if ! command -v rustup >/dev/null 2>&1 || ! rustup component add "$pkg" >&2; then
      die "cargo $sub unavailable and 'rustup component add $pkg' failed"
    fi
    cargo "$sub" --version >/dev/null 2>&1 || die "cargo $sub still unavailable"
  fi
done
cargo --version
cargo fmt --version
cargo clippy --version
incus --version | sed 's/^/incus /'

# --- 3. shell scripts -----------------------------------------------------------------------
step "shellcheck"
shellcheck -x contrib/*.sh contrib/bench/*.sh tests/fixtures/make-test-image \
  tests/fixtures/incusd-harness tests/fixtures/pg-harness tests/fixtures/garage-harness \
  .ci/run || die "shellcheck"

# --- 4-6. Rust ------------------------------------------------------------------------------
step "cargo fmt --all -- --check"
cargo fmt --all -- --check || die "cargo fmt: run 'cargo fmt --all'"

# Both builds: the default one (the embedded appliance) and `--features full` (PostgreSQL
# + S3). The tests run on the full build, which holds every test of the default one
# except those about what a default build lacks (tests/storage.rs), run on their own.
step "cargo clippy --all-targets --locked -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings || die "cargo clippy"

step "cargo clippy --all-targets --locked --features full -- -D warnings"
cargo clippy --all-targets --locked --features full -- -D warnings || die "cargo clippy (full)"

step "cargo test --all-targets --locked --features full (build)"
cargo test --all-targets --locked --features full --no-run || die "cargo test build"

step "cargo test --doc --locked --features full"
timeout --kill-after=30 600 cargo test --doc --locked --features full || die "doc tests"

step "cargo test --locked --test storage (the default build)"
default_results=$(mktemp)
{ timeout --kill-after=30 600 cargo test --locked --test storage 2>&1 || echo "cargo-test-exit $?"; } | tee "$default_results"
grep -q '^cargo-test-exit ' "$default_results" && die "cargo test --test storage (default build)"

step "cargo test --all-targets --locked --features full"
set -- --all-targets --locked --features full
threads=
[ -n "${IMGSRV_TEST_THREADS:-}" ] && threads=--test-threads=$IMGSRV_TEST_THREADS
limit=${IMGSRV_TEST_TIMEOUT:-1800}
results=$(mktemp)
rc=0
# shellcheck disable=SC2086 # $threads is empty or one word
{ timeout --kill-after=30 "$limit" cargo test "$@" -- $threads 2>&1 || echo "cargo-test-exit $?"; } | tee "$results"
cat "$default_results" >> "$results"
rm -f "$default_results"
rc=$(awk '/^cargo-test-exit / { print $2 }' "$results")
rc=${rc:-0}
[ "$rc" = 124 ] && die "cargo test did not finish within ${limit}s"
[ "$rc" = 0 ] || die "cargo test (exit $rc)"
totals=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  END { printf "%d %d", p, f }' "$results")
rm -f "$results"
passed=${totals% *} failed=${totals#* }
[ "$passed" -gt 0 ] || die "no test ran"

printf '\ntest-all: OK in %ss\n' "$(($(date +%s) - start))"
printf 'tests: %s passed, %s failed\n' "$passed" "$failed"
