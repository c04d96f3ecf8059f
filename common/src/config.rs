//! Configuration loading shared by every service: [`load`] parses a clap `Config` from
//! arguments and an environment passed in by the caller, the flag groups several services share
//! ([`NatsArgs`], [`ApiKeysArgs`], [`ClickHouseLoginArgs`], [`LogArgs`], each
//! `#[command(flatten)]`ed into a `Config`), and the value parsers the configs use.
//!
//! Each flag declares its variable with clap's `env = "CHUTE_..."`, which clap would read from
//! the process environment. [`load`] takes the environment as an argument instead (linkerd2-proxy
//! `env.rs` does the same): `main` passes `std::env::vars_os()`, tests and `Default` impls pass
//! what they mean, so a `CHUTE_*` variable exported in a developer's shell cannot change a test.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::Resettable;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command};

use crate::telemetry::LogFormat;

/// Parses `C` from `args` (the first item is the program name, as in `std::env::args_os()`) and
/// `env` (`(name, value)` pairs; only the variables `C` declares are looked at).
///
/// Precedence is clap's: a flag on the command line, then its variable in `env`, then its
/// default. A variable whose value does not parse is an error naming the variable, unless the
/// flag was given (then the variable is not used, as with clap). The only thing that still
/// shows the process environment is `--help`, which clap renders with the current values.
pub fn load<C, I, A, E, K, V>(args: I, env: E) -> Result<C, clap::Error>
where
    C: clap::Parser,
    I: IntoIterator<Item = A>,
    A: Into<OsString>,
    E: IntoIterator<Item = (K, V)>,
    K: Into<OsString>,
    V: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let env: HashMap<OsString, OsString> = env
        .into_iter()
        .map(|(name, value)| (name.into(), value.into()))
        .collect();
    let mut rejected = Vec::new();
    let mut command = env_as_defaults(C::command(), &env, &[], &mut rejected);
    let mut matches = match command.try_get_matches_from_mut(&args) {
        Ok(matches) => matches,
        Err(err) if shows_help(&err) => {
            // The rewritten command would print the given values as defaults and no variable
            // names; render help and version from the command as declared instead.
            return Err(C::command().try_get_matches_from(&args).err().unwrap_or(err));
        }
        Err(err) => return Err(err),
    };
    if let Some(unparsable) = rejected.iter().find(|unparsable| unparsable.was_used(&matches)) {
        return Err(unparsable.error().with_cmd(&command));
    }
    C::from_arg_matches_mut(&mut matches).map_err(|err| err.format(&mut command))
}

/// `C` with the documented defaults: its name alone on the command line and no environment.
pub fn defaults<C: clap::Parser>() -> C {
    let name = C::command().get_name().to_owned();
    load([name], NO_ENV).expect("the documented defaults parse")
}

/// An empty environment for [`load`].
pub const NO_ENV: [(&str, &str); 0] = [];

/// [`load`] as unit tests call it: `args` without the program name (`C`'s is used) and the
/// environment as string pairs.
#[cfg(feature = "test-util")]
pub fn load_str<C: clap::Parser>(args: &[&str], env: &[(&str, &str)]) -> Result<C, clap::Error> {
    let name = C::command().get_name().to_owned();
    load(
        std::iter::once(name.as_str()).chain(args.iter().copied()),
        env.iter().copied(),
    )
}

/// The prefix of every variable a config declares. Test harnesses remove `CHUTE_*` from the
/// environment of the binaries they start, so a variable named otherwise would leak into tests
/// from the developer's shell.
const VARIABLE_PREFIX: &str = "CHUTE_";

/// The name and one-line description of a service with subcommands (the aggregator, the router),
/// implemented by its subcommand enum for [`ServiceCli`].
pub trait ServiceCommand: clap::Subcommand {
    const NAME: &'static str;
    const ABOUT: &'static str;
}

/// The command line of a service with subcommands: its `Config` flags and the subcommand, `None`
/// to run the service. Every flag is global, so it may also follow a subcommand
/// (`aggregator dlq list --nats-url ...`).
#[derive(Debug, clap::Parser)]
#[command(name = S::NAME, version, about = S::ABOUT, mut_args(|arg| arg.global(true)))]
pub struct ServiceCli<C: clap::Args, S: ServiceCommand> {
    #[command(flatten)]
    pub config: C,
    #[command(subcommand)]
    pub command: Option<S>,
}

/// A variable in the given environment whose value the flag's parser refused.
struct Unparsable {
    /// Subcommand names from the top to the command declaring the flag.
    path: Vec<String>,
    arg_id: String,
    flag: String,
    variable: String,
    /// `None` when the flag hides its value (`hide_env_values`, e.g. passwords).
    value: Option<String>,
    reason: String,
}

impl Unparsable {
    /// The value would have been used: the parse went through the declaring subcommand and the
    /// flag did not come from the command line.
    fn was_used(&self, matches: &ArgMatches) -> bool {
        let mut level = matches;
        for name in &self.path {
            match level.subcommand() {
                Some((matched, sub_matches)) if matched == name => level = sub_matches,
                _ => return false,
            }
        }
        level.value_source(&self.arg_id) != Some(ValueSource::CommandLine)
    }

    fn error(&self) -> clap::Error {
        let value = match &self.value {
            Some(value) => format!("'{value}'"),
            None => "(hidden)".to_owned(),
        };
        let message = format!(
            "invalid value {value} in environment variable {} (for '{}'): {}\n",
            self.variable, self.flag, self.reason
        );
        clap::Error::raw(ErrorKind::InvalidValue, message)
    }
}

/// `command` with every `env = ...` turned off and, where `env` has the variable, its value as
/// the flag's default: a flag given on the command line still wins over it, and the process
/// environment is never consulted. Values the flag's parser refuses are left out and recorded
/// in `rejected` (an error only if that flag ends up unset on the command line).
fn env_as_defaults(
    command: Command,
    env: &HashMap<OsString, OsString>,
    path: &[String],
    rejected: &mut Vec<Unparsable>,
) -> Command {
    let first_rejected = rejected.len();
    for arg in command.get_arguments() {
        debug_assert!(
            arg.get_env()
                .is_none_or(|variable| variable.to_string_lossy().starts_with(VARIABLE_PREFIX)),
            "variable {:?} lacks the {VARIABLE_PREFIX} prefix",
            arg.get_env().unwrap_or_default(),
        );
        let Some(value) = arg.get_env().and_then(|variable| env.get(variable)) else {
            continue;
        };
        if let Err(err) = check_value(arg, value) {
            rejected.push(Unparsable {
                path: path.to_vec(),
                arg_id: arg.get_id().to_string(),
                flag: arg
                    .get_long()
                    .map_or_else(|| arg.get_id().to_string(), |long| format!("--{long}")),
                variable: arg.get_env().unwrap_or_default().to_string_lossy().into_owned(),
                value: (!arg.is_hide_env_values_set()).then(|| value.to_string_lossy().into_owned()),
                reason: reason(&err),
            });
        }
    }
    let refused: Vec<String> = rejected[first_rejected..]
        .iter()
        .map(|unparsable| unparsable.arg_id.clone())
        .collect();
    let mut command = command.mut_args(|arg| {
        let Some(value) = arg.get_env().and_then(|variable| env.get(variable)).cloned() else {
            return arg.env(Resettable::Reset);
        };
        // A required flag is satisfied by its variable, as clap's `env` would have it.
        let arg = arg.env(Resettable::Reset).required(false);
        if refused.iter().any(|id| arg.get_id() == id.as_str()) {
            return arg;
        }
        arg.default_value(value)
    });
    let names: Vec<String> = command
        .get_subcommands()
        .map(|subcommand| subcommand.get_name().to_owned())
        .collect();
    for name in names {
        let mut sub_path = path.to_vec();
        sub_path.push(name.clone());
        command = command.mut_subcommand(&name, |subcommand| {
            env_as_defaults(subcommand, env, &sub_path, rejected)
        });
    }
    command
}

/// Runs `value` through the flag's own parser (ranges, value enums, durations, sizes).
fn check_value(arg: &Arg, value: &OsStr) -> Result<(), clap::Error> {
    let probe = arg
        .clone()
        .env(Resettable::Reset)
        .global(false)
        .required(false)
        .default_value(value.to_owned());
    Command::new("env").arg(probe).try_get_matches_from(["env"]).map(drop)
}

/// Why a parser refused a value, without clap's framing.
fn reason(err: &clap::Error) -> String {
    if let Some(source) = std::error::Error::source(err) {
        return source.to_string();
    }
    if let Some(ContextValue::Strings(valid)) = err.get(ContextKind::ValidValue) {
        return format!("expected one of {}", valid.join(", "));
    }
    err.kind().as_str().unwrap_or("invalid value").to_owned()
}

fn shows_help(err: &clap::Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    )
}

// The shared groups' fields are named for what they hold (`config.nats.url`), so each flag spells
// out its command-line name on a first `#[arg]`, its variable and default on a second.

/// The NATS connection: `--nats-url`, `--nats-connect-wait`, TLS (`--nats-tls-*`), one way to
/// authenticate (user and password, token, NKey seed or a creds file) and the inbox prefix the
/// server permissions name. Secrets can come from files so that they never appear on a command
/// line; [`NatsArgs::security`] reads them and refuses two ways to authenticate at once.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL (comma-separate several for a cluster). A `tls://` URL requires TLS.
    #[arg(long = "nats-url", value_name = "NATS_URL")]
    #[arg(env = "CHUTE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub url: String,

    /// How long to keep trying to reach NATS at start before giving up with an error.
    #[arg(long = "nats-connect-wait", value_name = "NATS_CONNECT_WAIT")]
    #[arg(env = "CHUTE_NATS_CONNECT_WAIT", default_value = "10s", value_parser = parse_duration)]
    pub connect_wait: Duration,

    /// CA certificate (PEM) that signed the NATS server's certificate; setting it requires TLS.
    #[arg(id = "nats_tls_ca", long = "nats-tls-ca", value_name = "NATS_TLS_CA")]
    #[arg(env = "CHUTE_NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS with NATS (with `--nats-tls-key`).
    #[arg(id = "nats_tls_cert", long = "nats-tls-cert", value_name = "NATS_TLS_CERT")]
    #[arg(env = "CHUTE_NATS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of `--nats-tls-cert`.
    #[arg(id = "nats_tls_key", long = "nats-tls-key", value_name = "NATS_TLS_KEY")]
    #[arg(env = "CHUTE_NATS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// NATS user (with `--nats-password` or `--nats-password-file`).
    #[arg(id = "nats_user", long = "nats-user", value_name = "NATS_USER")]
    #[arg(env = "CHUTE_NATS_USER")]
    pub user: Option<String>,

    /// Password of `--nats-user`.
    #[arg(id = "nats_password", long = "nats-password", value_name = "NATS_PASSWORD")]
    #[arg(env = "CHUTE_NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// File holding the password of `--nats-user` (one trailing newline is ignored).
    #[arg(
        id = "nats_password_file",
        long = "nats-password-file",
        value_name = "NATS_PASSWORD_FILE"
    )]
    #[arg(env = "CHUTE_NATS_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,

    /// NATS authentication token.
    #[arg(id = "nats_token", long = "nats-token", value_name = "NATS_TOKEN")]
    #[arg(env = "CHUTE_NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File holding the NATS authentication token.
    #[arg(id = "nats_token_file", long = "nats-token-file", value_name = "NATS_TOKEN_FILE")]
    #[arg(env = "CHUTE_NATS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// File holding an NKey seed (`SU...`, made by `nk -gen user`).
    #[arg(
        id = "nats_nkey_seed_file",
        long = "nats-nkey-seed-file",
        value_name = "NATS_NKEY_SEED_FILE"
    )]
    #[arg(env = "CHUTE_NATS_NKEY_SEED_FILE")]
    pub nkey_seed_file: Option<PathBuf>,

    /// NATS credentials file (a user JWT and its NKey seed, as `nsc` writes them).
    #[arg(id = "nats_creds", long = "nats-creds", value_name = "NATS_CREDS")]
    #[arg(env = "CHUTE_NATS_CREDS")]
    pub creds: Option<PathBuf>,

    /// Prefix of the reply subjects this client subscribes to (JetStream API replies, PubAcks,
    /// pulled messages). Give each service its own (`_INBOX_ingestor`) and allow only that one
    /// in its subscribe permissions, so no service can read another's replies.
    #[arg(
        id = "nats_inbox_prefix",
        long = "nats-inbox-prefix",
        value_name = "NATS_INBOX_PREFIX"
    )]
    #[arg(env = "CHUTE_NATS_INBOX_PREFIX", default_value = "_INBOX")]
    pub inbox_prefix: String,
}

impl NatsArgs {
    /// The server at `url`, with the default connect wait.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// TLS, authentication and inbox prefix, with the secrets read from their files. Fails when
    /// a file is unreadable or the flags ask for two ways to authenticate (or half of one).
    pub fn security(&self) -> crate::Result<crate::stream::NatsSecurity> {
        use crate::stream::NatsAuth;
        let fail = |reason: String| crate::Error::NatsConnect {
            url: self.url.clone(),
            reason,
        };
        let password = nats_secret("--nats-password", &self.password, &self.password_file).map_err(fail)?;
        let token = nats_secret("--nats-token", &self.token, &self.token_file).map_err(fail)?;
        let nkey_seed = read_nats_secret(&self.nkey_seed_file).map_err(fail)?;
        let creds = read_nats_secret(&self.creds).map_err(fail)?;
        let mut methods = Vec::new();
        match (&self.user, password) {
            (Some(user), Some(password)) => methods.push((
                "--nats-user",
                NatsAuth::UserPassword {
                    user: user.clone(),
                    password,
                },
            )),
            (None, None) => {}
            (Some(_), None) => return Err(fail("--nats-user needs --nats-password or --nats-password-file".into())),
            (None, Some(_)) => return Err(fail("a NATS password needs --nats-user".into())),
        }
        if let Some(token) = token {
            methods.push(("--nats-token", NatsAuth::Token(token)));
        }
        if let Some(seed) = nkey_seed {
            methods.push(("--nats-nkey-seed-file", NatsAuth::NKey(seed)));
        }
        if let Some(creds) = creds {
            methods.push(("--nats-creds", NatsAuth::Creds(creds)));
        }
        if methods.len() > 1 {
            let flags: Vec<&str> = methods.iter().map(|(flag, _)| *flag).collect();
            return Err(fail(format!("more than one way to authenticate: {}", flags.join(", "))));
        }
        let client_certificate = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => return Err(fail("--nats-tls-cert and --nats-tls-key go together".into())),
        };
        if self.inbox_prefix.is_empty() || self.inbox_prefix.contains(['*', '>', ' ']) {
            return Err(fail(format!("invalid --nats-inbox-prefix {:?}", self.inbox_prefix)));
        }
        Ok(crate::stream::NatsSecurity {
            auth: methods.pop().map(|(_, auth)| auth),
            tls_ca: self.tls_ca.clone(),
            client_certificate,
            inbox_prefix: self.inbox_prefix.clone(),
        })
    }

    /// Connects as `client_name` (how the server lists the connection), retrying for the
    /// connect wait.
    pub async fn connect(&self, client_name: &str) -> crate::Result<async_nats::Client> {
        let security = self.security()?;
        crate::stream::connect(&self.url, client_name, self.connect_wait, &security).await
    }
}

/// A secret given inline or by file (not both).
fn nats_secret(flag: &str, inline: &Option<String>, file: &Option<PathBuf>) -> Result<Option<String>, String> {
    match (inline, read_nats_secret(file)?) {
        (Some(_), Some(_)) => Err(format!("{flag} and {flag}-file both given")),
        (Some(value), None) => Ok(Some(value.clone())),
        (None, from_file) => Ok(from_file),
    }
}

/// The content of a secret file without its trailing newline; an empty file is an error.
fn read_nats_secret(path: &Option<PathBuf>) -> Result<Option<String>, String> {
    let Some(path) = path else {
        return Ok(None);
    };
    let content = std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let content = content.strip_suffix('\n').unwrap_or(&content);
    let content = content.strip_suffix('\r').unwrap_or(content);
    if content.trim().is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Some(content.to_owned()))
}

impl Default for NatsArgs {
    fn default() -> Self {
        group_defaults()
    }
}

/// The API keys the ingestor and the query API enforce: `--api-keys-file`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ApiKeysArgs {
    /// API keys file (`<tenant> <key>` per line). When set, every API call needs
    /// `authorization: Bearer <key>` and may only send or read events of the key's tenant.
    #[arg(long = "api-keys-file", value_name = "API_KEYS_FILE")]
    #[arg(env = "CHUTE_API_KEYS_FILE")]
    pub file: Option<PathBuf>,
}

/// The ClickHouse database and who to reach it as: `--clickhouse-database`, `--clickhouse-user`,
/// `--clickhouse-password` (or `--clickhouse-password-file`), and `--clickhouse-ca` for `https://`
/// URLs (the aggregator and the loadtest; the URL flag is each one's own, as the loadtest's falls
/// back to the endpoints file).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ClickHouseLoginArgs {
    /// ClickHouse database holding the Chute tables.
    #[arg(long = "clickhouse-database", value_name = "CLICKHOUSE_DATABASE")]
    #[arg(env = "CHUTE_CLICKHOUSE_DATABASE", default_value = "chute")]
    pub database: String,

    /// ClickHouse user.
    #[arg(long = "clickhouse-user", value_name = "CLICKHOUSE_USER")]
    #[arg(env = "CHUTE_CLICKHOUSE_USER", default_value = "default")]
    pub user: String,

    /// ClickHouse password.
    #[arg(long = "clickhouse-password", value_name = "CLICKHOUSE_PASSWORD")]
    #[arg(env = "CHUTE_CLICKHOUSE_PASSWORD", default_value = "", hide_env_values = true)]
    pub password: String,

    /// File holding the ClickHouse password (e.g. a mounted Secret; surrounding whitespace is
    /// dropped); takes precedence over `--clickhouse-password`.
    #[arg(long = "clickhouse-password-file", value_name = "CLICKHOUSE_PASSWORD_FILE")]
    #[arg(env = "CHUTE_CLICKHOUSE_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,

    /// PEM file of the CA certificate(s) that sign ClickHouse's HTTPS certificate (`https://`
    /// URLs); without it the system's trusted roots are used.
    #[arg(long = "clickhouse-ca", value_name = "CLICKHOUSE_CA")]
    #[arg(env = "CHUTE_CLICKHOUSE_CA")]
    pub ca: Option<PathBuf>,
}

impl ClickHouseLoginArgs {
    /// `database`, with the default user and password.
    pub fn for_database(database: impl Into<String>) -> Self {
        Self {
            database: database.into(),
            ..Self::default()
        }
    }

    /// The password: the password file's content when one is set, else `--clickhouse-password`.
    pub fn resolve_password(&self) -> std::io::Result<String> {
        read_secret(self.password_file.as_deref(), &self.password)
    }
}

/// A text file an operator supplies (API keys, pricing, rules), read whole, with its path as error
/// messages show it.
#[derive(Debug)]
pub struct ConfigFile {
    /// `path.display()`, for the errors that name the file.
    pub path: String,
    pub text: String,
}

impl ConfigFile {
    /// Reads `path`; a failure comes with the path as shown, so the caller's error can name it.
    pub fn read(path: &std::path::Path) -> Result<Self, (String, std::io::Error)> {
        let shown = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self { path: shown, text }),
            Err(source) => Err((shown, source)),
        }
    }
}

/// A secret given inline or as a file (a mounted Secret): the file's content without surrounding
/// whitespace when `file` is set, else `inline`. The error names the file.
pub fn read_secret(file: Option<&std::path::Path>, inline: &str) -> std::io::Result<String> {
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|text| text.trim().to_owned())
            .map_err(|err| std::io::Error::new(err.kind(), format!("read {}: {err}", path.display()))),
        None => Ok(inline.to_owned()),
    }
}

impl Default for ClickHouseLoginArgs {
    fn default() -> Self {
        group_defaults()
    }
}

/// Logging: `--log`, `--log-format`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// Log filter (tracing EnvFilter syntax, e.g. `info,chute=debug` for every Chute crate).
    #[arg(long = "log", value_name = "LOG")]
    #[arg(env = "CHUTE_LOG", default_value = "info")]
    pub filter: String,

    /// Log format: text or json.
    #[arg(long = "log-format", value_name = "LOG_FORMAT")]
    #[arg(env = "CHUTE_LOG_FORMAT", default_value = "text")]
    pub format: LogFormat,
}

impl LogArgs {
    /// Installs the process's tracing subscriber with this filter and format.
    pub fn init_tracing(&self) {
        crate::telemetry::init_tracing(&self.filter, self.format);
    }
}

impl Default for LogArgs {
    fn default() -> Self {
        group_defaults()
    }
}

/// The flag group `A` with its documented defaults, whatever the process environment holds.
fn group_defaults<A: clap::Args>() -> A {
    let command = env_as_defaults(
        A::augment_args(Command::new("defaults")),
        &HashMap::new(),
        &[],
        &mut Vec::new(),
    );
    let parsed = command
        .try_get_matches_from(["defaults"])
        .and_then(|mut matches| A::from_arg_matches_mut(&mut matches));
    parsed.expect("the documented defaults parse")
}

/// `500ms`, `10s`, `5m`, `7d`, `1h 30m` (humantime syntax).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value.trim())
        .map_err(|err| format!("invalid duration {value:?}: {err} (e.g. 500ms, 10s, 5m, 7d)"))
}

/// A byte size: a plain number of bytes or a number with KiB, MiB, GiB (or KB, MB, GB).
pub fn parse_bytes(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {value:?} (e.g. 524288, 512KiB, 8MiB)"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("invalid size unit {other:?} in {value:?} (use KiB, MiB, GiB)")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {value:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes the services use: global flags, a subcommand with its own variable, value
    /// parsers with ranges, durations and sizes, an optional flag and a hidden value.
    #[derive(Debug, clap::Parser)]
    #[command(name = "probe")]
    struct Probe {
        #[arg(long, env = "CHUTE_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024), global = true)]
        partitions: u32,
        #[arg(long, env = "CHUTE_BATCH_LINGER", default_value = "200ms", value_parser = parse_duration, global = true)]
        batch_linger: Duration,
        #[arg(long, env = "CHUTE_BATCH_MAX_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
        batch_max_bytes: u64,
        #[arg(long, env = "CHUTE_INSTANCE_ID")]
        instance_id: Option<String>,
        #[arg(long, env = "CHUTE_PROBE_SECRET_PIN", hide_env_values = true)]
        secret_pin: Option<u16>,
        #[command(subcommand)]
        command: Option<ProbeCommand>,
    }

    #[derive(Debug, PartialEq, clap::Subcommand)]
    enum ProbeCommand {
        Migrate {
            #[arg(long, env = "CHUTE_CLICKHOUSE_CLUSTER")]
            cluster: Option<String>,
            #[arg(long, env = "CHUTE_PROBE_LIMIT")]
            limit: Option<u8>,
        },
        List,
    }

    fn probe(args: &[&str], env: &[(&str, &str)]) -> Result<Probe, clap::Error> {
        load_str(args, env)
    }

    /// A config made of the shared groups, behind the aggregator's and the router's command line
    /// shape ([`ServiceCli`]: every flag global).
    #[derive(Debug, clap::Args)]
    struct Groups {
        #[command(flatten)]
        nats: NatsArgs,
        #[command(flatten)]
        api_keys: ApiKeysArgs,
        #[command(flatten)]
        clickhouse_login: ClickHouseLoginArgs,
        #[command(flatten)]
        log: LogArgs,
    }

    type Grouped = ServiceCli<Groups, ProbeCommand>;

    impl ServiceCommand for ProbeCommand {
        const NAME: &'static str = "grouped";
        const ABOUT: &'static str = "Chute probe: the shared flag groups";
    }

    #[test]
    fn no_environment_gives_the_documented_defaults() {
        let config = probe(&[], &[]).unwrap();
        assert_eq!(config.partitions, 16);
        assert_eq!(config.batch_linger, Duration::from_millis(200));
        assert_eq!(config.batch_max_bytes, 64 << 20);
        assert_eq!(config.instance_id, None);
        assert_eq!(config.command, None);
        assert_eq!(defaults::<Probe>().partitions, 16);
    }

    #[test]
    fn given_variables_are_applied_through_the_flags_parsers() {
        let env = [
            ("CHUTE_PARTITIONS", "8"),
            ("CHUTE_BATCH_LINGER", "1s"),
            ("CHUTE_BATCH_MAX_BYTES", "1MiB"),
            ("CHUTE_INSTANCE_ID", "agg-1"),
        ];
        let config = probe(&[], &env).unwrap();
        assert_eq!(config.partitions, 8);
        assert_eq!(config.batch_linger, Duration::from_secs(1));
        assert_eq!(config.batch_max_bytes, 1 << 20);
        assert_eq!(config.instance_id.as_deref(), Some("agg-1"));
        // Owned pairs, as `std::env::vars()` yields them, work the same.
        let owned = env.map(|(name, value)| (name.to_owned(), value.to_owned()));
        assert_eq!(load::<Probe, _, _, _, _, _>(["probe"], owned).unwrap().partitions, 8);
    }

    #[test]
    fn a_flag_beats_its_variable() {
        let env = [("CHUTE_PARTITIONS", "8"), ("CHUTE_BATCH_MAX_BYTES", "1MiB")];
        let config = probe(&["--partitions", "4"], &env).unwrap();
        assert_eq!(config.partitions, 4);
        assert_eq!(config.batch_max_bytes, 1 << 20);
        // Global flags: the variable reaches a subcommand, and a flag after the subcommand wins.
        assert_eq!(probe(&["migrate"], &env).unwrap().partitions, 8);
        assert_eq!(probe(&["migrate", "--partitions", "2"], &env).unwrap().partitions, 2);
    }

    #[test]
    fn subcommand_flags_read_their_variables() {
        let env = [("CHUTE_CLICKHOUSE_CLUSTER", "main"), ("CHUTE_PROBE_LIMIT", "7")];
        let config = probe(&["migrate"], &env).unwrap();
        let expected = ProbeCommand::Migrate {
            cluster: Some("main".to_owned()),
            limit: Some(7),
        };
        assert_eq!(config.command, Some(expected));
        assert_eq!(probe(&["list"], &env).unwrap().command, Some(ProbeCommand::List));
    }

    #[test]
    fn shared_groups_have_the_documented_defaults() {
        let grouped: Grouped = load_str(&[], &[]).unwrap();
        assert_eq!(grouped.command, None, "no subcommand: run the service");
        assert_eq!(grouped.config.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(grouped.config.nats.connect_wait, Duration::from_secs(10));
        assert_eq!(grouped.config.nats, NatsArgs::default());
        assert_eq!(
            NatsArgs::with_url("nats://b:4222").connect_wait,
            Duration::from_secs(10)
        );
        assert_eq!(grouped.config.api_keys, ApiKeysArgs::default());
        assert_eq!(grouped.config.log.filter, "info");
        assert_eq!(grouped.config.log, LogArgs::default());
        assert_eq!(grouped.config.clickhouse_login.user, "default");
        assert_eq!(
            grouped.config.clickhouse_login,
            ClickHouseLoginArgs::for_database("chute")
        );
    }

    #[test]
    fn a_service_cli_is_named_and_described_by_its_command() {
        let command = <Grouped as clap::CommandFactory>::command();
        assert_eq!(command.get_name(), "grouped");
        assert_eq!(
            command.get_about().map(ToString::to_string).as_deref(),
            Some("Chute probe: the shared flag groups")
        );
        let help = load_str::<Grouped>(&["--help"], &[]).unwrap_err().to_string();
        assert!(help.contains("Usage: grouped [OPTIONS] [COMMAND]"), "{help}");
    }

    #[test]
    fn shared_groups_read_their_flags_and_variables_also_after_a_subcommand() {
        let env = [
            ("CHUTE_NATS_CONNECT_WAIT", "1s"),
            ("CHUTE_API_KEYS_FILE", "/etc/chute/keys"),
            ("CHUTE_LOG_FORMAT", "json"),
        ];
        let args = ["list", "--nats-url", "nats://a:4222", "--log", "debug"];
        let grouped: Grouped = load_str(&args, &env).unwrap();
        assert_eq!(grouped.command, Some(ProbeCommand::List));
        let nats = NatsArgs {
            url: "nats://a:4222".to_owned(),
            connect_wait: Duration::from_secs(1),
            ..NatsArgs::default()
        };
        assert_eq!(grouped.config.nats, nats);
        assert_eq!(grouped.config.api_keys.file, Some(PathBuf::from("/etc/chute/keys")));
        let log = LogArgs {
            filter: "debug".to_owned(),
            format: LogFormat::Json,
        };
        assert_eq!(grouped.config.log, log);
    }

    #[test]
    fn nats_security_reads_secrets_from_files_and_variables() {
        use crate::stream::NatsAuth;
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, "s3cret\n").unwrap();
        let password_file = password_file.to_str().unwrap();
        let env = [
            ("CHUTE_NATS_USER", "ingestor"),
            ("CHUTE_NATS_PASSWORD_FILE", password_file),
        ];
        let grouped: Grouped = load_str(&[], &env).unwrap();
        let security = grouped.config.nats.security().unwrap();
        let expected = NatsAuth::UserPassword {
            user: "ingestor".into(),
            password: "s3cret".into(),
        };
        assert_eq!(security.auth, Some(expected));
        assert_eq!(security.inbox_prefix, "_INBOX");
        // The secret never shows in Debug output.
        assert!(!format!("{security:?}").contains("s3cret"), "{security:?}");

        let env = [
            ("CHUTE_NATS_TOKEN", "t0ken"),
            ("CHUTE_NATS_INBOX_PREFIX", "_INBOX_query"),
        ];
        let tls = [
            "--nats-tls-ca",
            "/ca.pem",
            "--nats-tls-cert",
            "/c.pem",
            "--nats-tls-key",
            "/k.pem",
        ];
        let grouped: Grouped = load_str(&tls, &env).unwrap();
        let security = grouped.config.nats.security().unwrap();
        assert_eq!(security.auth, Some(NatsAuth::Token("t0ken".into())));
        assert_eq!(security.inbox_prefix, "_INBOX_query");
        assert_eq!(security.tls_ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            security.client_certificate,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        assert_eq!(
            NatsArgs::default().security().unwrap(),
            crate::stream::NatsSecurity::default()
        );
    }

    #[test]
    fn nats_security_refuses_ambiguous_or_half_given_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::write(&seed, "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU\n").unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let seed = seed.to_str().unwrap();
        let cases: &[(&[&str], &str)] = &[
            (
                &["--nats-token", "t", "--nats-nkey-seed-file", seed],
                "more than one way",
            ),
            (&["--nats-token", "t", "--nats-token-file", seed], "both given"),
            (&["--nats-user", "u"], "needs --nats-password"),
            (&["--nats-password", "p"], "needs --nats-user"),
            (&["--nats-tls-cert", "/c.pem"], "go together"),
            (&["--nats-creds", "/does/not/exist"], "cannot read /does/not/exist"),
            (&["--nats-token-file", empty.to_str().unwrap()], "is empty"),
            (&["--nats-inbox-prefix", "_INBOX.>"], "invalid --nats-inbox-prefix"),
        ];
        for (args, reason) in cases {
            let grouped: Grouped = load_str(args, &[]).unwrap();
            let err = grouped.config.nats.security().unwrap_err().to_string();
            assert!(err.contains(reason), "{args:?}: {err}");
        }
        let grouped: Grouped = load_str(&["--nats-nkey-seed-file", seed], &[]).unwrap();
        assert!(matches!(
            grouped.config.nats.security().unwrap().auth,
            Some(crate::stream::NatsAuth::NKey(seed)) if seed.starts_with("SU") && !seed.ends_with('\n')
        ));
    }

    #[test]
    fn unknown_variables_are_ignored() {
        let env = [
            ("CHUTE_NOT_A_FLAG", "x"),
            ("PATH", "/bin"),
            ("partitions", "3"),
            ("PARTITIONS", "3"),
        ];
        assert_eq!(probe(&[], &env).unwrap().partitions, 16);
    }

    #[test]
    fn an_unparsable_variable_is_an_error_naming_it() {
        for (value, reason) in [("abc", "invalid digit"), ("0", "not in 1..=1024")] {
            let err = probe(&[], &[("CHUTE_PARTITIONS", value)]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidValue);
            let message = err.to_string();
            assert!(message.contains("CHUTE_PARTITIONS"), "{message}");
            assert!(message.contains(&format!("'{value}'")), "{message}");
            assert!(message.contains("--partitions"), "{message}");
            assert!(message.contains(reason), "{message}");
        }
        let err = probe(&["migrate"], &[("CHUTE_BATCH_LINGER", "soon")]).unwrap_err();
        assert!(err.to_string().contains("CHUTE_BATCH_LINGER"), "{err}");
        assert!(err.to_string().contains("invalid duration"), "{err}");
        let err = probe(&["migrate"], &[("CHUTE_PROBE_LIMIT", "many")]).unwrap_err();
        assert!(err.to_string().contains("CHUTE_PROBE_LIMIT"), "{err}");
        // A hidden value stays hidden in the error.
        let err = probe(&[], &[("CHUTE_PROBE_SECRET_PIN", "hunter2")]).unwrap_err();
        assert!(err.to_string().contains("CHUTE_PROBE_SECRET_PIN"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn an_unparsable_variable_that_is_not_used_is_no_error() {
        // Overridden by its flag, as with clap's own `env`.
        let config = probe(&["--partitions", "3"], &[("CHUTE_PARTITIONS", "abc")]).unwrap();
        assert_eq!(config.partitions, 3);
        // Declared by a subcommand that was not chosen.
        assert!(probe(&["list"], &[("CHUTE_PROBE_LIMIT", "many")]).is_ok());
    }

    #[test]
    fn command_line_errors_are_clap_errors() {
        let err = probe(&["--partitions", "abc"], &[("CHUTE_PARTITIONS", "8")]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(!err.to_string().contains("CHUTE_PARTITIONS"), "{err}");
        assert_eq!(probe(&["--bogus"], &[]).unwrap_err().kind(), ErrorKind::UnknownArgument);
    }

    #[test]
    fn help_shows_the_declared_variables_and_defaults() {
        let err = probe(&["--help"], &[("CHUTE_PARTITIONS", "8")]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DisplayHelp);
        let help = err.to_string();
        assert!(help.contains("[env: CHUTE_PARTITIONS"), "{help}");
        assert!(help.contains("[default: 16]"), "{help}");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "lacks the CHUTE_ prefix")]
    fn a_variable_without_the_prefix_is_a_bug() {
        #[derive(Debug, clap::Parser)]
        struct Leaky {
            #[arg(long, env = "RUST_LOG")]
            log: Option<String>,
        }
        let _ = defaults::<Leaky>();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("soon").unwrap_err().contains("invalid duration"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_bytes("8MiB"), Ok(8 << 20));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("").is_err());
    }
}
