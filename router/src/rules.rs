//! The rules file: YAML -> a validated [`RuleSet`], with errors that name the line.
//!
//! The full schema, with a worked example, is in `router/RULES.md`. In short:
//!
//! ```yaml
//! webhooks:                  # optional: destinations, by name
//!   ops: { url: "http://127.0.0.1:9000/hook", secret_env: CHUTE_WEBHOOK_OPS_SECRET }
//! rules:
//!   - name: low_quality      # [a-z0-9_]{1,64}, unique
//!     tenants: [acme]        # optional; every tenant by default
//!     match: { event: "llm.*", attributes: { region: eu }, metrics: ["quality < 0.7"] }
//!     route: {}              # exactly one of route / threshold / anomaly
//!     webhook: ops           # optional
//! ```
//!
//! Parsing is strict: unknown fields, wrong types, bad regexes and predicates, unknown value
//! functions, undefined webhooks, invalid URLs, missing secrets, duplicate or invalid names,
//! windows that are not a multiple of [`SLOT`] or longer than 24 h, hysteresis the wrong way
//! round, sensitivity <= 0 and quantiles outside (0, 1) are all refused with
//! `<file>:<line>: rule "<name>": <field>: <reason>`. Secrets are read at load, from the
//! environment given to [`parse`] (never the process environment directly) or from a file.
//!
//! [`RuleIndex::matching`] finds the rules an event matches through an index built once per
//! file: per event name, the rules whose name pattern accepts it are worked out once and
//! remembered, so an event costs one look-up plus the full tests of those few rules.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use chute_common::config::ConfigFile;
use chute_common::validate::list_or_none;
use chute_proto::v1::Event;
use saphyr::{AnnotatedMapping, MarkedYaml, YamlData, YamlLoader};
use saphyr_parser::{Parser, ScalarStyle};

use crate::matcher::{AttributeTest, Matcher};
use crate::spec::{
    AnomalySpec, Direction, Rule, RuleKind, RuleSet, SeriesValue, Side, ThresholdSpec, WebhookSpec, WindowValue, SLOT,
};

/// Why a rules file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{path}: cannot read the rules file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `file` is `None` for [`parse`], the path for [`load`].
    #[error("{}:{line}: {message}", file.as_deref().unwrap_or("rules"))]
    Invalid {
        file: Option<String>,
        line: usize,
        message: String,
    },
}

impl RulesError {
    /// The 1-based line the error is about (`None` when the file could not be read).
    pub fn line(&self) -> Option<usize> {
        match self {
            RulesError::Read { .. } => None,
            RulesError::Invalid { line, .. } => Some(*line),
        }
    }
}

/// Webhook defaults (see `RULES.md`).
const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_WEBHOOK_CONCURRENCY: u64 = 4;
const DEFAULT_WEBHOOK_MAX_ATTEMPTS: u64 = 8;
const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Anomaly defaults.
const DEFAULT_SENSITIVITY: f64 = 4.0;
const DEFAULT_WARMUP_MINUTES: u64 = 30;
/// The longest threshold window.
const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Parses and validates a rules file. `env` answers `secret_env` look-ups (pass
/// `&|name| std::env::var(name).ok()` in production, a map in tests).
pub fn parse(source: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<RuleSet, RulesError> {
    parse_document(source, env).map_err(|fail| RulesError::Invalid {
        file: None,
        line: fail.line,
        message: fail.message,
    })
}

/// Reads and parses the rules file at `path`; errors name the path and the line.
pub fn load(path: impl AsRef<Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<RuleSet, RulesError> {
    let path = path.as_ref();
    let file = ConfigFile::read(path).map_err(|(path, source)| RulesError::Read { path, source })?;
    parse(&file.text, env).map_err(|err| match err {
        RulesError::Invalid { line, message, .. } => RulesError::Invalid {
            file: Some(file.path),
            line,
            message,
        },
        read => read,
    })
}

/// Which rules can match an event. Per event name, the rules whose name pattern accepts it are
/// worked out once (rules on that exact name by look-up, glob rules by testing each) and kept
/// in a memo, so an event costs one hash look-up plus the full tests of those candidates.
/// Event names are few (a LowCardinality column); the memo keeps at most [`MEMO_NAMES`] of
/// them and works the rest out on each call. Built once per rules file
/// (`RuleIndex::new(&rules)`) and used with that same [`RuleSet`].
#[derive(Debug, Default)]
pub struct RuleIndex {
    by_name: HashMap<Box<str>, Vec<usize>>,
    by_pattern: Vec<usize>,
    /// Event name -> positions of the rules whose name pattern accepts it, ascending.
    memo: RwLock<HashMap<Box<str>, Arc<[usize]>>>,
    /// How many rules the index was built for.
    rules: usize,
}

/// Event names remembered by a [`RuleIndex`] at most.
pub const MEMO_NAMES: usize = 4096;

impl Clone for RuleIndex {
    /// A copy with an empty memo (it refills on use).
    fn clone(&self) -> Self {
        Self {
            by_name: self.by_name.clone(),
            by_pattern: self.by_pattern.clone(),
            memo: RwLock::default(),
            rules: self.rules,
        }
    }
}

impl RuleIndex {
    pub fn new(rules: &RuleSet) -> Self {
        let mut index = RuleIndex {
            rules: rules.rules.len(),
            ..RuleIndex::default()
        };
        for (position, rule) in rules.rules.iter().enumerate() {
            match rule.matcher.exact_name() {
                Some(name) => index.by_name.entry(name.into()).or_default().push(position),
                None => index.by_pattern.push(position),
            }
        }
        index
    }

    /// The rules of `rules` (the set this index was built from) that apply to `event` (tenant
    /// and match), in file order, with their position in [`RuleSet::rules`].
    pub fn matching<'a, 'e>(
        &'a self,
        rules: &'a RuleSet,
        event: &'e Event,
    ) -> impl Iterator<Item = (usize, &'a Rule)> + use<'a, 'e> {
        assert_eq!(
            self.rules,
            rules.rules.len(),
            "RuleIndex used with another RuleSet than the one it was built from"
        );
        let candidates = self.candidates(rules, &event.name);
        (0..candidates.len())
            .map(move |i| candidates[i])
            .map(|position| (position, &rules.rules[position]))
            .filter(|(_, rule)| {
                rule.tenants
                    .as_ref()
                    .is_none_or(|tenants| tenants.contains(&event.tenant))
                    && rule.matcher.matches(event)
            })
    }

    /// The rules whose name pattern accepts `name`, ascending: from the memo, or worked out
    /// (and remembered while the memo has room).
    fn candidates(&self, rules: &RuleSet, name: &str) -> Arc<[usize]> {
        let memo = self.memo.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = memo.get(name) {
            return Arc::clone(known);
        }
        drop(memo);
        let exact = self.by_name.get(name).map_or(&[][..], Vec::as_slice);
        let candidates: Arc<[usize]> = SortedUnion {
            left: exact,
            right: &self.by_pattern,
        }
        .filter(|&position| rules.rules[position].matcher.name_matches(name))
        .collect();
        let mut memo = self.memo.write().unwrap_or_else(PoisonError::into_inner);
        if memo.len() < MEMO_NAMES {
            memo.insert(name.into(), Arc::clone(&candidates));
        }
        candidates
    }

    /// Event names in the memo.
    pub fn memo_len(&self) -> usize {
        self.memo.read().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// The union of two ascending lists of rule positions, ascending.
struct SortedUnion<'a> {
    left: &'a [usize],
    right: &'a [usize],
}

impl Iterator for SortedUnion<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let next = match (self.left.first(), self.right.first()) {
            (None, None) => return None,
            (Some(&l), Some(&r)) if l < r => l,
            (Some(_), Some(&r)) | (None, Some(&r)) => r,
            (Some(&l), None) => l,
        };
        if self.left.first() == Some(&next) {
            self.left = &self.left[1..];
        } else {
            self.right = &self.right[1..];
        }
        Some(next)
    }
}

// ---------------------------------------------------------------------------------------------
// The document walker: YAML nodes with positions -> spec types. Every failure carries a line.

type Node<'a> = MarkedYaml<'a>;

/// A validation failure at a line; `message` is complete except for the file name.
struct Fail {
    line: usize,
    message: String,
}

type Parsed<T> = Result<T, Fail>;

fn fail<T>(node: &Node, message: impl Into<String>) -> Parsed<T> {
    Err(Fail {
        line: line(node),
        message: message.into(),
    })
}

fn fail_at<T>(line: usize, message: impl Into<String>) -> Parsed<T> {
    Err(Fail {
        line,
        message: message.into(),
    })
}

fn line(node: &Node) -> usize {
    node.span.start.line()
}

/// `parent.key`, or `key` at the top.
fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// The entries of mapping `node`, else the error "`<path>: `expected a mapping`<of_what>`, found
/// ..." (no path prefix at the top level).
fn mapping<'a, 'n>(node: &'a Node<'n>, path: &str, of_what: &str) -> Parsed<&'a AnnotatedMapping<'n, Node<'n>>> {
    let YamlData::Mapping(mapping) = &node.data else {
        let prefix = path_prefix(path);
        return fail(
            node,
            format!("{prefix}expected a mapping{of_what}, found {}", describe(node)),
        );
    };
    Ok(mapping)
}

/// "`<path>`: " in front of a message, nothing at the top level.
fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

fn describe(node: &Node) -> &'static str {
    match &node.data {
        YamlData::Mapping(_) => "a mapping",
        YamlData::Sequence(_) => "a list",
        _ if is_null(node) => "nothing",
        _ => "a single value",
    }
}

fn is_null(node: &Node) -> bool {
    match &node.data {
        YamlData::Representation(text, ScalarStyle::Plain, None) => {
            matches!(&**text, "" | "~" | "null" | "Null" | "NULL")
        }
        YamlData::BadValue => true,
        _ => false,
    }
}

/// The text of a scalar (any style; tags are ignored).
fn scalar<'n>(node: &'n Node, path: &str) -> Parsed<&'n str> {
    match &node.data {
        YamlData::Representation(text, _, _) if !is_null(node) => Ok(text),
        _ => fail(
            node,
            format!("{path}: expected a single value, found {}", describe(node)),
        ),
    }
}

fn string(node: &Node, path: &str) -> Parsed<String> {
    scalar(node, path).map(str::to_owned)
}

fn number(node: &Node, path: &str) -> Parsed<f64> {
    let text = scalar(node, path)?;
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && !text.contains(['i', 'I', 'n', 'N']) => Ok(value),
        _ => fail(node, format!("{path}: expected a number, found {text:?}")),
    }
}

fn whole(node: &Node, path: &str, min: u64, max: u64) -> Parsed<u64> {
    let text = scalar(node, path)?;
    match text.parse::<u64>() {
        Ok(value) if (min..=max).contains(&value) => Ok(value),
        _ => fail(
            node,
            format!("{path}: expected a whole number from {min} to {max}, found {text:?}"),
        ),
    }
}

fn boolean(node: &Node, path: &str) -> Parsed<bool> {
    match scalar(node, path)? {
        "true" | "True" | "TRUE" => Ok(true),
        "false" | "False" | "FALSE" => Ok(false),
        other => fail(node, format!("{path}: expected true or false, found {other:?}")),
    }
}

fn duration(node: &Node, path: &str) -> Parsed<Duration> {
    let text = scalar(node, path)?;
    match humantime::parse_duration(text) {
        Ok(value) if !value.is_zero() => Ok(value),
        Ok(_) => fail(node, format!("{path}: must be longer than 0")),
        Err(err) => fail(
            node,
            format!("{path}: bad duration {text:?} ({err}); write e.g. 500ms, 10s, 5m, 1h"),
        ),
    }
}

/// `[a-z0-9_]{1,64}`: a NATS subject token and part of message ids.
fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn name(node: &Node, path: &str, what: &str) -> Parsed<String> {
    let text = scalar(node, path)?;
    if !is_valid_name(text) {
        return fail(
            node,
            format!("{what} name {text:?} is invalid: use 1 to 64 of a-z, 0-9 and _"),
        );
    }
    Ok(text.to_owned())
}

/// A YAML mapping whose keys are taken one by one; [`Fields::finish`] refuses the rest.
struct Fields<'n> {
    /// The line blamed for errors about the mapping as a whole (a missing field): the line of
    /// the key that names it when the caller knows it ([`Fields::at`]), else its first line.
    line: usize,
    path: String,
    entries: Vec<(&'n str, &'n Node<'n>, &'n Node<'n>, bool)>,
}

impl<'n> Fields<'n> {
    fn new(node: &'n Node<'n>, path: &str) -> Parsed<Self> {
        let mapping = mapping(node, path, "")?;
        let mut entries: Vec<(&str, &Node, &Node, bool)> = Vec::with_capacity(mapping.len());
        for (key, value) in mapping {
            let key_text = scalar(key, &join(path, "<key>"))?;
            // The YAML loader already refuses `a:` twice, but not `a:` and `"a":`.
            if entries.iter().any(|entry| entry.0 == key_text) {
                return fail(key, format!("{}duplicate key {key_text:?}", path_prefix(path)));
            }
            entries.push((key_text, key, value, false));
        }
        Ok(Self {
            line: line(node),
            path: path.to_owned(),
            entries,
        })
    }

    /// Blame `line` (the line of the key naming this mapping) for errors about the whole.
    fn at(mut self, line: usize) -> Self {
        self.line = line;
        self
    }

    /// The line of `key`, or of the mapping when it is absent.
    fn key_line(&self, key: &str) -> usize {
        self.entries
            .iter()
            .find(|entry| entry.0 == key)
            .map_or(self.line, |entry| line(entry.1))
    }

    /// The value of `key`, if present (even when it is null).
    fn get(&mut self, key: &str) -> Option<&'n Node<'n>> {
        let entry = self.entries.iter_mut().find(|entry| entry.0 == key)?;
        entry.3 = true;
        Some(entry.2)
    }

    /// The value of `key`, if present and not null.
    fn opt(&mut self, key: &str) -> Option<&'n Node<'n>> {
        self.get(key).filter(|node| !is_null(node))
    }

    fn required(&mut self, key: &str) -> Parsed<&'n Node<'n>> {
        match self.opt(key) {
            Some(node) => Ok(node),
            None => fail_at(self.line, format!("{}missing field {key:?}", self.prefix())),
        }
    }

    /// `path: `, or nothing at the top (the caller's prefix names the place).
    fn prefix(&self) -> String {
        if self.path.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.path)
        }
    }

    /// Refuses any key not taken, naming the ones that are allowed.
    fn finish(self, allowed: &[&str]) -> Parsed<()> {
        match self.entries.iter().find(|entry| !entry.3) {
            None => Ok(()),
            Some((key, key_node, _, _)) => fail(
                key_node,
                format!(
                    "{}unknown field {key:?}, expected one of: {}",
                    self.prefix(),
                    allowed.join(", ")
                ),
            ),
        }
    }
}

fn load_yaml(source: &str) -> Parsed<Vec<Node<'_>>> {
    let mut parser = Parser::new_from_str(source);
    let mut loader: YamlLoader<Node<'_>> = YamlLoader::default();
    // Keep scalars as written: "200" stays "200", "0x10" stays "0x10"; numbers are parsed here.
    loader.early_parse(false);
    let scanned = parser.load(&mut loader, true);
    if let Some(err) = scanned.err().or_else(|| loader.error().cloned()) {
        return Err(Fail {
            line: err.marker().line(),
            message: format!("YAML syntax error: {}", err.info()),
        });
    }
    Ok(loader.into_documents())
}

fn parse_document(source: &str, env: &dyn Fn(&str) -> Option<String>) -> Parsed<RuleSet> {
    let documents = load_yaml(source)?;
    if let Some(second) = documents.get(1) {
        return fail(second, "a rules file holds one YAML document");
    }
    let Some(root) = documents.first().filter(|root| !is_null(root)) else {
        return Ok(RuleSet::default());
    };
    let mut top = Fields::new(root, "")?;
    let webhooks_node = top.opt("webhooks");
    let rules_node = top.opt("rules");
    top.finish(&["webhooks", "rules"])?;

    let webhooks = match webhooks_node {
        Some(node) => parse_webhooks(node, env)?,
        None => BTreeMap::new(),
    };
    let Some(rules_node) = rules_node else {
        return Ok(RuleSet {
            rules: Vec::new(),
            webhooks,
        });
    };
    let YamlData::Sequence(items) = &rules_node.data else {
        return fail(
            rules_node,
            format!("rules: expected a list, found {}", describe(rules_node)),
        );
    };
    let mut rules = Vec::with_capacity(items.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (position, item) in items.iter().enumerate() {
        let rule = parse_rule(item, position, &webhooks)?;
        if let Some(first) = seen.insert(rule.name.clone(), rule.line) {
            return fail(
                item,
                format!("rule {:?}: duplicate name (first defined at line {first})", rule.name),
            );
        }
        rules.push(rule);
    }
    Ok(RuleSet { rules, webhooks })
}

fn parse_webhooks(node: &Node, env: &dyn Fn(&str) -> Option<String>) -> Parsed<BTreeMap<String, WebhookSpec>> {
    let mapping = mapping(node, "webhooks", " of name to webhook")?;
    let mut webhooks = BTreeMap::new();
    for (key, value) in mapping {
        let webhook_name = name(key, "webhooks", "webhook")?;
        let webhook = parse_webhook(&webhook_name, value, line(key), env).map_err(|fail| Fail {
            message: format!("webhook {webhook_name:?}: {}", fail.message),
            ..fail
        })?;
        webhooks.insert(webhook_name, webhook);
    }
    Ok(webhooks)
}

fn parse_webhook(
    webhook_name: &str,
    node: &Node,
    at: usize,
    env: &dyn Fn(&str) -> Option<String>,
) -> Parsed<WebhookSpec> {
    let mut fields = Fields::new(node, "")?.at(at);
    let url_node = fields.required("url")?;
    let url = string(url_node, "url")?;
    match url::Url::parse(&url) {
        Ok(parsed)
            if matches!(parsed.scheme(), "http" | "https")
                && parsed.host_str().is_some_and(|host| !host.is_empty()) => {}
        Ok(_) => {
            return fail(
                url_node,
                format!("url: invalid URL {url:?}: must be http:// or https:// with a host"),
            )
        }
        Err(err) => return fail(url_node, format!("url: invalid URL {url:?}: {err}")),
    }
    let secret = match (fields.opt("secret_env"), fields.opt("secret_file")) {
        (Some(var_node), None) => {
            let var = scalar(var_node, "secret_env")?;
            match env(var) {
                Some(secret) if !secret.is_empty() => secret,
                _ => {
                    return fail(
                        var_node,
                        format!("secret_env: environment variable {var} is not set or empty"),
                    )
                }
            }
        }
        (None, Some(file_node)) => {
            let file = scalar(file_node, "secret_file")?;
            match std::fs::read_to_string(file) {
                Ok(secret) if !secret.trim_end_matches(['\r', '\n']).is_empty() => {
                    secret.trim_end_matches(['\r', '\n']).to_owned()
                }
                Ok(_) => return fail(file_node, format!("secret_file: {file} is empty")),
                Err(err) => return fail(file_node, format!("secret_file: cannot read {file}: {err}")),
            }
        }
        _ => return fail_at(at, "exactly one of secret_env or secret_file is required"),
    };
    let timeout = match fields.opt("timeout") {
        Some(n) => duration(n, "timeout")?,
        None => DEFAULT_WEBHOOK_TIMEOUT,
    };
    let concurrency = match fields.opt("concurrency") {
        Some(n) => whole(n, "concurrency", 1, 1024)?,
        None => DEFAULT_WEBHOOK_CONCURRENCY,
    };
    let max_attempts = match fields.opt("max_attempts") {
        Some(n) => whole(n, "max_attempts", 1, 1000)?,
        None => DEFAULT_WEBHOOK_MAX_ATTEMPTS,
    };
    let (mut backoff_initial, mut backoff_max) = (DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX);
    if let Some(backoff_node) = fields.opt("backoff") {
        let mut backoff = Fields::new(backoff_node, "backoff")?;
        if let Some(n) = backoff.opt("initial") {
            backoff_initial = duration(n, "backoff.initial")?;
        }
        if let Some(n) = backoff.opt("max") {
            backoff_max = duration(n, "backoff.max")?;
        }
        backoff.finish(&["initial", "max"])?;
        if backoff_initial > backoff_max {
            return fail(backoff_node, "backoff: initial must not be longer than max");
        }
    }
    fields.finish(&[
        "url",
        "secret_env",
        "secret_file",
        "timeout",
        "concurrency",
        "max_attempts",
        "backoff",
    ])?;
    Ok(WebhookSpec {
        name: webhook_name.to_owned(),
        url,
        secret,
        timeout,
        concurrency: concurrency as usize,
        max_attempts: max_attempts as u32,
        backoff_initial,
        backoff_max,
    })
}

fn parse_rule(node: &Node, position: usize, webhooks: &BTreeMap<String, WebhookSpec>) -> Parsed<Rule> {
    let mut fields = Fields::new(node, &format!("rules[{position}]"))?;
    let Some(name_node) = fields.opt("name") else {
        return fail(node, format!("rules[{position}]: missing field \"name\""));
    };
    let rule_name = name(name_node, "name", "rule")?;
    let parsed = parse_rule_body(node, fields, webhooks);
    parsed
        .map(|(tenants, matcher, kind, webhook)| Rule {
            name: rule_name.clone(),
            tenants,
            matcher,
            kind,
            webhook,
            line: line(node),
        })
        .map_err(|fail| Fail {
            message: format!("rule {rule_name:?}: {}", fail.message),
            ..fail
        })
}

type RuleBody = (Option<Vec<String>>, Matcher, RuleKind, Option<String>);

fn parse_rule_body(node: &Node, mut fields: Fields<'_>, webhooks: &BTreeMap<String, WebhookSpec>) -> Parsed<RuleBody> {
    // Field paths in messages are relative to the rule, whose name prefixes them.
    fields.path.clear();
    let tenants = match fields.opt("tenants") {
        None => None,
        Some(list) => Some(string_list(list, "tenants")?),
    };
    if let (Some(tenants), Some(list)) = (&tenants, fields.get("tenants")) {
        if let Some(bad) = tenants.iter().find(|t| !chute_common::validate::is_valid_tenant(t)) {
            return fail(
                list,
                format!("tenants: {bad:?} is not a valid tenant ([a-z0-9_-]{{1,64}})"),
            );
        }
    }
    let match_line = fields.key_line("match");
    let matcher = parse_match(fields.required("match")?, "match", match_line)?;
    let kinds: Vec<(&str, &Node, usize)> = ["route", "threshold", "anomaly"]
        .into_iter()
        .filter_map(|kind| {
            let at = fields.key_line(kind);
            fields.get(kind).map(|node| (kind, node, at))
        })
        .collect();
    let kind = match kinds.as_slice() {
        [("route", route, _)] => {
            if !is_null(route) {
                Fields::new(route, "route")?.finish(&[])?;
            }
            RuleKind::Route
        }
        [("threshold", threshold, at)] => RuleKind::Threshold(parse_threshold(threshold, *at)?),
        [("anomaly", anomaly, at)] => RuleKind::Anomaly(parse_anomaly(anomaly, *at)?),
        _ => return fail(node, "exactly one of route, threshold or anomaly is required"),
    };
    let webhook = match fields.opt("webhook") {
        None => None,
        Some(webhook_node) => {
            let webhook = scalar(webhook_node, "webhook")?;
            if !webhooks.contains_key(webhook) {
                let defined: Vec<&str> = webhooks.keys().map(String::as_str).collect();
                return fail(
                    webhook_node,
                    format!(
                        "webhook {webhook:?} is not defined (webhooks defined: {})",
                        list_or_none(&defined)
                    ),
                );
            }
            Some(webhook.to_owned())
        }
    };
    fields.finish(&["name", "tenants", "match", "route", "threshold", "anomaly", "webhook"])?;
    Ok((tenants, matcher, kind, webhook))
}

/// An attribute name: non-empty, without control characters.
fn attribute_key(node: &Node, path: &str) -> Parsed<String> {
    let key = scalar(node, path)?;
    if key.is_empty() || key.chars().any(char::is_control) {
        return fail(node, format!("{path}: {key:?} is not an attribute name"));
    }
    Ok(key.to_owned())
}

/// A list of single values, or one value standing for a list of one.
fn string_list(node: &Node, path: &str) -> Parsed<Vec<String>> {
    match &node.data {
        YamlData::Sequence(items) if items.is_empty() => fail(node, format!("{path}: must not be empty")),
        YamlData::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| string(item, &format!("{path}[{i}]")))
            .collect(),
        _ => Ok(vec![string(node, path)?]),
    }
}

fn parse_match(node: &Node, path: &str, at: usize) -> Parsed<Matcher> {
    let mut fields = Fields::new(node, path)?.at(at);
    let mut matcher = match fields.opt("event") {
        None => Matcher::default(),
        Some(glob) => {
            let field = join(path, "event");
            Matcher::new(&string(glob, &field)?).or_else(|err| fail(glob, format!("{field}: {err}")))?
        }
    };
    if let Some(attributes) = fields.opt("attributes") {
        let attributes_path = join(path, "attributes");
        let mapping = mapping(attributes, &attributes_path, " of attribute to test")?;
        let mut seen: Vec<&str> = Vec::with_capacity(mapping.len());
        for (key_node, value) in mapping {
            let key = scalar(key_node, &attributes_path)?;
            if seen.contains(&key) {
                return fail(key_node, format!("{attributes_path}: duplicate attribute {key:?}"));
            }
            seen.push(key);
            let field = join(&attributes_path, key);
            let test = parse_attribute_test(value, &field, line(key_node))?;
            matcher = matcher
                .with_attribute(key, test)
                .or_else(|err| fail(key_node, format!("{field}: {err}")))?;
        }
    }
    if let Some(metrics) = fields.opt("metrics") {
        let metrics_path = join(path, "metrics");
        let items: Vec<&Node> = match &metrics.data {
            YamlData::Sequence(items) => items.iter().collect(),
            _ => vec![metrics],
        };
        for (i, item) in items.into_iter().enumerate() {
            let field = format!("{metrics_path}[{i}]");
            let predicate = scalar(item, &field)?;
            matcher = matcher
                .with_metric(predicate)
                .or_else(|err| fail(item, format!("{field}: {err}")))?;
        }
    }
    fields.finish(&["event", "attributes", "metrics"])?;
    Ok(matcher)
}

/// `region: eu` (equals), or exactly one of `{ equals: v }`, `{ in: [a, b] }`,
/// `{ regex: "^/api/" }`, `{ exists: true|false }`.
fn parse_attribute_test(node: &Node, field: &str, at: usize) -> Parsed<AttributeTest> {
    if is_null(node) {
        return fail(node, format!("{field}: a value is required (quote \"null\" or \"\" to compare with it; {{ exists: false }} matches a missing attribute)"));
    }
    if let YamlData::Representation(text, _, _) = &node.data {
        return Ok(AttributeTest::Equals(text.to_string()));
    }
    let mut fields = Fields::new(node, field)?.at(at);
    let tests: Vec<(&str, &Node)> = ["equals", "in", "regex", "exists"]
        .into_iter()
        .filter_map(|test| fields.get(test).map(|n| (test, n)))
        .collect();
    fields.finish(&["equals", "in", "regex", "exists"])?;
    let test = match tests.as_slice() {
        [("equals", value)] => AttributeTest::Equals(string(value, &join(field, "equals"))?),
        [("in", values)] => {
            let path = join(field, "in");
            let YamlData::Sequence(_) = &values.data else {
                return fail(values, format!("{path}: expected a list, found {}", describe(values)));
            };
            AttributeTest::In(string_list(values, &path)?)
        }
        [("regex", pattern)] => {
            let path = join(field, "regex");
            AttributeTest::regex(scalar(pattern, &path)?).or_else(|err| fail(pattern, format!("{path}: {err}")))?
        }
        [("exists", exists)] => AttributeTest::Exists(boolean(exists, &join(field, "exists"))?),
        _ => {
            return fail_at(
                at,
                format!("{field}: exactly one of equals, in, regex or exists is required"),
            )
        }
    };
    Ok(test)
}

fn parse_threshold(node: &Node, at: usize) -> Parsed<ThresholdSpec> {
    let mut fields = Fields::new(node, "threshold")?.at(at);
    let value_node = fields.required("value")?;
    let value = parse_window_value(value_node, fields.key_line("value"))?;
    let window_node = fields.required("window")?;
    let window = duration(window_node, "threshold.window")?;
    if window > MAX_WINDOW || window.as_nanos() % SLOT.as_nanos() != 0 {
        return fail(
            window_node,
            format!(
                "threshold.window: {} must be a multiple of {} and at most 24h",
                humantime::format_duration(window),
                humantime::format_duration(SLOT)
            ),
        );
    }
    let (direction, fire_node) = match (fields.opt("above"), fields.opt("below")) {
        (Some(above), None) => (Direction::Above, above),
        (None, Some(below)) => (Direction::Below, below),
        _ => return fail_at(at, "threshold: exactly one of above or below is required"),
    };
    let bound = if direction == Direction::Above {
        "above"
    } else {
        "below"
    };
    let fire = number(fire_node, &format!("threshold.{bound}"))?;
    let resolve = match fields.opt("resolve") {
        None => fire,
        Some(resolve_node) => {
            let resolve = number(resolve_node, "threshold.resolve")?;
            let wrong_way = match direction {
                Direction::Above => resolve > fire,
                Direction::Below => resolve < fire,
            };
            if wrong_way {
                let side = if direction == Direction::Above {
                    "above"
                } else {
                    "below"
                };
                return fail(
                    resolve_node,
                    format!("threshold.resolve: {resolve} is {side} the firing value {fire} (hysteresis the wrong way round: the alert would resolve while still firing)"),
                );
            }
            resolve
        }
    };
    let group_by = match fields.opt("group_by") {
        None => None,
        Some(n) => Some(attribute_key(n, "threshold.group_by")?),
    };
    let min_events = match fields.opt("min_events") {
        None => 1,
        Some(n) => whole(n, "threshold.min_events", 1, u64::MAX)?,
    };
    fields.finish(&["value", "window", "above", "below", "resolve", "group_by", "min_events"])?;
    Ok(ThresholdSpec {
        value,
        window,
        direction,
        fire,
        resolve,
        group_by,
        min_events,
    })
}

const WINDOW_VALUES: &str =
    "pNN(metric) (e.g. p99(latency_ms), p99.9(latency_ms)), avg(metric), rate, count or { share: <match> }";

/// `p99(latency_ms)`, `p99.9(m)`, `avg(m)`, `rate`, `count`, or `{ share: <match> }`.
fn parse_window_value(node: &Node, at: usize) -> Parsed<WindowValue> {
    let path = "threshold.value";
    if let YamlData::Mapping(_) = &node.data {
        let mut fields = Fields::new(node, path)?.at(at);
        let share_line = fields.key_line("share");
        let of = parse_match(fields.required("share")?, &join(path, "share"), share_line)?;
        fields.finish(&["share"])?;
        return Ok(WindowValue::Share { of });
    }
    let text = scalar(node, path)?.trim();
    match text {
        "rate" => return Ok(WindowValue::Rate),
        "count" => return Ok(WindowValue::Count),
        _ => {}
    }
    let Some((function, argument)) = text.strip_suffix(')').and_then(|t| t.split_once('(')) else {
        return fail(
            node,
            format!("{path}: unknown value {text:?}, expected {WINDOW_VALUES}"),
        );
    };
    let (function, metric) = (function.trim(), argument.trim());
    if metric.is_empty()
        || metric
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '(' || c == ')')
    {
        return fail(node, format!("{path}: bad metric name {metric:?} in {text:?}"));
    }
    if function == "avg" {
        return Ok(WindowValue::Avg {
            metric: metric.to_owned(),
        });
    }
    let percent = function
        .strip_prefix('p')
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        .and_then(|digits| digits.parse::<f64>().ok());
    match percent {
        Some(percent) if percent > 0.0 && percent < 100.0 => Ok(WindowValue::Quantile {
            q: percent / 100.0,
            metric: metric.to_owned(),
        }),
        Some(_) => fail(
            node,
            format!("{path}: unknown function {function:?}: a quantile pNN needs 0 < NN < 100 (the quantile must be inside (0, 1))"),
        ),
        None => fail(node, format!("{path}: unknown function {function:?}, expected {WINDOW_VALUES}")),
    }
}

fn parse_anomaly(node: &Node, at: usize) -> Parsed<AnomalySpec> {
    let mut fields = Fields::new(node, "anomaly")?.at(at);
    let series_node = fields.required("series")?;
    let series_text = scalar(series_node, "anomaly.series")?.trim();
    let series = match series_text {
        "rate" => SeriesValue::Rate,
        _ => match series_text
            .strip_suffix(')')
            .and_then(|t| t.strip_prefix("mean("))
            .map(str::trim)
        {
            Some(metric) if !metric.is_empty() && !metric.contains(char::is_whitespace) => SeriesValue::Mean {
                metric: metric.to_owned(),
            },
            _ => {
                return fail(
                    series_node,
                    format!("anomaly.series: unknown series {series_text:?}, expected rate or mean(metric)"),
                )
            }
        },
    };
    let sensitivity = match fields.opt("sensitivity") {
        None => DEFAULT_SENSITIVITY,
        Some(n) => {
            let sensitivity = number(n, "anomaly.sensitivity")?;
            if sensitivity <= 0.0 {
                return fail(n, format!("anomaly.sensitivity: {sensitivity} must be greater than 0"));
            }
            sensitivity
        }
    };
    let side = match fields.opt("side") {
        None => Side::Both,
        Some(n) => match scalar(n, "anomaly.side")? {
            "up" => Side::Up,
            "down" => Side::Down,
            "both" => Side::Both,
            other => {
                return fail(
                    n,
                    format!("anomaly.side: unknown side {other:?}, expected up, down or both"),
                )
            }
        },
    };
    let warmup_minutes = match fields.opt("warmup") {
        None => DEFAULT_WARMUP_MINUTES,
        Some(n) => whole(n, "anomaly.warmup", 0, 7 * 24 * 60)?,
    };
    let group_by = match fields.opt("group_by") {
        None => None,
        Some(n) => Some(attribute_key(n, "anomaly.group_by")?),
    };
    fields.finish(&["series", "sensitivity", "side", "warmup", "group_by"])?;
    Ok(AnomalySpec {
        series,
        group_by,
        sensitivity,
        side,
        warmup_minutes: warmup_minutes as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET_VAR: &str = "CHUTE_WEBHOOK_OPS_SECRET";

    fn env(name: &str) -> Option<String> {
        (name == SECRET_VAR).then(|| "s3cret".to_owned())
    }

    fn ok(source: &str) -> RuleSet {
        parse(source, &env).unwrap_or_else(|err| panic!("{err}\n{source}"))
    }

    /// The error for `source`: its line, and its message containing every one of `parts`.
    fn refused(source: &str, line: usize, parts: &[&str]) {
        let err = match parse(source, &env) {
            Ok(_) => panic!("accepted:\n{source}"),
            Err(err) => err,
        };
        let text = err.to_string();
        assert_eq!(err.line(), Some(line), "{text}\n{source}");
        for part in parts {
            assert!(text.contains(part), "{text:?} lacks {part:?}\n{source}");
        }
    }

    const WEBHOOK: &str =
        "webhooks:\n  ops:\n    url: http://127.0.0.1:9000/hook\n    secret_env: CHUTE_WEBHOOK_OPS_SECRET\n";

    fn event(name: &str, attributes: &[(&str, &str)], metrics: &[(&str, f64)]) -> Event {
        Event {
            tenant: "acme".to_owned(),
            name: name.to_owned(),
            attributes: attributes.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            metrics: metrics.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
            ..Event::default()
        }
    }

    /// The full example of RULES.md, so the documentation cannot rot.
    fn rules_md_example() -> &'static str {
        let doc = include_str!("../RULES.md");
        let start = doc.find("```yaml\n").expect("RULES.md has a yaml example") + "```yaml\n".len();
        let end = start + doc[start..].find("```").expect("the example is closed");
        &doc[start..end]
    }

    #[test]
    fn the_example_in_rules_md_parses() {
        let secret_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret_file.path(), "pager-secret\n").unwrap();
        let source = rules_md_example().replace("/run/secrets/pager", secret_file.path().to_str().unwrap());
        let rules = ok(&source);
        let names: Vec<&str> = rules.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "low_quality",
                "slow_p99",
                "error_share",
                "quiet_ingest",
                "traffic",
                "quality_drop"
            ]
        );
        assert_eq!(rules.webhooks["ops"].secret, "s3cret");
        assert_eq!(rules.webhooks["pager"].secret, "pager-secret");
        assert_eq!(rules.webhooks["ops"].concurrency, 4);
        assert_eq!(rules.webhooks["pager"].max_attempts, 8);
        assert_eq!(rules.webhooks["pager"].timeout, Duration::from_secs(5));

        let RuleKind::Threshold(slow) = &rules.rules[1].kind else {
            panic!("slow_p99 is a threshold")
        };
        assert!(
            matches!(&slow.value, WindowValue::Quantile { q, metric } if (*q - 0.99).abs() < 1e-12 && metric == "latency_ms")
        );
        assert_eq!(
            (slow.direction, slow.fire, slow.resolve),
            (Direction::Above, 2000.0, 1800.0)
        );
        assert_eq!(
            (slow.window, slow.group_by.as_deref(), slow.min_events),
            (Duration::from_secs(300), Some("model"), 20)
        );
        assert_eq!(
            rules.rules[1].line,
            source.lines().position(|l| l.contains("name: slow_p99")).unwrap() + 1
        );
        let RuleKind::Threshold(quiet) = &rules.rules[3].kind else {
            panic!("quiet_ingest is a threshold")
        };
        assert_eq!(
            (quiet.direction, quiet.fire, quiet.resolve),
            (Direction::Below, 0.5, 1.0)
        );
        let RuleKind::Anomaly(quality) = &rules.rules[5].kind else {
            panic!("quality_drop is an anomaly")
        };
        assert!(matches!(&quality.series, SeriesValue::Mean { metric } if metric == "quality"));
        assert_eq!(
            (quality.side, quality.sensitivity, quality.warmup_minutes),
            (Side::Down, 4.0, 30)
        );

        // The matchers behave as documented.
        let good = event(
            "llm.response",
            &[("model", "gpt-4o"), ("region", "eu"), ("path", "/api/chat")],
            &[("quality", 0.5)],
        );
        assert!(rules.rules[0].matcher.matches(&good));
        let mut failed = good.clone();
        failed.attributes.insert("error.type".into(), "timeout".into());
        assert!(!rules.rules[0].matcher.matches(&failed));
        let mut fine = good.clone();
        fine.metrics.insert("quality".into(), 0.9);
        assert!(!rules.rules[0].matcher.matches(&fine));
        let RuleKind::Threshold(share) = &rules.rules[2].kind else {
            panic!("error_share is a threshold")
        };
        let WindowValue::Share { of } = &share.value else {
            panic!("error_share is a share")
        };
        assert!(of.matches(&failed) && !of.matches(&good));
    }

    #[test]
    fn an_empty_file_has_no_rules() {
        assert!(ok("").rules.is_empty());
        assert!(ok("# nothing yet\n").rules.is_empty());
        assert!(ok(WEBHOOK).rules.is_empty());
        assert!(ok("rules: []\n").rules.is_empty());
    }

    #[test]
    fn syntax_errors_name_the_line() {
        refused(
            "rules:\n  - name: a\n    match: { event: x\n",
            4,
            &["YAML syntax error"],
        );
        refused("rules:\n  - name: a\n    name: b\n", 3, &["duplicated key"]);
        refused("rules: []\n---\nrules: []\n", 3, &["one YAML document"]);
        refused("- a\n", 1, &["expected a mapping, found a list"]);
        refused(
            "rules: []\nwebhooks: [a]\n",
            2,
            &["webhooks: expected a mapping of name to webhook, found a list"],
        );
        refused(
            "rules:\n  - name: r\n    route: {}\n    match:\n      attributes: model\n",
            5,
            &["match.attributes: expected a mapping of attribute to test, found a single value"],
        );
        refused(
            "rules:\n  - name: a\n    match: 1\n",
            3,
            &["rule \"a\": match: expected a mapping, found a single value"],
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        refused("rule: []\n", 1, &["unknown field \"rule\"", "webhooks, rules"]);
        refused(
            "rules:\n  - name: a\n    match: {}\n    route: {}\n    webhooks: ops\n",
            5,
            &["rule \"a\"", "unknown field \"webhooks\""],
        );
        refused(
            "rules:\n  - name: a\n    match:\n      event: x\n      metric: [\"q < 1\"]\n    route: {}\n",
            5,
            &["match: unknown field \"metric\""],
        );
        refused(
            "rules:\n  - name: a\n    match: {}\n    route: { stream: x }\n",
            4,
            &["route: unknown field \"stream\""],
        );
        refused(
            "rules:\n  - name: a\n    match:\n      attributes:\n        model: { equal: x }\n    route: {}\n",
            5,
            &["match.attributes.model: unknown field \"equal\""],
        );
        refused(
            &format!("{WEBHOOK}    retries: 3\nrules: []\n"),
            5,
            &["webhook \"ops\"", "unknown field \"retries\""],
        );
        refused(
            "rules:\n  - name: a\n    match: {}\n    threshold: { value: count, window: 1m, above: 1, for: 5m }\n",
            4,
            &["threshold: unknown field \"for\""],
        );
    }

    #[test]
    fn bad_matches_are_refused() {
        let rule = |body: &str| format!("rules:\n  - name: r\n    route: {{}}\n    match:\n{body}");
        refused(
            &rule("      attributes:\n        path: { regex: \"(unclosed\" }\n"),
            6,
            &["rule \"r\"", "match.attributes.path.regex", "bad regex"],
        );
        refused(
            &rule("      attributes:\n        id: { regex: \"^\\\\d+$\" }\n"),
            6,
            &["\\d means different things"],
        );
        refused(
            &rule("      metrics: [\"quality <\"]\n"),
            5,
            &["match.metrics[0]", "bad metric predicate \"quality <\""],
        );
        refused(
            &rule("      metrics:\n        - latency_ms > 1\n        - quality ~ 2\n"),
            7,
            &["match.metrics[1]"],
        );
        refused(&rule("      event: \"\"\n"), 5, &["match.event", "bad event glob"]);
        refused(
            &rule("      attributes:\n        model: { in: x }\n"),
            6,
            &["match.attributes.model.in: expected a list"],
        );
        refused(
            &rule("      attributes:\n        model: { in: [a], equals: b }\n"),
            6,
            &["exactly one of equals, in, regex or exists"],
        );
        refused(
            &rule("      attributes:\n        model: { exists: maybe }\n"),
            6,
            &["expected true or false"],
        );
        refused(
            &rule("      attributes:\n        model:\n"),
            6,
            &["a value is required"],
        );
    }

    #[test]
    fn errors_about_a_whole_block_name_the_line_of_its_key() {
        refused(
            "rules:\n  - name: r\n    route: {}\n    match:\n      attributes:\n        model:\n          in: [a]\n          equals: b\n",
            6,
            &["match.attributes.model: exactly one of equals, in, regex or exists"],
        );
        refused(
            "rules:\n  - name: r\n    match: {}\n    threshold:\n      window: 1m\n      value:\n        share:\n      above: 1\n",
            6,
            &["threshold.value: missing field \"share\""],
        );
        refused(
            "rules:\n  - name: r\n    match: {}\n    anomaly:\n      side: up\n",
            4,
            &["anomaly: missing field \"series\""],
        );
    }

    #[test]
    fn duplicate_keys_are_refused_however_quoted() {
        refused("rules: []\n\"rules\": []\n", 2, &["duplicate key \"rules\""]);
        refused(
            "rules:\n  - name: r\n    route: {}\n    match:\n      attributes:\n        model: a\n        'model': b\n",
            7,
            &["match.attributes: duplicate attribute \"model\""],
        );
        refused(
            "rules:\n  - name: r\n    match: {}\n    threshold: { value: rate, window: 1m, above: 1, group_by: \"\" }\n",
            4,
            &["threshold.group_by: \"\" is not an attribute name"],
        );
    }

    #[test]
    fn attribute_values_are_taken_as_written() {
        let rules = ok("rules:\n  - name: r\n    route:\n    match:\n      attributes: { status: 200, flag: yes, hex: 0x10, empty: \"\" }\n");
        let matching = event(
            "x",
            &[("status", "200"), ("flag", "yes"), ("hex", "0x10"), ("empty", "")],
            &[],
        );
        assert!(rules.rules[0].matcher.matches(&matching));
        assert!(!rules.rules[0].matcher.matches(&event("x", &[("status", "200")], &[])));
    }

    #[test]
    fn value_functions_and_windows() {
        let threshold = |body: &str| format!("rules:\n  - name: slow_p99\n    match: {{}}\n    threshold:\n{body}");
        refused(
            &threshold("      value: p101(latency_ms)\n      window: 5m\n      above: 1\n"),
            5,
            &[
                "rules:5: rule \"slow_p99\": threshold.value: unknown function \"p101\"",
                "(0, 1)",
            ],
        );
        refused(
            &threshold("      value: p0(latency_ms)\n      window: 5m\n      above: 1\n"),
            5,
            &["unknown function \"p0\""],
        );
        refused(
            &threshold("      value: median(latency_ms)\n      window: 5m\n      above: 1\n"),
            5,
            &["unknown function \"median\""],
        );
        refused(
            &threshold("      value: latency_ms\n      window: 5m\n      above: 1\n"),
            5,
            &["unknown value \"latency_ms\""],
        );
        refused(
            &threshold("      value: p99()\n      window: 5m\n      above: 1\n"),
            5,
            &["bad metric name"],
        );
        refused(
            &threshold("      value: count\n      window: 45s\n      above: 1\n"),
            6,
            &["threshold.window", "multiple of 10s"],
        );
        refused(
            &threshold("      value: count\n      window: 25h\n      above: 1\n"),
            6,
            &["at most 24h"],
        );
        refused(
            &threshold("      value: count\n      window: soon\n      above: 1\n"),
            6,
            &["bad duration"],
        );
        refused(
            &threshold("      value: count\n      window: 1m\n"),
            4,
            &["exactly one of above or below"],
        );
        refused(
            &threshold("      value: count\n      window: 1m\n      above: 1\n      below: 0\n"),
            4,
            &["exactly one of above or below"],
        );
        refused(
            &threshold("      value: count\n      window: 1m\n      above: lots\n"),
            7,
            &["threshold.above: expected a number"],
        );
        refused(
            &threshold("      value: count\n      window: 1m\n      min_events: 0\n      above: 1\n"),
            7,
            &["threshold.min_events"],
        );
        refused(
            &threshold("      window: 1m\n      above: 1\n"),
            4,
            &["missing field \"value\""],
        );
        let rules = ok(&threshold(
            "      value: p99.9(latency_ms)\n      window: 24h\n      above: 1\n",
        ));
        let RuleKind::Threshold(spec) = &rules.rules[0].kind else {
            panic!()
        };
        assert!(matches!(&spec.value, WindowValue::Quantile { q, .. } if (*q - 0.999).abs() < 1e-12));
        let rules = ok(&threshold(
            "      value: avg(cost)\n      window: 1m 30s\n      below: 2\n",
        ));
        let RuleKind::Threshold(spec) = &rules.rules[0].kind else {
            panic!()
        };
        assert!(matches!(&spec.value, WindowValue::Avg { metric } if metric == "cost"));
        assert_eq!((spec.window, spec.resolve), (Duration::from_secs(90), 2.0));
    }

    #[test]
    fn hysteresis_must_point_the_right_way() {
        let threshold = |bounds: &str| {
            format!(
                "rules:\n  - name: t\n    match: {{}}\n    threshold:\n      value: rate\n      window: 1m\n{bounds}"
            )
        };
        refused(
            &threshold("      above: 2000\n      resolve: 2100\n"),
            8,
            &["threshold.resolve", "wrong way round"],
        );
        refused(
            &threshold("      below: 10\n      resolve: 5\n"),
            8,
            &["threshold.resolve", "wrong way round"],
        );
        ok(&threshold("      above: 2000\n      resolve: 2000\n"));
        ok(&threshold("      below: 10\n      resolve: 12\n"));
    }

    #[test]
    fn anomaly_fields() {
        let anomaly = |body: &str| format!("rules:\n  - name: a\n    match: {{}}\n    anomaly:\n{body}");
        refused(
            &anomaly("      series: rate\n      sensitivity: 0\n"),
            6,
            &["anomaly.sensitivity", "greater than 0"],
        );
        refused(
            &anomaly("      series: rate\n      sensitivity: -2\n"),
            6,
            &["greater than 0"],
        );
        refused(&anomaly("      series: p99(x)\n"), 5, &["unknown series"]);
        refused(
            &anomaly("      series: rate\n      side: sideways\n"),
            6,
            &["unknown side"],
        );
        refused(
            &anomaly("      series: rate\n      warmup: -1\n"),
            6,
            &["anomaly.warmup"],
        );
        let rules = ok(&anomaly("      series: mean(latency_ms)\n      sensitivity: 2.5\n      side: up\n      warmup: 0\n      group_by: model\n"));
        let RuleKind::Anomaly(spec) = &rules.rules[0].kind else {
            panic!()
        };
        assert!(matches!(&spec.series, SeriesValue::Mean { metric } if metric == "latency_ms"));
        assert_eq!(
            (
                spec.sensitivity,
                spec.side,
                spec.warmup_minutes,
                spec.group_by.as_deref()
            ),
            (2.5, Side::Up, 0, Some("model"))
        );
    }

    #[test]
    fn names_and_kinds() {
        refused(
            "rules:\n  - match: {}\n    route: {}\n",
            2,
            &["rules[0]: missing field \"name\""],
        );
        refused(
            "rules:\n  - name: Bad-Name\n    match: {}\n    route: {}\n",
            2,
            &["rule name \"Bad-Name\" is invalid"],
        );
        refused(
            &format!(
                "rules:\n  - name: {}\n    match: {{}}\n    route: {{}}\n",
                "a".repeat(65)
            ),
            2,
            &["is invalid"],
        );
        refused("rules:\n  - name: a\n    match: {}\n    route: {}\n  - name: b\n    match: {}\n    route: {}\n  - name: a\n    match: {}\n    route: {}\n", 8, &["rule \"a\": duplicate name (first defined at line 2)"]);
        refused(
            "rules:\n  - name: a\n    match: {}\n",
            2,
            &["rule \"a\": exactly one of route, threshold or anomaly"],
        );
        refused(
            "rules:\n  - name: a\n    match: {}\n    route: {}\n    anomaly: { series: rate }\n",
            2,
            &["exactly one of route, threshold or anomaly"],
        );
        refused(
            "rules:\n  - name: a\n    route: {}\n",
            2,
            &["rule \"a\": missing field \"match\""],
        );
        refused(
            "rules:\n  - name: a\n    tenants: [Acme]\n    match: {}\n    route: {}\n",
            3,
            &["\"Acme\" is not a valid tenant"],
        );
        refused("rules: { a: 1 }\n", 1, &["rules: expected a list"]);
    }

    #[test]
    fn webhooks_are_checked() {
        let rule = "rules:\n  - name: r\n    match: {}\n    route: {}\n    webhook: pager\n";
        refused(
            &format!("{WEBHOOK}{rule}"),
            9,
            &["rule \"r\"", "webhook \"pager\" is not defined", "ops"],
        );
        refused(rule, 5, &["webhook \"pager\" is not defined (webhooks defined: none)"]);
        let hook = |body: &str| format!("webhooks:\n  ops:\n{body}rules: []\n");
        refused(
            &hook("    url: ftp://127.0.0.1/x\n    secret_env: CHUTE_WEBHOOK_OPS_SECRET\n"),
            3,
            &[
                "webhook \"ops\": url: invalid URL \"ftp://127.0.0.1/x\"",
                "http:// or https://",
            ],
        );
        refused(
            &hook("    url: not a url\n    secret_env: CHUTE_WEBHOOK_OPS_SECRET\n"),
            3,
            &["url: invalid URL"],
        );
        refused(
            &hook("    url: \"http://\"\n    secret_env: CHUTE_WEBHOOK_OPS_SECRET\n"),
            3,
            &["url: invalid URL"],
        );
        refused(
            &hook("    secret_env: CHUTE_WEBHOOK_OPS_SECRET\n"),
            2,
            &["webhook \"ops\": missing field \"url\""],
        );
        refused(
            &hook("    url: http://127.0.0.1:9/\n    secret_env: CHUTE_UNSET\n"),
            4,
            &["secret_env: environment variable CHUTE_UNSET is not set"],
        );
        refused(
            &hook("    url: http://127.0.0.1:9/\n    secret_file: /nonexistent/secret\n"),
            4,
            &["secret_file: cannot read /nonexistent/secret"],
        );
        refused(
            &hook("    url: http://127.0.0.1:9/\n"),
            2,
            &["exactly one of secret_env or secret_file"],
        );
        refused(
            &hook("    url: http://127.0.0.1:9/\n    secret_env: CHUTE_WEBHOOK_OPS_SECRET\n    secret_file: /x\n"),
            2,
            &["exactly one of secret_env or secret_file"],
        );
        refused(
            &hook("    url: http://127.0.0.1:9/\n    secret_env: CHUTE_WEBHOOK_OPS_SECRET\n    concurrency: 0\n"),
            5,
            &["concurrency"],
        );
        refused(&hook("    url: http://127.0.0.1:9/\n    secret_env: CHUTE_WEBHOOK_OPS_SECRET\n    backoff: { initial: 1m, max: 1s }\n"), 5, &["backoff: initial must not be longer than max"]);
        refused(
            "webhooks:\n  Ops:\n    url: http://127.0.0.1:9/\nrules: []\n",
            2,
            &["webhook name \"Ops\" is invalid"],
        );
        let empty = tempfile::NamedTempFile::new().unwrap();
        refused(
            &hook(&format!(
                "    url: http://127.0.0.1:9/\n    secret_file: {}\n",
                empty.path().display()
            )),
            4,
            &["is empty"],
        );
        let rules = ok(&hook("    url: https://hooks.internal:8443/chute\n    secret_env: CHUTE_WEBHOOK_OPS_SECRET\n    timeout: 2s\n    concurrency: 16\n    max_attempts: 1\n    backoff: { initial: 1s, max: 1m }\n"));
        let ops = &rules.webhooks["ops"];
        assert_eq!(
            (ops.timeout, ops.concurrency, ops.max_attempts),
            (Duration::from_secs(2), 16, 1)
        );
        assert_eq!(
            (ops.backoff_initial, ops.backoff_max),
            (Duration::from_secs(1), Duration::from_secs(60))
        );
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.yaml");
        std::fs::write(
            &path,
            "rules:\n  - name: a\n    match: {}\n    route: {}\n    colour: red\n",
        )
        .unwrap();
        let text = load(&path, &env).unwrap_err().to_string();
        assert_eq!(text, format!("{}:5: rule \"a\": unknown field \"colour\", expected one of: name, tenants, match, route, threshold, anomaly, webhook", path.display()));
        let missing = load(dir.path().join("missing.yaml"), &env).unwrap_err();
        assert!(matches!(missing, RulesError::Read { .. }), "{missing}");
        std::fs::write(&path, "rules:\n  - name: a\n    match: {}\n    route: {}\n").unwrap();
        assert_eq!(load(&path, &env).unwrap().rules.len(), 1);
    }

    #[test]
    fn the_index_finds_exactly_the_matching_rules_in_file_order() {
        let rules = ok("rules:
  - { name: any, match: {}, route: {} }
  - { name: exact, match: { event: llm.request }, route: {} }
  - { name: prefix, match: { event: \"llm.*\" }, route: {} }
  - { name: other, match: { event: http.request }, route: {} }
  - { name: beta_only, tenants: [beta], match: { event: llm.request }, route: {} }
  - { name: slow, match: { event: llm.request, metrics: [\"latency_ms > 100\"] }, route: {} }
  - { name: exact_again, match: { event: llm.request }, route: {} }
");
        let index = RuleIndex::new(&rules);
        let names = |e: &Event| -> Vec<&str> { index.matching(&rules, e).map(|(_, r)| r.name.as_str()).collect() };
        let mut e = event("llm.request", &[], &[("latency_ms", 150.0)]);
        assert_eq!(names(&e), ["any", "exact", "prefix", "slow", "exact_again"]);
        e.tenant = "beta".into();
        assert_eq!(
            names(&e),
            ["any", "exact", "prefix", "beta_only", "slow", "exact_again"]
        );
        assert_eq!(names(&event("http.request", &[], &[])), ["any", "other"]);
        assert_eq!(names(&event("llm.response", &[], &[])), ["any", "prefix"]);
        let positions: Vec<usize> = index
            .matching(&rules, &event("http.request", &[], &[]))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(positions, [0, 3]);
        // The index gives the same answer as testing every rule.
        let brute = |e: &Event| -> Vec<&str> {
            rules
                .rules
                .iter()
                .filter(|r| r.tenants.as_ref().is_none_or(|t| t.contains(&e.tenant)) && r.matcher.matches(e))
                .map(|r| r.name.as_str())
                .collect()
        };
        for e in [
            event("llm.request", &[], &[]),
            event("nothing", &[], &[]),
            event("llm.", &[], &[("latency_ms", 101.0)]),
        ] {
            assert_eq!(names(&e), brute(&e));
        }
    }

    #[test]
    fn the_memo_is_bounded_and_answers_stay_right_past_it() {
        let rules = ok("rules:
  - { name: any_error, match: { event: \"*.error\" }, route: {} }
  - { name: exact, match: { event: svc1.error }, route: {} }
");
        let index = RuleIndex::new(&rules);
        for round in 0..2 {
            for i in 0..MEMO_NAMES + 100 {
                let name = format!("svc{i}.{}", if i % 2 == 0 { "error" } else { "request" });
                let found: Vec<usize> = index
                    .matching(&rules, &event(&name, &[], &[]))
                    .map(|(p, _)| p)
                    .collect();
                let expected: &[usize] = if i % 2 == 0 { &[0] } else { &[] };
                assert_eq!(found, expected, "{name} in round {round}");
            }
            assert_eq!(index.memo_len(), MEMO_NAMES);
        }
        let both: Vec<usize> = index
            .matching(&rules, &event("svc1.error", &[], &[]))
            .map(|(p, _)| p)
            .collect();
        assert_eq!(both, [0, 1]);
        assert_eq!(index.clone().memo_len(), 0, "a clone starts with an empty memo");
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        fn any_event() -> impl Strategy<Value = Event> {
            let text = prop_oneof!["[a-z._]{0,12}", "llm\\.[a-z?*%_]{0,6}", any::<String>(),];
            let value = prop_oneof![
                any::<f64>(),
                -1e4..1e4f64,
                Just(0.7),
                Just(f64::NAN),
                Just(f64::INFINITY)
            ];
            let key = prop_oneof![
                Just("model".to_owned()),
                Just("region".to_owned()),
                Just("path".to_owned()),
                Just("error.type".to_owned()),
                Just("quality".to_owned()),
                Just("latency_ms".to_owned()),
                any::<String>(),
            ];
            (
                text.clone(),
                prop_oneof![Just("acme".to_owned()), any::<String>()],
                proptest::collection::hash_map(key.clone(), text, 0..6),
                proptest::collection::hash_map(key, value, 0..6),
            )
                .prop_map(|(name, tenant, attributes, metrics)| Event {
                    name,
                    tenant,
                    attributes,
                    metrics,
                    ..Event::default()
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// `matches` (through the index) never panics, and the index agrees with testing
            /// every rule in turn.
            #[test]
            fn matching_never_panics_and_agrees_with_every_rule(event in any_event(), glob in "[a-z.*?é]{1,8}") {
                let secret_file = tempfile::NamedTempFile::new().unwrap();
                std::fs::write(secret_file.path(), "x").unwrap();
                let source = format!(
                    "{}  - name: random\n    match: {{ event: \"{glob}\", metrics: [\"latency_ms >= 0\"] }}\n    route: {{}}\n",
                    rules_md_example().replace("/run/secrets/pager", secret_file.path().to_str().unwrap())
                );
                let rules = ok(&source);
                let index = RuleIndex::new(&rules);
                let by_index: Vec<usize> = index.matching(&rules, &event).map(|(i, _)| i).collect();
                let by_scan: Vec<usize> = rules
                    .rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.tenants.as_ref().is_none_or(|t| t.contains(&event.tenant)) && r.matcher.matches(&event))
                    .map(|(i, _)| i)
                    .collect();
                prop_assert_eq!(by_index, by_scan);
            }
        }
    }
}
