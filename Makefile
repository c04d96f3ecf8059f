# Chute — developer entry points. `make up` and `make test` are the quick start.
.PHONY: up up-cluster down test bench-cluster venv deps build bench bench-micro fmt clean-local

up:            ## start the local pipeline (nats-server, ClickHouse dev server, services) and demo it
	@scripts/up.sh

up-cluster:    ## the production shape on loopback: 3-node NATS cluster (R3), 2 ingestors, 3 aggregators, 2 query APIs
	@scripts/up-cluster.sh

down:          ## stop what `make up` or `make up-cluster` started
	@scripts/down.sh

deps venv:     ## install nats-server (apt) and the Python venv .venv if missing
	@scripts/install-deps.sh

build:
	cargo build --workspace --release

test: deps     ## every test: Rust unit + integration (real nats-server, ClickHouse dev server), Python
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --all-features -q -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q
	cargo test --workspace --all-features --no-fail-fast
	.venv/bin/python -m pytest -q clickhouse-dev/tests
	.venv/bin/python -m pytest -q deploy/tests

bench: deps    ## whole-pipeline benchmark: ceilings, steady state, latency and CPU per event at 10k/50k (profiled, pinned), RSS, live page ingest -> pixel, query API on 10M events, router (~25 min; BENCHMARKS.md)
	scripts/bench.sh
	.venv/bin/python scripts/bench_page.py --rates 10000,50000 --duration 30
	.venv/bin/python scripts/bench_query.py
	scripts/bench_router.sh

bench-cluster: deps ## replication cost on the ingest path: 1 node R1 vs 3 nodes R3, events/s and ack p99 (~2 min)
	scripts/bench-cluster.sh

bench-micro:   ## micro-benchmarks: ingestor CPU path (criterion) and aggregator drain vs the insert ceiling
	cargo bench -p chute-ingestor --bench validate_encode
	cargo bench -p chute-aggregator --bench drain

fmt:
	cargo fmt --all

clean-local: down ## remove local state (.local/)
	rm -rf .local
