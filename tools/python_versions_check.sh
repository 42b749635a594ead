#!/usr/bin/env bash
# The README's install and test commands under other Pythons than the one CI's environment has:
# by default the oldest the package supports (3.9, pyproject.toml's requires-python) and the
# newest released (3.13), each in a fresh virtual environment, where an interpreter for it is found
# (python3.X on PATH, or pyenv's versions); a version with no interpreter here is named and skipped.
# ~3 minutes a version on 2 cores (1.5 to build, 1.3 to test). `.ci/run` runs it.
#   tools/python_versions_check.sh              3.9 and 3.13
#   tools/python_versions_check.sh 3.10 3.12    those
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[[ ${#versions[@]} -gt 0 ]] || versions=(3.9 3.13)

find_python() {  # find_python X.Y: prints an interpreter for Python X.Y, or nothing
  local candidate
  for candidate in "$(command -v "python$1" || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/python"$1"; do
    [[ -n "$candidate" && -x "$candidate" ]] || continue
    if [[ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2> /dev/null)" == "$1" ]]; then
      echo "$candidate"
      return
    fi
  done
}

for version in "${versions[@]}"; do
  [[ "$version" =~ ^3\.[0-9]+$ ]] || { echo "python_versions_check: '$version' is not a Python version like 3.9" >&2; exit 2; }
  python_exe=$(find_python "$version")
  if [[ -z "$python_exe" ]]; then
    echo "python_versions_check: no Python $version here (python$version or pyenv); skipped"
    continue
  fi
  echo "python_versions_check: Python $version ($python_exe)"
  venv=$(mktemp -d)/venv
  "$python_exe" -m venv "$venv"
  (
    source "$venv/bin/activate"
    python -m pip install --quiet --upgrade pip
    # --- README: install, then test (pyproject.toml builds in build/<wheel tag>, one per version) ---
    pip install --quiet ".[test]"
    pytest -q -p no:cacheprovider
  )
  rm -rf "$(dirname "$venv")"
done
