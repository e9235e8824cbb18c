//! The worker executable the check starts (fork+exec) for each side of a batch.
//! Install it beside `p2pcheck`, beside your program, or name it in `P2PCHECK_WORKER`.

fn main() {
    if std::env::args().nth(1).as_deref() != Some(p2pcheck::WORKER_FLAG) {
        eprintln!(
            "p2pcheck-worker is started by p2pcheck (the CLI or the library), not by hand; \
             run `p2pcheck --help`"
        );
        std::process::exit(2);
    }
    std::process::exit(p2pcheck::worker_main());
}
