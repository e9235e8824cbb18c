//! vLLM's `gpu_p2p_access_check` from Rust: prints, for every ordered pair of the visible
//! devices, whether `tgt` can use `src`'s memory, answering from (and filling) vLLM's cache.
//!
//! ```sh
//! cargo run --example access_check
//! ```

fn main() -> anyhow::Result<()> {
    let n = p2pcheck::visible_device_count()?;
    for src in 0..n {
        for tgt in 0..n {
            println!("{src}->{tgt} {}", p2pcheck::gpu_p2p_access_check(src, tgt)?);
        }
    }
    println!("cache {}", p2pcheck::vllm_cache_path(n)?.display());
    Ok(())
}
