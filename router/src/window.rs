//! Bounded sliding windows of event time for threshold alerts. Owned by WINDOWS (to be completed).
