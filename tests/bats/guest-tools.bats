#!/usr/bin/env bats
# The guest tools outside a SnowFlock VM (here, on the host): no XenStore port, so each
# exits 5 with one line on stderr, no traceback, nothing on stdout (snowflock(7)).

bats_require_minimum_version 1.5.0
load helpers

PORT=/dev/virtio-ports/org.snowflock.xenbus

setup() {
    unset SF_XENBUS SF_HOOKS_DIR SF_AVOIDANCE
    [ ! -e "$PORT" ] || skip "this machine has a XenStore port: it is a SnowFlock VM"
}

# Runs a tool with its address space bounded (500 MB, plenty for Python): with
# avoidance, sf-clone and sf-checkpoint take all but 10% of the free memory first, and
# outside a VM that is the machine's (see the known bug below). And 60 s at most.
outside() {
    run --separate-stderr bash -c 'ulimit -v 500000; exec timeout 60 "$@"' _ "$@"
}

# The verdict of a tool ($1) that found no XenStore port.
# shellcheck disable=SC2154  # stderr: set by run --separate-stderr
unreachable() {
    [ "$status" -eq 5 ]
    [ -z "$output" ]
    [ "$stderr" = "$1: error: no XenStore port at $PORT (is this a SnowFlock VM?)" ]
}

@test "sf-ticket, sf-join, sf-kill, sf-exit outside a VM: exit 5, one line" {
    for argv in "sf-ticket 1" "sf-join t1-abcdef" "sf-kill t1-abcdef" "sf-exit" "sf-exit 3"; do
        # shellcheck disable=SC2086  # word splitting wanted: a command line
        outside $argv
        unreachable "${argv%% *}"
    done
}

@test "sf-share outside a VM: put, get, ls and clear exit 5, one line" {
    echo data >"$BATS_TEST_TMPDIR/f"
    for argv in "put k $BATS_TEST_TMPDIR/f" "get t1-abcdef 1 k" "ls t1-abcdef" "ls --json t1-abcdef" \
        "clear t1-abcdef"; do
        # shellcheck disable=SC2086
        outside sf-share $argv
        unreachable sf-share
    done
    outside sf-share put k </dev/null
    unreachable sf-share
}

@test "sf-clone --no-avoidance, --from and --hooks-dir outside a VM: exit 5, one line" {
    outside sf-clone --no-avoidance t1-abcdef
    unreachable sf-clone
    outside sf-clone --from c1-abcdef t1-abcdef
    unreachable sf-clone
    outside env SF_AVOIDANCE=0 sf-clone --hooks-dir "$BATS_TEST_TMPDIR" --json t1-abcdef
    unreachable sf-clone
    outside sf-checkpoint --no-avoidance
    unreachable sf-checkpoint
}

@test "sf-clone and sf-checkpoint outside a VM: exit 5 before taking the free memory" {
    # Bounded (outside), a reservation of the machine's free memory would fail and warn
    # "no free-page report": they must find no port before they take any.
    outside sf-clone t1-abcdef
    unreachable sf-clone
    outside sf-checkpoint
    unreachable sf-checkpoint
}
