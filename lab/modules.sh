#!/usr/bin/env bash
# Make the kernel ready for the lab's first ESP SA before charon installs it.
#  1. Load the crypto and XFRM modules in one modprobe call (each modprobe is
#     a slow process start under QEMU TCG). Names differ between kernels and
#     many are built in, so a missing module is not an error.
#  2. Instantiate the default ESP transform once, in a throw-away namespace:
#     the kernel builds and self-tests authenc(hmac(sha256),cbc(aes)) the first
#     time an SA uses it, which stalled the first CHILD_SA install by ~3-4 s
#     under TCG (long enough for the IKE_AUTH request to be retransmitted).
#     Crypto transforms are global, so the real namespaces get the warm one.
# Nothing here is fatal: if ESP really is unusable, charon's SA install says so.
set -euo pipefail
modprobe -qa esp4 esp6 xfrm_user xfrm_algo authenc echainiv seqiv aes_generic aesni_intel \
    cbc ctr gcm ghash_generic ghash_clmulni_intel sha1_generic sha256_generic sha256_ssse3 \
    sha512_generic hmac cmac xcbc 2>/dev/null || true

ns=xwamp-warmup-$$
if ip netns add "$ns" 2>/dev/null; then
    ip -n "$ns" xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x00000100 mode tunnel \
        enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f \
        auth-trunc 'hmac(sha256)' 0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f 128 \
        2>/dev/null || true
    ip netns del "$ns"
fi
