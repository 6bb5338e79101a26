# Shared set-up for the bats tests: a private temp dir and the project's bin/ first.
# shellcheck shell=bash

setup_tmp() {
    TMP=$(mktemp -d)
    export TMP
}

teardown_tmp() {
    [ -n "${TMP:-}" ] && rm -rf "$TMP"
}

# Waits until a path exists (a socket), at most 10 seconds.
wait_for_path() {
    for _ in $(seq 100); do
        [ -e "$1" ] && return 0
        sleep 0.1
    done
    return 1
}
