#!/usr/bin/env bash
# Regenerate constraints.txt: the exact versions a fresh install of requirements.txt resolves to,
# i.e. what CI then installs (`pip install -r requirements.txt -c constraints.txt`) and tests.
# Run it after changing requirements.txt or to move to newer versions, then run CI (bash .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(mktemp -d)/venv
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/pip" install -q -r requirements.txt
{
  echo "# The versions CI tested: pip freeze of a fresh venv after \`pip install -r requirements.txt\`"
  echo "# (Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m) Linux), written by"
  echo "# scripts/update_constraints.sh. Install with: pip install -r requirements.txt -c constraints.txt"
  "$VENV/bin/pip" freeze --all --exclude pip | grep -v '^-e \|^# Editable' | sort -f
} > constraints.txt
rm -rf "$(dirname "$VENV")"
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
