#!/bin/sh
# Installs the C ABI of p2pcheck under PREFIX, the layout include/p2pcheck.h documents:
#   PREFIX/include/p2pcheck.h
#   PREFIX/lib/libp2pcheck.a
#   PREFIX/lib/libp2pcheck.so.0            (the shared library under its soname)
#   PREFIX/lib/libp2pcheck.so -> libp2pcheck.so.0   (for the linker's -lp2pcheck)
#   PREFIX/lib/pkgconfig/p2pcheck.pc       (scripts/gen-pkgconfig.sh)
#   PREFIX/bin/p2pcheck-worker             (found on $PATH by programs that use the library)
# from BUILD_DIR (default: target/release, after `cargo build --release`), where cargo names the
# libraries after their crate (capi/): libp2pcheck_capi.a and libp2pcheck_capi.so.
#   scripts/install.sh /usr/local [target/release]
set -eu
if [ "$#" -lt 1 ] || [ "$#" -gt 2 ] || [ -z "$1" ]; then
    echo "usage: $0 PREFIX [BUILD_DIR]" >&2
    exit 2
fi
prefix=$1
here=$(dirname "$0")
build=${2:-$here/../target/release}
for f in libp2pcheck_capi.a libp2pcheck_capi.so p2pcheck-worker; do
    if [ ! -f "$build/$f" ]; then
        echo "$0: $build/$f is missing: run cargo build --release first" >&2
        exit 1
    fi
done
mkdir -p "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/bin"
install -m 644 "$here/../include/p2pcheck.h" "$prefix/include/p2pcheck.h"
install -m 644 "$build/libp2pcheck_capi.a" "$prefix/lib/libp2pcheck.a"
install -m 755 "$build/libp2pcheck_capi.so" "$prefix/lib/libp2pcheck.so.0"
ln -sf libp2pcheck.so.0 "$prefix/lib/libp2pcheck.so"
install -m 755 "$build/p2pcheck-worker" "$prefix/bin/p2pcheck-worker"
sh "$here/gen-pkgconfig.sh" "$prefix" > "$prefix/lib/pkgconfig/p2pcheck.pc"
