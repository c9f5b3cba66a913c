# Sourced by tools/lab/tunnel.sh and tools/lab/strongswan.sh: the two "routers" both
# labs share. Expects A, B (namespace names) and p (prefix) to be set.
# Outer (wire) addresses on wan0, inner (measured) addresses on lo, routed over wan0.
OA=192.0.2.1; OB=192.0.2.2; IA=10.77.1.1; IB=10.77.2.1

routers_up() {
    ip netns add "$A"; ip netns add "$B"
    ip link add "$p-va" netns "$A" type veth peer name "$p-vb" netns "$B"
    for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
    ip -n "$A" link set "$p-va" name wan0 up; ip -n "$B" link set "$p-vb" name wan0 up
    ip -n "$A" addr add $OA/24 dev wan0; ip -n "$B" addr add $OB/24 dev wan0
    ip -n "$A" addr add $IA/32 dev lo;   ip -n "$B" addr add $IB/32 dev lo
    ip -n "$A" route add $IB/32 dev wan0 src $IA
    ip -n "$B" route add $IA/32 dev wan0 src $IB
}
