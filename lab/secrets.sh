#!/usr/bin/env bash
# Make the lab's credentials once, never committed: a random PSK and, with
# --cert, a throw-away CA with one RSA certificate per node (identity
# NAME.xwamp.lab in the subjectAltName, which is what swanctl matches).
#   lab/secrets.sh DIR [--cert] [NAME...]     (names default to: a b)
# Idempotent: existing files are kept, so both nodes of a lab (and a re-run of
# the provisioning) keep agreeing on the same secrets. RSA, not ECDSA: the lab's
# charon plugin list (lab/strongswan/strongswan.conf.in) verifies RSA with gmp.
set -euo pipefail
dir=${1:?usage: lab/secrets.sh DIR [--cert] [NAME...]}; shift
cert=no
if [ "${1:-}" = --cert ]; then cert=yes; shift; fi
[ $# -gt 0 ] || set -- a b
mkdir -p "$dir"
chmod 700 "$dir"
umask 077

if [ ! -s "$dir/psk" ]; then
    # 32 random octets in hex; swanctl takes it as "0x..." (no quoting issues).
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$dir/psk.new"
    echo >> "$dir/psk.new"
    mv "$dir/psk.new" "$dir/psk"
    echo "made: $dir/psk"
fi

[ $cert = yes ] || exit 0
# quiet CMD...: openssl chatters on stderr; show it only when it fails.
quiet() {
    local out
    if ! out=$("$@" 2>&1); then echo "secrets.sh: $1 failed: $out" >&2; return 1; fi
}
command -v openssl >/dev/null || { echo "secrets.sh: openssl missing (apt-get install openssl)" >&2; exit 2; }
if [ ! -s "$dir/ca.crt" ] || [ ! -s "$dir/ca.key" ]; then
    quiet openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "/O=xwamp lab/CN=xwamp lab CA" \
        -addext "basicConstraints=critical,CA:true" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    echo "made: $dir/ca.crt"
fi
for n in "$@"; do
    [ -s "$dir/$n.crt" ] && [ -s "$dir/$n.key" ] && continue
    id=$n.xwamp.lab
    quiet openssl req -new -newkey rsa:2048 -nodes -sha256 -keyout "$dir/$n.key" \
        -out "$dir/$n.csr" -subj "/O=xwamp lab/CN=$id"
    # A file, not <(...): the QEMU guest's devtmpfs has no /dev/fd for bash to use.
    printf '%s\n' "subjectAltName=DNS:$id" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth,clientAuth" > "$dir/$n.ext"
    quiet openssl x509 -req -in "$dir/$n.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -sha256 -days 825 \
        -set_serial "0x$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')" -out "$dir/$n.crt" -extfile "$dir/$n.ext"
    rm -f "$dir/$n.csr" "$dir/$n.ext"
    chmod 644 "$dir/$n.crt" "$dir/ca.crt"
    echo "made: $dir/$n.crt"
done
