//! Build script: gives the C ABI's shared library its soname.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The C ABI's shared library is versioned by its soname (include/p2pcheck.h); bump the
    // number with any incompatible change of the header.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libp2pcheck.so.0");
}
