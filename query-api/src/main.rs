//! The query API (rollup queries, moka cache, live stream) is not built yet: see issue 5.
fn main() {
    eprintln!("query-api: not implemented yet (tracked in issue 5: query API with moka cache and live stream)");
    std::process::exit(2);
}
