#!/usr/bin/env bash
# The abi3 wheel on every other Python we claim, as a user installs it: for
# each version, a fresh venv, the wheel installed with no Rust toolchain on
# PATH, then the quick-start and a smoke subset of the suite (the embedded
# default, a remote worker, futures, large buffers). The whole suite runs on
# the development interpreter (make test-python).
#
# Interpreters: pythonX.Y on PATH, else pyenv's. A missing one fails under
# CI (CI=1) and is reported elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=${DISTRIPOOL_PYTHONS:-3.9 3.10 3.12 3.13}
smoke=(tests/test_embedded.py tests/test_remote.py tests/test_futures_conformance.py tests/test_buffers.py
    tests/test_conformance.py::test_multiprocessing_objects_in_initargs
    tests/test_conformance.py::test_what_tasks_put_on_a_queue_is_there_after_join
    tests/test_conformance.py::test_manager_proxies_work_in_executors
    tests/test_conformance.py::test_classes_of_the_drivers_script_are_arguments_and_results)

wheel=$(ls target/wheels/distripool-*-abi3-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    echo "no abi3 wheel in target/wheels: run make wheel first" >&2
    exit 1
fi

# PATH without any directory that holds cargo or rustc.
norust=""
IFS=: read -ra dirs <<<"$PATH"
for d in "${dirs[@]}"; do
    [ -x "$d/cargo" ] || [ -x "$d/rustc" ] || norust="${norust:+$norust:}$d"
done

find_python() {
    local v=$1 root candidate
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    for candidate in $(command -v "python$v" 2>/dev/null) \
        $(ls -d "$root"/versions/"$v".*/bin/"python$v" 2>/dev/null | sort -V -r); do
        # A pyenv shim is on PATH whether or not it can run that version.
        if "$candidate" -c 'import sys' >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
}

size=$(du -k "$wheel" | cut -f1)
summary=("wheel: $(basename "$wheel"), ${size} KiB")
failed=0
for v in $versions; do
    py=$(find_python "$v")
    if [ -z "$py" ]; then
        summary+=("Python $v: not found")
        [ -n "${CI:-}" ] && failed=1
        continue
    fi
    venv=$PWD/target/venvs/py$v
    rm -rf "$venv"
    "$py" -m venv "$venv"
    if PATH="$venv/bin:$norust" command -v cargo rustc >/dev/null 2>&1; then
        echo "a Rust toolchain is still on PATH" >&2
        exit 1
    fi
    start=$EPOCHREALTIME
    PATH="$venv/bin:$norust" "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
    install=$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $start }")
    PATH="$venv/bin:$norust" "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        'pytest>=8' 'pytest-timeout>=2.3'
    where=$(cd /tmp && "$venv/bin/python" -c 'import distripool, sys; print(sys.version.split()[0], distripool.__file__)')
    echo "== Python $where (installed in ${install} s)"
    result=passed
    if ! PATH="$venv/bin:$norust" "$venv/bin/python" examples/quickstart.py; then
        result="quick-start failed"
    fi
    log=target/venvs/py$v.log
    if ! PATH="$venv/bin:$norust" "$venv/bin/python" -m pytest -q -p no:cacheprovider "${smoke[@]}" >"$log" 2>&1; then
        result="${result/passed/}smoke tests failed (see $log)"
    fi
    tail -n 15 "$log"
    summary+=("Python $v ($where): wheel installed in ${install} s; quick-start and smoke: $(tail -n 1 "$log") -> $result")
    [ "$result" = passed ] || failed=1
done
printf '%s\n' "${summary[@]}"
exit $failed
