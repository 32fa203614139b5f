#!/usr/bin/env bash
# Checks that the SDKs work outside this repository, as a tenant author uses them:
#   AssemblyScript: `npm pack` the SDK, copy templates/assemblyscript to a temporary folder,
#     `npm install` the tarball there, `npm run build`, and run the module with `stepfleet run`;
#   C: copy templates/c and sdk/c/stepfleet.h to a temporary folder, `make STEPFLEET_SDK=.`,
#     and run the module, when clang and wasm-ld are installed; skipped, saying so, otherwise,
#     except under CI=true, where a missing toolchain is an error (`./dev check --all`
#     installs it on Debian).
# Needs node >= 20 and npm (the registry, for the pinned assemblyscript compiler).
set -euo pipefail
cd "$(dirname "$0")"

STEPFLEET=${STEPFLEET:-$(cd .. && pwd)/.venv/bin/stepfleet}
die() { echo "check-sdk.sh: error: $*" >&2; exit 1; }
command -v node >/dev/null && command -v npm >/dev/null || die "node and npm are needed"
[ -x "$STEPFLEET" ] || die "$STEPFLEET not found (set STEPFLEET)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

expect_greeting() {
  local out
  out=$("$STEPFLEET" run "$1" --params '{"name":"Ada"}') || die "$1 did not complete: $out"
  grep -q '"greeting":"Hello, Ada"' <<<"$out" || die "$1 printed: $out"
  echo "$2: built and ran ($(wc -c < "$1") bytes): $(tail -n 1 <<<"$out")"
}

(cd sdk/assemblyscript && npm pack --silent --pack-destination "$tmp" >/dev/null)
tarball=$(ls "$tmp"/stepfleet-guest-sdk-*.tgz)
cp -r templates/assemblyscript "$tmp/as"
rm -rf "$tmp/as/node_modules" "$tmp/as/build"
(cd "$tmp/as" && npm install --no-audit --no-fund --loglevel=error "$tarball" >/dev/null \
  && npm run build --silent) || die "the AssemblyScript template did not build"
expect_greeting "$tmp/as/build/workflow.wasm" "AssemblyScript template (SDK from $(basename "$tarball"))"

if command -v clang >/dev/null && command -v wasm-ld >/dev/null; then
  cp -r templates/c "$tmp/c"
  cp sdk/c/stepfleet.h "$tmp/c/"
  rm -f "$tmp/c/workflow.wasm"
  make --no-print-directory -s -C "$tmp/c" STEPFLEET_SDK=. || die "the C template did not build"
  expect_greeting "$tmp/c/workflow.wasm" "C template"
elif [ "${CI:-}" = true ]; then
  die "the C template cannot be built: clang and wasm-ld are not installed, and CI must build it" \
    "(./dev check --all installs them on Debian; see templates/c/README.md)"
else
  echo "C template: SKIPPED, not built: clang and wasm-ld are not installed" \
    "(./dev check --all installs them on Debian; see templates/c/README.md)"
fi
