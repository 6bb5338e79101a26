#!/bin/sh
# SnowFlock guest init: PID 1 of the initramfs (which is the whole root fs), run by
# busybox sh. Built into the image as /init by sf-image(1).
#
# Kernel command line:
#   sf.run=CMD      run CMD (with sh -c) instead of a shell on the console; quote
#                   with double quotes when it has spaces: sf.run="python3 /t.py"
#   sf.debug=1      trace this script (set -x)
# When the command or the shell exits, the guest powers off.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
MODULES=/etc/snowflock/modules
XENBUS_PORT=org.snowflock.xenbus
AGENT_SOCKET=/run/xenstored/socket

say() {
    echo "snowflock-guest: $*"
}

# The value of kernel parameter $1 (a sed regex: dots escaped), "..." quoting removed.
param() {
    sed -n -e "s/^\(.* \)\{0,1\}$1=\"\([^\"]*\)\".*/\2/p" -e t \
        -e "s/^\(.* \)\{0,1\}$1=\([^ ]*\).*/\2/p" /proc/cmdline
}

mount_filesystems() {
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    # The kernel does not mount devtmpfs on an initramfs (DEVTMPFS_MOUNT only acts
    # on a real root device), so do it here; /dev/console came from the cpio.
    mount -t devtmpfs devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts
    mount -t tmpfs tmpfs /dev/shm
    mount -t tmpfs tmpfs /tmp
    mount -t tmpfs tmpfs /run
    mkdir -p /var
    [ -e /var/run ] || ln -s /run /var/run  # where pyxs looks for xenstored (FHS)
}

load_modules() {
    # One path per line, each after the modules it needs (sf-image resolved it).
    [ -r "$MODULES" ] || return 0
    while read -r module; do
        insmod "$module" || say "cannot load $module"
    done <"$MODULES"
}

# Without udev nobody creates /dev/virtio-ports/<name>: link each named port.
link_ports() {
    mkdir -p /dev/virtio-ports
    for dir in /sys/class/virtio-ports/vport*; do
        [ -r "$dir/name" ] || continue
        name=$(cat "$dir/name")
        [ -n "$name" ] && ln -sf "/dev/${dir##*/}" "/dev/virtio-ports/$name"
    done
}

# Port names arrive from the host asynchronously after virtio_console binds: when a
# virtio-serial device exists, wait (up to 5 s) for the XenStore port to be named.
wait_for_ports() {
    ls /sys/bus/virtio/drivers/virtio_console/virtio* >/dev/null 2>&1 || return 0
    tries=50
    while [ "$tries" -gt 0 ]; do
        link_ports
        [ -e "/dev/virtio-ports/$XENBUS_PORT" ] && return 0
        tries=$((tries - 1))
        sleep 0.1
    done
    say "no virtio port named $XENBUS_PORT"
}

# sf-guestd(8) owns the XenStore port from now on and serves every guest process
# on Xen's xenstored socket, where the tools, the libraries and xenstore-utils look.
start_agent() {
    [ -e "/dev/virtio-ports/$XENBUS_PORT" ] || return 0
    # Restarted if it dies: it then drops what the dead one left in the session.
    (while :; do
        sf-guestd --quiet </dev/null
        say "sf-guestd exited with status $?: restarting it"
        sleep 1
    done) &
    agent=$!
    tries=200  # 20 s: its start, under TCG on a loaded host
    while [ ! -S "$AGENT_SOCKET" ]; do
        if ! kill -0 "$agent" 2>/dev/null || [ "$tries" -eq 0 ]; then
            say "sf-guestd did not start: the tools use the port, one at a time"
            return 0
        fi
        tries=$((tries - 1))
        sleep 0.1
    done
}

# A VM on a family network (sfld(8), NETWORK) asks its host's DHCP server for its
# address: the lease is static, so a reboot or renewal gets the same one.
configure_network() {
    [ -e /sys/class/net/eth0 ] || return 0
    ip link set dev eth0 up  # udhcpc spins on a link that is down
    udhcpc -i eth0 -n -q -t 5 -T 1 >/dev/null 2>&1 || say "no DHCP lease on eth0"
}

# Tell sfld through XenStore that the guest is up (sf-vm run --wait-ready).
notify_ready() {
    [ -e "/dev/virtio-ports/$XENBUS_PORT" ] || return 0
    python3 -m sflib.guest.ready || say "could not write the ready key"
}

# The kernel turns transparent huge pages off in a guest of less than 512 MiB; a
# region that asks for them (madvise) may still have them: sf-clone's free pages,
# taken in huge pages, cost a fault each 2 MiB instead of each 4 KiB.
allow_huge_pages() {
    thp=/sys/kernel/mm/transparent_hugepage/enabled
    grep -q '\[never\]' "$thp" 2>/dev/null && echo madvise >"$thp"
    return 0
}

main() {
    mount_filesystems
    allow_huge_pages
    [ "$(param 'sf\.debug')" = 1 ] && set -x
    load_modules
    wait_for_ports
    start_agent
    ifconfig lo 127.0.0.1 up
    configure_network
    hostname snowflock
    notify_ready
    say ready
    command=$(param 'sf\.run')
    if [ -n "$command" ]; then
        say "running: $command"
        sh -c "$command"
        say "command exited with status $?"
    else
        setsid cttyhack sh -l
    fi
    sync
    poweroff -f
}

main
