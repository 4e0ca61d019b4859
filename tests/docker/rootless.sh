#!/usr/bin/env bash
# Rootless Docker runs usernet as RootlessKit's network driver: the real client end to end
# (driven by tests/docker_rootless.rs).
#
# Usage: [USERNET_DOCKER_LOGS=DIR] rootless.sh ROOT USERNET_BIN PREFIX MODE [PORT_DRIVER]
#   ROOT        a root file system from make-root.sh (Debian 13: docker.io 26, rootlesskit 2.0,
#               user `undock`)
#   USERNET_BIN the usernet binary under test; installed as ROOT/opt/usernet/libexec/{slirp4netns,
#               pasta} behind wrappers of the same names on PATH that log the argv RootlessKit
#               passes
#   PREFIX      name prefix of the namespaces and veths made here (removed at the end)
#   MODE        slirp4netns: DOCKERD_ROOTLESS_ROOTLESSKIT_NET=slirp4netns with
#               DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=slirp4netns (published ports go
#               through usernet's API socket);
#               pasta: DOCKERD_ROOTLESS_ROOTLESSKIT_NET=pasta with PORT_DRIVER=implicit
#               (published ports are pasta's -t/-u auto)
#   PORT_DRIVER another DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER (e.g. builtin, the default of
#               dockerd-rootless.sh, where RootlessKit forwards published ports itself)
#   DIR         where the logs are copied at the end, whatever the outcome (dockerd.log:
#               dockerd-rootless.sh's output, dns.log: W's DNS server, usernet-argv.log)
#
# Topology: host H (198.51.100.2/24, default route via W) and world W (198.51.100.1), joined
# by a veth; nothing else. dockerd-rootless.sh runs as `undock` inside H, in a private mount
# namespace whose root is ROOT (pivot_root), whose /etc/resolv.conf names W's test DNS
# server, and whose /dev/net/tun is a node of its own readable by the user.
#
# Checked: `docker run` fetches a file from W over TCP and a UDP payload from W's echo
# server (compared), resolves a name through W's DNS server (the container's resolv.conf
# names RootlessKit's 10.0.2.3, which usernet forwards); `-p 8080:80` and `-p 5353:5353/udp`
# answer clients on H's loopback and in W (IPv4: dockerd-rootless.sh starts neither driver
# with IPv6, pasta gets --ipv4-only); two containers on a user-defined network reach each
# other by name; the argv RootlessKit passes is logged; no usernet process is left once
# dockerd has exited.
set -euo pipefail

root="$1" bin="$2" p="$3" mode="$4" port_driver="${5:-}"
logs="${USERNET_DOCKER_LOGS:-}"
H="${p}H" W="${p}W"
work="$(mktemp -d /tmp/usernet-docker.XXXXXX)"
pids=()
dockerd_pid=""

fail() {
    trap - ERR
    echo "FAIL: $*" >&2
    # (with USERNET_DOCKER_LOGS, the whole log is kept there)
    if [ -z "$logs" ] && [ -s "$work/dockerd.log" ]; then
        echo "--- dockerd-rootless.sh log (last 60 lines)" >&2
        tail -n 60 "$work/dockerd.log" >&2
    fi
    if [ -s "$work/tmp/usernet-argv.log" ]; then
        echo "--- argv log" >&2
        cat "$work/tmp/usernet-argv.log" >&2
    fi
    exit 1
}
userns=""
cleanup() {
    set +e
    trap - ERR
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    # Everything of this run's RootlessKit child (dockerd, containerd, shims, docker-proxy,
    # containers: some live in namespaces of their own, not in H) shares its user
    # namespace: a SIGKILL by PID to each.
    if [ -n "$userns" ]; then
        for d in /proc/[0-9]*; do
            if [ "$(readlink "$d/ns/user" 2>/dev/null)" = "$userns" ]; then
                kill -9 "${d#/proc/}" 2>/dev/null
            fi
        done
    fi
    # Whatever is left in H (RootlessKit, dockerd, containerd, containers, usernet) dies
    # with a SIGKILL by PID; then the namespaces, mounts and files go.
    for pid in $(ip netns pids "$H" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$H" 2>/dev/null
    ip netns del "$W" 2>/dev/null
    if [ -n "$logs" ]; then
        cp "$work/dockerd.log" "$work/dns.log" "$work/tmp/usernet-argv.log" "$logs/" 2>/dev/null
    fi
    rm -rf "$work" 2>/dev/null
}
trap cleanup EXIT
# A command that ends the script through `set -e`, also inside a function, says which,
# with the logs (in a background job or a command substitution, the script does once the
# failure reaches it).
on_error() {
    local rc=$? cmd="${BASH_COMMAND%%$'\n'*}" at="line ${BASH_LINENO[0]}"
    [ "$BASHPID" = "$$" ] || return "$rc"
    [ "${#FUNCNAME[@]}" -le 2 ] || at="$at (in ${FUNCNAME[1]}, called at line ${BASH_LINENO[1]})"
    fail "$at: \`$cmd\` exited $rc"
}
set -E
trap on_error ERR

case "$mode" in
slirp4netns) : "${port_driver:=slirp4netns}" ;;
pasta) : "${port_driver:=implicit}" ;;
*) echo "usage: rootless.sh ROOT USERNET_BIN PREFIX slirp4netns|pasta [PORT_DRIVER]" >&2; exit 2 ;;
esac

ip netns add "$H"
ip netns add "$W"
ip link add "${p}h" type veth peer name "${p}w"
ip link set "${p}h" netns "$H"
ip link set "${p}w" netns "$W"
ip -n "$H" link set lo up
ip -n "$W" link set lo up
ip -n "$H" addr add 198.51.100.2/24 dev "${p}h"
ip -n "$W" addr add 198.51.100.1/24 dev "${p}w"
ip -n "$H" link set "${p}h" up
ip -n "$W" link set "${p}w" up
ip -n "$H" route add default via 198.51.100.1

mkdir -p "$work/world" "$work/img/srv" "$work/img/bin" "$work/img/etc" "$work/run" "$work/tmp" \
    "$work/home"
head -c 2000000 /dev/urandom >"$work/world/world.bin"
head -c 1500000 /dev/urandom >"$work/img/srv/ctr.bin"

# The UDP helper (static: for the busybox image and for this host).
gcc -O2 -static -o "$work/udp" "$(dirname "$0")/udp.c" 2>/dev/null \
    || fail "cannot build tests/docker/udp.c statically (gcc, libc6-dev)"

# W's servers: HTTP, UDP echo, DNS (world.test -> 198.51.100.1).
ip netns exec "$W" busybox httpd -f -p 198.51.100.1:8082 -h "$work/world" &
pids+=($!)
ip netns exec "$W" "$work/udp" echo 9000 &
pids+=($!)
ip netns exec "$W" python3 "$(dirname "$0")/dns.py" 198.51.100.1 world.test=198.51.100.1 \
    >"$work/dns.log" 2>&1 &
pids+=($!)

# The image: Debian 13's static busybox, the UDP helper and the file to serve.
cp "$root/bin/busybox" "$work/img/bin/busybox"
cp "$work/udp" "$work/img/bin/udp"
for a in sh wget httpd sha256sum nslookup cat sleep ip; do ln -sf busybox "$work/img/bin/$a"; done
tar -C "$work/img" -cf "$work/tmp/img.tar" .

# usernet as slirp4netns and as pasta, behind wrappers that log RootlessKit's argv.
mkdir -p "$root/opt/usernet/bin" "$root/opt/usernet/libexec"
install -m 0755 "$bin" "$root/opt/usernet/libexec/slirp4netns"
install -m 0755 "$bin" "$root/opt/usernet/libexec/pasta"
for name in slirp4netns pasta; do
    cat >"$root/opt/usernet/bin/$name" <<WRAP
#!/bin/sh
echo "$name \$*" >>/tmp/usernet-argv.log
exec /opt/usernet/libexec/$name "\$@"
WRAP
    chmod 0755 "$root/opt/usernet/bin/$name"
done
chmod -R a+rwX "$work/tmp"
chmod 1777 "$work/tmp"
echo "nameserver 198.51.100.1" >"$root/etc/resolv.conf"
mkdir -p "$work/run/user/1600" "$work/home/undock"
chown 1600:1600 "$work/run/user/1600" "$work/home/undock"
chmod 0700 "$work/run/user/1600"

# Runs a shell snippet as `undock` in ROOT, inside H.
as_user() {
    ip netns exec "$H" unshare -m --propagation private sh -c '
        set -e
        r="$1"; work="$2"; shift 2
        mount --bind "$r" "$r"
        mount -t proc proc "$r/proc"
        mount --rbind /sys "$r/sys"
        # cgroup v2 at /sys/fs/cgroup: RootlessKit mounts a new sysfs in its child and binds
        # only /sys/fs/cgroup itself back, so the v1 hierarchies of a hybrid host are lost
        # there (runc: "no cgroup mount found in mountinfo").
        mount -t cgroup2 cgroup2 "$r/sys/fs/cgroup"
        mount --rbind /dev "$r/dev"
        # A tun node of our own that the user may open (the host'"'"'s may be 0600).
        mount -t tmpfs -o mode=0755 tmpfs "$r/dev/net"
        mknod -m 0666 "$r/dev/net/tun" c 10 200
        mount --bind "$work/run" "$r/run"
        mount --bind "$work/tmp" "$r/tmp"
        mount --bind "$work/home" "$r/home"
        cd "$r"; mkdir -p .oldroot; pivot_root . .oldroot; cd /
        umount -l /.oldroot
        mount --make-rshared /
        exec setpriv --reuid 1600 --regid 1600 --init-groups \
            env -i HOME=/home/undock USER=undock XDG_RUNTIME_DIR=/run/user/1600 \
            PATH=/opt/usernet/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            DOCKER_HOST=unix:///run/user/1600/docker.sock sh -c "$@"
    ' sh "$root" "$work" "$1"
}

echo "--- dockerd-rootless.sh with DOCKERD_ROOTLESS_ROOTLESSKIT_NET=$mode, PORT_DRIVER=$port_driver"
as_user "DOCKERD_ROOTLESS_ROOTLESSKIT_NET=$mode DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=$port_driver \
    exec /usr/share/docker.io/contrib/dockerd-rootless.sh --storage-driver=vfs" \
    >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
up=""
for _ in $(seq 120); do
    if as_user "docker version --format '{{.Server.Version}}'" >/dev/null 2>&1; then up=1; break; fi
    kill -0 "$dockerd_pid" 2>/dev/null || fail "dockerd-rootless.sh exited"
    sleep 0.5
done
[ -n "$up" ] || fail "dockerd did not come up in 60 s: $(as_user "docker version" 2>&1; ls -la "$work/run/user/1600")"
echo "dockerd $(as_user "docker version --format '{{.Server.Version}}'") is up"
userns="$(readlink "/proc/$(cat "$work/run/user/1600/docker.pid")/ns/user")" \
    || fail "cannot read dockerd's user namespace"
as_user "docker import /tmp/img.tar usernet-bb >/dev/null"

echo "--- outbound TCP, UDP and DNS from a container"
want_world="$(sha256sum <"$work/world/world.bin" | cut -d' ' -f1)"
out="$(as_user "docker run --rm usernet-bb sh -c '
    wget -q -O - http://198.51.100.1:8082/world.bin | sha256sum
    udp send 198.51.100.1 9000 payload-$mode
    nslookup world.test
    cat /etc/resolv.conf'" 2>&1)" || fail "docker run failed: $out"
echo "$out"
grep -q "^$want_world " <<<"$out" || fail "the file from the world differs or did not arrive"
grep -q "udp reply from 198.51.100.1: payload-$mode" <<<"$out" || fail "no UDP echo from the world"
grep -q "Address: 198.51.100.1" <<<"$out" || fail "world.test did not resolve through the test DNS server"
grep -q "query world.test type 1 from 198.51.100.2" "$work/dns.log" \
    || fail "the test DNS server saw no query from H: $(cat "$work/dns.log")"

echo "--- published ports: -p 8080:80 (TCP) and -p 5353:5353/udp"
as_user "docker run -d --name usernet-srv -p 8080:80 -p 5353:5353/udp usernet-bb \
    sh -c 'httpd -p 80 -h /srv; exec udp echo 5353' >/dev/null"
want_ctr="$(sha256sum <"$work/img/srv/ctr.bin" | cut -d' ' -f1)"
got=""
for _ in $(seq 100); do
    got="$(ip netns exec "$H" curl -sS --max-time 5 http://127.0.0.1:8080/ctr.bin 2>/dev/null | sha256sum | cut -d' ' -f1)" || true
    [ "$got" = "$want_ctr" ] && break
    sleep 0.2
done
[ "$got" = "$want_ctr" ] || fail "H loopback client: the published file differs or did not arrive"
got="$(ip netns exec "$W" curl -sS --max-time 10 http://198.51.100.2:8080/ctr.bin | sha256sum | cut -d' ' -f1)" || true
[ "$got" = "$want_ctr" ] || fail "W client: the published file differs or did not arrive; H listens on: $(ip netns exec "$H" ss -Hltnup)"
ip netns exec "$H" "$work/udp" send 127.0.0.1 5353 "published-lo-$mode" \
    || fail "H loopback client: no UDP echo through -p 5353:5353/udp"
ip netns exec "$W" "$work/udp" send 198.51.100.2 5353 "published-w-$mode" \
    || fail "W client: no UDP echo through -p 5353:5353/udp"
echo "published ports: TCP and UDP answer H's loopback and W"

echo "--- a user-defined network: containers reach each other by name"
as_user "docker network create usernet-net >/dev/null"
as_user "docker run -d --name usernet-a --network usernet-net usernet-bb httpd -f -p 80 -h /srv >/dev/null"
out=""
for _ in $(seq 20); do
    out="$(as_user "docker run --rm --network usernet-net usernet-bb sh -c '
        wget -q -O - http://usernet-a/ctr.bin | sha256sum; nslookup world.test'" 2>&1)" || true
    grep -q "^$want_ctr " <<<"$out" && break
    sleep 0.5
done
echo "$out"
grep -q "^$want_ctr " <<<"$out" || fail "usernet-a was not reached by name on the user-defined network"
grep -q "Address: 198.51.100.1" <<<"$out" || fail "world.test did not resolve on the user-defined network"

echo "--- dockerd exits: no usernet process is left"
out="$(as_user "docker rm -f usernet-srv usernet-a && docker network rm usernet-net" 2>&1)" || fail "docker rm: $out"
# usernet's processes, this run's only: argv[0] one of ours, in H's network namespace (the
# main process) or in dockerd's user namespace (pasta mode's helper in RootlessKit's child).
h_netns="net:[$(stat -L -c %i "/run/netns/$H")]"
usernet_pids() {
    for d in /proc/[0-9]*; do
        if tr '\0' '\n' 2>/dev/null <"$d/cmdline" | head -n 1 | grep -q '^/opt/usernet/libexec/' \
            && { [ "$(readlink "$d/ns/net" 2>/dev/null)" = "$h_netns" ] \
                || [ "$(readlink "$d/ns/user" 2>/dev/null)" = "$userns" ]; }; then
            echo "${d#/proc/}"
        fi
    done
}
running="$(usernet_pids | wc -l)"
[ "$running" -ge 1 ] || fail "no usernet process ran as $mode"
echo "usernet processes while dockerd runs: $running"
# dockerd-rootless.sh execs RootlessKit (the child of the background job): SIGTERM it, as
# systemd stops the service.
rk=""
for pid in $(ip netns pids "$H"); do
    if [ "$(cut -d' ' -f4 "/proc/$pid/stat" 2>/dev/null)" = "$dockerd_pid" ] \
        && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = rootlesskit ]; then
        rk="$pid"
    fi
done
[ -n "$rk" ] || fail "no RootlessKit process found"
kill -TERM "$rk"
for _ in $(seq 100); do
    [ -z "$(usernet_pids)" ] && break
    sleep 0.1
done
if [ -n "$(usernet_pids)" ]; then
    fail "usernet is still running after dockerd exited: $(usernet_pids | xargs -r ps -o pid,args -p)"
fi
wait "$dockerd_pid" 2>/dev/null || true
for pid in $(ip netns pids "$H"); do
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in
    rootlesskit | dockerd | containerd*) fail "$(cat "/proc/$pid/comm") $pid outlived SIGTERM" ;;
    esac
done
echo "no usernet process is left"

echo "--- the argv RootlessKit passed"
cat "$work/tmp/usernet-argv.log"
echo "docker rootless $mode ($port_driver): ok"
