#!/bin/sh
# Prints a pkg-config file for p2pcheck installed under PREFIX as scripts/install.sh lays it
# out: the header in PREFIX/include, libp2pcheck.a, libp2pcheck.so.0 and its libp2pcheck.so link
# in PREFIX/lib.
#   scripts/gen-pkgconfig.sh /usr/local > /usr/local/lib/pkgconfig/p2pcheck.pc
# Libs names libp2pcheck.a by its path, not -lp2pcheck: with the shared library in the same
# folder, -lp2pcheck would link that one, and pkg-config can only add flags for --static, never
# take one away. So a program built with these flags never depends on libp2pcheck at run time.
# Libs.private are the system libraries the static library needs (rustc's native-static-libs,
# the list include/p2pcheck.h states; capi/tests/capi.rs links with them), for `pkg-config --static`
# (needed with a glibc older than 2.34, where some of them are not part of libc).
set -eu
if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 PREFIX" >&2
    exit 2
fi
manifest="$(dirname "$0")/../Cargo.toml"
# The package's version: the first `version = "..."` line of Cargo.toml, under [package].
version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$manifest" | head -n 1)
if [ -z "$version" ]; then
    echo "$0: no version in $manifest" >&2
    exit 1
fi
cat <<PC
prefix=$1
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: p2pcheck
Description: Proves which NVIDIA GPU pairs can reach each other's memory across processes (vLLM-compatible P2P check)
Version: $version
Libs: \${libdir}/libp2pcheck.a
Libs.private: -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
Cflags: -I\${includedir}
PC
