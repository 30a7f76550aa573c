#!/usr/bin/env bash
# The README's first command: install the demo's dataset and this package, then run a study.
#
#   bash scripts/demo.sh config/demo.yaml        # the demo (CI runs it with config/smoke.yaml)
#   bash scripts/demo.sh config/demo.yaml config/claims.yaml   # more config files overlay it
#
# * Debian/Ubuntu, as root or as a user with sudo: Fashion-MNIST from Debian's
#   dataset-fashion-mnist (apt-get, through sudo unless root; no sudo is needed as root).
# * No apt-get (macOS, ...): Fashion-MNIST is read from data/FashionMNIST/raw; torchvision
#   downloads it there when online, offline copy the four *-ubyte(.gz) files there first.
# * An interpreter managed by the OS (PEP 668, e.g. Debian's /usr/bin/python3) and no virtual
#   environment active: the package goes into .venv (activate it before the tests).
# Environment: PYTHON (default python3), CORES (snakemake -c, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(config/demo.yaml)
PYTHON=${PYTHON:-python3}
CORES=${CORES:-2}
say() { echo "simflow demo: $*"; }

if command -v apt-get >/dev/null 2>&1; then
    SUDO=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || { say "apt-get needs root: run this as root or install sudo"; exit 1; }
        SUDO=(sudo)
    fi
    say "installing Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)${SUDO:+ with sudo}"
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist
    local_data=0
else
    say "no apt-get here, so Fashion-MNIST is read from data/FashionMNIST/raw: torchvision downloads it there when online; offline, copy its four *-ubyte(.gz) files there first"
    local_data=1
fi

# PEP 668: an OS-managed interpreter refuses `pip install` outside a virtual environment.
if "$PYTHON" -c 'import sys, sysconfig, os; sys.exit(0 if sys.prefix == sys.base_prefix and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
    say "$PYTHON is managed by the OS (PEP 668): installing into .venv (activate it before the tests: . .venv/bin/activate)"
    if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
        [ "$local_data" = 0 ] && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        rm -rf .venv && "$PYTHON" -m venv .venv
    fi
    PYTHON=$PWD/.venv/bin/python
    export PATH="$PWD/.venv/bin:$PATH"   # the workflow's rules run python3 -m simflow
fi

"$PYTHON" -m pip install -q -e ".[test]"

if [ "$local_data" = 1 ]; then
    # one download before the workflow starts (its stages must not race to download it)
    SIMFLOW_ALLOW_DOWNLOAD=1 "$PYTHON" -c 'from simflow.data import build_dataset; [build_dataset("fashion_mnist", "data", split, 32) for split in ("train", "test")]'
    configs+=(config/local_data.yaml)
fi

# Snakemake reports a config file it cannot parse without naming it: check them first (file:line).
"$PYTHON" -m simflow.study check --merged "${configs[@]}" >/dev/null
say "snakemake -c$CORES --configfile ${configs[*]}"
exec "$PYTHON" -m snakemake -c"$CORES" --configfile "${configs[@]}"
