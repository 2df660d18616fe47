//! Reading policies from a directory (the GitOps path) and inventories from
//! files, with every error located as `FILE:LINE:COL` and, where it helps,
//! the field path. One bad document never hides the errors of the others.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::IgnoredAny;
use tenet_crds::policy::TerminalPolicySpec;
use tenet_crds::{API_VERSION, TerminalPolicy};
use tenet_protocol::inventory::Inventory;

use super::compile::{CompiledPolicy, compile};
use super::yamlpos::{self, DocPositions, Pos};

/// Larger files are refused unread. A policy file holds a handful of
/// documents of a few KiB; etcd refuses objects over 1.5 MiB.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Deeper flow nesting (`[[[...`) is refused before the YAML parser sees
/// it: libyaml takes time quadratic in that depth (30,000 levels: 3 s).
pub const MAX_FLOW_DEPTH: usize = 64;

/// One error in one file, as a person reads it:
/// `policies/browser.yaml:12:18: spec.requirements[0].package.version: ...`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The field path, when the error is about one field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for LoadError {}

/// A policy read from a file and compiled.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    pub policy: TerminalPolicy,
    pub compiled: CompiledPolicy,
    pub file: PathBuf,
    pub line: usize,
    /// Which YAML document of its file (counting empty ones).
    pub document: usize,
    /// Where the key of its approval annotation is written (or, without
    /// one, its `annotations` or `metadata` key): what `tenet policy
    /// check` points at.
    pub approval_at: (usize, usize),
}

/// Everything read from a policy directory: the good policies and every
/// error. The caller decides what an error means (the CLI fails; the
/// operator keeps the last good generation of that policy).
#[derive(Debug, Default)]
pub struct PolicySet {
    pub policies: Vec<LoadedPolicy>,
    pub errors: Vec<LoadError>,
    pub files: usize,
}

/// A TerminalPolicy document exactly as `kubectl apply` takes it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyDocument {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: ObjectMeta,
    spec: TerminalPolicySpec,
    /// Status is the operator's; a file may carry one (from `kubectl get -o
    /// yaml`), and it is ignored.
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

/// Read every `.yaml` and `.yml` file under `dir` (recursively, in name
/// order, skipping hidden files and folders such as `.git`), or the one
/// file `dir` names, and compile every `TerminalPolicy` in them.
pub fn load_dir(dir: &Path) -> PolicySet {
    let mut set = PolicySet::default();
    let files = match yaml_files(dir) {
        Ok(files) => files,
        Err(e) => {
            set.errors.push(e);
            return set;
        }
    };
    set.files = files.len();
    let mut seen: HashMap<(String, String), (PathBuf, Pos)> = HashMap::new();
    for file in files {
        let text = match read_text(&file) {
            Ok(t) => t,
            Err(e) => {
                set.errors.push(e);
                continue;
            }
        };
        load_text(&mut set, &mut seen, &file, &text);
    }
    set
}

/// Read the policies of one file's `text` into `set` (`seen`: the
/// policies read so far, by namespace and name, to refuse duplicates).
pub fn load_text(
    set: &mut PolicySet,
    seen: &mut HashMap<(String, String), (PathBuf, Pos)>,
    file: &Path,
    text: &str,
) {
    if let Err(e) = check_flow_depth(file, text) {
        set.errors.push(e);
        return;
    }
    let mut positions: Option<Vec<DocPositions>> = None;
    let mut pos_of = |doc: usize, field: &str, key: bool| -> Pos {
        let docs = positions.get_or_insert_with(|| yamlpos::index(text));
        docs.get(doc)
            .and_then(|d| if key { d.key(field) } else { d.value(field) })
            .unwrap_or(Pos { line: 1, column: 1 })
    };
    let located = |pos: Pos, field: Option<&str>, message: String| LoadError {
        file: file.to_path_buf(),
        line: pos.line,
        column: pos.column,
        field: field.filter(|f| !f.is_empty()).map(str::to_string),
        message,
    };
    let mut documents = 0;
    for (doc_index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                // After a syntax error the rest of the stream cannot be read.
                set.errors.push(yaml_error(file, &e));
                documents += 1;
                break;
            }
        };
        if value.is_null() {
            continue; // an empty document, as between two `---`
        }
        documents += 1;
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        if !value.is_mapping() || api_version != API_VERSION || kind != "TerminalPolicy" {
            let field = if kind != "TerminalPolicy" {
                "kind"
            } else {
                "apiVersion"
            };
            let message = if !value.is_mapping() {
                "a document must be a mapping with apiVersion, kind, metadata and spec".to_string()
            } else {
                format!(
                    "expected apiVersion {API_VERSION} and kind TerminalPolicy, found apiVersion {api_version:?} and kind {kind:?}"
                )
            };
            set.errors.push(located(
                pos_of(doc_index, field, false),
                Some(field),
                message,
            ));
            continue;
        }
        let parsed: Result<PolicyDocument, _> = serde_path_to_error::deserialize(value);
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => {
                let field = e.path().to_string();
                let field = if field == "." { String::new() } else { field };
                let inner = e.into_inner();
                let message = inner.to_string();
                // For an unknown field the path ends with the unknown key:
                // point at the key, not at its value.
                let is_unknown = message.starts_with("unknown field");
                set.errors.push(located(
                    pos_of(doc_index, &field, is_unknown),
                    Some(&field),
                    message,
                ));
                continue;
            }
        };
        let name_pos = pos_of(doc_index, "metadata.name", false);
        let Some(name) = parsed.metadata.name.clone() else {
            set.errors.push(located(
                pos_of(doc_index, "metadata", true),
                Some("metadata.name"),
                "missing field `name`".into(),
            ));
            continue;
        };
        if let Err(why) = check_name(&name) {
            set.errors
                .push(located(name_pos, Some("metadata.name"), why));
            continue;
        }
        let namespace = parsed
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let key = (namespace.clone(), name.clone());
        if let Some((first_file, first_pos)) = seen.get(&key) {
            set.errors.push(located(
                name_pos,
                Some("metadata.name"),
                format!(
                    "duplicate TerminalPolicy {namespace}/{name}: first defined at {}:{}:{}",
                    first_file.display(),
                    first_pos.line,
                    first_pos.column
                ),
            ));
            continue;
        }
        seen.insert(key, (file.to_path_buf(), name_pos));
        let mut metadata = parsed.metadata;
        metadata.namespace = Some(namespace);
        let policy = TerminalPolicy {
            metadata,
            spec: parsed.spec,
            status: None,
        };
        match compile(&policy) {
            Ok(compiled) => set.policies.push(LoadedPolicy {
                policy,
                compiled,
                file: file.to_path_buf(),
                line: name_pos.line,
                document: doc_index,
                approval_at: {
                    let at = pos_of(
                        doc_index,
                        &format!(
                            "metadata.annotations.{}",
                            tenet_protocol::approval::APPROVAL_ANNOTATION
                        ),
                        true,
                    );
                    (at.line, at.column)
                },
            }),
            Err(errors) => {
                for e in errors {
                    let mut pos = pos_of(doc_index, &e.path, false);
                    if let Some(offset) = e.offset {
                        pos.column += offset;
                    }
                    set.errors.push(located(pos, Some(&e.path), e.message));
                }
            }
        }
    }
    if documents == 0 {
        set.errors
            .push(file_error(file, "the file holds no YAML document".into()));
    }
}

/// A Kubernetes object name: a DNS subdomain (RFC 1123).
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name: use at most 253 lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
        ))
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden {
            continue;
        }
        let ty = entry.file_type()?;
        if ty.is_dir() {
            collect_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// The YAML files of a directory, sorted, or the path itself when it is a
/// file.
pub fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let meta =
        std::fs::metadata(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    collect_files(path, &mut files)
        .map_err(|e| file_error(path, format!("cannot read the directory: {e}")))?;
    files.sort();
    Ok(files)
}

fn file_error(file: &Path, message: String) -> LoadError {
    LoadError {
        file: file.to_path_buf(),
        line: 1,
        column: 1,
        field: None,
        message,
    }
}

/// Read a file as UTF-8 text, refusing files over the size limit without
/// reading them.
fn read_text(file: &Path) -> Result<String, LoadError> {
    let f = std::fs::File::open(file).map_err(|e| file_error(file, format!("cannot open: {e}")))?;
    let len = f
        .metadata()
        .map_err(|e| file_error(file, format!("cannot read: {e}")))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(file_error(
            file,
            format!("the file is {len} bytes, over the limit of {MAX_FILE_BYTES} bytes"),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(file, format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(file_error(
            file,
            format!("the file grew over the limit of {MAX_FILE_BYTES} bytes while being read"),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count()
            + 1;
        LoadError {
            file: file.to_path_buf(),
            line,
            column,
            field: None,
            message: "the file is not valid UTF-8".into(),
        }
    })
}

/// Refuse flow collections nested deeper than [`MAX_FLOW_DEPTH`], in one
/// linear pass. Brackets are counted everywhere but in comments, quoted
/// strings included: that errs on the side of refusing, and no quoting
/// trick can hide a deep nest from the count.
fn check_flow_depth(file: &Path, text: &str) -> Result<(), LoadError> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let mut comment = false;
    let mut prev = '\n';
    for c in text.chars() {
        column += 1;
        match c {
            '\n' => {
                line += 1;
                column = 0;
                comment = false;
            }
            _ if comment => {}
            '#' if prev.is_whitespace() => comment = true,
            '[' | '{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Err(LoadError {
                        file: file.to_path_buf(),
                        line,
                        column,
                        field: None,
                        message: format!(
                            "invalid YAML: nested more than {MAX_FLOW_DEPTH} levels deep"
                        ),
                    });
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    Ok(())
}

fn yaml_error(file: &Path, e: &serde_yaml::Error) -> LoadError {
    let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
    let message = strip_first_location(&e.to_string());
    LoadError {
        file: file.to_path_buf(),
        line,
        column,
        field: None,
        message: format!("invalid YAML: {message}"),
    }
}

/// serde_yaml says where the error is (" at line L column C"); the
/// `FILE:LINE:COL` prefix already does, so drop the first such phrase and
/// keep any further context ("while scanning a quoted scalar at line 7").
fn strip_first_location(message: &str) -> String {
    let Some(start) = message.find(" at line ") else {
        return message.to_string();
    };
    let after = &message[start..];
    let end = after
        .find(" column ")
        .map(|c| {
            let digits = after[c + 8..]
                .find(|ch: char| !ch.is_ascii_digit())
                .unwrap_or(after.len() - c - 8);
            start + c + 8 + digits
        })
        .unwrap_or(message.len());
    format!("{}{}", &message[..start], &message[end..])
}

/// Read terminal inventories from a file (one or more YAML documents) or
/// from every `.yaml`/`.yml` file of a directory.
pub fn load_inventories(path: &Path) -> Result<Vec<Inventory>, Vec<LoadError>> {
    let files = yaml_files(path).map_err(|e| vec![e])?;
    let mut inventories = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let text = match read_text(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if let Err(e) = check_flow_depth(&file, &text) {
            errors.push(e);
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(&text) {
            match serde_path_to_error::deserialize::<_, Option<Inventory>>(doc) {
                Ok(Some(inv)) => inventories.push(inv),
                Ok(None) => {}
                Err(e) => {
                    let field = e.path().to_string();
                    let mut err = yaml_error(&file, e.inner());
                    let message = err.message.trim_start_matches("invalid YAML: ");
                    // serde_yaml starts its message with the path (of the
                    // enclosing mapping) too.
                    let message = match message.split_once(": ") {
                        Some((prefix, rest)) if field.starts_with(prefix) => rest,
                        _ => message,
                    };
                    err.message = message.to_string();
                    if field != "." {
                        err.field = Some(field);
                    }
                    errors.push(err);
                    break;
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(inventories)
    } else {
        Err(errors)
    }
}
