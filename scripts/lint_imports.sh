#!/usr/bin/env bash
# Checks the import-linter contracts of pyproject.toml (the layers, docs/architecture.md) on a regular,
# non-editable install of the working tree in a temporary folder; exits non-zero on a broken contract.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
site="$(mktemp -d)"
src="$(mktemp -d)"
trap 'rm -rf "$site" "$src"' EXIT
# Built from a copy of the sources: setuptools' build/ folder in the tree would keep deleted modules
cp -r "$root/pyproject.toml" "$root/README.md" "$root/gptdeploy" "$root/exporters" "$root/runtimes" "$src/"
python -m pip install -q --no-deps --no-build-isolation --target "$site" "$src" 2>&1 | grep -v -i "warning" || true
cd "$site"  # not the repository: lint-imports puts the working directory first on sys.path
PYTHONPATH="$site" lint-imports "$root/pyproject.toml"
