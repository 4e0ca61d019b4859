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

# The mirror apt is configured with: deb822 sources first, then the one-line format.
mirror="$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
if [ -z "$mirror" ]; then
    mirror="$(awk '$1 == "deb" && $2 !~ /^\[/ { print $2; exit } $1 == "deb" { print $3; exit }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)"
fi
if [ -z "$mirror" ]; then
    echo "make-root.sh: no Debian mirror found in /etc/apt/sources.list*" >&2
    exit 1
fi

command -v debootstrap >/dev/null || apt-get install -y -q --no-install-recommends debootstrap
rm -rf "$root"
# docker-cli is the `docker` command (a package of its own in Debian 13).
# dockerd-rootless.sh needs rootlesskit, newuidmap/newgidmap (uidmap), ip (iproute2) and,
# inside, iptables for docker's bridge networks; dockerd runs containerd and runc.
debootstrap --variant=minbase \
    --include=docker.io,docker-cli,rootlesskit,containerd,runc,uidmap,iproute2,iptables,busybox-static,ca-certificates,procps \
    trixie "$root" "$mirror"

chroot "$root" useradd -m -u 1600 undock
echo "undock:300000:65536" >"$root/etc/subuid"
echo "undock:300000:65536" >"$root/etc/subgid"

touch "$root/.usernet-ready"
echo "make-root.sh: $root is ready"
