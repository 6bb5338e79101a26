# Shared set-up for the bats tests: a private temp dir and the project's bin/ first.
# shellcheck shell=bash

setup_tmp() {
    TMP=$(mktemp -d)
    export TMP
}

teardown_tmp() {
    [ -n "${TMP:-}" ] && rm -rf "$TMP"
}

# Waits until a path exists (a socket), at most 30 seconds (a loaded machine).
wait_for_path() {
    for _ in $(seq 300); do
        [ -e "$1" ] && return 0
        sleep 0.1
    done
    return 1
}

# Waits until a file (a daemon's log) has a line matching a grep pattern, at most 30
# seconds.
wait_for_line() {
    for _ in $(seq 300); do
        grep -q -- "$1" "$2" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "no line matching '$1' in $2:" >&2
    cat "$2" >&2
    return 1
}
