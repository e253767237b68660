#!/bin/sh
# build_zipapp.sh - build cares.pyz, one file that runs with `python3 cares.pyz`
# on any host with a supported CPython (no pip, no venv needed there).
#
# Plain POSIX sh that only finds a Python and runs the builder, the module
# pyz/build.py (what it does and why: its docstring). The archive's start-up
# code is pyz/bootstrap.py. Run `sh build_zipapp.sh --help` for the options.
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "build_zipapp.sh: '$PYTHON' not found; set PYTHON=/path/to/python3 (3.8 or newer, with pip)" >&2
    exit 1
fi

# -I: neither the current directory nor PYTHONPATH may shadow a stdlib module
# used by the build, so only this folder goes on sys.path (for the pyz package).
# The version check comes first, in code any Python can parse.
exec "$PYTHON" -I -c '
import sys
if sys.version_info < (3, 8):
    sys.exit("build_zipapp.sh: needs Python 3.8 or newer to build (this is %s); set PYTHON=" % sys.version.split()[0])
sys.path.insert(0, sys.argv.pop(1))
from pyz.build import main
main()
' "$here" "$@"
