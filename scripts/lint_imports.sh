#!/usr/bin/env bash
# Checks the import-linter contracts of pyproject.toml (the layers, docs/architecture.md) on a regular,
# non-editable install of the working tree in a temporary folder; exits non-zero on a broken contract.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
python -m pip install -q --no-deps --no-build-isolation --target "$site" "$root" 2>&1 | grep -v -i "warning" || true
cd "$site"  # not the repository: lint-imports puts the working directory first on sys.path
PYTHONPATH="$site" lint-imports "$root/pyproject.toml"
