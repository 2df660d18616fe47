//! Where each field of a YAML document was written, so that errors found
//! after deserialising (a bad CEL expression, an impossible version
//! constraint, a duplicate name) point at a line and column like syntax
//! errors do. serde_yaml gives positions only for its own errors; this walks
//! the same text with yaml-rust2's marked events (no alias expansion, no
//! recursion) and records the position of every field path.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Pos {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Pos {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// Positions of one document's fields, keyed by path as serde_path_to_error
/// prints it: `spec.requirements[0].package.version`.
#[derive(Debug, Default)]
pub struct DocPositions {
    /// Where the key of a mapping entry is written (`version:`).
    keys: HashMap<String, Pos>,
    /// Where a value starts.
    values: HashMap<String, Pos>,
}

impl DocPositions {
    /// The value at `path`, or the nearest enclosing field that exists.
    pub fn value(&self, path: &str) -> Option<Pos> {
        nearest(path, |p| self.values.get(p).copied())
    }

    /// Where the key of the entry at exactly `path` is written.
    pub fn exact_key(&self, path: &str) -> Option<Pos> {
        self.keys.get(path).copied()
    }

    /// Where the first key inside the mapping at `path` is written: its
    /// first entry's (the earliest of all keys beneath it).
    pub fn first_key_under(&self, path: &str) -> Option<Pos> {
        let prefix = format!("{path}.");
        self.keys
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, p)| *p)
            .min_by_key(|p| (p.line, p.column))
    }

    /// Where the value at exactly `path` starts.
    pub fn exact_value(&self, path: &str) -> Option<Pos> {
        self.values.get(path).copied()
    }

    /// The key of the entry at `path` (for unknown fields), or the nearest
    /// enclosing field that exists.
    pub fn key(&self, path: &str) -> Option<Pos> {
        nearest(path, |p| {
            self.keys.get(p).or_else(|| self.values.get(p)).copied()
        })
    }
}

fn nearest(path: &str, get: impl Fn(&str) -> Option<Pos>) -> Option<Pos> {
    let mut p = path;
    loop {
        if let Some(pos) = get(p) {
            return Some(pos);
        }
        if p.is_empty() {
            return None;
        }
        let cut = p.rfind(['.', '[']).unwrap_or(0);
        p = &p[..cut];
    }
}

enum Frame {
    Map {
        path: String,
        key: Option<(String, Pos)>,
    },
    Seq {
        path: String,
        index: usize,
    },
    /// A mapping or sequence used as a mapping key: nothing in it is a field.
    ComplexKey,
}

#[derive(Default)]
struct Indexer {
    docs: Vec<DocPositions>,
    stack: Vec<Frame>,
}

impl Indexer {
    /// The path of the node that starts now, and whether it is a mapping key.
    fn place(&mut self, mark: Marker, scalar: Option<&str>) -> Option<String> {
        let pos = Pos::from(mark);
        let doc = self.docs.last_mut()?;
        match self.stack.last_mut() {
            None => {
                doc.values.insert(String::new(), pos);
                Some(String::new())
            }
            Some(Frame::ComplexKey) => None,
            Some(Frame::Map {
                key: key @ None, ..
            }) => {
                // This node is a key.
                *key = Some((scalar.unwrap_or("?").to_string(), pos));
                None
            }
            Some(Frame::Map {
                path,
                key: Some((k, kpos)),
            }) => {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                doc.keys.insert(child.clone(), *kpos);
                doc.values.insert(child.clone(), pos);
                Some(child)
            }
            Some(Frame::Seq { path, index }) => {
                let child = format!("{path}[{index}]");
                doc.values.insert(child.clone(), pos);
                Some(child)
            }
        }
    }
}

impl MarkedEventReceiver for Indexer {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => {
                self.docs.push(DocPositions::default());
                self.stack.clear();
            }
            Event::Scalar(ref value, ..) => {
                let was_key = self.is_key_slot();
                self.place(mark, Some(value));
                if !was_key {
                    self.value_done();
                }
            }
            Event::Alias(_) => {
                let was_key = self.is_key_slot();
                self.place(mark, None);
                if !was_key {
                    self.value_done();
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(ev, Event::MappingStart(..));
                let frame =
                    if self.is_key_slot() || matches!(self.stack.last(), Some(Frame::ComplexKey)) {
                        self.place(mark, None);
                        Frame::ComplexKey
                    } else {
                        match self.place(mark, None) {
                            Some(path) if is_map => Frame::Map { path, key: None },
                            Some(path) => Frame::Seq { path, index: 0 },
                            None => Frame::ComplexKey,
                        }
                    };
                self.stack.push(frame);
            }
            Event::MappingEnd | Event::SequenceEnd => {
                let ended = self.stack.pop();
                // A complex key that ends leaves its entry waiting for the value.
                if !matches!(ended, Some(Frame::ComplexKey)) {
                    self.value_done();
                }
            }
            _ => {}
        }
    }
}

impl Indexer {
    fn is_key_slot(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None, .. }))
    }

    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { index, .. }) => *index += 1,
            _ => {}
        }
    }
}

/// Positions of every document in `text`, in order. A text the scanner
/// cannot read gives the documents read before the error.
pub fn index(text: &str) -> Vec<DocPositions> {
    let mut indexer = Indexer::default();
    let mut parser = Parser::new_from_str(text);
    // Errors here were already reported by serde_yaml, with their position.
    let _ = parser.load(&mut indexer, true);
    indexer.docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_positions() {
        let text = "a: 1\nspec:\n  list:\n    - x: 1\n      y: [1, {z: 2}]\n  ? [complex]\n  : v\n  after: 3\n---\nb: 2\n";
        let docs = index(text);
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.value("a"), Some(Pos { line: 1, column: 4 }));
        assert_eq!(d.key("spec.list[0].x"), Some(Pos { line: 4, column: 7 }));
        assert_eq!(
            d.value("spec.list[0].y[1].z"),
            Some(Pos {
                line: 5,
                column: 18
            })
        );
        assert_eq!(
            d.value("spec.after"),
            Some(Pos {
                line: 8,
                column: 10
            })
        );
        // A path that does not exist falls back to its nearest parent.
        assert_eq!(d.value("spec.list[0].missing"), d.value("spec.list[0]"));
        assert_eq!(
            docs[1].value("b"),
            Some(Pos {
                line: 10,
                column: 4
            })
        );
    }
}
