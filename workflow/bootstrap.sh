#!/usr/bin/env bash
# equipet: set up a fresh machine and run the workflow or the tests.
#
#   bash workflow/bootstrap.sh run  [snakemake args...]   # set up, estimate the time, run the paper config, build the report
#   bash workflow/bootstrap.sh test [pytest args...]      # set up, run the test suite
#   bash workflow/bootstrap.sh estimate [snakemake args...]  # set up, print what `run` would cost, run nothing
#   bash workflow/bootstrap.sh setup                      # set up only
#
# Setup is idempotent: it installs system prerequisites when missing (gfortran, which
# escnn's py3nj dependency compiles with), creates the virtualenv (EQUIPET_VENV, default
# .venv) and installs the pinned dependencies of envs/constraints.txt. A stamp file skips
# the install when nothing changed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${EQUIPET_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac     # relative to the checkout
PYTHON="${EQUIPET_PYTHON:-python3}"

say() { printf 'equipet: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need_root_or_sudo() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@";
    else die "'$*' needs root; install it yourself and rerun"; fi
}

system_prerequisites() {
    local missing=()
    command -v gfortran >/dev/null || missing+=(gfortran)
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ "${#missing[@]}" -gt 0 ]; then
        command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install them with your package manager"
        say "installing system packages: ${missing[*]}"
        need_root_or_sudo apt-get update -qq
        need_root_or_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

setup() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" --version 2>&1); equipet needs Python >= 3.11 (set EQUIPET_PYTHON)"
    system_prerequisites
    [ -x "$VENV/bin/python" ] || { say "creating virtualenv $VENV"; "$PYTHON" -m venv "$VENV"; }
    local stamp="$VENV/.equipet-installed"
    local want
    want="$(cat envs/constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "installing pinned dependencies (envs/constraints.txt) into $VENV"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip wheel setuptools
        # numpy first: py3nj and lie_learn build against it (numpy 1, see constraints)
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c envs/constraints.txt numpy
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c envs/constraints.txt -e ".[test,slurm]"
        echo "$want" > "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
    export MPLBACKEND=Agg
}

# The jobs and expected wall time of this run on this machine (equipet-estimate: a short
# calibration, then the dry run's jobs times the measured costs). EQUIPET_ESTIMATE=0 skips it;
# its failure only warns. Reads the --configfile(s) and --cores of the Snakemake arguments.
estimate() {
    [ "${EQUIPET_ESTIMATE:-1}" = 0 ] && return 0
    local args=() take=""
    for a in "$@"; do
        case "$a" in
            --configfile|--configfiles) take=config; args+=(--configfile) ;;
            --cores|-c) take=cores; args+=(--cores) ;;
            --configfile=*|--configfiles=*) take=""; args+=(--configfile "${a#*=}") ;;
            --cores=*) take=""; args+=(--cores "${a#*=}") ;;
            -*) take="" ;;
            *) case "$take" in
                   config) args+=("$a") ;;
                   cores) [ "$a" = all ] && unset 'args[${#args[@]}-1]' || args+=("$a"); take="" ;;
               esac ;;
        esac
    done
    equipet-estimate "${args[@]}" \
        || say "warning: the time estimate failed (see above); starting the run anyway"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup ;;
    run)
        setup
        estimate "$@"
        snakemake --profile workflow/profiles/default "$@"
        snakemake --profile workflow/profiles/default "$@" --report "${EQUIPET_REPORT:-results/report.html}"
        say "done: results in results/, report in ${EQUIPET_REPORT:-results/report.html}" ;;
    estimate)
        setup
        EQUIPET_ESTIMATE=1 estimate "$@" ;;
    test)
        setup
        set +e
        python -m pytest "$@"
        rc=$?
        set -e
        [ "$rc" = 5 ] && die "pytest collected no tests"
        exit "$rc" ;;
    *)
        sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
