//! A YAML tree that remembers where every node stands in its file.
//!
//! serde_yaml stops at the first error and forgets positions once it has a
//! `Value`; the spec checker needs every error at once, each with its line and
//! column. So the spec is parsed into this marked tree first (yaml-rust2's event
//! parser), checked field by field, and only then turned into typed settings.
//! A key that occurs twice in one mapping is never silently overwritten: the
//! later entry is dropped and reported as a [`DuplicateKey`] with both
//! positions.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A position in a file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    /// The earlier of two positions.
    fn min_by_line(self, other: Pos) -> Pos {
        if (other.line, other.column) < (self.line, self.column) {
            other
        } else {
            self
        }
    }
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Pos {
            line: m.line().max(1),
            column: m.col() + 1,
        }
    }
}

/// One node of the marked tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar and whether it was quoted (a quoted `"true"` is a string).
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Keys are kept in file order; duplicates are reported by the checker.
    Map(Vec<(Node, Node)>),
    /// An alias: the spec does not use anchors, and they are refused.
    Alias,
}

impl Node {
    /// A short name for the node's type, for "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match &self.value {
            Value::Scalar { text, quoted } => {
                if *quoted {
                    return "string";
                }
                match text.as_str() {
                    "" | "~" | "null" | "Null" | "NULL" => "null",
                    "true" | "false" | "True" | "False" | "TRUE" | "FALSE" => "boolean",
                    t if t.parse::<i64>().is_ok() => "integer",
                    t if t.parse::<f64>().is_ok() => "number",
                    _ => "string",
                }
            }
            Value::Seq(_) => "list",
            Value::Map(_) => "mapping",
            Value::Alias => "alias",
        }
    }

    pub fn is_null(&self) -> bool {
        self.type_name() == "null"
    }
}

/// A syntax error: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// A key that occurs a second time in the same mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    /// Which document (0-based) it is in.
    pub document: usize,
    /// The dotted path of the key, e.g. `spec.apiServer.port` (`[i]` for list items).
    pub path: String,
    /// Where it occurs again, and where it occurred first.
    pub pos: Pos,
    pub first: Pos,
}

/// The documents of a file and the duplicate keys found in them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Documents {
    pub docs: Vec<Node>,
    pub duplicates: Vec<DuplicateKey>,
}

/// Parses every document in `src`. Each document's root comes with the
/// position of its first token.
pub fn parse_documents(src: &str) -> Result<Documents, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(src);
    parser.load(&mut builder, true).map_err(|e| SyntaxError {
        pos: Pos::from(*e.marker()),
        message: e.info().to_string(),
    })?;
    Ok(Documents {
        docs: builder.docs,
        duplicates: builder.duplicates,
    })
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    /// Open collections; a map holds a pending key until its value arrives.
    stack: Vec<(Node, Option<Node>)>,
    duplicates: Vec<DuplicateKey>,
}

impl Builder {
    /// The dotted path of the open collections down to the top one's `key`.
    fn path_to(&self, key: &str) -> String {
        let mut path = String::new();
        for (i, (node, pending)) in self.stack.iter().enumerate() {
            if i + 1 == self.stack.len() {
                break;
            }
            match (&node.value, pending) {
                (
                    Value::Map(_),
                    Some(Node {
                        value: Value::Scalar { text, .. },
                        ..
                    }),
                ) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(text);
                }
                (Value::Seq(items), _) => path.push_str(&format!("[{}]", items.len())),
                _ => path.push_str(".?"),
            }
        }
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        path
    }

    fn push_value(&mut self, node: Node) {
        // A second occurrence of a scalar key in the same mapping.
        let duplicate = match self.stack.last() {
            Some((
                Node {
                    value: Value::Map(entries),
                    ..
                },
                Some(Node {
                    value: Value::Scalar { text, .. },
                    pos,
                }),
            )) => entries
                .iter()
                .find(|(k, _)| matches!(&k.value, Value::Scalar { text: t, .. } if t == text))
                .map(|(k, _)| (text.clone(), *pos, k.pos)),
            _ => None,
        };
        if let Some((key, pos, first)) = duplicate {
            let path = self.path_to(&key);
            self.duplicates.push(DuplicateKey {
                document: self.docs.len(),
                path,
                pos,
                first,
            });
            if let Some((_, pending)) = self.stack.last_mut() {
                *pending = None;
            }
            return;
        }
        let Some((parent, pending_key)) = self.stack.last_mut() else {
            self.docs.push(node);
            return;
        };
        match &mut parent.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => {
                    // A collection under a key is reported at its key:
                    // "spec.cluster: required field … missing" points at `cluster:`.
                    let mut node = node;
                    if matches!(node.value, Value::Map(_) | Value::Seq(_))
                        && node.pos.line != key.pos.line
                    {
                        node.pos = key.pos;
                    }
                    entries.push((key, node));
                }
            },
            Value::Scalar { .. } | Value::Alias => {}
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from(mark);
        match ev {
            Event::Scalar(text, style, _, _) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.push_value(Node {
                    pos,
                    value: Value::Scalar { text, quoted },
                });
            }
            Event::SequenceStart(..) => self.stack.push((
                Node {
                    pos,
                    value: Value::Seq(vec![]),
                },
                None,
            )),
            Event::MappingStart(..) => self.stack.push((
                Node {
                    pos,
                    value: Value::Map(vec![]),
                },
                None,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((mut node, _)) = self.stack.pop() {
                    // A block collection starts where its first item does;
                    // yaml-rust2's start marker points past it.
                    match &node.value {
                        Value::Map(entries) => {
                            if let Some((k, _)) = entries.first() {
                                node.pos = node.pos.min_by_line(k.pos);
                            }
                        }
                        Value::Seq(items) => {
                            if let Some(first) = items.first() {
                                node.pos = node.pos.min_by_line(first.pos);
                            }
                        }
                        _ => {}
                    }
                    self.push_value(node);
                }
            }
            Event::Alias(_) => self.push_value(Node {
                pos,
                value: Value::Alias,
            }),
            Event::DocumentStart => {}
            Event::DocumentEnd | Event::Nothing | Event::StreamStart | Event::StreamEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let docs = parse_documents("a: 1\nb:\n  c: x\n").unwrap().docs;
        let Value::Map(entries) = &docs[0].value else {
            panic!("not a map")
        };
        assert_eq!(entries[1].0.pos, Pos { line: 2, column: 1 });
        let Value::Map(inner) = &entries[1].1.value else {
            panic!("not a map")
        };
        assert_eq!(inner[0].1.pos, Pos { line: 3, column: 6 });
    }

    #[test]
    fn counts_documents() {
        assert_eq!(parse_documents("a: 1\n---\nb: 2\n").unwrap().docs.len(), 2);
        assert_eq!(parse_documents("").unwrap().docs.len(), 0);
    }

    #[test]
    fn quoted_scalars_are_strings() {
        let docs = parse_documents("a: \"true\"\nb: true\n").unwrap().docs;
        let Value::Map(e) = &docs[0].value else {
            panic!()
        };
        assert_eq!(e[0].1.type_name(), "string");
        assert_eq!(e[1].1.type_name(), "boolean");
    }

    /// Issue 17: a second `daemonSet:` silently replaced the first.
    #[test]
    fn duplicate_keys_are_reported_with_both_positions_and_dropped() {
        let src = "a: 1\nb:\n  - c: x\n    \"c\": y\nd: {e: 1, e: 2}\na: 3\n";
        let parsed = parse_documents(src).unwrap();
        let found: Vec<(String, Pos, Pos)> = parsed
            .duplicates
            .iter()
            .map(|d| (d.path.clone(), d.pos, d.first))
            .collect();
        let p = |line, column| Pos { line, column };
        assert_eq!(
            found,
            [
                ("b[0].c".to_string(), p(4, 5), p(3, 5)),
                ("d.e".to_string(), p(5, 11), p(5, 5)),
                ("a".to_string(), p(6, 1), p(1, 1)),
            ]
        );
        let Value::Map(top) = &parsed.docs[0].value else {
            panic!("not a map")
        };
        assert_eq!(top.len(), 3, "the second `a` is dropped");
        assert_eq!(
            top[0].1.value,
            Value::Scalar {
                text: "1".into(),
                quoted: false
            },
            "the first `a` wins"
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse_documents("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
    }
}
