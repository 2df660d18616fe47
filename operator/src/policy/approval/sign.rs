//! `tenet policy sign`: add an admin's signature to the approval of every
//! TerminalPolicy in a file, in the file itself (the `tenet.dev/approval`
//! annotation), so that the same file serves a policy directory and
//! `kubectl apply`.
//!
//! The file is edited as text, not re-serialised: comments, key order and
//! quoting stay as the admins wrote them. The edited text is read again
//! before it is written, and must hold the same policies with exactly the
//! new approvals; otherwise nothing is written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use tenet_protocol::approval::PolicyApproval;
use tenet_protocol::keys::{Fingerprint, KeyError};
use tenet_protocol::{Kind, SignedMessage, Signer};

use super::super::auto::{Choice, Contents};
use super::super::load::{LoadError, LoadedPolicy, PolicySet, load_text};
use super::super::yamlpos::{self, DocPositions, Pos};
use super::APPROVAL_ANNOTATION;

/// What signing did to one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPolicy {
    /// `namespace/name`.
    pub policy: String,
    /// Every key whose signature the approval now holds, in order.
    pub signers: Vec<Fingerprint>,
    /// False when this key had signed this version already.
    pub added: bool,
    /// Signatures dropped because they approved an earlier version.
    pub dropped: usize,
    /// For an auto remediation: the bundle the approval names, and what
    /// the admin should know about the choice.
    pub bundle: Option<Choice>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The file does not load: nothing is signed until it does.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<LoadError>),
    #[error("{}: holds no TerminalPolicy to sign", .0.display())]
    NothingToSign(PathBuf),
    #[error("{}:{line}:{column}: {message}; nothing was written", file.display())]
    Place {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot sign: {0}")]
    Key(#[from] KeyError),
    /// An auto remediation without a bundle that can carry it out.
    #[error("{}: {policy}: {message}; nothing was written", file.display())]
    Auto {
        file: PathBuf,
        policy: String,
        message: String,
    },
}

/// How to sign.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignOptions<'a> {
    /// Start a new approval even when the policy carries one of this very
    /// version (dropping its signatures, with a new approval time): how
    /// admins bring back an earlier version, which the operator and the
    /// terminals refuse with its old approval.
    pub renew: bool,
    /// The approval time of a new approval (unix ms).
    pub now_ms: u64,
    /// The bundles an auto remediation may run (`tenet policy sign
    /// --bundles DIR`): the approval names the one chosen.
    pub bundles: Option<&'a [Contents]>,
}

/// Sign every TerminalPolicy in `file` with `key`, in place (through a
/// symbolic link, the file it points to).
pub fn sign(
    file: &Path,
    key: &dyn Signer,
    options: SignOptions<'_>,
) -> Result<Vec<SignedPolicy>, SignError> {
    let io = |source| SignError::Io {
        path: file.to_path_buf(),
        source,
    };
    let target = std::fs::canonicalize(file).map_err(io)?;
    let text = std::fs::read_to_string(&target).map_err(io)?;
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&target).map_err(io)?.permissions().mode() & 0o7777
    };
    let set = load_one(file, &text);
    if !set.errors.is_empty() {
        return Err(SignError::Invalid(set.errors));
    }
    if set.policies.is_empty() {
        return Err(SignError::NothingToSign(file.to_path_buf()));
    }
    let docs = yamlpos::index(&text);
    let mut edits = Vec::new();
    let mut signed = Vec::new();
    let mut frames = HashMap::new();
    for p in &set.policies {
        let (frame, report) = approval_for(file, p, key, options)?;
        let encoded = frame.encode();
        let text64 = base64::engine::general_purpose::STANDARD.encode(&encoded);
        let positions = docs.get(p.document).ok_or_else(|| SignError::Place {
            file: file.to_path_buf(),
            line: p.line,
            column: 1,
            message: "cannot find this document's fields".into(),
        })?;
        edits.push(place(file, &text, positions, &text64)?);
        frames.insert(p.compiled.key(), encoded);
        signed.push(report);
    }
    let new_text = apply(&text, edits);
    check_edit(file, &set, &text, &new_text, &frames)?;
    if new_text != text {
        tenet_protocol::host::replace(&target, new_text.as_bytes(), mode).map_err(io)?;
    }
    Ok(signed)
}

fn load_one(file: &Path, text: &str) -> PolicySet {
    let mut set = PolicySet {
        files: 1,
        ..PolicySet::default()
    };
    load_text(&mut set, &mut HashMap::new(), file, text);
    set
}

/// The approval of `p` with `key`'s signature added: to the approval it
/// carries when that one approves this very version, else to a new one
/// (the signatures of an earlier version approve nothing now).
fn approval_for(
    file: &Path,
    p: &LoadedPolicy,
    key: &dyn Signer,
    options: SignOptions<'_>,
) -> Result<(SignedMessage, SignedPolicy), SignError> {
    let existing = p
        .compiled
        .approval
        .as_ref()
        .ok()
        .and_then(|bytes| SignedMessage::decode(bytes, Kind::PolicyApproval).ok());
    let choice = auto_choice(file, p, options)?;
    let computed;
    let statement = match &choice {
        Some(c) => {
            computed = super::statement(&p.compiled.key(), &p.compiled.spec, Some(c.digest));
            &computed
        }
        None => p.compiled.statement.as_ref(),
    };
    let fingerprint = key.public_key().fingerprint();
    let fresh = || {
        SignedMessage::new(&PolicyApproval {
            statement: statement.clone(),
            approved_at_ms: options.now_ms,
        })
    };
    let (mut frame, dropped) = match existing {
        Some(f)
            if !options.renew
                && f.open::<PolicyApproval>()
                    .is_ok_and(|a| a.statement == *statement) =>
        {
            (f, 0)
        }
        Some(f) => (fresh(), f.signatures.len()),
        None => (fresh(), 0),
    };
    let added = !frame.signatures.iter().any(|s| s.key == fingerprint);
    frame.sign(key)?;
    let report = SignedPolicy {
        policy: p.compiled.key(),
        signers: frame.signatures.iter().map(|s| s.key).collect(),
        added,
        dropped,
        bundle: choice,
    };
    Ok((frame, report))
}

/// For a policy that remediates automatically (and is not suspended),
/// the standard-library bundle its approval is to name.
fn auto_choice(
    file: &Path,
    p: &LoadedPolicy,
    options: SignOptions<'_>,
) -> Result<Option<Choice>, SignError> {
    let spec = &p.compiled.spec;
    if spec.suspend || spec.remediation.as_ref().is_none_or(|r| r.auto.is_none()) {
        return Ok(None);
    }
    let refuse = |message: String| SignError::Auto {
        file: file.to_path_buf(),
        policy: p.compiled.key(),
        message,
    };
    let Some(bundles) = options.bundles else {
        return Err(refuse(
            "its remediation is auto: name the bundle directory with --bundles, so the approval can name the standard-library bundle that carries it out".into(),
        ));
    };
    // It compiled: its steps are valid.
    let steps = super::super::auto::steps(spec).map_err(|e| {
        refuse(
            e.iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let current = p
        .compiled
        .statement
        .remediation
        .as_ref()
        .map(|r| r.payload_digest);
    super::super::auto::choose(&steps, bundles, current, options.renew)
        .map(Some)
        .map_err(refuse)
}

/// One change to the text, at a 0-based line and character column.
#[derive(Debug)]
enum Edit {
    /// Replace the value token (up to the next whitespace) that starts here.
    Replace {
        line: usize,
        column: usize,
        with: String,
    },
    /// Insert `text` here.
    Insert {
        line: usize,
        column: usize,
        text: String,
    },
}

impl Edit {
    fn at(&self) -> (usize, usize) {
        match self {
            Edit::Replace { line, column, .. } | Edit::Insert { line, column, .. } => {
                (*line, *column)
            }
        }
    }
}

/// Where the approval of one document goes: over the annotation it has,
/// as the first entry of its `annotations`, or as a new `annotations`
/// entry first in its `metadata`. Block and flow style are both kept.
fn place(file: &Path, text: &str, doc: &DocPositions, value: &str) -> Result<Edit, SignError> {
    let annotation = format!("metadata.annotations.{APPROVAL_ANNOTATION}");
    if let Some(v) = doc.exact_value(&annotation) {
        return Ok(Edit::Replace {
            line: v.line - 1,
            column: v.column - 1,
            with: value.to_string(),
        });
    }
    let (first, entry) = match doc.first_key_under("metadata.annotations") {
        Some(first) => (first, (APPROVAL_ANNOTATION.to_string(), value.to_string())),
        None if doc.exact_key("metadata.annotations").is_some() => {
            let k = doc
                .exact_key("metadata.annotations")
                .unwrap_or(Pos { line: 1, column: 1 });
            return Err(SignError::Place {
                file: file.to_path_buf(),
                line: k.line,
                column: k.column,
                message: "metadata.annotations is empty; remove it, or give it an entry, so that the approval can be added".into(),
            });
        }
        None => match doc.first_key_under("metadata") {
            Some(first) => (first, ("annotations".to_string(), String::new())),
            None => {
                return Err(SignError::Place {
                    file: file.to_path_buf(),
                    line: 1,
                    column: 1,
                    message: "the document has no metadata".into(),
                });
            }
        },
    };
    let flow = in_flow(text, first);
    let newline = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let (key, inline) = entry;
    let inserted = match (flow, inline.is_empty()) {
        // `{ tenet.dev/approval: X, owner: it }`
        (true, false) => format!("{key}: {inline}, "),
        // `{ annotations: { tenet.dev/approval: X }, name: ... }`
        (true, true) => format!("{key}: {{ {APPROVAL_ANNOTATION}: {value} }}, "),
        (false, false) => {
            let indent = " ".repeat(first.column - 1);
            format!("{key}: {inline}{newline}{indent}")
        }
        (false, true) => {
            let indent = " ".repeat(first.column - 1);
            format!("{key}:{newline}{indent}  {APPROVAL_ANNOTATION}: {value}{newline}{indent}")
        }
    };
    Ok(Edit::Insert {
        line: first.line - 1,
        column: first.column - 1,
        text: inserted,
    })
}

/// Whether the key at `at` is an entry of a flow mapping (`{ a: 1 }`): the
/// text before it, blanks aside, ends with `{` or `,`.
fn in_flow(text: &str, at: Pos) -> bool {
    let mut before = String::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let line: String = if i + 1 == at.line {
            line.chars().take(at.column - 1).collect()
        } else {
            line.to_string()
        };
        // A comment is not text: `# owners: alice, bob,` ends in no `,`.
        let code = match line.find('#') {
            Some(n) if n == 0 || line[..n].ends_with([' ', '\t']) => &line[..n],
            _ => &line,
        };
        before.push_str(code);
        before.push('\n');
        if i + 1 == at.line {
            break;
        }
    }
    before.trim_end().ends_with(['{', ','])
}

/// The length in bytes of the one-line scalar `rest` starts with: a quoted
/// one to its closing quote; a plain one (base64, as written here) up to a
/// blank, a comment, or the `,` `}` `]` that end a flow entry.
fn scalar_len(rest: &str) -> usize {
    let mut chars = rest.char_indices();
    match chars.next() {
        Some((_, q @ ('"' | '\''))) => {
            let mut escaped = false;
            for (i, c) in chars {
                if q == '"' && c == '\\' && !escaped {
                    escaped = true;
                    continue;
                }
                if c == q && !escaped {
                    return i + 1;
                }
                escaped = false;
            }
            rest.trim_end_matches(['\n', '\r']).len()
        }
        _ => rest
            .find(|c: char| c.is_whitespace() || matches!(c, ',' | '}' | ']'))
            .unwrap_or(rest.len()),
    }
}

/// Apply `edits` to `text`, the last first so that each position still
/// holds. Columns are counted in characters, as the YAML scanner counts.
fn apply(text: &str, mut edits: Vec<Edit>) -> String {
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
    edits.sort_by_key(|e| std::cmp::Reverse(e.at()));
    for edit in edits {
        let (line, column) = edit.at();
        let Some(l) = lines.get_mut(line) else {
            continue;
        };
        let start = l.char_indices().nth(column).map_or(l.len(), |(i, _)| i);
        match edit {
            Edit::Replace { with, .. } => {
                let end = start + scalar_len(&l[start..]);
                l.replace_range(start..end, &with);
            }
            Edit::Insert { text, .. } => l.insert_str(start, &text),
        }
    }
    lines.concat()
}

/// The edited text must read as the same documents, each policy carrying
/// exactly its new approval, and nothing else changed: every document,
/// read as YAML, equals the original once their approval annotations are
/// set aside.
fn check_edit(
    file: &Path,
    before: &PolicySet,
    original: &str,
    text: &str,
    frames: &HashMap<String, Vec<u8>>,
) -> Result<(), SignError> {
    let fail = |p: &LoadedPolicy, why: String| SignError::Place {
        file: file.to_path_buf(),
        line: p.line,
        column: 1,
        message: format!(
            "cannot add the approval of {}: {why}; write its metadata, annotations and {APPROVAL_ANNOTATION} value in plain block style",
            p.compiled.key()
        ),
    };
    let first = &before.policies[0];
    let after = load_one(file, text);
    if let Some(e) = after.errors.first() {
        return Err(fail(first, format!("the edited file would not read ({e})")));
    }
    for p in &before.policies {
        let key = p.compiled.key();
        let Some(q) = after.policies.iter().find(|q| q.compiled.key() == key) else {
            return Err(fail(p, "it would be gone from the edited file".into()));
        };
        let carried = q.compiled.approval.as_deref().ok();
        // The spec must read the same; an auto policy's statement also
        // names the bundle of the new approval, which the frame holds.
        if q.compiled.statement.spec_digest != p.compiled.statement.spec_digest
            || carried != frames.get(&key).map(Vec::as_slice)
        {
            return Err(fail(p, "the edited file would read differently".into()));
        }
    }
    if documents_without_approvals(original) != documents_without_approvals(text) {
        return Err(fail(
            first,
            "the edit would change more than the approval".into(),
        ));
    }
    Ok(())
}

/// Every YAML document of `text`, its `tenet.dev/approval` annotation
/// (and an `annotations` mapping left empty without it) set aside.
fn documents_without_approvals(text: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            let mut v = serde_yaml::Value::deserialize(doc).unwrap_or(serde_yaml::Value::Null);
            if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_mapping_mut()) {
                let empty = match meta.get_mut("annotations").and_then(|a| a.as_mapping_mut()) {
                    Some(a) => {
                        a.remove(APPROVAL_ANNOTATION);
                        a.is_empty()
                    }
                    None => false,
                };
                if empty {
                    meta.remove("annotations");
                }
            }
            v
        })
        .collect()
}
