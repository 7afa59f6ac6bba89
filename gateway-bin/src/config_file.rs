//! The configuration file (`--config`, TOML) merged with the environment and the command
//! line. Its keys are derived from the clap arguments of [`Cli`] (the long flag with `_` for
//! `-`), so an option added to `Cli` is a file key with no code here. Precedence: a flag
//! beats its environment variable, which beats the file, which beats the default.
//!
//! How: the command line and the environment are parsed once, and clap says where each
//! value came from (`ArgMatches::value_source`); every file key whose option was not given
//! on the command line or in the environment becomes a `--flag=value` argument placed in
//! front of the real ones, and the whole is parsed again. Clap thus checks each file value
//! exactly as it checks a flag, and `Cli::validate` runs on the result as at start-up.
//! Secrets (the options with `hide_env_values`) never appear in a message.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::config::{Cli, Command};

/// Clap arguments that are not file keys: what they do makes no sense in a file.
const NOT_KEYS: &[&str] = &["help", "version", "config"];

/// Largest configuration file read, in bytes (a configuration is a few kilobytes).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// A configuration as start-up uses it, and its values for telling what a reload changed.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub cli: Cli,
    /// Every option's value as given (flag, environment, file or default), by key; a
    /// secret's value is replaced by a fingerprint that only says whether it changed.
    pub values: BTreeMap<String, Vec<String>>,
}

/// Why a configuration was not loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The command line itself (or `--help`, `--version`): clap prints it and exits.
    CommandLine(clap::Error),
    /// A bad file, key, value or combination; the message names the key or option.
    Invalid(anyhow::Error),
}

impl From<anyhow::Error> for LoadError {
    fn from(e: anyhow::Error) -> Self {
        LoadError::Invalid(e)
    }
}

/// The file keys: every clap argument of [`Cli`] but `help`, `version` and `config`.
pub fn keys(cmd: &clap::Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| !NOT_KEYS.contains(&a.get_id().as_str()) && !a.is_positional())
}

/// Whether an option holds a secret: its value is never shown (`hide_env_values` marks it).
pub fn is_secret(arg: &Arg) -> bool {
    arg.is_hide_env_values_set() || arg.get_id().as_str().ends_with("secret")
}

/// Parses `args` (the command line, program name first), the environment and the file
/// named by `--config` or `check-config FILE`; loads the secret files; validates.
pub fn load(args: &[OsString]) -> Result<Loaded, LoadError> {
    let cmd = Cli::command();
    let first = cmd.clone().try_get_matches_from(args).map_err(LoadError::CommandLine)?;
    let path = match first.subcommand() {
        Some(("check-config", sub)) => sub.get_one::<PathBuf>("file").cloned(),
        _ => first.get_one::<PathBuf>("config").cloned(),
    };
    let mut merged: Vec<OsString> = args.iter().take(1).cloned().collect();
    // The keys whose value the file gives (the others are set by a flag or variable).
    let mut from_file = Vec::new();
    if let Some(path) = &path {
        let table = read_table(path)?;
        let (file, keys) = file_args(&cmd, &first, &table).with_context(|| at(path))?;
        merged.extend(file);
        from_file = keys;
    }
    merged.extend(args.iter().skip(1).cloned());
    let matches = cmd
        .clone()
        .try_get_matches_from(&merged)
        .map_err(|e| LoadError::Invalid(file_value_error(&cmd, &e, path.as_deref())))?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(|e| LoadError::Invalid(anyhow!(e)))?;
    if let Err(e) = cli.load_secret_files().and_then(|()| cli.validate()) {
        // The checks name options (`--max-connections`); say which came from the file.
        let message = format!("{e:#}");
        let named: Vec<String> = from_file
            .iter()
            .filter(|key| mentions(&message, &format!("--{}", key.replace('_', "-"))))
            .map(|key| format!("`{key}`"))
            .collect();
        return Err(match (&path, named.is_empty()) {
            (Some(path), false) => {
                anyhow!("{message} (set by key {} of {})", named.join(", "), at(path))
            }
            _ => e,
        }
        .into());
    }
    let values = values(&cmd, &matches, &cli);
    Ok(Loaded { cli, values })
}

fn at(path: &Path) -> String {
    format!("configuration file {}", path.display())
}

/// The file as a TOML table. A syntax error is reported by line and column with the
/// parser's message, never with the line itself (it may hold a secret).
fn read_table(path: &Path) -> Result<toml::Table> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", at(path)))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_FILE_BYTES + 1), &mut text)
        .with_context(|| format!("cannot read {} (UTF-8 text)", at(path)))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        bail!("{} is larger than {MAX_FILE_BYTES} bytes", at(path));
    }
    text.parse::<toml::Table>().map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => line_column(&text, span.start),
            None => (0, 0),
        };
        anyhow!("{}: line {line}, column {column}: {}", at(path), e.message().trim_end())
    })
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The file's keys as `--flag=value` arguments, skipping those the command line or the
/// environment set. Unknown keys and values of the wrong TOML type are refused by key.
fn file_args(
    cmd: &clap::Command,
    first: &ArgMatches,
    table: &toml::Table,
) -> Result<(Vec<OsString>, Vec<String>)> {
    let mut out = Vec::new();
    let mut applied = Vec::new();
    for (key, value) in table {
        let Some(arg) = keys(cmd).find(|a| a.get_id().as_str() == key) else {
            let hint = closest(key, keys(cmd).map(|a| a.get_id().as_str()))
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            bail!("unknown key `{key}`{hint}");
        };
        if matches!(
            first.value_source(key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        applied.push(key.clone());
        let long = arg.get_long().unwrap_or(key);
        let kind = ValueKind::of(arg);
        let wrong = || anyhow!("key `{key}`: expected {}", kind.describe(is_list(arg)));
        let elements: Vec<&toml::Value> = match value {
            toml::Value::Array(items) if is_list(arg) => items.iter().collect(),
            toml::Value::Array(_) => return Err(wrong()),
            v => vec![v],
        };
        for element in elements {
            match kind.scalar(element) {
                Some(Scalar::Flag(true)) => out.push(OsString::from(format!("--{long}"))),
                Some(Scalar::Flag(false)) => {}
                Some(Scalar::Value(text)) => out.push(OsString::from(format!("--{long}={text}"))),
                None => return Err(wrong()),
            }
        }
    }
    Ok((out, applied))
}

/// Whether `message` names the option `flag` (`--max-in-flight`, not as the start of
/// `--max-in-flight-total`).
fn mentions(message: &str, flag: &str) -> bool {
    message.match_indices(flag).any(|(at, _)| {
        let next = message[at + flag.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// A file value as clap takes it: a flag given or not, or a value.
enum Scalar {
    Flag(bool),
    Value(String),
}

/// What an option takes, from its clap metadata (for type checks and the documentation).
pub enum ValueKind {
    /// A flag without a value (`ArgAction::SetTrue`): `true` or `false` in the file.
    Flag,
    Bool,
    Integer,
    /// One of these words.
    Enum(Vec<String>),
    Address,
    Path,
    Text,
}

impl ValueKind {
    pub fn of(arg: &Arg) -> ValueKind {
        if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
            return ValueKind::Flag;
        }
        let parser = arg.get_value_parser();
        let id = parser.type_id();
        let is = |t: TypeId| id == t;
        if is(TypeId::of::<bool>()) {
            ValueKind::Bool
        } else if [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
        ]
        .into_iter()
        .any(is)
        {
            ValueKind::Integer
        } else if is(TypeId::of::<SocketAddr>()) {
            ValueKind::Address
        } else if is(TypeId::of::<PathBuf>()) {
            ValueKind::Path
        } else if let Some(values) = parser.possible_values() {
            ValueKind::Enum(
                values.filter(|v| !v.is_hide_set()).map(|v| v.get_name().to_owned()).collect(),
            )
        } else {
            ValueKind::Text
        }
    }

    /// The TOML type a value of this kind has, in words.
    pub fn describe(&self, list: bool) -> String {
        let one = match self {
            ValueKind::Flag | ValueKind::Bool => "a boolean".to_owned(),
            ValueKind::Integer => "an integer".to_owned(),
            ValueKind::Enum(words) => format!(
                "one of {}",
                words.iter().map(|w| format!("\"{w}\"")).collect::<Vec<_>>().join(", ")
            ),
            ValueKind::Address => "a string (address:port)".to_owned(),
            ValueKind::Path => "a string (file path)".to_owned(),
            ValueKind::Text => "a string".to_owned(),
        };
        if !list {
            return one;
        }
        let each = match self {
            ValueKind::Flag | ValueKind::Bool => "booleans",
            ValueKind::Integer => "integers",
            ValueKind::Enum(_) => return format!("an array, each element {one}"),
            ValueKind::Address => "strings (address:port)",
            ValueKind::Path => "strings (file paths)",
            ValueKind::Text => "strings",
        };
        format!("an array of {each}")
    }

    /// `value` as clap takes it, or `None` when it has the wrong TOML type.
    fn scalar(&self, value: &toml::Value) -> Option<Scalar> {
        use toml::Value as V;
        match (self, value) {
            (ValueKind::Flag, V::Boolean(b)) => Some(Scalar::Flag(*b)),
            (ValueKind::Bool, V::Boolean(b)) => Some(Scalar::Value(b.to_string())),
            (ValueKind::Integer, V::Integer(i)) => Some(Scalar::Value(i.to_string())),
            (
                ValueKind::Enum(_) | ValueKind::Address | ValueKind::Path | ValueKind::Text,
                V::String(s),
            ) => Some(Scalar::Value(s.clone())),
            _ => None,
        }
    }
}

/// Whether an option takes several values (an array in the file).
pub fn is_list(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

/// Clap's refusal of the merged arguments, as a message naming the file key. Values from
/// the command line and the environment were checked by the first parse, so a value clap
/// refuses here came from the file. A secret's message says which key, never the value.
fn file_value_error(cmd: &clap::Command, e: &clap::Error, path: Option<&Path>) -> anyhow::Error {
    use clap::error::{ContextKind, ContextValue};
    let invalid = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let arg = invalid.as_deref().and_then(|flag| {
        let long = flag.trim_start_matches("--").split([' ', '=']).next().unwrap_or_default();
        keys(cmd).find(|a| a.get_long() == Some(long))
    });
    let place = path.map(at).unwrap_or_else(|| "configuration".to_owned());
    let Some(arg) = arg else {
        // Not tied to one option (e.g. two that conflict): clap's first line names them.
        return anyhow!("{place}: {}", first_line(e));
    };
    let key = arg.get_id().as_str();
    let expected = ValueKind::of(arg).describe(is_list(arg));
    if is_secret(arg) {
        anyhow!("{place}: key `{key}`: invalid value (expected {expected})")
    } else {
        anyhow!("{place}: key `{key}`: expected {expected}: {}", first_line(e))
    }
}

fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    line.trim_start_matches("error: ").to_owned()
}

/// The known key closest to `key` by edit distance, when close enough to be a typo.
fn closest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over chars (keys are short; quadratic is fine).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Every key's value as given, for telling what a reload changed. Secrets (and the
/// secrets read from files) are fingerprinted: equal fingerprints, same secret; the
/// fingerprint is a keyed hash with a per-process random key, so it reveals nothing.
fn values(cmd: &clap::Command, matches: &ArgMatches, cli: &Cli) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for arg in keys(cmd) {
        let key = arg.get_id().as_str();
        let raw: Vec<String> = matches
            .get_raw(key)
            .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let value = if is_secret(arg) { raw.iter().map(|v| fingerprint(v)).collect() } else { raw };
        out.insert(key.to_owned(), value);
    }
    // A secret file's content can change while its path does not.
    let secret_files = [
        ("jwt_secret_file", cli.jwt_secret_file.as_ref().and(cli.jwt_secret.as_ref())),
        ("amqp_url_file", cli.amqp_url_file.as_ref().and(cli.amqp_url.first())),
    ];
    for (key, secret) in secret_files {
        if let (Some(values), Some(secret)) = (out.get_mut(key), secret) {
            values.push(fingerprint(secret.expose()));
        }
    }
    out
}

fn fingerprint(secret: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    // One random key per process: fingerprints compare within the process only.
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = KEY.get_or_init(Default::default).build_hasher();
    h.write(secret.as_bytes());
    format!("secret#{:016x}", h.finish())
}

/// Whether the parsed command is `config-doc` (it needs no configuration).
pub fn wants_config_doc(args: &[OsString]) -> bool {
    Cli::command()
        .try_get_matches_from(args)
        .ok()
        .and_then(|m| Cli::from_arg_matches(&m).ok())
        .is_some_and(|c| matches!(c.command, Some(Command::ConfigDoc)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    /// A temporary configuration file, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let path = std::env::temp_dir()
                .join(format!("nuropb-config-{}-{name}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            // Best effort: a leftover temp file harms nothing.
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Loads `text` as the configuration file with `flags` on the command line. The
    /// environment of the test process is not cleared, so the tests use keys with no
    /// NUROPB_ variable set in CI.
    fn load_file(name: &str, text: &str, flags: &[&str]) -> Result<Loaded, String> {
        let file = TempFile::new(name, text);
        let mut args: Vec<OsString> = vec!["nuropb-gateway".into()];
        args.extend(flags.iter().map(OsString::from));
        args.push("--config".into());
        args.push(file.0.clone().into());
        load(&args).map_err(|e| match e {
            LoadError::CommandLine(e) => format!("command line: {e}"),
            LoadError::Invalid(e) => format!("{e:#}"),
        })
    }

    #[test]
    fn file_keys_set_options_and_flags_win() {
        let text = "max_connections = 500\nallowed_origins = [\"example.com\", \".example.org\"]\n\
                    cookie_auth = false\nrate_burst = 7\n";
        let loaded = load_file("keys", text, &["--rate-burst", "9"]).unwrap();
        assert_eq!(loaded.cli.max_connections, 500);
        assert_eq!(loaded.cli.allowed_origins, ["example.com", ".example.org"]);
        assert!(!loaded.cli.cookie_auth);
        assert_eq!(loaded.cli.rate_burst, 9, "the flag beats the file");
        assert_eq!(loaded.values["max_connections"], ["500"]);
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        let loaded = load_file("empty", "", &[]).unwrap();
        assert_eq!(loaded.cli.max_connections, 10_000);
    }

    #[test]
    fn bad_files_are_refused_naming_the_key() {
        for (text, expected) in [
            (
                "max_connectons = 5",
                "unknown key `max_connectons` (did you mean `max_connections`?)",
            ),
            ("zzz = 5", "unknown key `zzz`"),
            ("help = true", "unknown key `help`"),
            ("config = \"x.toml\"", "unknown key `config`"),
            ("max_connections = \"5\"", "key `max_connections`: expected an integer"),
            (
                "max_connections = -5",
                "key `max_connections`: expected an integer: invalid value '-5'",
            ),
            ("listen = 8080", "key `listen`: expected a string (address:port)"),
            (
                "listen = \"nowhere\"",
                "key `listen`: expected a string (address:port): invalid value",
            ),
            ("cookie_auth = \"yes\"", "key `cookie_auth`: expected a boolean"),
            ("allowed_origins = [1]", "key `allowed_origins`: expected an array of strings"),
            ("max_connections = [1]", "key `max_connections`: expected an integer"),
            (
                "encryption = \"maybe\"",
                "key `encryption`: expected one of \"off\", \"auto\", \"required\"",
            ),
            ("[section]\nx = 1", "unknown key `section`"),
            (
                "max_connections = 0",
                "--max-connections must be greater than 0 (set by key `max_connections` of",
            ),
            ("max_in_flight_total = 0", "(set by key `max_in_flight_total` of"),
            ("max_connections = ", "line 1, column 19"),
        ] {
            let e = load_file("bad", text, &[]).unwrap_err();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
    }

    #[test]
    fn secrets_never_appear_in_messages() {
        let secret = "s3cr3t-value-that-must-not-leak";
        for text in [
            format!("jwt_secret = \"{secret}\"\njwt_secret_file = \"/nonexistent\""),
            format!("jwt_secret = \"{secret}"),
            format!("jwt_secret = [\"{secret}\"]"),
            format!("amqp_url = \"amqp://u:{secret}@127.0.0.1/x\"\nmax_connections = 0"),
            format!("jwt_secret = \"{secret}\"\njwt_public_key_file = \"/k.pem\""),
        ] {
            let e = load_file("secret", &text, &[]).unwrap_err();
            assert!(!e.contains(secret), "{e}");
        }
        let loaded = load_file("secret-ok", &format!("jwt_secret = \"{secret}\""), &[]).unwrap();
        assert!(!format!("{loaded:?}").contains(secret));
        assert!(!loaded.values["jwt_secret"].concat().contains(secret));
    }

    #[test]
    fn secret_files_are_read_trimmed_and_exclusive() {
        let secret = TempFile::new("jwt", "a-secret-of-more-than-16-bytes\n");
        let text = format!("jwt_secret_file = {:?}", secret.0.display().to_string());
        let loaded = load_file("secret-file", &text, &[]).unwrap();
        assert_eq!(
            loaded.cli.jwt_secret.as_ref().map(|s| s.expose()),
            Some("a-secret-of-more-than-16-bytes")
        );
        let e =
            load_file("both", &text, &["--jwt-secret", "another-secret-of-16-bytes"]).unwrap_err();
        assert!(e.contains("--jwt-secret and --jwt-secret-file are exclusive"), "{e}");
    }

    #[test]
    fn every_option_has_a_known_kind_and_a_doc() {
        let cmd = Cli::command();
        for arg in keys(&cmd) {
            assert!(arg.get_long().is_some(), "{}", arg.get_id());
            assert!(arg.get_help().is_some(), "{} has no doc comment", arg.get_id());
        }
    }

    #[test]
    fn options_are_found_in_messages_whole() {
        assert!(mentions("--max-in-flight must be", "--max-in-flight"));
        assert!(mentions("x (--max-in-flight)", "--max-in-flight"));
        assert!(!mentions("--max-in-flight-total must be", "--max-in-flight"));
    }

    #[test]
    fn edit_distance_finds_typos() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(closest("rate_brust", ["rate_burst", "listen"].into_iter()), Some("rate_burst"));
        assert_eq!(closest("qqqqqqqq", ["rate_burst", "listen"].into_iter()), None);
    }
}
