#!/bin/sh
# The render farm, inside the parent VM: load the job once, then for each frame fork
# a clone per band; each clone renders its rows and hands them back, the parent joins
# and assembles the frame. The second frame forks the same VM again, as a render
# farm's parent does for every batch. Every line for the demo starts with FARM.
set -u
W=${SF_W:-320} H=${SF_H:-240} N=${SF_N:-4} FRAMES=${SF_FRAMES:-2}
cd /tmp || exit 1
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
say() { echo "FARM $*"; }

# In clone $2 of $3: render rows of frame $1 (its clock: 0 for the first, 1 for the
# last), hand them back, end. Does not return.
render_band() {
    start=$(now)
    first=$(( ($2 - 1) * H / $3 + 1 )) last=$(( $2 * H / $3 ))
    clock=$(awk -v f="$1" -v n="$FRAMES" 'BEGIN { print (n > 1 ? (f - 1) / (n - 1) : 0) }')
    povray +Iscene.pov +Ofull.ppm +FP "+W$W" "+H$H" "+SR$first" "+ER$last" "+K$clock" \
        -D -V >povray.log 2>&1 || { tail -3 povray.log; sf-exit 1; }
    python3 /demo/bands.py crop full.ppm "$first" "$last" band.ppm
    sf-share put band band.ppm
    echo "$(since "$start") $first $last" | sf-share put work
    sf-exit 0
    exit 1  # sf-exit failed
}

# In the parent: fork, join and assemble frame $1 into render$1 (sf-share).
frame() {
    fr=$1  # set -- below reuses the arguments
    grant=$(sf-ticket --json "$N") || return 1
    read -r ticket m <<EOF
$(echo "$grant" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["ticket"], d["granted"])')
EOF
    say "frame $fr ticket $ticket granted $m of $N"
    t0=$(now)
    id=$(sf-clone "$ticket") || { say "frame $fr sf-clone failed"; return 1; }
    [ "$id" = 0 ] || render_band "$fr" "$id" "$m"
    say "frame $fr cloned in $(since "$t0") s"
    joined=$(sf-join "$ticket"); rc=$?
    echo "$joined" | sed "s/^/FARM frame $fr joined /"
    set --
    for k in $(seq 1 "$m"); do
        sf-share get "$ticket" "$k" band "band$k.ppm" && set -- "$@" "band$k.ppm"
        say "frame $fr work $k $(sf-share get "$ticket" "$k" work)"
    done
    [ "$rc" = 0 ] || return 1
    python3 /demo/bands.py join "render$fr.png" "$@" && sf-share put "render$fr" "render$fr.png"
    say "frame $fr wall $(since "$t0") s"
}

cp /demo/scene.pov scene.pov
povray +Iscene.pov +Owarm.ppm +FP +W32 +H24 -D -V >/dev/null 2>&1  # load: parse once
f=1
while [ "$f" -le "$FRAMES" ]; do
    frame "$f" || exit 1
    f=$((f + 1))
done
say "done"
