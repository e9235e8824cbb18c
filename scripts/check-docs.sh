#!/usr/bin/env bash
# The documentation of the library and of its C ABI crate (capi/) builds without a warning, and no public item of it names
# `anyhow` (the library's one error type is `p2pcheck::Error`; `anyhow` may stay inside private
# code and the binaries). rustdoc renders every public signature, so a public fn taking or
# returning an `anyhow` type shows the name in the HTML it writes: that is what is looked for.
set -euo pipefail
cd "$(dirname "$0")/.."
pages=(target/doc/p2pcheck target/doc/p2pcheck_capi)
rm -rf "${pages[@]}" # pages of items that no longer exist must not linger
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --lib -q
found=$(grep -rl --include='*.html' 'anyhow' "${pages[@]}" || true)
if [ -n "$found" ]; then
  echo "the public API names anyhow in:" >&2
  echo "$found" >&2
  exit 1
fi
echo "docs: no warning; no anyhow in the public API ($(find "${pages[@]}" -name '*.html' | wc -l) pages)"
