#!/bin/sh
# The render farm, inside the parent VM: load the job once, fork a clone per band,
# each renders its rows and hands them back, the parent joins and assembles.
set -u
W=${SF_W:-320} H=${SF_H:-240} N=${SF_N:-4}
cd /tmp || exit 1
now() { cut -d' ' -f1 /proc/uptime; }
say() { echo "FARM $*"; }

cp /demo/scene.pov scene.pov
povray +Iscene.pov +Owarm.ppm +FP +W32 +H24 -D -V >/dev/null 2>&1  # load: parse once
grant=$(sf-ticket --json "$N") || exit 1
read -r ticket m <<EOF
$(echo "$grant" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["ticket"], d["granted"])')
EOF
say "ticket $ticket granted $m of $N"
t0=$(now)
id=$(sf-clone "$ticket")
if [ "$id" != 0 ]; then
    start=$(now)
    first=$(( (id - 1) * H / m + 1 )) last=$(( id * H / m ))
    povray +Iscene.pov +Ofull.ppm +FP "+W$W" "+H$H" "+SR$first" "+ER$last" -D -V >povray.log 2>&1 \
        || { tail -3 povray.log; sf-exit 1; }
    python3 /demo/bands.py crop full.ppm "$first" "$last" band.ppm
    sf-share put band band.ppm
    echo "$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }') $first $last" \
        | sf-share put work
    sf-exit 0
fi
say "cloned in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }') s"
sf-join "$ticket" | sed 's/^/FARM joined /'
set --
for k in $(seq 1 "$m"); do
    sf-share get "$ticket" "$k" band "band$k.ppm" && set -- "$@" "band$k.ppm"
    say "work $k $(sf-share get "$ticket" "$k" work)"
done
python3 /demo/bands.py join render.png "$@"
sf-share put render render.png
say "wall $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }') s"
say "done"
