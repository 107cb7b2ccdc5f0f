//! `zapvm run --config FILE`: the VM's settings from a JSON or TOML file.
//!
//! The file is one object (a JSON object, or a TOML document's top-level table) whose keys are
//! the long names of `zapvm run`'s options without their dashes (`mem`, `vcpus`, `virtio-mem`,
//! `workload`, `id`, ...). A value option takes a string or a number (`mem = "1G"`,
//! `vcpus = 2`), a flag takes `true` or `false` (`thp = true`). The file's settings become
//! command-line options (`--mem=1G`, `--thp`) added after the ones typed, except where the
//! command line already sets that option or one that conflicts with it: the command line
//! overrides the file. The combined command line is then parsed as usual, so a value in the file
//! is checked by the same parser as the same value typed.
//!
//! Every problem with the file (unreadable, not JSON/TOML, not an object, an unknown key, a value
//! of the wrong type or one the option refuses) is one line naming the file, before any VM
//! exists.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};
use serde_json::{Map, Value};

/// The `zapvm run` option that names the file (itself not a key of the file).
pub const CONFIG_OPTION: &str = "config";

/// The options a file sets, as command-line words to append to the command line that was typed.
///
/// `run` is `zapvm run`'s clap command, `typed` its matches for the command line as typed (to see
/// which options it sets), `path` the file (its extension, `.json` or `.toml`, says its syntax).
pub fn options_from_file(run: &Command, typed: &ArgMatches, path: &Path) -> Result<Vec<OsString>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--config {}: cannot read it: {e}", path.display()))?;
    let table = parse(path, &text).map_err(|why| format!("--config {}: {why}", path.display()))?;
    options_from_table(run, typed, &table).map_err(|why| format!("--config {}: {why}", path.display()))
}

/// The file's text as an object, by the file's extension.
fn parse(path: &Path, text: &str) -> Result<Map<String, Value>, String> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(table)) => Ok(table),
            Ok(_) => Err("not a JSON object (want {\"mem\": \"1G\", ...})".into()),
            Err(e) => Err(format!("not JSON: {e}")),
        },
        Some("toml") => toml::from_str::<Map<String, Value>>(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => line_and_column(text, span.start),
                None => (1, 1),
            };
            format!("not TOML: line {line} column {column}: {}", e.message().trim_end())
        }),
        _ => Err("give a .json or .toml file (its extension says which)".into()),
    }
}

/// The 1-based line and column of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

/// [`options_from_file`] for a parsed file.
fn options_from_table(
    run: &Command,
    typed: &ArgMatches,
    table: &Map<String, Value>,
) -> Result<Vec<OsString>, String> {
    let typed_on_command_line = |id: &str| typed.value_source(id) == Some(ValueSource::CommandLine);
    let mut words = Vec::new();
    for (key, value) in table {
        let arg = run
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && is_setting(a) && key != CONFIG_OPTION)
            .ok_or_else(|| unknown_key(run, key))?;
        // Set on the command line, or in conflict (declared on either side) with an option that is.
        let overridden = typed_on_command_line(arg.get_id().as_str())
            || run.get_arguments().any(|other| {
                typed_on_command_line(other.get_id().as_str())
                    && (run.get_arg_conflicts_with(arg).iter().any(|a| a.get_id() == other.get_id())
                        || run.get_arg_conflicts_with(other).iter().any(|a| a.get_id() == arg.get_id()))
            });
        let word = match (arg.get_action(), value) {
            (ArgAction::SetTrue, Value::Bool(set)) => set.then(|| format!("--{key}")),
            (ArgAction::SetTrue, other) => {
                return Err(format!("{key} = {other}: a flag, give true or false"));
            }
            (_, Value::String(text)) => Some(format!("--{key}={text}")),
            (_, Value::Number(number)) => Some(format!("--{key}={number}")),
            (_, other) => {
                return Err(format!("{key} = {other}: give a string or a number, as --{key} takes"));
            }
        };
        if let Some(word) = word.filter(|_| !overridden) {
            words.push(OsString::from(word));
        }
    }
    Ok(words)
}

/// Whether `arg` is one a file may set: a value option or an on/off flag (not `--help`).
fn is_setting(arg: &clap::Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Set | ArgAction::SetTrue)
}

/// The error for a key that is no option, with the key it most likely meant.
fn unknown_key(run: &Command, key: &str) -> String {
    let known: Vec<&str> = run
        .get_arguments()
        .filter(|a| is_setting(a))
        .filter_map(|a| a.get_long())
        .filter(|long| *long != CONFIG_OPTION)
        .collect();
    let dashed = key.replace('_', "-");
    match known.iter().find(|k| **k == dashed) {
        Some(k) => format!("unknown key {key:?} (did you mean {k:?}? keys are spelt as the options are)"),
        None => format!("unknown key {key:?} (the keys are `zapvm run`'s options: {})", known.join(", ")),
    }
}

/// The first line of a clap error, without its `error: ` (the rest is usage help for a typed
/// command line, not for a file).
pub fn first_line(error: &clap::Error) -> String {
    let text = error.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// A stand-in for `zapvm run`'s command with the kinds of option the file maps.
    #[derive(Parser)]
    struct Options {
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long)]
        thp: bool,
        #[arg(long, conflicts_with = "no_api")]
        api_socket: Option<String>,
        #[arg(long)]
        no_api: bool,
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long, conflicts_with = "kernel")]
        linux: bool,
        #[arg(long)]
        config: Option<String>,
    }

    fn words(typed: &[&str], file: &str) -> Result<Vec<String>, String> {
        let cmd = Options::command();
        let matches =
            cmd.clone().try_get_matches_from(std::iter::once("run").chain(typed.iter().copied())).unwrap();
        let table = parse(Path::new("f.toml"), file)?;
        options_from_table(&cmd, &matches, &table)
            .map(|w| w.into_iter().map(|w| w.into_string().unwrap()).collect())
    }

    #[test]
    fn file_settings_become_options_unless_the_command_line_sets_them() {
        assert_eq!(words(&[], "vcpus = 2\nthp = true").unwrap(), ["--thp", "--vcpus=2"], "in key order");
        assert_eq!(words(&[], "thp = false").unwrap(), Vec::<String>::new());
        assert_eq!(words(&["--vcpus", "3"], "vcpus = 2\nthp = true").unwrap(), ["--thp"]);
        // An option typed that conflicts with the file's drops the file's, both ways round.
        assert_eq!(words(&["--api-socket", "s"], "no-api = true").unwrap(), Vec::<String>::new());
        assert_eq!(words(&["--no-api"], "api-socket = \"s\"").unwrap(), Vec::<String>::new());
        assert_eq!(words(&["--linux"], "kernel = \"k\"").unwrap(), Vec::<String>::new());
        assert_eq!(words(&["--kernel", "k"], "linux = true").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        let e = words(&[], "cpus = 2").unwrap_err();
        assert!(e.contains("unknown key \"cpus\"") && e.contains("vcpus"), "{e}");
        let e = words(&[], "api_socket = \"s\"").unwrap_err();
        assert!(e.contains("did you mean \"api-socket\""), "{e}");
        assert!(words(&[], "config = \"other.toml\"").unwrap_err().contains("unknown key"));
        assert!(words(&[], "help = true").unwrap_err().contains("unknown key"));
        assert!(words(&[], "thp = 1").unwrap_err().contains("give true or false"));
        assert!(words(&[], "vcpus = true").unwrap_err().contains("give a string or a number"));
        assert!(words(&[], "vcpus = [2]").unwrap_err().contains("give a string or a number"));
    }

    #[test]
    fn syntax_errors_are_one_line_with_where() {
        let e = words(&[], "vcpus = 2\nmem = \n").unwrap_err();
        assert!(e.starts_with("not TOML: line 2 column ") && !e.contains('\n'), "{e}");
        let e = parse(Path::new("f.json"), "{\"vcpus\": }").unwrap_err();
        assert!(e.starts_with("not JSON: ") && !e.contains('\n'), "{e}");
        assert!(parse(Path::new("f.json"), "[1]").unwrap_err().contains("not a JSON object"));
        assert!(parse(Path::new("f.yaml"), "").unwrap_err().contains(".json or .toml"));
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
    }
}
