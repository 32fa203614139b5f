#!/usr/bin/env bash
# Rebuilds every example .wasm from source:
#   examples/order/order.wasm      C, clang --target=wasm32-wasi + wasi-libc, SDK sdk/c/stepfleet.h
#   examples/playbook/playbook.wasm  C, likewise
#   examples/greeter/greeter.wasm  AssemblyScript (asc from sdk/assemblyscript, installed by npm ci)
# Needs: clang, wasm-ld (lld), wasi-libc and clang's wasm32 builtins (Debian: apt-get install clang lld
# wasi-libc libclang-rt-14-dev-wasm32 for clang 14), node >= 20
# and npm. Outputs are byte-for-byte reproducible with the same toolchain versions.
# The .wasm files are committed, so running the fleet or its tests never needs this script.
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "build.sh: error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found ($2)"; }

need clang "install clang, e.g. apt-get install clang"
need wasm-ld "install lld, e.g. apt-get install lld"
need node "install Node.js >= 20"
need npm "install npm"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A probe link catches a missing wasm32 target or wasi-libc before any real build.
printf '#include <stdlib.h>\nvoid *probe(void) { return malloc(1); }\n' > "$tmp/probe.c"
clang --target=wasm32-wasi -mexec-model=reactor -O2 -o "$tmp/probe.wasm" "$tmp/probe.c" \
  || die "clang cannot build wasm32-wasi reactors (install wasi-libc and clang's wasm32 builtins, e.g. apt-get install wasi-libc libclang-rt-14-dev-wasm32)"

# Fails the build if a module imports anything outside the stepfleet module.
check_imports() {
  node -e '
    const fs = require("fs");
    const bad = WebAssembly.Module.imports(new WebAssembly.Module(fs.readFileSync(process.argv[1])))
      .filter((i) => i.module !== "stepfleet").map((i) => i.module + "." + i.name);
    if (bad.length) { console.error("imports outside stepfleet: " + bad.join(", ")); process.exit(1); }
  ' "$1" || die "$1 has forbidden imports"
}

# Writes through a temporary file so a failed build never leaves a half-written .wasm behind.
install_wasm() {
  check_imports "$1"
  chmod 644 "$1"
  mv "$1" "$2"
  echo "built $2 ($(wc -c < "$2") bytes)"
}

clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror -Wl,--strip-all \
  -I sdk/c -o "$tmp/order.wasm" examples/order/order.c
install_wasm "$tmp/order.wasm" examples/order/order.wasm
clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror -Wl,--strip-all \
  -I sdk/c -o "$tmp/playbook.wasm" examples/playbook/playbook.c
install_wasm "$tmp/playbook.wasm" examples/playbook/playbook.wasm

(cd sdk/assemblyscript && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci failed in sdk/assemblyscript"
asc=sdk/assemblyscript/node_modules/.bin/asc
[ -x "$asc" ] || die "asc missing after npm ci"
# Paths stay relative to guest/ so abort messages, and so the bytes, do not depend on the checkout.
"$asc" examples/greeter/greeter.ts --runtime stub -O3 \
  --use abort=sdk/assemblyscript/assembly/index/stepfleetAbort -o "$tmp/greeter.wasm"
install_wasm "$tmp/greeter.wasm" examples/greeter/greeter.wasm
"$asc" examples/reminder/reminder.ts --runtime stub -O3 \
  --use abort=sdk/assemblyscript/assembly/index/stepfleetAbort -o "$tmp/reminder.wasm"
install_wasm "$tmp/reminder.wasm" examples/reminder/reminder.wasm
