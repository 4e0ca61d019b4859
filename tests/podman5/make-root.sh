#!/usr/bin/env bash
# Builds a Debian 13 (trixie) root file system holding podman 5, for tests/podman5.rs.
#
# Debian 12's podman 4.3.1 is built without pasta support, so the real client that runs
# usernet as its `pasta` is podman 5 from Debian 13, installed into a directory with
# debootstrap (never an upgrade of the host). The packages come from the Debian mirror this
# machine's apt already uses. The tree also gets an unprivileged user `unpod` (uid 1500) with
# subordinate ids: podman refuses pasta for rootful containers.
#
# Usage: make-root.sh DIR    (does nothing when DIR/usr/bin/podman already exists)
set -euo pipefail

root="${1:?usage: make-root.sh DIR}"
if [ -x "$root/usr/bin/podman" ] && [ -x "$root/usr/bin/newuidmap" ] && [ -e "$root/.usernet-ready" ]; then
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
debootstrap --variant=minbase \
    --include=podman,crun,conmon,catatonit,uidmap,busybox-static,iproute2,ca-certificates \
    trixie "$root" "$mirror"

chroot "$root" useradd -m -u 1500 unpod
echo "unpod:200000:65536" >"$root/etc/subuid"
echo "unpod:200000:65536" >"$root/etc/subgid"
touch "$root/.usernet-ready"
echo "make-root.sh: $root is ready"
