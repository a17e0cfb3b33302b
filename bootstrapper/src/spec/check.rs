//! Field-by-field checking of a marked YAML tree.
//!
//! A [`Checker`] walks mappings with a known set of fields and collects every
//! problem it finds — unknown fields (with a "did you mean"), wrong types,
//! values out of range — as a [`SpecError`] carrying file, line, column and
//! the dotted field path. Nothing stops at the first error.

use std::fmt;

use super::grammar::one_line;
use super::yaml::{Node, Pos, Value};

/// One problem in a spec file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SpecError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `spec.apiServer.port`; empty for the file itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Collects errors for one file.
pub struct Checker {
    file: String,
    errors: Vec<SpecError>,
}

/// A mapping whose keys were checked against the fields a section allows.
pub struct Section<'n> {
    pub path: String,
    pub pos: Pos,
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> Section<'n> {
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_null())
    }

    pub fn child(&self, key: &str) -> String {
        join(&self.path, key)
    }
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Checker {
    pub fn new(file: impl Into<String>) -> Self {
        Checker {
            file: one_line(&file.into()),
            errors: Vec::new(),
        }
    }

    /// Records a problem. The field path (keys come from the file) and the
    /// message (it quotes values) are kept on one line with control, line-break
    /// and bidi characters escaped, so a crafted spec cannot forge output lines.
    pub fn error(&mut self, pos: Pos, field: &str, message: impl Into<String>) {
        self.errors.push(SpecError {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            field: one_line(field),
            message: one_line(&message.into()),
        });
    }

    pub fn into_errors(self) -> Vec<SpecError> {
        self.errors
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    fn wrong_type(&mut self, node: &Node, path: &str, expected: &str) {
        let found = node.type_name();
        self.error(
            node.pos,
            path,
            format!("expected {expected}, found {found}"),
        );
    }

    /// Checks that `node` is a mapping whose keys are all in `known`.
    pub fn section<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        known: &[&str],
    ) -> Option<Section<'n>> {
        let Value::Map(entries) = &node.value else {
            self.wrong_type(node, path, "a mapping");
            return None;
        };
        let mut seen: Vec<(&'n str, &'n Node)> = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let Value::Scalar { text, .. } = &key.value else {
                self.error(key.pos, path, "keys must be plain strings");
                continue;
            };
            let field = join(path, text);
            if !known.contains(&text.as_str()) {
                let hint = did_you_mean(text, known)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.error(
                    key.pos,
                    &field,
                    format!("unknown field{hint} (allowed: {})", known.join(", ")),
                );
                continue;
            }
            if seen.iter().any(|(k, _)| *k == text.as_str()) {
                self.error(key.pos, &field, "duplicate field");
                continue;
            }
            seen.push((text.as_str(), value));
        }
        Some(Section {
            path: path.to_string(),
            pos: node.pos,
            entries: seen,
        })
    }

    /// A required field: reports it missing at the section's position.
    pub fn require<'n>(&mut self, s: &Section<'n>, key: &str) -> Option<&'n Node> {
        let node = s.get(key);
        if node.is_none() {
            self.error(s.pos, &s.child(key), "required field is missing");
        }
        node
    }

    pub fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Scalar { text, quoted } if *quoted || node.type_name() == "string" => {
                Some(text.clone())
            }
            _ => {
                self.wrong_type(node, path, "a string");
                None
            }
        }
    }

    /// A string that must not be empty or blank.
    pub fn nonempty(&mut self, node: &Node, path: &str) -> Option<String> {
        let s = self.string(node, path)?;
        if s.trim().is_empty() {
            self.error(node.pos, path, "must not be empty");
            return None;
        }
        Some(s)
    }

    pub fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match (&node.value, node.type_name()) {
            (Value::Scalar { text, .. }, "boolean") => Some(text.eq_ignore_ascii_case("true")),
            _ => {
                self.wrong_type(node, path, "a boolean (true or false)");
                None
            }
        }
    }

    /// An integer within `min..=max`.
    pub fn integer(&mut self, node: &Node, path: &str, min: u64, max: u64) -> Option<u64> {
        let Value::Scalar { text, .. } = &node.value else {
            self.wrong_type(node, path, "an integer");
            return None;
        };
        if node.type_name() != "integer" {
            self.wrong_type(node, path, "an integer");
            return None;
        }
        match text.parse::<i128>() {
            Ok(v) if v >= i128::from(min) && v <= i128::from(max) => u64::try_from(v).ok(),
            _ => {
                self.error(
                    node.pos,
                    path,
                    format!("{text} is out of range ({min}..={max})"),
                );
                None
            }
        }
    }

    /// One of a fixed set of words; the message lists them.
    pub fn one_of(&mut self, node: &Node, path: &str, allowed: &[&str]) -> Option<String> {
        let s = self.string(node, path)?;
        if allowed.contains(&s.as_str()) {
            return Some(s);
        }
        let hint = did_you_mean(&s, allowed)
            .map(|a| format!("; did you mean `{a}`?"))
            .unwrap_or_default();
        self.error(
            node.pos,
            path,
            format!("`{s}` is not one of: {}{hint}", allowed.join(", ")),
        );
        None
    }

    pub fn list<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            _ => {
                self.wrong_type(node, path, "a list");
                None
            }
        }
    }
}

/// The closest allowed word, when it is close enough to be a typo.
pub fn did_you_mean<'a>(word: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|a| {
            (
                strsim::jaro_winkler(&word.to_ascii_lowercase(), &a.to_ascii_lowercase()),
                *a,
            )
        })
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, a)| a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names() {
        assert_eq!(
            did_you_mean("apiserver", &["apiServer", "cluster"]),
            Some("apiServer")
        );
        assert_eq!(did_you_mean("xyz", &["apiServer", "cluster"]), None);
    }
}
