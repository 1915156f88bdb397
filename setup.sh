#!/usr/bin/env bash
# setup.sh: create .venv and install b2t-bench into it. Idempotent: run it as often as you like.
#
#   bash setup.sh            create .venv if needed; install b2t-bench editable (pip install -e .:
#                            the `b2t` command) with its dependencies, if pyproject.toml's or
#                            constraints.txt's say changed
#   bash setup.sh --dev      the same plus the dev extra (pytest, ruff, jiwer): what `make test` runs
#   bash setup.sh --force    reinstall every package (e.g. after changing TORCH_INDEX_URL)
#
# What is installed: pyproject.toml's [project] dependencies (and with --dev, the dev and trackers
# extras), each at its version in constraints.txt: `pip install -c constraints.txt -e ".[dev,trackers]"`.
#
# Environment:
#   PYTHON=python3.12   interpreter that creates .venv (default python3; needs >= 3.11).
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#                       an extra package index for torch, e.g. a CUDA wheel index. It is passed
#                       as --extra-index-url; constraints.txt pins torch==2.13.0 without a local
#                       label, so 2.13.0+cu128 from that index satisfies the pin. An existing venv
#                       keeps the torch it has unless you add --force.
#
# Installer: `uv pip` when uv is on PATH (faster), else the venv's pip. uv does not read pip.conf:
# configure its indexes with UV_INDEX_URL / UV_FIND_LINKS where pip uses PIP_* or pip.conf.
#
# Skipping: after a successful install the stamp file .venv/.b2t-setup-stamp (--dev:
# .venv/.b2t-setup-dev-stamp) holds the sha256 of pyproject.toml's [project], [build-system] and
# [tool.setuptools] tables + constraints.txt; while they are unchanged a run only says "already set up"
# (editing pyproject.toml's tool settings, ruff's or pytest's, reinstalls nothing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=.venv
STAMP="$VENV/.b2t-setup-stamp"
DEV_STAMP="$VENV/.b2t-setup-dev-stamp"
PYTHON="${PYTHON:-python3}"
MIN_PYTHON=(3 11)  # the pins of constraints.txt (numpy 2.4, scipy 1.17, ...) need it

say() { echo "setup.sh: $*"; }
die() { echo "setup.sh: error: $*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

FORCE=0
DEV=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --dev) DEV=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$arg' (try: bash setup.sh --help)" ;;
    esac
done

# Exit 0 when interpreter $1 is at least version $2.$3.
python_at_least() { "$1" -c "import sys; sys.exit(sys.version_info[:2] < ($2, $3))"; }
python_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])'; }

sha256_of() {
    if command -v sha256sum >/dev/null; then sha256sum | cut -d' ' -f1
    else shasum -a 256 | cut -d' ' -f1; fi  # macOS
}

# --- system packages ---------------------------------------------------------------------------
# Reserved for system packages that later features need (they will be checked here, with a line
# that says how to install them). None are needed yet.

# --- virtual environment -----------------------------------------------------------------------
create_venv() {
    command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found; set PYTHON=/path/to/python3 (>= 3.11)"
    python_at_least "$PYTHON" "${MIN_PYTHON[@]}" \
        || die "$PYTHON is Python $(python_version "$PYTHON"); b2t-bench needs >= 3.11 (set PYTHON=...)"
    say "creating $VENV with $PYTHON (Python $(python_version "$PYTHON"))"
    "$PYTHON" -m venv "$VENV"
}

if [[ -x "$VENV/bin/python" ]]; then
    python_at_least "$VENV/bin/python" "${MIN_PYTHON[@]}" \
        || die "$VENV holds Python $(python_version "$VENV/bin/python"), needs >= 3.11: remove $VENV and re-run"
    say "using existing $VENV (Python $(python_version "$VENV/bin/python"))"
else
    [[ -e "$VENV" ]] && die "$VENV exists but has no bin/python: remove it and re-run"
    create_venv
fi
VPY="$VENV/bin/python"

# --- dependencies ------------------------------------------------------------------------------
# What decides the install: pyproject.toml's tables that pip reads, constraints.txt, and the extras.
install_inputs() {
    "$VPY" - <<'PY'
import json, tomllib
with open("pyproject.toml", "rb") as f:
    pyproject = tomllib.load(f)
tables = {"project": pyproject.get("project"), "build-system": pyproject.get("build-system"),
          "tool.setuptools": pyproject.get("tool", {}).get("setuptools")}
print(json.dumps(tables, sort_keys=True))
PY
    cat constraints.txt
}
INPUTS="$(install_inputs)" || die "cannot read pyproject.toml"
RUNTIME_HASH="$(printf '%s\nextras=\n' "$INPUTS" | sha256_of)"
DEV_HASH="$(printf '%s\nextras=dev\n' "$INPUTS" | sha256_of)"
if [[ $DEV == 1 ]]; then
    want_stamp=$DEV_STAMP; want_hash=$DEV_HASH; target=".[dev,trackers]"
else
    want_stamp=$STAMP; want_hash=$RUNTIME_HASH; target="."
fi

# Up to date: a dev install holds the runtime one too.
if [[ $FORCE == 0 && -f "$want_stamp" && "$(cat "$want_stamp")" == "$want_hash" ]]; then
    touch "$want_stamp"  # newer than its inputs again, so make does not call us back
    [[ $DEV == 1 ]] && echo "$RUNTIME_HASH" > "$STAMP"
    say "already set up (pyproject.toml's dependencies and constraints.txt unchanged; --force reinstalls)"
    exit 0
fi

install_args=(-c constraints.txt -e "$target")

if command -v uv >/dev/null; then
    installer=(uv pip install --python "$VPY")
    [[ $FORCE == 1 ]] && install_args+=(--reinstall)
    if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
        # uv takes each package from the first index that has it; torch indexes also carry
        # numpy & co., so let uv pick the best match across indexes as pip does.
        install_args+=(--extra-index-url "$TORCH_INDEX_URL" --index-strategy unsafe-best-match)
    fi
else
    installer=("$VPY" -m pip install)
    [[ $FORCE == 1 ]] && install_args+=(--force-reinstall)
    [[ -n "${TORCH_INDEX_URL:-}" ]] && install_args+=(--extra-index-url "$TORCH_INDEX_URL")
fi

say "installing: ${installer[*]} ${install_args[*]}"
"${installer[@]}" "${install_args[@]}"

echo "$RUNTIME_HASH" > "$STAMP"
[[ $DEV == 1 ]] && echo "$DEV_HASH" > "$DEV_STAMP"
torch_info="$("$VPY" -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "no cuda")')"
say "done in ${SECONDS}s: $VENV ready (Python $(python_version "$VPY"), torch $torch_info; $("$VENV/bin/b2t" --version))"
