#!/usr/bin/env bats
# The command-line contract of sfld and sf-vm, without booting VMs.

bats_require_minimum_version 1.5.0
load helpers

setup() {
    setup_tmp
    export SF_ROOTDIR=$TMP
}
teardown() {
    [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "/dev/shm/snowflock-$(printf '%s' "$TMP" | sha256sum | cut -c1-8)"
    teardown_tmp
}

start_sfld() {
    sfld --accel tcg --image-dir "$TMP" 2>"$TMP/sfld.log" &
    PID=$!
    wait_for_path "$TMP/run/snowflock/sfld.sock"
}

@test "sfld --help lists every setting" {
    run sfld --help
    [ "$status" -eq 0 ]
    for opt in --config --state-dir --run-dir --memory-dir --image-dir --qemu --accel \
        --memory --vcpus --max-vms --ready-timeout --print-config --ready-fd; do
        [[ "$output" == *"$opt"* ]]
    done
}

@test "sfld settings: defaults < file < environment < command line" {
    mkdir -p "$TMP/etc/snowflock"
    printf '[sfld]\nmemory = 300\nvcpus = 2\nmax_vms = 5\n' >"$TMP/etc/snowflock/sfld.toml"
    run env SF_VCPUS=3 SF_MAX_VMS=6 sfld --print-config --max-vms 7
    [ "$status" -eq 0 ]
    [[ "$output" == *'memory = 300'* ]]
    [[ "$output" == *'vcpus = 3'* ]]
    [[ "$output" == *'max_vms = 7'* ]]
    [[ "$output" == *"state_dir = \"$TMP/var/lib/snowflock\""* ]]
}

@test "sfld --print-config --json is machine-readable" {
    run sfld --print-config --json --accel tcg
    [ "$status" -eq 0 ]
    [ "$(printf '%s' "$output" | python3 -c 'import json,sys; print(json.load(sys.stdin)["accel"])')" = tcg ]
}

@test "sfld: an unknown config key is a usage error naming it" {
    mkdir -p "$TMP/etc/snowflock"
    printf '[sfld]\nmemroy = 300\n' >"$TMP/etc/snowflock/sfld.toml"
    run --separate-stderr sfld --print-config
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"unknown setting(s): memroy"* ]]
}

@test "sfld: broken TOML, wrong types and a missing --config are usage errors" {
    printf '[sfld\n' >"$TMP/bad.toml"
    run --separate-stderr sfld --config "$TMP/bad.toml" --print-config
    [ "$status" -eq 2 ]
    printf '[sfld]\nmemory = "lots"\n' >"$TMP/type.toml"
    run --separate-stderr sfld --config "$TMP/type.toml" --print-config
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"memory must be an integer"* ]]
    run --separate-stderr sfld --config "$TMP/none.toml" --print-config
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"does not exist"* ]]
    run --separate-stderr env SF_ACCEL=warp sfld --print-config
    [ "$status" -eq 2 ]
    [[ "$stderr" == *'$SF_ACCEL: accel must be one of auto, kvm, tcg'* ]]
}

@test "sf-vm without a running sfld: exit 5 and a hint" {
    run --separate-stderr sf-vm ls
    [ "$status" -eq 5 ]
    [[ "$stderr" == "sf-vm: error: cannot reach sfld at $TMP/run/snowflock/sfld.sock"*"(is sfld running?)" ]]
}

@test "sf-vm against sfld: empty list, unknown VM (3), bad name (2), no image (2)" {
    start_sfld
    run sf-vm ls --json
    [ "$status" -eq 0 ]
    [ "$output" = "[]" ]
    run --separate-stderr sf-vm stop ghost
    [ "$status" -eq 3 ]
    [ "$stderr" = "sf-vm: error: no VM named ghost" ]
    run --separate-stderr sf-vm run --name 'Bad Name'
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"invalid VM name"* ]]
    run --separate-stderr sf-vm run --image "$TMP/nothing"
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"no guest image in $TMP/nothing"*"sf-image build"* ]]
    run sf-vm status --json
    [ "$status" -eq 0 ]
    [[ "$output" == *'"accel": "tcg"'* ]]
}

@test "sfld: SIGTERM with no VMs exits 0 and removes its sockets" {
    start_sfld
    kill -TERM "$PID"
    wait "$PID"
    status=$?
    PID=
    [ "$status" -eq 0 ]
    [ ! -e "$TMP/run/snowflock/sfld.sock" ]
    [ ! -e "$TMP/run/snowflock/xenstored.sock" ]
    grep -q "stopped" "$TMP/sfld.log"
}

@test "sfld's XenStore serves xenstore-utils on its socket" {
    start_sfld
    XENSTORED_PATH=$TMP/run/snowflock/xenstored.sock xenstore-write /bats 1
    run env XENSTORED_PATH="$TMP/run/snowflock/xenstored.sock" xenstore-read /bats
    [ "$output" = 1 ]
}

@test "sf-vm run --show-command prints QEMU's command line and starts nothing" {
    start_sfld
    printf 'k' >"$TMP/vmlinuz"
    printf 'i' >"$TMP/initrd.img"
    run sf-vm run --name shown --show-command
    [ "$status" -eq 0 ]
    [[ "$output" == qemu-system-x86_64* ]]
    [[ "$output" == *"share=on"* ]]
    [[ "$output" == *"name=org.snowflock.xenbus"* ]]
    [[ "$output" == *"-netdev tap,id=net0,fd=3"*"virtio-net-pci"* ]]  # its family card
    run sf-vm ls --json
    [ "$output" = "[]" ]
}

@test "sfld in a cluster will not make up a secret: exit 2, nothing left running" {
    run --separate-stderr sfld --accel tcg --master 127.0.0.1:1 --secret-file "$TMP/none"
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"cannot read the shared secret $TMP/none"* ]]
    [ ! -e "$TMP/none" ]
    printf 'short\n' >"$TMP/short"
    run --separate-stderr sfld --accel tcg --master 127.0.0.1:1 --secret-file "$TMP/short"
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"too short"* ]]
    [ ! -e "$TMP/run/snowflock/sfld.sock" ]
}

@test "sfmasterd: --help, a missing secret (2), a clean SIGTERM" {
    run sfmasterd --help
    [ "$status" -eq 0 ]
    [[ "$output" == *"--host-timeout"* ]]
    run --separate-stderr sfmasterd --secret-file "$TMP/none"
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"cannot read the shared secret"* ]]
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TMP/secret"
    sfmasterd --listen 127.0.0.1:0 --secret-file "$TMP/secret" --state-dir "$TMP/m" 2>"$TMP/log" &
    PID=$!
    wait_for_line ready "$TMP/log"
    kill -TERM "$PID"
    wait "$PID"
    status=$?
    PID=
    [ "$status" -eq 0 ]
    [ -f "$TMP/m/master.db" ]
}

@test "sfmasterd: a bad --listen is a usage error that leaves nothing on disk" {
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TMP/secret"
    run --separate-stderr sfmasterd --listen nonsense --secret-file "$TMP/secret"
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"invalid address 'nonsense'"* ]]
    [ ! -e "$TMP/var/lib/snowflock-master" ]
}

@test "sfld's family networks: a bad port list or an unspecified underlay is a usage error (2)" {
    run --separate-stderr sfld --accel tcg --inbound-ports 22,99999
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"inbound_ports must be a list of ports from 1 to 65535"* ]]
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TMP/secret"
    run --separate-stderr sfld --accel tcg --master 127.0.0.1:1 --secret-file "$TMP/secret" \
        --peer-listen 0.0.0.0:7100
    [ "$status" -eq 2 ]
    [[ "$stderr" == *"family networks need this host's own address in peer_listen"* ]]
    [ ! -e "$TMP/run/snowflock/sfld.sock" ]
}
