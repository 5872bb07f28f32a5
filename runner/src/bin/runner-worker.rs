//! The worker executable: what `runner` starts for each worker.
//!
//! The same code as `runner`'s own worker mode, in an executable that holds
//! nothing else, so that each of many workers maps and touches as little
//! as possible. `runner` starts it when it sits next to `runner`, and
//! re-executes itself otherwise.

fn main() {
    runner::worker::run_if_worker();
    eprintln!(
        "runner-worker is started by runner for each worker; it is not meant to be run by hand"
    );
    std::process::exit(runner::exit::ERROR.into());
}
