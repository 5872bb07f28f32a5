//! Links the `runner` executable as position-dependent.
//!
//! Every worker is this executable, re-executed. As a position-independent
//! executable, the dynamic loader would patch its relocations at every
//! start, dirtying hundreds of kilobytes of pages in each worker; linked at
//! a fixed address, those pages stay shared and clean.

fn main() {
    println!("cargo:rustc-link-arg-bins=-no-pie");
}
