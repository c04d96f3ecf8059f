//! `window::bucket_index_sql` computes `window::bucket_index` in the real engine (the ClickHouse
//! dev server), so the seeding query's `GROUP BY slot, bucket` rebuilds the windows' sketches
//! exactly as live observation builds them.

use chute_router::window::{bucket_index, bucket_index_sql, bucket_value, RELATIVE_ERROR};
use chute_schema::testing::ClickHouseServer;
use clickhouse::Row;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Row, Serialize, Deserialize)]
struct Value {
    i: u32,
    v: f64,
}

/// Random magnitudes over 34 decades and both signs, zeros, tiny values, integers (counts and
/// latencies in ms), typical latencies and scores, and the values next to bucket boundaries.
fn values() -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(17);
    let mut values = vec![
        0.0,
        -0.0,
        1e-9,
        -1e-9,
        0.99e-9,
        1e-300,
        1.0,
        -1.0,
        1e25,
        1e30,
        -1e30,
        f64::MAX,
    ];
    values.extend((0..20_000).map(|_| {
        let magnitude = 10f64.powf(rng.random_range(-10.0..26.0));
        if rng.random_bool(0.3) {
            -magnitude
        } else {
            magnitude
        }
    }));
    values.extend((1..=5_000).map(f64::from));
    values.extend((0..5_000).map(|_| rng.random_range(0.0..3000.0)));
    values.extend((0..2_000).map(|_| rng.random_range(0.0..1.0)));
    // Bucket boundaries: gamma^m as Rust computes it, and its two neighbours.
    let gamma: f64 = (1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR);
    for m in -1000..1000 {
        let boundary = gamma.powi(m);
        values.extend([
            boundary,
            f64::from_bits(boundary.to_bits() + 1),
            f64::from_bits(boundary.to_bits() - 1),
        ]);
    }
    values
}

#[tokio::test]
async fn bucket_index_sql_agrees_with_bucket_index_on_the_real_engine() {
    let server = ClickHouseServer::start().await;
    let client = server.database("router_window_sql").await;
    client
        .query("CREATE TABLE bucket_values (i UInt32, v Float64) ENGINE = MergeTree ORDER BY i")
        .execute()
        .await
        .unwrap();
    let values = values();
    let mut insert = client.insert::<Value>("bucket_values").await.unwrap();
    for (i, &v) in values.iter().enumerate() {
        insert.write(&Value { i: i as u32, v }).await.unwrap();
    }
    insert.end().await.unwrap();

    let sql = format!("SELECT i, {} FROM bucket_values ORDER BY i", bucket_index_sql("v"));
    let rows: Vec<(u32, i32)> = client.query(&sql).fetch_all().await.unwrap();
    assert_eq!(rows.len(), values.len());
    let disagreements: Vec<(f64, i32, i32)> = rows
        .iter()
        .map(|&(i, sql_index)| (values[i as usize], bucket_index(values[i as usize]), sql_index))
        .filter(|(_, rust_index, sql_index)| rust_index != sql_index)
        .collect();
    println!(
        "bucket_index: {} values, {} disagreements between Rust and ClickHouse",
        values.len(),
        disagreements.len()
    );
    assert!(
        disagreements.is_empty(),
        "{} of {} values land in another bucket in SQL, e.g. (value, rust, sql) {:?}",
        disagreements.len(),
        values.len(),
        &disagreements[..disagreements.len().min(10)]
    );

    // A GROUP BY bucket in SQL and the sketch's bucket value give a p99 within 1%.
    let latencies: Vec<f64> = values.iter().copied().filter(|v| (1.0..3000.0).contains(v)).collect();
    let sql = format!(
        "SELECT {} AS bucket, count() FROM bucket_values WHERE v >= 1 AND v < 3000 GROUP BY bucket ORDER BY bucket",
        bucket_index_sql("v")
    );
    let buckets: Vec<(i32, u64)> = client.query(&sql).fetch_all().await.unwrap();
    let total: u64 = buckets.iter().map(|(_, count)| count).sum();
    assert_eq!(total, latencies.len() as u64);
    let rank = (0.99 * (total - 1) as f64).floor() as u64;
    let mut seen = 0;
    let p99 = buckets
        .iter()
        .find_map(|&(index, count)| {
            seen += count;
            (seen > rank).then(|| bucket_value(index))
        })
        .unwrap();
    let mut sorted = latencies;
    sorted.sort_by(f64::total_cmp);
    let exact = sorted[rank as usize];
    assert!(
        (p99 - exact).abs() <= RELATIVE_ERROR * exact,
        "p99 {p99} from SQL buckets against {exact}"
    );
}
