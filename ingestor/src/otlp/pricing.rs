//! The optional pricing file (`--pricing-file`): USD per million tokens by model, so spans with
//! GenAI token usage get a `cost_usd` metric. OpenTelemetry defines no cost attribute and Chute
//! ships no prices: the operator supplies them (`deploy/pricing.example.yaml` shows the format).
//!
//! ```yaml
//! models:
//!   gpt-4o:                      # gen_ai.response.model, else gen_ai.request.model, exactly
//!     input: 2.50                # per 1M input tokens that were not read from the cache
//!     output: 10.00              # per 1M output tokens that were not reasoning tokens
//!     cached_input: 1.25         # optional, default `input`
//!     reasoning: 10.00           # optional, default `output`
//!   claude-sonnet-4:             # or a list of date-effective entries
//!     - input: 3.00
//!       output: 15.00
//!     - from: 2026-01-01         # UTC day from which the entry applies
//!       input: 2.50
//!       output: 12.00
//! ```
//!
//! `gen_ai.usage.input_tokens` includes cached tokens (the GenAI conventions say so), so the cost
//! is `(input - cache_read) * input + cache_read * cached_input + (output - reasoning) * output +
//! reasoning * reasoning`, each rate per million: cached tokens are priced once, at their rate.

use std::collections::HashMap;
use std::path::Path;

use chute_common::config::ConfigFile;
use serde::Deserialize;

/// Why a pricing file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("pricing file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("pricing file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Token counts of one span, as its `gen_ai.usage.*` attributes report them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// All input tokens, cached ones included.
    pub input_tokens: f64,
    /// All output tokens, reasoning ones included.
    pub output_tokens: f64,
    pub cache_read_input_tokens: f64,
    pub reasoning_output_tokens: f64,
}

/// Prices by model, each a list of entries sorted by the day they take effect.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pricing {
    models: HashMap<String, Vec<Rates>>,
}

/// USD per million tokens, in force from `from_unix_nanos` on.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Rates {
    from_unix_nanos: i64,
    input: f64,
    output: f64,
    cached_input: f64,
    reasoning: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    models: HashMap<String, OneOrMany>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Entry),
    Many(Vec<Entry>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    from: Option<String>,
    input: f64,
    output: f64,
    cached_input: Option<f64>,
    reasoning: Option<f64>,
}

impl Pricing {
    pub fn load(path: &Path) -> Result<Self, PricingError> {
        let file = ConfigFile::read(path).map_err(|(path, source)| PricingError::Read { path, source })?;
        Self::parse(&file.text).map_err(|reason| PricingError::Invalid {
            path: file.path,
            reason,
        })
    }

    /// Parses the YAML format above; the error says what is wrong and where.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = serde_norway::from_str(text).map_err(|err| err.to_string())?;
        let mut models = HashMap::with_capacity(file.models.len());
        for (model, entries) in file.models {
            let entries = match entries {
                OneOrMany::One(entry) => vec![entry],
                OneOrMany::Many(entries) => entries,
            };
            if entries.is_empty() {
                return Err(format!("model {model:?} has no prices"));
            }
            let mut rates = Vec::with_capacity(entries.len());
            for entry in entries {
                let from_unix_nanos = match &entry.from {
                    None => i64::MIN,
                    Some(day) => day_start_unix_nanos(day)
                        .ok_or_else(|| format!("model {model:?}: `from: {day}` is not a YYYY-MM-DD day"))?,
                };
                let rate = Rates {
                    from_unix_nanos,
                    input: entry.input,
                    output: entry.output,
                    cached_input: entry.cached_input.unwrap_or(entry.input),
                    reasoning: entry.reasoning.unwrap_or(entry.output),
                };
                let all = [rate.input, rate.output, rate.cached_input, rate.reasoning];
                if all.iter().any(|price| !price.is_finite() || *price < 0.0) {
                    return Err(format!("model {model:?}: prices must be finite and not negative"));
                }
                rates.push(rate);
            }
            rates.sort_by_key(|rate| rate.from_unix_nanos);
            if rates
                .windows(2)
                .any(|pair| pair[0].from_unix_nanos == pair[1].from_unix_nanos)
            {
                return Err(format!("model {model:?} has two entries from the same day"));
            }
            models.insert(model, rates);
        }
        Ok(Self { models })
    }

    /// The cost in USD of `usage` on `model` at `time_unix_nanos`: `None` when the model has
    /// no price in force then.
    pub fn cost_usd(&self, model: &str, time_unix_nanos: i64, usage: &Usage) -> Option<f64> {
        let rates = self
            .models
            .get(model)?
            .iter()
            .rev()
            .find(|rates| rates.from_unix_nanos <= time_unix_nanos)?;
        let cached = usage.cache_read_input_tokens.clamp(0.0, usage.input_tokens.max(0.0));
        let reasoning = usage.reasoning_output_tokens.clamp(0.0, usage.output_tokens.max(0.0));
        let uncached = usage.input_tokens.max(0.0) - cached;
        let plain_output = usage.output_tokens.max(0.0) - reasoning;
        let cost = uncached * rates.input
            + cached * rates.cached_input
            + plain_output * rates.output
            + reasoning * rates.reasoning;
        Some(cost / 1e6)
    }
}

/// Unix nanoseconds at the start (UTC) of a `YYYY-MM-DD` day.
fn day_start_unix_nanos(day: &str) -> Option<i64> {
    let mut parts = day.trim().splitn(3, '-');
    let (year, month, day) = (parts.next()?, parts.next()?, parts.next()?);
    if month.len() != 2 || day.len() != 2 {
        return None;
    }
    let month = time::Month::try_from(month.parse::<u8>().ok()?).ok()?;
    let date = time::Date::from_calendar_date(year.parse().ok()?, month, day.parse().ok()?).ok()?;
    let seconds = date.midnight().assume_utc().unix_timestamp();
    seconds.checked_mul(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "
models:
  gpt-4o:
    input: 2.5
    output: 10
    cached_input: 1.25
  o3:
    input: 2
    output: 8
    reasoning: 16
  claude-sonnet-4:
    - input: 3
      output: 15
    - from: 2026-01-01
      input: 2
      output: 12
";

    const JAN_1_2026: i64 = 1_767_225_600_000_000_000;

    fn usage(input: f64, output: f64, cached: f64, reasoning: f64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cache_read_input_tokens: cached,
            reasoning_output_tokens: reasoning,
        }
    }

    fn close(actual: Option<f64>, expected: f64) {
        let actual = actual.expect("priced");
        assert!((actual - expected).abs() < 1e-12, "{actual} != {expected}");
    }

    #[test]
    fn cached_tokens_are_priced_once_at_the_cached_rate() {
        let pricing = Pricing::parse(FILE).unwrap();
        // 1M input of which 400k cached, 100k output.
        close(
            pricing.cost_usd("gpt-4o", 0, &usage(1e6, 1e5, 4e5, 0.0)),
            0.6 * 2.5 + 0.4 * 1.25 + 0.1 * 10.0,
        );
        // Without a cached rate, cached tokens cost the input rate: the total is input * rate.
        close(pricing.cost_usd("o3", 0, &usage(1e6, 0.0, 4e5, 0.0)), 2.0);
    }

    #[test]
    fn reasoning_tokens_are_part_of_output_at_their_own_rate() {
        let pricing = Pricing::parse(FILE).unwrap();
        close(
            pricing.cost_usd("o3", 0, &usage(0.0, 1e6, 0.0, 2.5e5)),
            0.75 * 8.0 + 0.25 * 16.0,
        );
        // More reasoning than output (a buggy instrumentation) never makes a negative part.
        close(
            pricing.cost_usd("o3", 0, &usage(0.0, 10.0, 0.0, 20.0)),
            10.0 * 16.0 / 1e6,
        );
    }

    #[test]
    fn dated_entries_apply_from_their_day() {
        let pricing = Pricing::parse(FILE).unwrap();
        let tokens = usage(1e6, 0.0, 0.0, 0.0);
        close(pricing.cost_usd("claude-sonnet-4", JAN_1_2026 - 1, &tokens), 3.0);
        close(pricing.cost_usd("claude-sonnet-4", JAN_1_2026, &tokens), 2.0);
        assert_eq!(pricing.cost_usd("unknown-model", 0, &tokens), None);
        assert_eq!(day_start_unix_nanos("2026-01-01"), Some(JAN_1_2026));
    }

    #[test]
    fn the_shipped_example_file_parses() {
        let example = Pricing::parse(include_str!("../../../deploy/pricing.example.yaml")).unwrap();
        close(
            example.cost_usd("example-model", 0, &usage(1e6, 1e6, 5e5, 0.0)),
            0.5 + 0.25 + 2.0,
        );
    }

    #[test]
    fn bad_files_say_why() {
        // A missing price (serde names no field for an entry that may be one or a list).
        assert!(Pricing::parse("models: {m: {input: 1}}").is_err());
        assert!(Pricing::parse("models: {m: {input: -1, output: 1}}")
            .unwrap_err()
            .contains("negative"));
        assert!(Pricing::parse("models: {m: [{from: 2026-13-01, input: 1, output: 1}]}")
            .unwrap_err()
            .contains("YYYY-MM-DD"));
        assert!(
            Pricing::parse("models: {m: [{input: 1, output: 1}, {input: 2, output: 2}]}")
                .unwrap_err()
                .contains("same day")
        );
        assert!(Pricing::parse("models: {m: []}").unwrap_err().contains("no prices"));
        assert!(Pricing::parse("prices: {}").is_err());
    }
}
