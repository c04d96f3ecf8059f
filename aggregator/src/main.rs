//! The aggregator (JetStream -> ClickHouse, exactly once) is not built yet: see issue 4.
fn main() {
    eprintln!("aggregator: not implemented yet (tracked in issue 4: exactly-once JetStream -> ClickHouse)");
    std::process::exit(2);
}
