//! The command line's flags for settings groups: each [`harma_settings::Setting`] becomes a
//! clap argument (its help from the setting's documentation, its default shown from the
//! group's `Default`), and the flags given become a table of just those keys, the top layer of
//! the settings' merge. The only place that maps settings to clap.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use harma_settings::{Given, Settings};

/// A settings group as flags: `#[command(flatten)] compute: Flags<ComputeSettings>`.
#[derive(Debug, Clone, Default)]
pub struct Flags<T> {
    /// The group: its defaults under the flags given.
    pub value: T,
    /// The flags given on the command line, typed, as a table of just those keys.
    pub given: toml::Table,
}

impl<T> std::ops::Deref for Flags<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> From<T> for Flags<T> {
    /// Settings given as a value, not by flags.
    fn from(value: T) -> Self {
        Self {
            value,
            given: toml::Table::new(),
        }
    }
}

/// The flags' defaults: the parse of an empty command line (the `Default` of a command's
/// arguments, e.g. the demo's when `harma` runs with none).
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(Command::new("defaults"));
    let m = cmd
        .try_get_matches_from(["defaults"])
        .expect("the flags have no required argument");
    T::from_arg_matches(&m).expect("the defaults parse")
}

/// `cmd` with a flag for each setting of `T`.
pub fn augment<T: Settings>(mut cmd: Command) -> Command {
    let defaults = T::defaults();
    for s in T::settings() {
        let mut help = s.help();
        let mut arg = Arg::new(s.key).long(s.flag.clone());
        arg = match s.given {
            Given::Switch(true) => arg.action(ArgAction::SetTrue),
            Given::Switch(false) => arg.action(ArgAction::SetFalse),
            Given::Value => {
                let parse = s.parse;
                let mut arg = arg
                    .action(ArgAction::Set)
                    .value_parser(move |v: &str| parse(v));
                arg = if s.value_name.is_empty() {
                    arg.value_name(s.key.to_uppercase())
                } else {
                    arg.value_name(s.value_name)
                };
                if !s.choices.is_empty() {
                    arg = arg.value_parser(possible_values(s.choices).map(toml::Value::String));
                }
                if let Some(d) = defaults.get(s.key) {
                    help.push_str(&format!(" [default: {}]", shown(d)));
                }
                arg
            }
        };
        if let Some(var) = s.env {
            arg = arg.env(var);
        }
        for c in s.conflicts {
            arg = arg.conflicts_with(*c);
        }
        let (short, long) = match help.split_once("\n\n") {
            Some((first, _)) => (first.to_string(), Some(help.clone())),
            None => (help.clone(), None),
        };
        arg = arg.help(short);
        if let Some(long) = long {
            arg = arg.long_help(long);
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

/// A clap value parser for an enumerated setting's type (`value_parser = choice::<Dataset>()`),
/// its names and their help from its [`harma_settings::Choices`].
pub fn choice<T>() -> impl TypedValueParser<Value = T>
where
    T: harma_settings::Choices + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    possible_values(T::CHOICES).map(|name: String| {
        T::deserialize(toml::Value::String(name)).expect("every choice is a name of its type")
    })
}

fn possible_values(choices: &'static [harma_settings::Choice]) -> PossibleValuesParser {
    PossibleValuesParser::new(choices.iter().map(|c| {
        let v = PossibleValue::new(c.name);
        if c.help.is_empty() {
            v
        } else {
            v.help(c.help)
        }
    }))
}

/// A default as help shows it (`30`, `0.1`, `linear`).
fn shown(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The flags of `T` given in `m`, as a table of keys.
pub fn given<T: Settings>(m: &ArgMatches) -> toml::Table {
    let mut table = toml::Table::new();
    for s in T::settings() {
        // a value from the flag's environment variable counts as given on the command line
        if !matches!(
            m.value_source(s.key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let v = match s.given {
            Given::Switch(v) => toml::Value::Boolean(v),
            Given::Value => match m.get_one::<toml::Value>(s.key) {
                Some(v) => v.clone(),
                None => continue,
            },
        };
        table.insert(s.key.to_string(), v);
    }
    table
}

/// `T`'s defaults under what the environment gives the settings that read a variable, as a
/// command line without flags sees it (xtask's in-process workloads: `HARMA_BF16_KERNEL`).
pub fn from_env<T: Settings>() -> Result<T, clap::Error> {
    let m = augment::<T>(Command::new("env")).try_get_matches_from(["env"])?;
    resolve(&given::<T>(&m))
}

/// `T`'s defaults under the flags given.
pub fn resolve<T: Settings>(given: &toml::Table) -> Result<T, clap::Error> {
    let mut table = T::defaults();
    for (k, v) in given {
        table.insert(k.clone(), v.clone());
    }
    T::from_table(table).map_err(|e| clap::Error::raw(clap::error::ErrorKind::InvalidValue, e))
}

impl<T: Settings> clap::Args for Flags<T> {
    fn augment_args(cmd: Command) -> Command {
        augment::<T>(cmd)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        augment::<T>(cmd)
    }
}

impl<T: Settings> clap::FromArgMatches for Flags<T> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let given = given::<T>(m);
        Ok(Self {
            value: resolve(&given)?,
            given,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}
