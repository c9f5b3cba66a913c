#!/usr/bin/env bash
# Two "routers" as network namespaces joined by a veth, with a real IKEv2
# tunnel negotiated by two charon (strongSwan) instances, one per namespace.
#   tools/lab/strongswan.sh up [PREFIX]      create PREFIX-a / PREFIX-b (default xs), wait for the CHILD_SA
#   tools/lab/strongswan.sh down [PREFIX]
#   tools/lab/strongswan.sh rekey [PREFIX]   rekey the CHILD_SA from a; wait for the new SPIs
#   tools/lab/strongswan.sh status [PREFIX]  swanctl --list-sas in both
#   tools/lab/strongswan.sh swanctl a|b [PREFIX] -- ARGS   swanctl against that node's charon
#   tools/lab/strongswan.sh keys [PREFIX]    (needs XWAMP_LAB_KEYLOG=1 at up) write a's IKE key-source JSON
# Same addressing as tools/lab/tunnel.sh: outer (wire) 192.0.2.1/.2 on wan0,
# inner (measured) 10.77.1.1 <-> 10.77.2.1 on lo, tunnel mode. All addresses
# exist only inside these namespaces.
# Environment: XWAMP_LAB_AUTH=psk|cert, XWAMP_LAB_KEYLOG=1 (log SK_d/nonces, lab only),
#   XWAMP_LAB_STATE (default /tmp/xwamp-lab), XWAMP_LAB_WAIT (seconds, default 60),
#   XWAMP_LAB_IKE_PROPOSALS, XWAMP_LAB_ESP_PROPOSALS.
# The configuration comes from lab/ (render.sh, secrets.sh, strongswan/*.in),
# the same files the Vagrant lab provisions with.
set -euo pipefail
cmd=${1:-up}; shift || true
node=
if [ "$cmd" = swanctl ]; then node=${1:?usage: swanctl a|b [PREFIX] -- ARGS}; shift; fi
p=xs
if [ $# -gt 0 ] && [ "$1" != -- ]; then p=$1; shift; fi
if [ "${1:-}" = -- ]; then shift; fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
A=$p-a; B=$p-b
. "$repo/tools/lab/routers.sh"  # OA OB IA IB, routers_up
# /tmp: the QEMU guest's /tmp is tmpfs (9p refuses unix sockets) and the vici
# socket lives in each node's state directory.
state=${XWAMP_LAB_STATE:-/tmp/xwamp-lab}/$p
wait_s=${XWAMP_LAB_WAIT:-60}
CHARON=${XWAMP_CHARON:-/usr/lib/ipsec/charon}

el() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a - b }'; }  # elapsed seconds
# XWAMP_LAB_TRACE=1: time each step of `up` on stderr (the VM is slow; find out where).
trace() { [ "${XWAMP_LAB_TRACE:-0}" = 1 ] && echo "strongswan.sh: +$(el "$(date +%s.%N)" "$t0")s $*" >&2; return 0; }
t0=$(date +%s.%N)
log() { echo "strongswan.sh: $*" >&2; }
die() { log "$*"; for n in a b; do [ -f "$state/$n/charon.log" ] && { log "--- $n/charon.log"; tail -n 30 "$state/$n/charon.log" >&2; }; done; exit 1; }

# sw NODE ARGS...: swanctl against one node's charon (the socket is a file in
# /tmp, so swanctl needs no netns; STRONGSWAN_CONF gives it the socket URI).
sw() {
    local n=$1; shift
    STRONGSWAN_CONF=$state/$n/strongswan.conf SWANCTL_DIR=$state/$n/swanctl swanctl "$@"
}

esp_spis() { # NS: the ESP SPIs in that namespace, sorted, one per line
    ip -n "$1" xfrm state 2>/dev/null | sed -n 's/.*proto esp spi \(0x[0-9a-f]*\).*/\1/p' | sort
}

wait_for() { # DESC CMD...: poll CMD every 0.1 s until it succeeds or XWAMP_LAB_WAIT passes
    local desc=$1; shift
    local end=$((SECONDS + wait_s))
    until "$@"; do
        [ $SECONDS -lt $end ] || die "timed out after ${wait_s}s waiting for $desc"
        sleep 0.1
    done
}

down() {
    local n pid
    for n in a b; do
        pid=$(cat "$state/$n/charon.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        # Key material does not outlive the lab (logs and configs stay for debugging).
        rm -f "$state/$n/charon.pid" "$state/$n/keys.log" "$state/$n/ike-keys.json"
    done
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
}

start_charon() { # NODE NS
    local n=$1 ns=$2
    # charon's pid file is fixed at /var/run/charon.pid: give each instance a
    # private /run. umask 077: the logs may hold key material. `ip netns exec` already runs us in a new mount namespace
    # (it remounts /sys there), so this tmpfs is invisible outside.
    # shellcheck disable=SC2016  # $0 is expanded by the inner sh
    setsid ip netns exec "$ns" env STRONGSWAN_CONF="$state/$n/strongswan.conf" \
        sh -c 'umask 077 && mount -t tmpfs -o mode=0755 tmpfs /run && exec "$0"' "$CHARON" \
        > "$state/$n/charon.out" 2>&1 < /dev/null &
    echo $! > "$state/$n/charon.pid"
}

two_sas() { # both namespaces hold an ESP SA pair
    [ "$(esp_spis "$A" | wc -l)" -eq 2 ] && [ "$(esp_spis "$B" | wc -l)" -eq 2 ]
}

old=""
rekeyed() { # exactly one pair again on both sides, and none of the $old SPIs left
    two_sas || return 1
    local s
    for s in $old; do
        if esp_spis "$A" | grep -qx "$s" || esp_spis "$B" | grep -qx "$s"; then return 1; fi
    done
}

case $cmd in
down)
    down; exit 0;;
status)
    for n in a b; do echo "== $p-$n"; sw $n --list-sas; done; exit 0;;
swanctl)
    sw "$node" "$@"; exit $?;;
keys)
    [ -s "$state/a/keys.log" ] || die "no key log: bring the lab up with XWAMP_LAB_KEYLOG=1"
    sw a --list-sas > "$state/a/list-sas.txt" || die "swanctl --list-sas failed"
    PY=${XWAMP_PYTHON:-python3}
    exec "$PY" "$repo/tools/lab/charon-keys" "$state/a/keys.log" "$state/a/list-sas.txt" "$state/a/ike-keys.json";;
rekey)
    old=$(esp_spis "$A")
    [ -n "$old" ] || die "no ESP SAs in $A: is the lab up?"
    t0=$(date +%s.%N)
    sw a --rekey --child xwamp >/dev/null || die "swanctl --rekey failed"
    wait_for "the rekeyed CHILD_SA" rekeyed
    echo "rekeyed in $(el "$(date +%s.%N)" "$t0") s: SPIs now $(esp_spis "$A" | tr '\n' ' ')"
    exit 0;;
up) ;;
*) echo "usage: $0 up|down|rekey|status|keys [PREFIX] | swanctl a|b [PREFIX] -- ARGS" >&2; exit 2;;
esac

if ! command -v swanctl >/dev/null || [ ! -x "$CHARON" ]; then
    log "strongSwan missing: apt-get install strongswan-charon strongswan-swanctl"; exit 2
fi
down
trace "old lab removed"
"$repo/lab/modules.sh"
trace "crypto modules loaded"

routers_up

trace "namespaces and veth up"
mkdir -p "$state"
auth=${XWAMP_LAB_AUTH:-psk}
certflag=(); [ "$auth" = cert ] && certflag=(--cert)
"$repo/lab/secrets.sh" "$state/secrets" "${certflag[@]}" a b >/dev/null || die "lab/secrets.sh failed"

render() { # NAME PEER LOCAL_OUTER REMOTE_OUTER LOCAL_INNER REMOTE_INNER
    local keylog=""
    [ "${XWAMP_LAB_KEYLOG:-0}" = 1 ] && keylog=$state/$1/keys.log
    XW_NAME=$1 XW_PEER=$2 XW_LOCAL_OUTER=$3 XW_REMOTE_OUTER=$4 XW_LOCAL_INNER=$5 XW_REMOTE_INNER=$6 \
    XW_SECRETS=$state/secrets XW_AUTH=$auth XW_KEYLOG=$keylog XW_START_ACTION=none \
    XW_IKE_PROPOSALS=${XWAMP_LAB_IKE_PROPOSALS:-} XW_ESP_PROPOSALS=${XWAMP_LAB_ESP_PROPOSALS:-} \
        "$repo/lab/render.sh" "$state/$1" >/dev/null
    # A fresh log per run, so waits and the key log see only this run.
    rm -f "$state/$1/charon.log" "$state/$1/keys.log" "$state/$1/charon.vici"
}
trace "secrets ready"
render a b $OA $OB $IA $IB
render b a $OB $OA $IB $IA
trace "configs rendered"

start_charon a "$A"
start_charon b "$B"
for n in a b; do
    wait_for "charon $n's vici socket" sw $n --stats --raw >/dev/null 2>&1
    trace "charon $n answers on vici"
done
for n in a b; do
    sw $n --load-all --noprompt --file "$state/$n/swanctl/swanctl.conf" >/dev/null 2>"$state/$n/load.err" \
        || die "swanctl --load-all failed for $n: $(cat "$state/$n/load.err")"
done
trace "connections loaded"
t1=$(date +%s.%N)
sw a --initiate --child xwamp --timeout "$wait_s" > "$state/a/initiate.out" 2>&1 \
    || { cat "$state/a/initiate.out" >&2; die "IKEv2 initiation failed"; }
trace "swanctl --initiate returned"
wait_for "the ESP SA pair in both namespaces" two_sas
t2=$(date +%s.%N)
echo "strongswan up ($auth): $A ($IA via $OA) <== IKEv2/ESP ==> $B ($IB via $OB);" \
     "SPIs $(esp_spis "$A" | tr '\n' ' '); negotiated in $(el "$t2" "$t1") s, total $(el "$t2" "$t0") s"
