//! Per-series anomaly detection over minute buckets. Owned by WINDOWS (to be completed).
