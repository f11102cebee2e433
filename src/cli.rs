//! Command-line flags: one per setting of the registry, with gunicorn's spellings (`-w`,
//! `-b`, `-t`, `--keep-alive`, `--limit-request-field_size`, `-p`, `--access-logfile`...), plus
//! the actions (`--check-config`, `--print-config`, `--health-check`). gunicorn's `--preload` is
//! accepted: forkserve always loads the model before it forks.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::config::Given;
use crate::registry::{Kind, Setting, SETTINGS};

#[derive(Debug)]
pub struct Cli {
    /// Config file (TOML). Default: conf/forkserve.toml if it exists.
    pub config: Option<PathBuf>,
    pub check_config: bool,
    pub print_config: bool,
    pub print_default_config: bool,
    pub print_settings_table: bool,
    /// GET /health at HOST:PORT and exit 0 on 200 (a container HEALTHCHECK without curl).
    pub health_check: Option<String>,
    /// Values for settings, in the order given.
    pub flags: Vec<Given>,
}

const ABOUT: &str = "Prefork HTTP server for sentence embeddings and clustering: the model is \
                     loaded once in the master and shared copy-on-write by every worker. Every \
                     setting has a flag, a FORKSERVE_* variable and a key in the config file.";

/// The flags of the settings, and nothing else (also what FORKSERVE_CMD_ARGS may hold).
fn setting_args(command: Command) -> Command {
    SETTINGS.iter().fold(command, |command, setting| {
        command.arg(setting_arg(setting))
    })
}

fn setting_arg(setting: &'static Setting) -> Arg {
    let mut arg = Arg::new(setting.id())
        .help(setting.doc)
        .value_name(value_name(setting))
        .hide(setting.key.starts_with("testing."));
    let mut longs = setting.flags.iter().filter_map(|f| f.strip_prefix("--"));
    if let Some(long) = longs.next() {
        arg = arg.long(long);
    }
    for alias in longs {
        arg = arg.visible_alias(alias);
    }
    if let Some(short) = setting
        .flags
        .iter()
        .find(|f| f.len() == 2 && f.starts_with('-'))
        .and_then(|f| f.chars().nth(1))
    {
        arg = arg.short(short);
    }
    match setting.kind {
        Kind::Binds => arg.action(ArgAction::Append),
        // `--allow-root` alone means true; `--access-log=false` turns a default off.
        Kind::Bool => arg
            .action(ArgAction::Append)
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true"),
        _ => arg.action(ArgAction::Append),
    }
}

fn value_name(setting: &Setting) -> &'static str {
    match setting.kind {
        Kind::Int { .. } => "N",
        Kind::Float { .. } => "X",
        Kind::Seconds { .. } => "SECONDS",
        Kind::Bool => "BOOL",
        Kind::Text => "TEXT",
        Kind::Choice(_) => "WORD",
        Kind::Path => "PATH",
        Kind::Size => "SIZE",
        Kind::Binds => "ADDRESS",
        Kind::Mode => "MODE",
    }
}

pub fn command() -> Command {
    let command = Command::new("forkserve")
        .version(env!("CARGO_PKG_VERSION"))
        .about(ABOUT)
        .arg(
            Arg::new("config")
                .short('c')
                .long("config")
                .value_name("FILE")
                .help("Config file (TOML). Default: conf/forkserve.toml if it exists."),
        )
        .arg(
            Arg::new("check_config")
                .long("check-config")
                .action(ArgAction::SetTrue)
                .help("Validate the configuration (and the model directory) and exit: 0 if valid, 2 if not."),
        )
        .arg(
            Arg::new("print_config")
                .long("print-config")
                .action(ArgAction::SetTrue)
                .help("Print the effective configuration (file, environment, flags) and exit."),
        )
        .arg(
            Arg::new("print_default_config")
                .long("print-default-config")
                .action(ArgAction::SetTrue)
                .help("Print the commented default configuration (conf/forkserve.toml) and exit."),
        )
        .arg(
            Arg::new("print_settings_table")
                .long("print-settings-table")
                .action(ArgAction::SetTrue)
                .hide(true)
                .help("Print the README's table of settings and exit."),
        )
        .arg(
            Arg::new("health_check")
                .long("health-check")
                .value_name("HOST:PORT")
                .conflicts_with_all(["check_config", "print_config"])
                .help("GET /health at HOST:PORT and exit 0 if it answers 200, 1 otherwise (a container HEALTHCHECK that needs no curl)."),
        )
        .arg(
            Arg::new("preload")
                .long("preload")
                .action(ArgAction::SetTrue)
                .help("Accepted for gunicorn's command lines: forkserve always loads the model before it forks."),
        )
        .arg(
            Arg::new("app")
                .value_name("APP_MODULE")
                .hide(true)
                .help("gunicorn's application argument: accepted and ignored (forkserve serves its model)."),
        );
    setting_args(command)
}

/// Parse the command line.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli, clap::Error> {
    let matches = command().try_get_matches_from(args)?;
    if let Some(app) = matches.get_one::<String>("app") {
        eprintln!(
            "forkserve: ignoring {app:?}: forkserve serves its model (model.path), not an application module"
        );
    }
    Ok(Cli {
        config: matches.get_one::<String>("config").map(PathBuf::from),
        check_config: matches.get_flag("check_config"),
        print_config: matches.get_flag("print_config"),
        print_default_config: matches.get_flag("print_default_config"),
        print_settings_table: matches.get_flag("print_settings_table"),
        health_check: matches.get_one::<String>("health_check").cloned(),
        flags: given(&matches),
    })
}

/// The settings in `FORKSERVE_CMD_ARGS` (read as gunicorn reads GUNICORN_CMD_ARGS: flags,
/// split as a shell would).
pub fn settings_in(args: &str) -> Result<Vec<Given>, String> {
    let words = shlex::split(args).ok_or("unbalanced quotes")?;
    let command = setting_args(Command::new("FORKSERVE_CMD_ARGS").no_binary_name(true));
    let matches = command.try_get_matches_from(words).map_err(|e| {
        e.render()
            .to_string()
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })?;
    Ok(given(&matches))
}

/// Every value given for a setting, in command-line order.
fn given(matches: &ArgMatches) -> Vec<Given> {
    let mut out: Vec<(usize, Given)> = Vec::new();
    for setting in SETTINGS {
        let Some(values) = matches.get_many::<String>(setting.id()) else {
            continue;
        };
        let indices = matches.indices_of(setting.id()).into_iter().flatten();
        for (value, index) in values.zip(indices) {
            out.push((
                index,
                Given {
                    setting,
                    flag: setting
                        .flags
                        .iter()
                        .rfind(|f| f.starts_with("--"))
                        .unwrap_or(&setting.key)
                        .to_string(),
                    value: value.clone(),
                },
            ));
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, g)| g).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(words: &[&str]) -> Cli {
        parse(
            std::iter::once("forkserve")
                .chain(words.iter().copied())
                .map(OsString::from),
        )
        .unwrap()
    }

    #[test]
    fn gunicorns_spellings_reach_their_settings() {
        let cli = parse_words(&[
            "-w",
            "3",
            "-b",
            ":8000",
            "--bind",
            "unix:/tmp/s",
            "-t",
            "60",
            "--keep-alive",
            "2",
            "--limit-request-field_size",
            "100",
            "-p",
            "/run/f.pid",
            "--access-logfile",
            "-",
            "--log-level",
            "warning",
            "--preload",
            "-n",
            "api",
            "--workers=4",
        ]);
        let keys: Vec<(&str, &str)> = cli
            .flags
            .iter()
            .map(|g| (g.setting.key, g.value.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("workers", "3"),
                ("bind", ":8000"),
                ("bind", "unix:/tmp/s"),
                ("timeout", "60"),
                ("keepalive", "2"),
                ("limit_request_field_size", "100"),
                ("pidfile", "/run/f.pid"),
                ("log.access_log_file", "-"),
                ("log.level", "warning"),
                ("proc_name", "api"),
                ("workers", "4"),
            ]
        );
    }

    #[test]
    fn a_bool_flag_alone_means_true() {
        let cli = parse_words(&["--allow-root", "--access-log=false"]);
        let values: Vec<&str> = cli.flags.iter().map(|g| g.value.as_str()).collect();
        assert_eq!(values, ["true", "false"]);
    }

    #[test]
    fn cmd_args_are_split_as_a_shell_would() {
        let given = settings_in("--workers 2 --access-logformat '%(h)s %(r)s'").unwrap();
        assert_eq!(given[1].value, "%(h)s %(r)s");
        assert!(settings_in("--check-config").is_err());
        assert!(settings_in("--workers '2").is_err());
    }
}
