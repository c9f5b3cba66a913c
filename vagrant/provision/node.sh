#!/usr/bin/env bash
# Provision one Vagrant lab node (run as root by the Vagrantfile's shell
# provisioner, from the synced checkout). Idempotent: every step checks or
# compares before it changes anything, so `vagrant provision` on a provisioned
# node changes nothing and restarts nothing.
# Environment: see the Vagrantfile (XW_NAME, XW_PEER, XW_LOCAL_OUTER, ...).
set -euo pipefail
repo=${XWAMP_REPO:-/xwamp}
here=$repo/vagrant/provision
export XWAMP_REPO=$repo
echo "== xwamp lab node $XW_NAME: packages"
"$here/packages.sh"
echo "== xwamp lab node $XW_NAME: inner address and IPsec (strongSwan IKEv2, $XW_AUTH)"
"$here/ipsec.sh"
echo "== xwamp lab node $XW_NAME: xwamp agent"
"$here/agent.sh"
if [ "${XW_PROMETHEUS:-0}" = 1 ]; then
    echo "== xwamp lab node $XW_NAME: Prometheus"
    "$here/prometheus.sh"
fi
echo "== xwamp lab node $XW_NAME: done"
