#!/usr/bin/env bash
# Two "routers" as network namespaces joined by a veth, with a real ESP tunnel
# (tunnel mode, ip xfrm SAs and policies) between their inner networks.
#   tools/lab/tunnel.sh up [PREFIX]     create PREFIX-a and PREFIX-b (default xw)
#   tools/lab/tunnel.sh down [PREFIX]
# Outer (wire) addresses 192.0.2.1/.2; inner (measured) 10.77.1.1 <-> 10.77.2.1.
# All addresses exist only inside these namespaces. Keys are random unless
# XWAMP_LAB_KEYS names a file of 4 hex keys: enc a->b, auth a->b, enc b->a, auth b->a.
set -Eeuo pipefail  # -E: the ERR trap also fires inside functions
cmd=${1:-up}; p=${2:-xw}
A=$p-a; B=$p-b
. "$(dirname "${BASH_SOURCE[0]}")/routers.sh"  # OA OB IA IB, routers_up
SPI_AB=${XWAMP_LAB_SPI_AB:-0xa0b00001}; SPI_BA=${XWAMP_LAB_SPI_BA:-0xb0a00001}; REQID=${XWAMP_LAB_REQID:-7}

down() { ip netns del "$A" 2>/dev/null || true; ip netns del "$B" 2>/dev/null || true; }
if [ "$cmd" = down ]; then down; exit 0; fi

hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
if [ -n "${XWAMP_LAB_KEYS:-}" ]; then read -r EAB HAB EBA HBA < "$XWAMP_LAB_KEYS"
else EAB=$(hex 16); HAB=$(hex 32); EBA=$(hex 16); HBA=$(hex 32); fi

down
trap 'echo "tunnel.sh: set-up failed (does this kernel have ESP? see tools/kernel-caps)" >&2; down' ERR
routers_up

sa() { # ns src dst spi enc auth
    ip -n "$1" xfrm state add src "$2" dst "$3" proto esp spi "$4" reqid $REQID mode tunnel \
        replay-window 32 enc 'cbc(aes)' "0x$5" auth-trunc 'hmac(sha256)' "0x$6" 128 \
        sel src 0.0.0.0/0 dst 0.0.0.0/0
}
pol() { # ns dir src dst tsrc tdst
    ip -n "$1" xfrm policy add src "$5/32" dst "$6/32" dir "$2" \
        tmpl src "$3" dst "$4" proto esp reqid $REQID mode tunnel
}
for ns in "$A" "$B"; do
    sa "$ns" $OA $OB $SPI_AB "$EAB" "$HAB"
    sa "$ns" $OB $OA $SPI_BA "$EBA" "$HBA"
done
pol "$A" out $OA $OB $IA $IB; pol "$A" in  $OB $OA $IB $IA; pol "$A" fwd $OB $OA $IB $IA
pol "$B" out $OB $OA $IB $IA; pol "$B" in  $OA $OB $IA $IB; pol "$B" fwd $OA $OB $IA $IB
echo "tunnel up: $A ($IA via $OA) <== ESP ==> $B ($IB via $OB), SPIs $SPI_AB / $SPI_BA, reqid $REQID"
