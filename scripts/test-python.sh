#!/usr/bin/env bash
# The Python client's checks (client/python): a virtual environment with
# the package and its test extras installed the way a user installs them
# (pip install client/python[test]), the generated-code check (the
# flatbuffers code in shoal/fb must be what flatc 25.12 makes of
# wire/schema/shoal.fbs), then pytest against the real broker binary
# ($SHOAL_BIN, default target/debug/shoal). Exits with pytest's status,
# except that "no tests collected" (pytest's 5) is a failure too.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export SHOAL_BIN="${SHOAL_BIN:-$root/target/debug/shoal}"
# The tests run from client/python: a relative path must not change meaning.
SHOAL_BIN=$(realpath -m "$SHOAL_BIN")
if [ ! -x "$SHOAL_BIN" ]; then
  echo "test-python: $SHOAL_BIN not found (cargo build -p shoal-core --bin shoal, or set SHOAL_BIN)" >&2
  exit 1
fi
venv="${SHOAL_PY_VENV:-$root/target/python-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$root/client/python[test]"
PATH="$venv/bin:$PATH" bash client/python/generate.sh --check

# glommio locks its I/O buffers in memory (the tests' brokers inherit this).
ulimit -l unlimited 2>/dev/null || true
cd client/python
report=$(mktemp)
trap 'rm -f "$report"' EXIT
set +e
# The pytest script, not `python -m pytest`: the current directory stays
# off sys.path, so the tests import the installed package, not the tree.
"$venv/bin/pytest" --junitxml="$report" "$@"
status=$?
set -e
# One line in cargo's words, so scripts/test.sh's closing summary counts
# these tests with the Rust ones.
if [ -s "$report" ]; then
  "$venv/bin/python" - "$report" <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
failed = failures + errors
print(f"test result: {'ok' if failed == 0 else 'FAILED'}. {tests - failed - skipped} passed; "
      f"{failed} failed; {skipped} ignored (client/python, pytest)")
PY
fi
if [ "$status" -eq 5 ]; then
  echo "test-python: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
