#!/bin/sh
# Every executable in bin/ is a symlink to this launcher: it runs the module named
# after the link (sf-foo -> sflib.cli.foo) with the project's virtualenv if there is
# one (a checkout), else with python3 (an installed system, a guest image).
set -eu
link=$(basename "$0")
top=$(dirname "$(dirname "$(readlink -f "$0")")")
top=$(dirname "$top")
module=sflib.cli.$(printf '%s' "${link#sf-}" | tr - _)
python=$top/.venv/bin/python
[ -x "$python" ] || python=python3
PYTHONPATH=$top${PYTHONPATH:+:$PYTHONPATH} exec "$python" -m "$module" "$@"
