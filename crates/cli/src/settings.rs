//! Every option of every command also from the environment and from a TOML file, flags
//! winning over the environment, and the environment over the file.
//!
//! - **Environment**: an option `--max-waiting` is also `RYLM_MAX_WAITING` (upper case, `-` as
//!   `_`), for every command that has it; `--help` shows each name. Options that had a variable
//!   of their own keep it (`rylm gilmour-proxy --redis` reads `RYLM_REDIS_URL`).
//! - **File**: `--config FILE` (or `RYLM_CONFIG`) reads TOML: keys at the top apply to every
//!   command, keys in a table named after the command (`[master]`, `[gateway]`) to that command
//!   only and win over the top. A key is an option's long name (`max-waiting` or
//!   `max_waiting`); a value a string, number or boolean. The file sets the environment
//!   variable of each key that the environment does not set already; clap then reads flags
//!   first, then variables.

use std::ffi::OsString;

use anyhow::{Context, Result, bail};
use clap::{Arg, ArgAction, Command, CommandFactory, FromArgMatches};

/// The variable an option is read from: `RYLM_` and its long name.
pub(crate) fn variable(long: &str) -> String {
    format!("RYLM_{}", long.to_uppercase().replace('-', "_"))
}

/// Gives every option with a long name and no variable its `RYLM_...` variable, at every
/// depth of subcommands.
fn with_variables(command: Command) -> Command {
    command
        .mut_args(|arg| {
            let settable = arg.get_long().is_some()
                && arg.get_env().is_none()
                && !matches!(
                    arg.get_action(),
                    ArgAction::Help
                        | ArgAction::HelpShort
                        | ArgAction::HelpLong
                        | ArgAction::Version
                );
            match arg.get_long() {
                Some(long) if settable => {
                    let name = variable(long);
                    arg.env(name)
                }
                _ => arg,
            }
        })
        .mut_subcommands(with_variables)
}

/// The file named by `--config FILE` (or `--config=FILE`) among `args`, or by `RYLM_CONFIG`.
fn config_file(args: &[OsString]) -> Option<OsString> {
    let mut args = args.iter().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            return args.next().cloned();
        }
        if let Some(file) = text.strip_prefix("--config=") {
            return Some(file.into());
        }
    }
    std::env::var_os("RYLM_CONFIG")
}

/// The subcommand named among `args`: the first that is not an option.
fn subcommand(args: &[OsString]) -> Option<String> {
    args.iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .find(|a| !a.starts_with('-'))
}

fn text_of(key: &str, value: &toml::Value) -> Result<String> {
    Ok(match value {
        toml::Value::String(text) => text.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "{key}: a string, a number or a boolean, not a {}",
            other.type_str()
        ),
    })
}

/// The environment a TOML file adds for `command`: (variable, value) for each key the
/// environment does not set already.
pub(crate) fn from_file(text: &str, command: Option<&str>) -> Result<Vec<(String, String)>> {
    let table: toml::Table = text.parse().context("reading the configuration (TOML)")?;
    let mut settings: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: &toml::Value| -> Result<()> {
        let name = variable(&key.replace('_', "-"));
        let value = text_of(key, value)?;
        settings.retain(|(n, _)| *n != name);
        settings.push((name, value));
        Ok(())
    };
    for (key, value) in &table {
        if !value.is_table() {
            set(key, value)?;
        }
    }
    if let Some(toml::Value::Table(own)) = command.and_then(|c| table.get(c)) {
        for (key, value) in own {
            set(key, value)?;
        }
    }
    settings.retain(|(name, _)| std::env::var_os(name).is_none());
    Ok(settings)
}

/// Parses the command line with the environment and the configuration file behind it; exits
/// with clap's message on a bad command line.
pub(crate) fn parse<T: CommandFactory + FromArgMatches>() -> Result<T> {
    let args: Vec<OsString> = std::env::args_os().collect();
    if let Some(file) = config_file(&args) {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading --config {}", file.to_string_lossy()))?;
        for (name, value) in from_file(&text, subcommand(&args).as_deref())? {
            // SAFETY of the environment: this runs before any thread is started.
            set_variable(&name, &value);
        }
    }
    let command = with_variables(T::command()).arg(
        Arg::new("config")
            .long("config")
            .global(true)
            .value_name("FILE")
            .help("Options from a TOML file (flags, then RYLM_* variables, win over it)"),
    );
    let matches = command.get_matches_from(args);
    T::from_arg_matches(&matches).map_err(|error| error.exit())
}

/// Sets one variable of this process (called before any thread starts).
fn set_variable(name: &str, value: &str) {
    // `set_var` is unsafe in the 2024 edition because other threads may read the environment
    // at the same time; `parse` runs first thing in `main`, on the only thread.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_option_is_read_from_its_variable() {
        assert_eq!(variable("max-waiting"), "RYLM_MAX_WAITING");
        assert_eq!(variable("db"), "RYLM_DB");
    }

    #[test]
    fn a_commands_table_wins_over_the_top_and_other_tables_are_ignored() {
        let text = r#"
            db = "tcp://127.0.0.1:1"
            drain_for = 3
            [master]
            db = "tcp://127.0.0.1:2"
            max-waiting = 7
            [gateway]
            listen = "127.0.0.1:9"
        "#;
        let mut got = from_file(text, Some("master")).expect("reads");
        got.sort();
        assert_eq!(
            got,
            [
                ("RYLM_DB".to_owned(), "tcp://127.0.0.1:2".to_owned()),
                ("RYLM_DRAIN_FOR".to_owned(), "3".to_owned()),
                ("RYLM_MAX_WAITING".to_owned(), "7".to_owned()),
            ]
        );
        assert!(from_file("db = [1, 2]", None).is_err(), "a list is refused");
        assert!(from_file("db = ", None).is_err(), "bad TOML is refused");
    }
}
