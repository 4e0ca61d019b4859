#!/usr/bin/env bash
# Builds a Debian 13 (trixie) root file system with debootstrap, for the tests that run real
# clients too new for Debian 12 (tests/podman5/make-root.sh, tests/docker/make-root.sh).
#
# The packages come from the Debian mirror this machine's apt already uses (never an upgrade
# of the host). The tree gets an unprivileged user with 65536 subordinate ids, and a marker
# file `.usernet-ready` once complete.
#
# Usage: trixie-root.sh DIR USER UID SUBID_START PACKAGE[,PACKAGE...]
set -euo pipefail

root="${1:?usage: trixie-root.sh DIR USER UID SUBID_START PACKAGES}"
user="${2:?user}"
uid="${3:?uid}"
subid="${4:?first subordinate id}"
packages="${5:?comma-separated packages}"

# The mirror apt is configured with: deb822 sources first, then the one-line format.
mirror="$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
if [ -z "$mirror" ]; then
    mirror="$(awk '$1 == "deb" && $2 !~ /^\[/ { print $2; exit } $1 == "deb" { print $3; exit }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)"
fi
if [ -z "$mirror" ]; then
    echo "trixie-root.sh: no Debian mirror found in /etc/apt/sources.list*" >&2
    exit 1
fi

command -v debootstrap >/dev/null || apt-get install -y -q --no-install-recommends debootstrap
rm -rf "$root"
debootstrap --variant=minbase --include="$packages" trixie "$root" "$mirror"

chroot "$root" useradd -m -u "$uid" "$user"
echo "$user:$subid:65536" >"$root/etc/subuid"
echo "$user:$subid:65536" >"$root/etc/subgid"
touch "$root/.usernet-ready"
echo "trixie-root.sh: $root is ready"
