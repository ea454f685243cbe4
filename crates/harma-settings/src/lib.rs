//! Settings declared once.
//!
//! A settings group is a plain serde struct declared with [`settings!`]: each field with its
//! type, its default and its documentation. The macro writes the struct, its `Default` (the
//! defaults, in that one place) and a [`Settings`] impl that describes every field as a
//! [`Setting`]: its key (the field's name, as config files spell it), its help (the doc
//! comment), how a command line gives it (a value, or a switch) and how a command-line string
//! becomes a typed value. Nothing here knows a command-line parser: the `harma` binary maps
//! these descriptions to its flags, so help, defaults and config-file keys cannot drift apart.
//!
//! Layers of settings (defaults, a preset, a file, the flags given) are TOML tables of keys,
//! merged key by key and read back into the struct by serde.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// One value of an enumerated setting: its name (as serde spells it) and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub name: &'static str,
    pub help: &'static str,
}

/// A type whose values are a fixed list of names (an enum of unit variants).
pub trait Choices {
    const CHOICES: &'static [Choice];
}

/// How a command-line string becomes a setting's value.
pub trait SettingValue {
    /// The value of `s` as a config file would hold it, or why `s` is not one.
    fn parse(s: &str) -> Result<toml::Value, String>;

    /// The names the value may take, if it is an enumeration.
    fn choices() -> &'static [Choice] {
        &[]
    }
}

macro_rules! integer_value {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            fn parse(s: &str) -> Result<toml::Value, String> {
                let v: $t = s.trim().parse().map_err(|e| format!("{e}"))?;
                i64::try_from(v)
                    .map(toml::Value::Integer)
                    .map_err(|_| format!("{v} is too large"))
            }
        }
    )*};
}

integer_value!(usize, u64, u32);

impl SettingValue for f64 {
    fn parse(s: &str) -> Result<toml::Value, String> {
        s.trim()
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|e| format!("{e}"))
    }
}

impl SettingValue for String {
    fn parse(s: &str) -> Result<toml::Value, String> {
        Ok(toml::Value::String(s.to_string()))
    }
}

impl SettingValue for PathBuf {
    fn parse(s: &str) -> Result<toml::Value, String> {
        Ok(toml::Value::String(s.to_string()))
    }
}

impl SettingValue for bool {
    fn parse(s: &str) -> Result<toml::Value, String> {
        s.trim()
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|e| format!("{e}"))
    }
}

impl<T: SettingValue> SettingValue for Option<T> {
    fn parse(s: &str) -> Result<toml::Value, String> {
        T::parse(s)
    }

    fn choices() -> &'static [Choice] {
        T::choices()
    }
}

impl<T: Choices> SettingValue for T {
    fn parse(s: &str) -> Result<toml::Value, String> {
        match T::CHOICES.iter().find(|c| c.name == s) {
            Some(c) => Ok(toml::Value::String(c.name.to_string())),
            None => Err(format!(
                "expected one of {}",
                T::CHOICES
                    .iter()
                    .map(|c| c.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn choices() -> &'static [Choice] {
        T::CHOICES
    }
}

/// A string setting checked by its type's `FromStr` (a device name), kept as the string.
pub fn parse_with<T: std::str::FromStr>(s: &str) -> Result<toml::Value, String>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>()
        .map(|_| toml::Value::String(s.to_string()))
        .map_err(|e| e.to_string())
}

/// How the command line gives a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Given {
    /// `--flag VALUE`
    Value,
    /// `--flag` alone sets the (boolean) setting to this value
    Switch(bool),
}

/// One setting, described for a command line and a config file.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The key in config files and the flag's id: the field's name.
    pub key: &'static str,
    /// The long flag (the key with `-` for `_` unless renamed, e.g. `no-shuffle`).
    pub flag: String,
    /// The doc comment's lines.
    pub doc: &'static [&'static str],
    /// The value's placeholder in help (`FILE`); empty: the key in capitals.
    pub value_name: &'static str,
    pub given: Given,
    /// Settings that cannot be given with this one on a command line.
    pub conflicts: &'static [&'static str],
    /// A command-line string to the typed value.
    pub parse: fn(&str) -> Result<toml::Value, String>,
    pub choices: &'static [Choice],
    /// An environment variable the command line reads the value from when the flag is not
    /// given (read by the binary at start-up, never by a library).
    pub env: Option<&'static str>,
}

impl Setting {
    pub fn new(
        key: &'static str,
        doc: &'static [&'static str],
        parse: fn(&str) -> Result<toml::Value, String>,
        choices: &'static [Choice],
    ) -> Self {
        Self {
            key,
            flag: key.replace('_', "-"),
            doc,
            value_name: "",
            given: Given::Value,
            conflicts: &[],
            parse,
            choices,
            env: None,
        }
    }

    /// The environment variable the binary reads when the flag is not given.
    pub fn env(self, env: &'static str) -> Self {
        Self {
            env: Some(env),
            ..self
        }
    }

    /// The placeholder of the value in help.
    pub fn value_name(self, value_name: &'static str) -> Self {
        Self { value_name, ..self }
    }

    /// Given as `--flag` alone, which sets the setting to `value`.
    pub fn switch(self, value: bool) -> Self {
        Self {
            given: Given::Switch(value),
            ..self
        }
    }

    /// A long flag other than the key's.
    pub fn flag(self, flag: &str) -> Self {
        Self {
            flag: flag.to_string(),
            ..self
        }
    }

    /// Settings that cannot be given with this one on a command line.
    pub fn conflicts(self, conflicts: &'static [&'static str]) -> Self {
        Self { conflicts, ..self }
    }

    /// A parser other than the type's (a string checked by a `FromStr`).
    pub fn parse(self, parse: fn(&str) -> Result<toml::Value, String>) -> Self {
        Self { parse, ..self }
    }

    /// The help: the doc comment's lines joined, paragraphs kept apart.
    pub fn help(&self) -> String {
        let mut out = String::new();
        for line in self.doc.iter().map(|l| l.trim()) {
            if line.is_empty() {
                out.push_str("\n\n");
            } else {
                if !(out.is_empty() || out.ends_with('\n')) {
                    out.push(' ');
                }
                out.push_str(line);
            }
        }
        out
    }
}

/// A group of settings: a serde struct whose every field is described.
pub trait Settings: Default + Serialize + DeserializeOwned {
    /// Every setting, in declaration order (groups flattened).
    fn settings() -> Vec<Setting>;

    /// The defaults as a table of keys (a `None` is left out).
    fn defaults() -> toml::Table {
        toml::Table::try_from(Self::default()).expect("settings serialise to a table")
    }

    /// `table` read as these settings, or the error that names the setting at fault.
    fn from_table(table: toml::Table) -> Result<Self, String> {
        table
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_string())
    }
}

/// The name a value of an enumerated setting has in config files (`text`, `plain-max`).
pub fn name<T: Serialize>(v: &T) -> Option<String> {
    match toml::Value::try_from(v) {
        Ok(toml::Value::String(s)) => Some(s),
        _ => None,
    }
}

/// The keys of every setting of `T`.
pub fn keys<T: Settings>() -> Vec<&'static str> {
    T::settings().iter().map(|s| s.key).collect()
}

/// Checks that each choice of `T` is a name serde reads as a `T` (for the tests of every
/// enumerated setting).
pub fn check_choices<T: Choices + DeserializeOwned>() -> Result<(), String> {
    for c in T::CHOICES {
        T::deserialize(toml::Value::String(c.name.to_string()))
            .map_err(|e| format!("choice `{}`: {e}", c.name))?;
    }
    Ok(())
}

/// Declares a settings group: a serde struct with `#[serde(default)]`, its `Default` from the
/// `= value` of each field, and its [`Settings`] description. A field's doc comment is its
/// help; `#[setting(...)]` calls [`Setting`]'s builders (`value_name("FILE")`, `switch(true)`,
/// `flag("no-shuffle")`, `conflicts(&["epochs"])`, `parse(...)`).
///
/// ```
/// harma_settings::settings! {
///     /// The run's length.
///     pub struct Run {
///         /// Number of optimiser steps
///         #[setting(value_name("N"))]
///         pub steps: Option<usize> = None,
///         /// Keep the file order
///         #[setting(switch(false), flag("no-shuffle"))]
///         pub shuffle: bool = true,
///     }
/// }
/// use harma_settings::Settings;
/// assert_eq!(Run::default().shuffle, true);
/// assert_eq!(Run::settings()[1].flag, "no-shuffle");
/// ```
#[macro_export]
macro_rules! settings {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $(#[setting($($m:ident($($a:expr),*)),* $(,)?)])?
                pub $field:ident : $ty:ty = $default:expr
            ),* $(,)?
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct $name {
            $(
                $(#[doc = $doc])*
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $($field: $default,)* }
            }
        }

        impl $crate::Settings for $name {
            fn settings() -> Vec<$crate::Setting> {
                vec![$(
                    $crate::Setting::new(
                        stringify!($field),
                        &[$($doc),*],
                        <$ty as $crate::SettingValue>::parse,
                        <$ty as $crate::SettingValue>::choices(),
                    )$($(.$m($($a),*))*)?
                ),*]
            }
        }
    };
}

/// Declares the [`Choices`] of an enum of unit variants: `choices!(Kind { A = "a": "help" })`.
#[macro_export]
macro_rules! choices {
    ($t:ty { $($name:literal : $help:literal),* $(,)? }) => {
        impl $crate::Choices for $t {
            const CHOICES: &'static [$crate::Choice] = &[
                $($crate::Choice { name: $name, help: $help }),*
            ];
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum Kind {
        Linear,
        PlainMax,
    }
    choices!(Kind { "linear": "the first", "plain-max": "the second" });

    settings! {
        /// A test group.
        pub struct Group {
            /// Peak learning rate
            ///
            /// Second paragraph.
            pub lr: Option<f64> = None,
            /// Words kept
            #[setting(value_name("N"))]
            pub max_words: usize = 30,
            #[setting(switch(false), flag("no-shuffle"))]
            pub shuffle: bool = true,
            pub kind: Kind = Kind::Linear,
        }
    }

    #[test]
    fn a_group_describes_its_fields_and_defaults() {
        let s = Group::settings();
        let keys: Vec<_> = s.iter().map(|s| s.key).collect();
        assert_eq!(keys, ["lr", "max_words", "shuffle", "kind"]);
        assert_eq!(s[0].help(), "Peak learning rate\n\nSecond paragraph.");
        assert_eq!((s[1].flag.as_str(), s[1].value_name), ("max-words", "N"));
        assert_eq!(
            (s[2].flag.as_str(), s[2].given),
            ("no-shuffle", Given::Switch(false))
        );
        assert_eq!(s[3].choices.len(), 2);
        let d = Group::defaults();
        assert!(!d.contains_key("lr"));
        assert_eq!(d["max_words"], toml::Value::Integer(30));
        assert_eq!(d["kind"], toml::Value::String("linear".into()));
        check_choices::<Kind>().unwrap();
    }

    #[test]
    fn strings_become_typed_values_or_say_why_not() {
        let s = Group::settings();
        assert_eq!((s[0].parse)("1e-4"), Ok(toml::Value::Float(1e-4)));
        assert!((s[0].parse)("fast").is_err());
        assert_eq!((s[1].parse)("12"), Ok(toml::Value::Integer(12)));
        assert!((s[1].parse)("-1").is_err());
        assert_eq!(
            (s[3].parse)("plain-max"),
            Ok(toml::Value::String("plain-max".into()))
        );
        let e = (s[3].parse)("plain").unwrap_err();
        assert_eq!(e, "expected one of linear, plain-max");
        let mut t = Group::defaults();
        t.insert("kind".into(), (s[3].parse)("plain-max").unwrap());
        t.insert("lr".into(), toml::Value::Float(0.5));
        let g = Group::from_table(t).unwrap();
        assert_eq!((g.kind, g.lr, g.max_words), (Kind::PlainMax, Some(0.5), 30));
        let mut bad = Group::defaults();
        bad.insert("max_words".into(), toml::Value::String("x".into()));
        assert!(Group::from_table(bad).is_err());
    }
}
