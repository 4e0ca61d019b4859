#!/usr/bin/env bash
# Builds the 2025 passt release (Debian 13's source package) for `cargo bench --bench anchors`,
# which runs it as the engine `pasta2025` when DIR/bin/pasta exists.
#
# Debian 12's pasta is from 2023; the newest release is the yardstick for pasta mode. The
# sources come from Debian's own archive only: apt fetches trixie's source index into a
# private directory (nothing in /etc/apt changes, the host's apt state is untouched), checks
# it against the Debian archive keyring and downloads the upstream tarball and Debian's
# patches, which are applied as `dpkg-source -x` would. passt needs nothing but a C compiler:
# plain `make` on Debian 12 (build-essential).
#
# Usage: passt-2025.sh [DIR]   (default /var/lib/usernet-bench/passt-2025; does nothing when
#                               DIR/bin/pasta already runs)
set -euo pipefail

dir="${1:-/var/lib/usernet-bench/passt-2025}"
if [ -x "$dir/bin/pasta" ] && [ -s "$dir/VERSION" ] && "$dir/bin/pasta" --version >/dev/null 2>&1; then
    echo "passt-2025.sh: $dir/bin/pasta is ready ($(cat "$dir/VERSION"))"
    exit 0
fi
for t in apt-get make cc patch tar xz; do
    command -v "$t" >/dev/null || { echo "passt-2025.sh: $t missing (apt-get install build-essential xz-utils patch)" >&2; exit 1; }
done

work="$(mktemp -d /tmp/passt-2025.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    >"$work/sources.list"
apt=(apt-get -q -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
"${apt[@]}" update >/dev/null
cd "$work/src"
# The .dsc itself is sometimes missing from a mirror while the tarballs are there: apt has
# checked each file it got against the signed index, which is what matters here.
"${apt[@]}" source --download-only passt || true
orig=(passt_*.orig.tar.*)
deb=(passt_*.debian.tar.*)
if [ ! -f "${orig[0]}" ] || [ ! -f "${deb[0]}" ]; then
    echo "passt-2025.sh: trixie's passt sources did not download" >&2
    exit 1
fi
echo "passt-2025.sh: building ${orig[0]} with ${deb[0]}"
mkdir tree
tar -xf "${orig[0]}" -C tree --strip-components=1
tar -xf "${deb[0]}" -C tree
cd tree
if [ -f debian/patches/series ]; then
    grep -v '^\s*#' debian/patches/series | while read -r p _; do
        [ -n "$p" ] && patch -s -p1 <"debian/patches/$p"
    done
fi
version="$(sed -n '1s/.*(\(.*\)).*/\1/p' debian/changelog)"
make -s -j2 VERSION="$version" >/dev/null
rm -rf "$dir/bin"
mkdir -p "$dir/bin"
# On x86_64 the Makefile also builds an AVX2 variant, which passt execs as "<itself>.avx2";
# pasta is passt under another name (hard links, as Debian's package installs them).
for b in passt passt.avx2; do
    [ -f "$b" ] && install -m 0755 "$b" "$dir/bin/$b"
done
ln "$dir/bin/passt" "$dir/bin/pasta"
[ -f "$dir/bin/passt.avx2" ] && ln "$dir/bin/passt.avx2" "$dir/bin/pasta.avx2"
# This release's --version writes nothing when stdout is not a terminal: the bench reads this.
echo "pasta $version" >"$dir/VERSION"
echo "passt-2025.sh: $dir/bin/pasta ready ($version)"
