//! Threshold alert state: fire and resolve with hysteresis. Owned by WINDOWS (to be completed).
