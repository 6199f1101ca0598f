#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11, pip, git):
#   bash dev.sh serve   - install, then serve on http://127.0.0.1:3000 (HOST, PORT change it; tiny model on CPU
#                         and ./outputs unless SD3_MODEL / BUCKET_NAME say otherwise)
#   bash dev.sh test    - install, then run the whole test suite
#   bash dev.sh bench   - install, then check that every benchmark of bench/ runs (its small configuration)
#   bash dev.sh image   - install, then build the container image from the Dockerfile and serve it (root, Debian)
#   bash dev.sh lock    - after changing a pin in pyproject.toml: install it, then rewrite requirements.lock
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

# install [pip args]: pass `-c requirements.lock` to get exactly the locked versions (tests and image share them).
install() {
    local began=$SECONDS
    if [ ! -x "$VENV/bin/python" ]; then
        say "making the virtual environment $VENV"
        python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
        say "installing torch 2.13.0 (CPU) and the project's pinned packages: about 2-3 minutes on a fresh machine"
    else
        say "checking $VENV against the pins (seconds when nothing changed)"
    fi
    # torch first and alone: 2.13.0 is the CPU build here; any looser requirement pulls a CUDA build.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0 "$@"
    say "torch is in ($((SECONDS - began)) s); now the service's and the tests' packages"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[test]" "$@"
    say "installed in $((SECONDS - began)) s"
}

say() { echo "dev.sh: $*" >&2; }

case "${1:-}" in
    serve)
        install -c requirements.lock
        export IMAGE_DIR=${IMAGE_DIR:-$PWD/outputs}
        cd sd3-medium && exec "../$VENV/bin/bentoml" serve . --host "${HOST:-127.0.0.1}" --port "${PORT:-3000}"
        ;;
    test)
        install -c requirements.lock
        shift
        say "running the tests on two workers (pytest-xdist, a file each at a time); the 15 slowest are listed at the end"
        exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@"
        ;;
    bench)
        install -c requirements.lock
        shift
        say "running each benchmark in its small configuration and checking what it reports (about 5 minutes)"
        exec "$VENV/bin/python" -m pytest benchcheck -n 2 --dist loadfile -p no:cacheprovider "$@"
        ;;
    image)
        install -c requirements.lock
        shift
        say "building the image with buildah and running its command (root on Debian): about 10 minutes the first"
        say "time, a minute or two once the base and the layers are cached; the image checks follow"
        exec "$VENV/bin/python" -m pytest imagecheck -p no:cacheprovider -s "$@"
        ;;
    lock)
        install
        exec "$VENV/bin/python" tools/write_lock.py
        ;;
    *)
        echo "usage: bash dev.sh serve | bash dev.sh test [pytest args] | bash dev.sh bench | bash dev.sh image |" \
             "bash dev.sh lock" >&2
        exit 2
        ;;
esac
