//! Config errors: what went wrong where, with the offending line of the file under the message
//! (a pointer like toml's own).

use std::path::{Path, PathBuf};

use crate::serve::web_config::WebConfigError;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax, an unknown key, or a value out of its bounds (`values`): where, and the
    /// offending line with a caret under the value ([`ConfigError::pointer`]).
    #[error("config file {path}, line {line}{}: {message}", key.as_ref().map(|k| format!(", key {k}")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: usize,
        key: Option<String>,
        message: String,
        pointer: String,
    },
    /// Compiling a pattern that parsing already accepted (daemon/select.rs): cannot happen
    /// for a value that came through `load` or the flags.
    #[error("config key {key}: invalid regular expression")]
    Regex {
        key: String,
        source: Box<regex::Error>,
    },
    #[error("config key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error(transparent)]
    WebConfig(#[from] WebConfigError),
}

impl ConfigError {
    /// For a [`ConfigError::Parse`]: the offending line of the file with a caret under the
    /// value, printed under the one-line error.
    pub fn pointer(&self) -> Option<&str> {
        match self {
            ConfigError::Parse { pointer, .. } => Some(pointer),
            ConfigError::Read { .. }
            | ConfigError::Regex { .. }
            | ConfigError::Invalid { .. }
            | ConfigError::WebConfig(_) => None,
        }
    }

    /// Locates toml's error in `text`: line, the dotted key written on that line (under its
    /// `[table]` header), and a caret pointer like toml's own.
    pub(super) fn parse(path: &Path, text: &str, e: &toml::de::Error) -> Self {
        let span = e.span().unwrap_or(0..0);
        let start = span.start.min(text.len());
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line_no = text[..start].matches('\n').count() + 1;
        let line_text = &text[line_start..line_end];
        let col = text[line_start..start].chars().count();
        let width = text[start..span.end.clamp(start, line_end)]
            .chars()
            .count()
            .max(1);
        let gutter = " ".repeat(line_no.to_string().len());
        let pointer = format!(
            "{gutter} |\n{line_no} | {line_text}\n{gutter} | {}{}",
            " ".repeat(col),
            "^".repeat(width)
        );
        // `key = value` with the span in the value: name the key.
        let key = line_text.split_once('=').and_then(|(k, _)| {
            let k = k.trim();
            let in_value = col > line_text.find('=').unwrap_or(usize::MAX);
            let simple = !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            (in_value && simple).then(|| {
                let table = text[..line_start].lines().rev().find_map(|l| {
                    let l = l.trim();
                    l.strip_prefix('[')
                        .and_then(|l| l.strip_suffix(']'))
                        .map(str::trim)
                });
                match table {
                    Some(t) => format!("{t}.{k}"),
                    None => k.to_string(),
                }
            })
        });
        ConfigError::Parse {
            path: path.to_path_buf(),
            line: line_no,
            key,
            message: e.message().trim_end().replace('\n', " "),
            pointer,
        }
    }
}
