#!/usr/bin/env bats
# The command-line contract of sf-xenstored.

bats_require_minimum_version 1.5.0
load helpers

setup() { setup_tmp; }
teardown() {
    [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    teardown_tmp
}

@test "--help prints usage and exits 0" {
    run sf-xenstored --help
    [ "$status" -eq 0 ]
    [[ "$output" == *"Usage: sf-xenstored"* ]]
    [[ "$output" == *"--socket"* ]]
}

@test "an unknown option is a usage error (exit 2) on stderr" {
    run --separate-stderr sf-xenstored --no-such-option
    [ "$status" -eq 2 ]
    [ -z "$output" ]
    [[ "$stderr" == *"No such option"* ]]
}

@test "a socket in a missing directory: exit 2 and one clear line" {
    run --separate-stderr sf-xenstored --socket "$TMP/missing/xs.sock"
    [ "$status" -eq 2 ]
    [[ "$stderr" == "sf-xenstored: error: $TMP/missing: no such directory" ]]
}

@test "a socket that cannot be bound: exit 111" {
    run --separate-stderr sf-xenstored --socket /proc/xs.sock
    [ "$status" -eq 111 ]
    [[ "$stderr" == *"sf-xenstored: error: cannot listen on /proc/xs.sock"* ]]
}

@test "quota options reject nonsense" {
    run --separate-stderr sf-xenstored --quota-nodes 0
    [ "$status" -eq 2 ]
}

@test "serves xenstore-utils, and SIGTERM stops it cleanly, removing the socket" {
    sf-xenstored --socket "$TMP/xs.sock" 2>"$TMP/log" &
    PID=$!
    wait_for_path "$TMP/xs.sock"
    XENSTORED_PATH=$TMP/xs.sock xenstore-write /bats/key hello
    run env XENSTORED_PATH="$TMP/xs.sock" xenstore-read /bats/key
    [ "$output" = hello ]
    kill -TERM "$PID"
    wait "$PID"
    status=$?
    PID=
    [ "$status" -eq 0 ]
    [ ! -e "$TMP/xs.sock" ]
    grep -q "listening on $TMP/xs.sock" "$TMP/log"
}

@test "SF_ROOTDIR moves the default socket" {
    mkdir -p "$TMP/run/snowflock"
    SF_ROOTDIR=$TMP sf-xenstored 2>/dev/null &
    PID=$!
    wait_for_path "$TMP/run/snowflock/xenstored.sock"
}
