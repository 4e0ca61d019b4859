#!/usr/bin/env bash
# podman 5 runs usernet as its `pasta`: the real client end to end (driven by tests/podman5.rs).
#
# Usage: pasta.sh ROOT USERNET_BIN PREFIX
#   ROOT        a root file system from make-root.sh (podman 5, user `unpod`)
#   USERNET_BIN the usernet binary under test; it is installed as ROOT/opt/usernet/usernet-pasta
#               behind a `pasta` wrapper that logs the argv podman builds
#   PREFIX      name prefix of the namespaces and veths made here (removed at the end)
#
# Topology: host H (198.51.100.2/24, 2001:db8:1::2/64, default routes via W) and world W
# (198.51.100.1, 2001:db8:1::1), joined by a veth; nothing else. podman runs rootless inside H,
# in a private mount namespace whose root is ROOT (pivot_root: a chroot may not create user
# namespaces), with CONTAINERS_HELPER_BINARY_DIR=/opt/usernet.
#
# Checked: a container fetches a file from a server on the host's own address through
# host.containers.internal (--map-guest-addr) and one from the world (outbound NAT); a
# container serves a file through `-p 8080:80` to a host loopback client and to a world client
# (SHA-256 compared), and its server sees the world client's real address; the argv is
# podman's; no usernet process is left once the containers are gone.
set -euo pipefail

root="$1" bin="$2" p="$3"
H="${p}H" W="${p}W"
work="$(mktemp -d /tmp/usernet-podman5.XXXXXX)"
pids=()

fail() { echo "FAIL: $*" >&2; exit 1; }
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    # Whatever podman left running in H (conmon, the container, usernet) dies with a SIGKILL
    # by PID; the namespaces go after them.
    for pid in $(ip netns pids "$H" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$H" 2>/dev/null || true
    ip netns del "$W" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$H"
ip netns add "$W"
ip link add "${p}h" type veth peer name "${p}w"
ip link set "${p}h" netns "$H"
ip link set "${p}w" netns "$W"
ip -n "$H" link set lo up
ip -n "$W" link set lo up
ip -n "$H" addr add 198.51.100.2/24 dev "${p}h"
ip -n "$H" addr add 2001:db8:1::2/64 dev "${p}h" nodad
ip -n "$W" addr add 198.51.100.1/24 dev "${p}w"
ip -n "$W" addr add 2001:db8:1::1/64 dev "${p}w" nodad
ip -n "$H" link set "${p}h" up
ip -n "$W" link set "${p}w" up
ip -n "$H" route add default via 198.51.100.1
ip -n "$H" -6 route add default via 2001:db8:1::1

# Servers: one on the host's own address (reached as host.containers.internal), one in W.
mkdir -p "$work/host" "$work/world" "$work/img/srv" "$work/img/bin" "$work/run" "$work/tmp"
head -c 3000000 /dev/urandom >"$work/host/host.bin"
head -c 2000000 /dev/urandom >"$work/world/world.bin"
head -c 2500000 /dev/urandom >"$work/img/srv/ctr.bin"
ip netns exec "$H" busybox httpd -f -p 198.51.100.2:8081 -h "$work/host" &
pids+=($!)
ip netns exec "$W" busybox httpd -f -p 198.51.100.1:8082 -h "$work/world" &
pids+=($!)

# The image: Debian's static busybox and the file to serve.
cp "$root/bin/busybox" "$work/img/bin/busybox"
for a in sh wget httpd sha256sum ip cat sleep; do ln -sf busybox "$work/img/bin/$a"; done
tar -C "$work/img" -cf "$work/img.tar" .

# usernet as `pasta`, behind a wrapper that logs podman's argv.
mkdir -p "$root/opt/usernet"
install -m 0755 "$bin" "$root/opt/usernet/usernet-pasta"
cat >"$root/opt/usernet/pasta" <<'WRAP'
#!/bin/sh
echo "$*" >>/tmp/pasta-argv.log
exec /opt/usernet/usernet-pasta "$@"
WRAP
chmod 0755 "$root/opt/usernet/pasta"
cp "$work/img.tar" "$work/tmp/img.tar"
chmod -R a+rwX "$work/tmp"
chmod 1777 "$work/tmp"
echo "nameserver 198.51.100.1" >"$root/etc/resolv.conf"

# Runs a shell snippet as `unpod` with podman 5 in ROOT, inside H.
as_podman_user() {
    ip netns exec "$H" unshare -m --propagation private sh -c '
        set -e
        r="$1"; work="$2"; shift 2
        mount --bind "$r" "$r"
        mount -t proc proc "$r/proc"
        mount --rbind /sys "$r/sys"
        mount -t cgroup2 cgroup2 "$r/sys/fs/cgroup" 2>/dev/null || mount -t tmpfs tmpfs "$r/sys/fs/cgroup"
        mount --rbind /dev "$r/dev"
        mount --bind "$work/run" "$r/run"
        mount --bind "$work/tmp" "$r/tmp"
        cd "$r"; mkdir -p .oldroot; pivot_root . .oldroot; cd /
        umount -l /.oldroot
        mount --make-rshared /
        exec setpriv --reuid 1500 --regid 1500 --init-groups \
            env -i HOME=/home/unpod USER=unpod XDG_RUNTIME_DIR=/run/user/1500 \
            PATH=/usr/sbin:/usr/bin:/sbin:/bin PODMAN_IGNORE_CGROUPSV1_WARNING=1 \
            CONTAINERS_HELPER_BINARY_DIR=/opt/usernet sh -c "$@"
    ' sh "$root" "$work" "$1"
}
mkdir -p "$work/run/user/1500"
chown 1500:1500 "$work/run/user/1500"
chmod 0700 "$work/run/user/1500"

PODMAN='podman --storage-driver vfs --cgroup-manager cgroupfs --events-backend file'
RUN="$PODMAN run --cgroups disabled --network pasta"

echo "--- podman: $(as_podman_user "$PODMAN --version")"
as_podman_user "$PODMAN import /tmp/img.tar localhost/usernet-bb >/dev/null"

echo "--- a container fetches from the host (host.containers.internal) and the world"
want_host="$(sha256sum <"$work/host/host.bin" | cut -d' ' -f1)"
want_world="$(sha256sum <"$work/world/world.bin" | cut -d' ' -f1)"
out="$(as_podman_user "$RUN --rm localhost/usernet-bb sh -c '
    wget -q -O - http://host.containers.internal:8081/host.bin | sha256sum
    wget -q -O - http://198.51.100.1:8082/world.bin | sha256sum
    ip -o addr show; ip route'")"
echo "$out"
grep -q "^$want_host " <<<"$out" || fail "the file from the host differs or did not arrive"
grep -q "^$want_world " <<<"$out" || fail "the file from the world differs or did not arrive"
grep -q "198.51.100.2/24" <<<"$out" || fail "the container did not get the host's address"

echo "--- --network pasta:--egress-deny,198.51.100.1/32 keeps a container off the world server"
out="$(as_podman_user "$PODMAN run --cgroups disabled --network pasta:--egress-deny,198.51.100.1/32 --rm localhost/usernet-bb sh -c '
    wget -q -O - http://host.containers.internal:8081/host.bin | sha256sum
    wget -q -T 10 -O /dev/null http://198.51.100.1:8082/world.bin 2>&1 || echo \"world: refused\"'")"
echo "$out"
grep -q "^$want_host " <<<"$out" || fail "egress: the file from the host differs or did not arrive"
grep -q "No route to host" <<<"$out" && grep -q "world: refused" <<<"$out" \
    || fail "egress: the denied world server was not refused with 'No route to host'"
grep -q -- "--config-net --egress-deny 198.51.100.1/32 " "$work/tmp/pasta-argv.log" \
    || fail "egress: podman did not pass --egress-deny right after --config-net"

echo "--- a container serves a file through -p 8080:80"
as_podman_user "$RUN -d --name usernet-srv -p 8080:80 localhost/usernet-bb httpd -f -vv -p 80 -h /srv >/dev/null"
want_ctr="$(sha256sum <"$work/img/srv/ctr.bin" | cut -d' ' -f1)"
got=""
# Until the container's server answers: up to 30 s on a busy machine, done at the answer.
for _ in $(seq 150); do
    got="$(ip netns exec "$H" curl -sS --max-time 5 http://127.0.0.1:8080/ctr.bin 2>/dev/null | sha256sum | cut -d' ' -f1)"
    [ "$got" = "$want_ctr" ] && break
    sleep 0.2
done
[ "$got" = "$want_ctr" ] || fail "host loopback client: published file differs or did not arrive"
got="$(ip netns exec "$W" curl -sS --max-time 30 http://198.51.100.2:8080/ctr.bin | sha256sum | cut -d' ' -f1)"
[ "$got" = "$want_ctr" ] || fail "world client: published file differs or did not arrive"
logs="$(as_podman_user "$PODMAN logs usernet-srv 2>&1")"
grep -q "198.51.100.1" <<<"$logs" || fail "the container's server did not see the world client's address: $logs"
echo "published port: both clients got the file; the server saw 198.51.100.1"

n_running="$(pgrep -c -f /opt/usernet/usernet-pasta || true)"
[ "$n_running" -ge 1 ] || fail "no usernet process serves the running container"
as_podman_user "$PODMAN rm -f -t 1 usernet-srv >/dev/null"
# usernet exits once it notices: up to 30 s on a busy machine, done when it is gone.
for _ in $(seq 300); do
    pgrep -f /opt/usernet/usernet-pasta >/dev/null || break
    sleep 0.1
done
if pgrep -f /opt/usernet/usernet-pasta >/dev/null; then
    fail "usernet is still running after the containers are gone: $(pgrep -a -f /opt/usernet/usernet-pasta)"
fi
echo "no usernet process is left"

echo "--- the argv podman built"
cat "$work/tmp/pasta-argv.log"
grep -q -- "--config-net" "$work/tmp/pasta-argv.log" || fail "podman did not pass --config-net"
grep -q -- "-t 8080-8080:80-80" "$work/tmp/pasta-argv.log" || fail "podman did not pass the published port"
# The whole lines, as tests/util's podman53() builds them for the other tests.
tail=' --dns-forward 169\.254\.1\.1 -t none -u none -T none -U none --no-map-gw --quiet --netns [^ ]+ --map-guest-addr 169\.254\.1\.2$'
for line in "^--config-net$tail" "^--config-net --egress-deny 198\.51\.100\.1/32$tail" \
    "^--config-net -t 8080-8080:80-80${tail/ -t none/}"; do
    grep -qE -- "$line" "$work/tmp/pasta-argv.log" || fail "no logged argv matches $line"
done
echo "podman5 pasta: ok"
