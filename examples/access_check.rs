//! vLLM's `gpu_p2p_access_check` from Rust: prints, for every ordered pair of the visible
//! devices, whether `tgt` can use `src`'s memory, answering from (and filling) vLLM's cache,
//! then how long a repeated question takes (the in-process memo).
//!
//! ```sh
//! cargo run --example access_check
//! ```

use std::time::Instant;

fn main() -> Result<(), p2pcheck::Error> {
    let started = Instant::now();
    let first = p2pcheck::access_check(0, 0, &Default::default())?;
    println!(
        "first answer in {:.3} ms ({:?}), cache {}",
        started.elapsed().as_secs_f64() * 1e3,
        first.origin,
        first.path.display()
    );
    for w in &first.warnings {
        println!("warning: {w}");
    }
    // Every pair of the devices the cache file holds.
    let n = (0..)
        .take_while(|&d| p2pcheck::gpu_p2p_access_check(d, 0).is_ok())
        .count() as u32;
    for src in 0..n {
        for tgt in 0..n {
            println!("{src}->{tgt} {}", p2pcheck::gpu_p2p_access_check(src, tgt)?);
        }
    }
    // Repeated questions are answered from memory: time many of them.
    let rounds = 100_000u32;
    let started = Instant::now();
    let mut yes = 0u32;
    for i in 0..rounds {
        yes += u32::from(p2pcheck::gpu_p2p_access_check(i % n, (i / n) % n)?);
    }
    let per_call = started.elapsed().as_secs_f64() / f64::from(rounds);
    println!(
        "memo: {:.0} ns per call over {rounds} calls ({yes} true)",
        per_call * 1e9
    );
    Ok(())
}
