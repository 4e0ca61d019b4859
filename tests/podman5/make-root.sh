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

bash "$(dirname "$0")/../util/trixie-root.sh" "$root" unpod 1500 200000 \
    podman,crun,conmon,catatonit,uidmap,busybox-static,iproute2,ca-certificates
