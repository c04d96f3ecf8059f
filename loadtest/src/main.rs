//! The load generator is not built yet: see issue 6.
fn main() {
    eprintln!("loadtest: not implemented yet (tracked in issue 6: load generator and benchmarks)");
    std::process::exit(2);
}
