//! Which events a rule looks at: a compiled match on the event name (a glob with `*` and `?`),
//! attributes (equals, in, regex, exists) and metric predicates (`quality < 0.7`).
//!
//! A [`Matcher`] answers twice, and both answers must agree:
//! - [`Matcher::matches`] on a live [`Event`], on the router's hot path (no allocation);
//! - [`Matcher::to_sql`] as a ClickHouse boolean expression over the raw `events` table, used to
//!   seed windows from stored events after a restart.
//!
//! Where the two engines could differ, the matcher is defined so they do not: an attribute or
//! metric test needs the key to be present (ClickHouse reads a missing map key as `''` or `0`),
//! `?` matches one character (a UTF-8 code point, as `_` does in ClickHouse's `LIKE`), `.` in a
//! regex does not match a newline (ClickHouse's `match` would, so the SQL says `(?-s)`), and
//! regexes that would mean different things (Unicode `\d`, `\w`, `\s`, `\b` in Rust, ASCII in
//! RE2) are refused at load.

use std::fmt::Write as _;

use chute_proto::v1::Event;
use regex::Regex;

/// Why a matcher part is invalid; the rules file adds the line and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatcherError {
    #[error("bad event glob {0:?}: it must be non-empty and without control characters")]
    Glob(String),
    #[error("bad regex {pattern:?}: {reason}")]
    Regex { pattern: String, reason: String },
    #[error("bad metric predicate {0:?}: expected \"<metric> <op> <number>\" with op one of < <= > >= == !=")]
    Predicate(String),
    #[error("bad attribute key {0:?}: it must be non-empty and without control characters")]
    AttributeKey(String),
}

/// A compiled match. `Matcher::default()` matches every event.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    name: NamePattern,
    attributes: Vec<AttributePredicate>,
    metrics: Vec<MetricPredicate>,
}

/// The event-name glob, compiled to the cheapest test that decides it.
#[derive(Debug, Clone, Default)]
enum NamePattern {
    /// `*`.
    #[default]
    Any,
    /// No wildcard.
    Exact(Box<str>),
    /// `prefix*`, the common case (`llm.*`).
    Prefix(Box<str>),
    /// Anything else, matched by [`glob_matches`] after a cheap test of the literal text before
    /// the first wildcard and after the last one, which rejects most names.
    Glob {
        glob: Box<str>,
        prefix: Box<str>,
        suffix: Box<str>,
    },
}

/// A test on one attribute. Every test but `Exists(false)` needs the attribute to be present.
#[derive(Debug, Clone)]
pub enum AttributeTest {
    Equals(String),
    In(Vec<String>),
    Regex(Regex),
    Exists(bool),
}

#[derive(Debug, Clone)]
struct AttributePredicate {
    key: String,
    test: AttributeTest,
}

/// `metric <op> value`; an event without the metric does not match.
#[derive(Debug, Clone)]
struct MetricPredicate {
    metric: String,
    op: CompareOp,
    value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CompareOp {
    fn apply(self, left: f64, right: f64) -> bool {
        match self {
            CompareOp::Lt => left < right,
            CompareOp::Le => left <= right,
            CompareOp::Gt => left > right,
            CompareOp::Ge => left >= right,
            CompareOp::Eq => left == right,
            CompareOp::Ne => left != right,
        }
    }

    fn sql(self) -> &'static str {
        match self {
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
            CompareOp::Eq => "=",
            CompareOp::Ne => "!=",
        }
    }
}

impl AttributeTest {
    /// A regex test, refusing what would not mean the same in ClickHouse (RE2): see
    /// [`check_portable_regex`].
    pub fn regex(pattern: &str) -> Result<Self, MatcherError> {
        check_portable_regex(pattern)?;
        Regex::new(pattern)
            .map(AttributeTest::Regex)
            .map_err(|err| MatcherError::Regex {
                pattern: pattern.to_owned(),
                reason: err.to_string(),
            })
    }

    fn cost_rank(&self) -> u8 {
        match self {
            AttributeTest::Exists(_) => 0,
            AttributeTest::Equals(_) => 1,
            AttributeTest::In(_) => 2,
            AttributeTest::Regex(_) => 3,
        }
    }

    fn matches(&self, value: Option<&String>) -> bool {
        match (self, value) {
            (AttributeTest::Exists(expected), value) => value.is_some() == *expected,
            (_, None) => false,
            (AttributeTest::Equals(expected), Some(value)) => value == expected,
            (AttributeTest::In(allowed), Some(value)) => allowed.iter().any(|a| a == value),
            (AttributeTest::Regex(regex), Some(value)) => regex.is_match(value),
        }
    }
}

impl Matcher {
    /// A matcher on the event name alone: a glob where `*` is any run of characters and `?` one
    /// character; there is no escape (event names never contain either).
    pub fn new(event_glob: &str) -> Result<Self, MatcherError> {
        if event_glob.is_empty() || event_glob.chars().any(char::is_control) {
            return Err(MatcherError::Glob(event_glob.to_owned()));
        }
        let wildcards = event_glob.bytes().filter(|b| matches!(b, b'*' | b'?')).count();
        let name = if event_glob.bytes().all(|b| b == b'*') {
            NamePattern::Any
        } else if wildcards == 0 {
            NamePattern::Exact(event_glob.into())
        } else if wildcards == 1 && event_glob.ends_with('*') {
            NamePattern::Prefix(event_glob[..event_glob.len() - 1].into())
        } else {
            let first = event_glob.find(['*', '?']).unwrap_or(event_glob.len());
            let last = event_glob.rfind(['*', '?']).map_or(0, |at| at + 1);
            NamePattern::Glob {
                glob: event_glob.into(),
                prefix: event_glob[..first].into(),
                suffix: event_glob[last..].into(),
            }
        };
        Ok(Self {
            name,
            ..Self::default()
        })
    }

    /// Adds a test on attribute `key`.
    pub fn with_attribute(mut self, key: &str, test: AttributeTest) -> Result<Self, MatcherError> {
        if key.is_empty() || key.chars().any(char::is_control) {
            return Err(MatcherError::AttributeKey(key.to_owned()));
        }
        self.attributes.push(AttributePredicate {
            key: key.to_owned(),
            test,
        });
        // Cheap tests first: `matches` stops at the first one that fails.
        self.attributes.sort_by_key(|predicate| predicate.test.cost_rank());
        Ok(self)
    }

    /// Adds a metric predicate such as `"quality < 0.7"` (ops `< <= > >= == !=`, a finite number).
    pub fn with_metric(mut self, predicate: &str) -> Result<Self, MatcherError> {
        self.metrics.push(parse_metric_predicate(predicate)?);
        Ok(self)
    }

    /// The event name this matcher requires, when it is one exact name (for the rule index).
    pub fn exact_name(&self) -> Option<&str> {
        match &self.name {
            NamePattern::Exact(name) => Some(name),
            _ => None,
        }
    }

    /// Does `event` match? Cheap tests first: name, then metrics, then attributes.
    pub fn matches(&self, event: &Event) -> bool {
        self.name_matches(&event.name)
            && self.metrics.iter().all(|predicate| {
                event
                    .metrics
                    .get(&predicate.metric)
                    .is_some_and(|value| predicate.op.apply(*value, predicate.value))
            })
            && self
                .attributes
                .iter()
                .all(|predicate| predicate.test.matches(event.attributes.get(&predicate.key)))
    }

    /// Only the name part of the match.
    pub fn name_matches(&self, name: &str) -> bool {
        match &self.name {
            NamePattern::Any => true,
            NamePattern::Exact(exact) => name == &**exact,
            NamePattern::Prefix(prefix) => name.starts_with(&**prefix),
            NamePattern::Glob { glob, prefix, suffix } => {
                name.starts_with(&**prefix) && name.ends_with(&**suffix) && glob_matches(glob, name)
            }
        }
    }

    /// The same predicate as a ClickHouse boolean expression over the raw `events` table
    /// (`name`, `attributes Map(String, String)`, `metrics Map(String, Float64)`); `1` when the
    /// matcher matches everything. Every literal is escaped (`\`, `'`, control characters and
    /// `?` become escapes), so the text is safe to embed in a query, including through the
    /// `clickhouse` crate, whose `query()` would read a bare `?` as a bind placeholder.
    pub fn to_sql(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        match &self.name {
            NamePattern::Any => {}
            NamePattern::Exact(exact) => parts.push(format!("name = {}", sql_string(exact))),
            NamePattern::Prefix(_) | NamePattern::Glob { .. } => {
                let glob = match &self.name {
                    NamePattern::Prefix(prefix) => format!("{prefix}*"),
                    NamePattern::Glob { glob, .. } => glob.to_string(),
                    _ => unreachable!("only prefix and glob patterns reach here"),
                };
                parts.push(format!("name LIKE {}", sql_string(&glob_to_like(&glob))));
            }
        }
        for predicate in &self.metrics {
            let key = sql_string(&predicate.metric);
            parts.push(format!(
                "(mapContains(metrics, {key}) AND metrics[{key}] {} {})",
                predicate.op.sql(),
                sql_float(predicate.value)
            ));
        }
        for predicate in &self.attributes {
            let key = sql_string(&predicate.key);
            let value = format!("attributes[{key}]");
            let contains = format!("mapContains(attributes, {key})");
            parts.push(match &predicate.test {
                AttributeTest::Exists(true) => contains,
                AttributeTest::Exists(false) => format!("NOT {contains}"),
                AttributeTest::Equals(expected) => {
                    format!("({contains} AND {value} = {})", sql_string(expected))
                }
                AttributeTest::In(allowed) if allowed.is_empty() => "0".to_owned(),
                AttributeTest::In(allowed) => {
                    let list: Vec<String> = allowed.iter().map(|a| sql_string(a)).collect();
                    format!("({contains} AND {value} IN ({}))", list.join(", "))
                }
                AttributeTest::Regex(regex) => {
                    // ClickHouse's `match` lets `.` match a newline, unlike RE2's default and
                    // Rust's; `(?-s)` restores the default (a pattern's own flags still apply).
                    let pattern = format!("(?-s){}", regex.as_str());
                    format!("({contains} AND match({value}, {}))", sql_string(&pattern))
                }
            });
        }
        if parts.is_empty() {
            return "1".to_owned();
        }
        parts.join(" AND ")
    }
}

/// `*` any run of characters, `?` exactly one character (a code point); everything else literal.
/// Iterative with one backtrack point, so it is linear in practice and never recursive.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let (pattern, text) = (pattern.as_bytes(), text.as_bytes());
    let (mut p, mut t) = (0, 0);
    // After the last `*`: where the pattern resumes and where in the text that `*` stopped.
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    backtrack = Some((p + 1, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += utf8_width(text[t]);
                    continue;
                }
                byte if byte == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        // Mismatch: let the last `*` swallow one more character, or fail.
        let Some((resume, star_end)) = backtrack else {
            return false;
        };
        let star_end = star_end + utf8_width(text[star_end]);
        backtrack = Some((resume, star_end));
        p = resume;
        t = star_end;
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Length of the UTF-8 sequence starting with `lead`.
fn utf8_width(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// The glob as a `LIKE` pattern: `*` -> `%`, `?` -> `_`, and the `LIKE` metacharacters that
/// are literal in the glob (`%`, `_`, `\`) escaped with a backslash.
fn glob_to_like(glob: &str) -> String {
    let mut like = String::with_capacity(glob.len() + 4);
    for c in glob.chars() {
        match c {
            '*' => like.push('%'),
            '?' => like.push('_'),
            '%' | '_' | '\\' => {
                like.push('\\');
                like.push(c);
            }
            c => like.push(c),
        }
    }
    like
}

/// A ClickHouse string literal for `value`: quoted, with `\` and `'` escaped, and control
/// characters and `?` written as `\xHH`.
pub(crate) fn sql_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '?' => out.push_str("\\x3F"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A Float64 literal that reads back as exactly `value` (Rust prints the shortest
/// representation that round-trips).
fn sql_float(value: f64) -> String {
    debug_assert!(value.is_finite(), "predicates hold finite numbers only");
    format!("toFloat64({value:?})")
}

fn parse_metric_predicate(text: &str) -> Result<MetricPredicate, MatcherError> {
    let bad = || MatcherError::Predicate(text.to_owned());
    let op_start = text.find(['<', '>', '=', '!']).ok_or_else(bad)?;
    let rest = &text[op_start..];
    let (op, op_len) = match rest.as_bytes() {
        [b'<', b'=', ..] => (CompareOp::Le, 2),
        [b'>', b'=', ..] => (CompareOp::Ge, 2),
        [b'=', b'=', ..] => (CompareOp::Eq, 2),
        [b'!', b'=', ..] => (CompareOp::Ne, 2),
        [b'<', ..] => (CompareOp::Lt, 1),
        [b'>', ..] => (CompareOp::Gt, 1),
        _ => return Err(bad()),
    };
    let metric = text[..op_start].trim();
    let number = rest[op_len..].trim();
    if metric.is_empty() || metric.chars().any(|c| c.is_whitespace() || c.is_control()) || number.is_empty() {
        return Err(bad());
    }
    // Only plain decimal numbers: f64's parser would also take "inf" and "NaN".
    if !number
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
    {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    if !value.is_finite() {
        return Err(bad());
    }
    Ok(MetricPredicate {
        metric: metric.to_owned(),
        op,
        value,
    })
}

/// Refuses regex syntax that the Rust `regex` crate and ClickHouse's RE2 read differently (or
/// that RE2 lacks), so that a seeded window counts what the live router would have counted:
/// `\d \D \w \W \s \S \b \B` are Unicode-aware in Rust and ASCII in RE2 (write `[0-9]`,
/// `[0-9A-Za-z_]`, `[[:space:]]`, ... instead), `\<`/`\>` and the `x`, `R`, `u` flags are Rust's
/// only.
pub fn check_portable_regex(pattern: &str) -> Result<(), MatcherError> {
    let refuse = |reason: String| MatcherError::Regex {
        pattern: pattern.to_owned(),
        reason,
    };
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(class @ ('d' | 'D' | 'w' | 'W' | 's' | 'S' | 'b' | 'B' | '<' | '>')) = chars.next() {
                    return Err(refuse(format!(
                        "\\{class} means different things in the router (Unicode) and in \
                         ClickHouse (ASCII); write an explicit class such as [0-9], [A-Za-z0-9_] \
                         or [[:space:]]"
                    )));
                }
            }
            '(' if chars.peek() == Some(&'?') => {
                chars.next();
                let flags: String = chars
                    .clone()
                    .take_while(|c| c.is_ascii_alphabetic() || *c == '-')
                    .collect();
                if let Some(flag) = flags.chars().find(|f| matches!(f, 'x' | 'R' | 'u')) {
                    return Err(refuse(format!(
                        "the ({flag}) flag is not supported by ClickHouse's regex engine (RE2)"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str) -> Event {
        Event {
            tenant: "acme".to_owned(),
            name: name.to_owned(),
            ..Event::default()
        }
    }

    #[test]
    fn globs() {
        let cases = [
            ("*", "anything", true),
            ("llm.*", "llm.request", true),
            ("llm.*", "llm.", true),
            ("llm.*", "llmx", false),
            ("llm.request", "llm.request", true),
            ("llm.request", "llm.requests", false),
            ("*.error", "http.error", true),
            ("*.error", "http.errors", false),
            ("llm.?", "llm.a", true),
            ("llm.?", "llm.ab", false),
            ("a*b*c", "a__b__c", true),
            ("a*b*c", "abcb", false),
            ("a*?", "a", false),
            ("a*?", "ab", true),
            ("?é*", "xé!", true),
            ("??", "é", false),
            ("?", "é", true),
            ("*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
        ];
        for (glob, name, expected) in cases {
            let matcher = Matcher::new(glob).unwrap();
            assert_eq!(matcher.matches(&event(name)), expected, "{glob:?} on {name:?}");
        }
        assert!(Matcher::new("").is_err());
        assert!(Matcher::new("a\nb").is_err());
        assert_eq!(Matcher::new("llm.request").unwrap().exact_name(), Some("llm.request"));
        assert_eq!(Matcher::new("llm.*").unwrap().exact_name(), None);
    }

    #[test]
    fn attributes_need_the_key_except_exists_false() {
        let matcher = Matcher::default()
            .with_attribute("region", AttributeTest::Equals(String::new()))
            .unwrap();
        let mut e = event("x");
        assert!(!matcher.matches(&e), "a missing attribute is not the empty string");
        e.attributes.insert("region".into(), String::new());
        assert!(matcher.matches(&e));

        let absent = Matcher::default()
            .with_attribute("error.type", AttributeTest::Exists(false))
            .unwrap();
        assert!(absent.matches(&event("x")));
        let mut failed = event("x");
        failed.attributes.insert("error.type".into(), "timeout".into());
        assert!(!absent.matches(&failed));

        let models = Matcher::default()
            .with_attribute("model", AttributeTest::In(vec!["a".into(), "b".into()]))
            .unwrap()
            .with_attribute("path", AttributeTest::regex("^/api/").unwrap())
            .unwrap();
        let mut request = event("x");
        request.attributes.insert("model".into(), "b".into());
        request.attributes.insert("path".into(), "/api/v1".into());
        assert!(models.matches(&request));
        request.attributes.insert("path".into(), "/web/api/".into());
        assert!(!models.matches(&request));
    }

    #[test]
    fn metric_predicates() {
        let mut e = event("x");
        e.metrics.insert("quality".into(), 0.7);
        for (predicate, expected) in [
            ("quality < 0.7", false),
            ("quality <= 0.7", true),
            ("quality>0.5", true),
            ("quality >= 0.71", false),
            ("quality == 0.7", true),
            ("quality != 0.7", false),
            ("quality > -1e3", true),
            ("latency_ms > 0", false),
        ] {
            let matcher = Matcher::default().with_metric(predicate).unwrap();
            assert_eq!(matcher.matches(&e), expected, "{predicate}");
        }
        for bad in [
            "quality",
            "< 0.7",
            "quality < ",
            "quality < abc",
            "quality <> 1",
            "quality < inf",
            "quality < NaN",
            "a b < 1",
            "quality = 1",
        ] {
            assert!(Matcher::default().with_metric(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn non_portable_regexes_are_refused() {
        for pattern in [r"\d+", r"[\w]", r"\bword", r"(?x) a", r"(?u:.)"] {
            assert!(AttributeTest::regex(pattern).is_err(), "{pattern} accepted");
        }
        for pattern in [r"\\d", r"^[0-9]+$", r"(?i)^gpt", r"\p{L}+", r"a\.b", "(?:a|b)"] {
            assert!(AttributeTest::regex(pattern).is_ok(), "{pattern} refused");
        }
        assert!(AttributeTest::regex("(unclosed").is_err());
    }

    #[test]
    fn sql_literals_are_escaped() {
        assert_eq!(sql_string("it's"), r"'it\'s'");
        assert_eq!(sql_string(r"a\'b"), r"'a\\\'b'");
        assert_eq!(sql_string("why?\n"), r"'why\x3F\x0A'");
        // Closing the literal to append a statement does not work: the quote stays escaped.
        assert_eq!(
            sql_string(r"a\'); DROP TABLE events; --"),
            r"'a\\\'); DROP TABLE events; --'"
        );
        assert_eq!(glob_to_like(r"a_b%c\*?"), r"a\_b\%c\\%_");
        assert_eq!(Matcher::default().to_sql(), "1");
        assert_eq!(
            Matcher::default()
                .with_attribute("path", AttributeTest::regex("^/api/.?").unwrap())
                .unwrap()
                .to_sql(),
            r"(mapContains(attributes, 'path') AND match(attributes['path'], '(\x3F-s)^/api/.\x3F'))"
        );
        assert_eq!(
            Matcher::new("llm.*")
                .unwrap()
                .with_metric("quality < 0.7")
                .unwrap()
                .to_sql(),
            "name LIKE 'llm.%' AND (mapContains(metrics, 'quality') AND metrics['quality'] < toFloat64(0.7))"
        );
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// The glob matcher (all its compiled forms) agrees with the same glob as a regex.
            #[test]
            fn globs_agree_with_regexes(glob in "[ab.*?é]{1,8}", text in "[ab.é\n]{0,10}") {
                let regex: String = glob
                    .chars()
                    .map(|c| match c {
                        '*' => ".*".to_owned(),
                        '?' => ".".to_owned(),
                        c => regex::escape(&c.to_string()),
                    })
                    .collect();
                let regex = Regex::new(&format!("(?s)^{regex}$")).unwrap();
                prop_assert_eq!(Matcher::new(&glob).unwrap().name_matches(&text), regex.is_match(&text));
            }

            /// `matches` never panics, whatever the event (any strings, NaN and infinite metrics).
            #[test]
            fn matches_never_panics(
                name in any::<String>(),
                glob in "[a-z.*?]{1,6}",
                attributes in proptest::collection::hash_map("[a-c]", any::<String>(), 0..4),
                metrics in proptest::collection::hash_map("[a-c]", any::<f64>(), 0..4),
                key in "[a-c]",
                value in any::<String>(),
                bound in -10.0..10.0f64,
            ) {
                let event = Event { name, attributes, metrics, ..Event::default() };
                let matchers = [
                    Matcher::new(&glob).unwrap(),
                    Matcher::default().with_attribute(&key, AttributeTest::Equals(value.clone())).unwrap(),
                    Matcher::default().with_attribute(&key, AttributeTest::In(vec![value, "x".into()])).unwrap(),
                    Matcher::default().with_attribute(&key, AttributeTest::regex("^[a-z]+é?$").unwrap()).unwrap(),
                    Matcher::default().with_attribute(&key, AttributeTest::Exists(false)).unwrap(),
                    Matcher::default().with_metric(&format!("{key} >= {bound}")).unwrap(),
                    Matcher::default().with_metric(&format!("{key} != {bound}")).unwrap(),
                ];
                for matcher in &matchers {
                    let _ = matcher.matches(&event);
                }
            }
        }
    }
}
