#!/usr/bin/env bash
# Builds a Debian 13 (trixie) root file system holding rootless Docker, for
# tests/docker_rootless.rs.
#
# Rootless Docker is dockerd started by dockerd-rootless.sh (docker.io ships it in
# /usr/share/docker.io/contrib/) under RootlessKit 2.x, whose network driver runs slirp4netns
# or pasta: usernet takes either's place. Debian 12's RootlessKit 1.1 has no pasta driver, so
# the tree is Debian 13's, installed with debootstrap from the mirror this machine's apt
# already uses (never an upgrade of the host). No slirp4netns or passt package: the test puts
# usernet on PATH under those names. The tree also gets an unprivileged user `undock`
# (uid 1600) with subordinate ids. The test's image is Debian 13's busybox-static from this
# tree, brought in with `docker import` (no registry is ever contacted).
#
# Usage: make-root.sh DIR    (does nothing when DIR/.usernet-ready exists)
set -euo pipefail

root="${1:?usage: make-root.sh DIR}"
if [ -x "$root/usr/sbin/dockerd" ] && [ -x "$root/usr/bin/docker" ] && [ -x "$root/usr/bin/rootlesskit" ] && [ -e "$root/.usernet-ready" ]; then
    echo "make-root.sh: $root is ready"
    exit 0
fi

# docker-cli is the `docker` command (a package of its own in Debian 13).
# dockerd-rootless.sh needs rootlesskit, newuidmap/newgidmap (uidmap), ip (iproute2) and,
# inside, iptables for docker's bridge networks; dockerd runs containerd and runc.
bash "$(dirname "$0")/../util/trixie-root.sh" "$root" undock 1600 300000 \
    docker.io,docker-cli,rootlesskit,containerd,runc,uidmap,iproute2,iptables,busybox-static,ca-certificates,procps
