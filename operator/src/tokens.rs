//! Bootstrap tokens: `tenet token create` mints one, prints it once and
//! leaves only its hash for the operator, in the data directory's token
//! inbox (standalone) or in the Secret `tenet-tokens` (Kubernetes). The
//! running operator imports those hashes into its store, where enrolment
//! spends them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tenet_protocol::host::{now_ms, write_new};
use tenet_protocol::wire::{encode, sha256};

use crate::daemon::{DaemonError, io};
use crate::data_dir::tokens_dir;
use crate::store::{Store, TokenRecord, token_key};

/// A bootstrap token waiting in `DATA/tokens/` for the operator to import.
#[derive(Serialize, Deserialize)]
struct PendingToken {
    hash: String,
    record: TokenRecord,
}

/// A bootstrap token just made, and the fingerprint of the CA agents must
/// find at the gateway.
pub struct IssuedToken {
    pub token: String,
    pub ca_fingerprint: String,
}

/// Where a new token's hash goes.
pub enum Inbox<'a> {
    /// `DATA/tokens/`, which the standalone operator watches.
    Directory,
    /// The Secret `tenet-tokens` of this namespace (KUBECONFIG), which the
    /// Kubernetes leader reads.
    Secret { namespace: &'a str },
}

/// Check a whole set of labels admins assign (a Terminal's `spec.labels`):
/// each as [`parse_label`] checks it, 64 at most.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > tenet_protocol::enrol::MAX_LABELS {
        return Err(format!(
            "{} labels, more than {}",
            labels.len(),
            tenet_protocol::enrol::MAX_LABELS
        ));
    }
    for (k, v) in labels {
        let (key, value) = parse_label(&format!("{k}={v}"))?;
        if (key.as_str(), value.as_str()) != (k.as_str(), v.as_str()) {
            return Err(format!("label key {k:?}: '=' is not allowed"));
        }
    }
    Ok(())
}

/// Parse `KEY=VALUE` as a label admins assign, with Kubernetes' syntax: an
/// optional DNS prefix and `/`, a name of at most 63 letters, digits, `-`,
/// `_` and `.`; a value of the same (or empty).
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    let name_ok = |s: &str| {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| !part.is_empty() && name_ok(part))
    });
    if !prefix_ok || !name_ok(name) {
        return Err(format!(
            "label key {key:?}: use an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ));
    }
    if !value.is_empty() && !name_ok(value) {
        return Err(format!(
            "label value {value:?}: use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ));
    }
    let dns_label = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if key == crate::policy::NAMESPACE_LABEL && !dns_label {
        return Err(format!(
            "{key}={value:?}: a namespace name is at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// `tenet token create`: a one-time bootstrap token (or one for `uses`
/// terminals), assigning `labels` to the terminals that enrol with it.
/// Only its hash is written; the token is printed once, with the enrolment
/// command.
#[allow(clippy::too_many_arguments)]
pub async fn create_token(
    data: &Path,
    terminal: Option<String>,
    uses: u32,
    ttl: Duration,
    labels: BTreeMap<String, String>,
    inbox: Inbox<'_>,
    out: &mut dyn Write,
) -> Result<IssuedToken, DaemonError> {
    if uses == 0 || (uses > 1 && terminal.is_some()) {
        return Err(DaemonError::Usage(
            "--uses must be at least 1, and 1 for a token bound to one --terminal".into(),
        ));
    }
    let assigns_namespace = labels.contains_key(crate::policy::NAMESPACE_LABEL);
    let to_secret = matches!(inbox, Inbox::Secret { .. });
    let dir = tokens_dir(data);
    if matches!(inbox, Inbox::Directory) && !dir.is_dir() {
        return Err(DaemonError::Usage(format!(
            "{} has no tokens/ directory: start `tenet operator --data {}` once first",
            data.display(),
            data.display()
        )));
    }
    let ca_fingerprint = ca_fingerprint(data)?;
    let token = hex::encode(tenet_protocol::keys::random_bytes()?);
    let pending = PendingToken {
        hash: token_key(&token),
        record: TokenRecord {
            terminal,
            expires_ms: now_ms() + ttl.as_millis() as u64,
            uses_left: uses,
            labels,
        },
    };
    match inbox {
        Inbox::Directory => {
            let path = dir.join(format!("{}.token", &pending.hash[..16]));
            write_new(&path, &encode(&pending), 0o600).map_err(io(&path))?;
        }
        Inbox::Secret { namespace } => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| DaemonError::Usage(format!("cannot reach the Kubernetes API: {e}")))?;
            crate::kubernetes::add_token(
                client,
                namespace,
                &pending.hash,
                &encode(&pending.record),
            )
            .await
            .map_err(|e| DaemonError::Usage(format!("cannot write the token Secret: {e}")))?;
        }
    }
    let _ = writeln!(
        out,
        "token {token}\nca-fingerprint {ca_fingerprint}\nenrol a terminal with:\n  tenet-agent enrol --config agent.yaml --token {token} --ca-fingerprint {ca_fingerprint}"
    );
    if to_secret && !assigns_namespace {
        let _ = writeln!(
            out,
            "note: no --label {NAMESPACE_LABEL}=NAMESPACE: in Kubernetes mode no TerminalPolicy selects these terminals until they are enrolled with one",
            NAMESPACE_LABEL = crate::policy::NAMESPACE_LABEL
        );
    }
    Ok(IssuedToken {
        token,
        ca_fingerprint,
    })
}

/// The fingerprint agents pin for the gateway: of `DATA/ca.pem`.
fn ca_fingerprint(data: &Path) -> Result<String, DaemonError> {
    let path = data.join("ca.pem");
    let ca = std::fs::read(&path).map_err(io(&path))?;
    let ca_der =
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            &ca,
        )
        .map_err(|e| DaemonError::Usage(format!("ca.pem: {e}")))?;
    Ok(format!("sha256:{}", hex::encode(sha256(&ca_der))))
}

/// Import every `*.token` of the data directory's inbox into the store, and
/// delete it. A file that is not a token is logged and deleted too. A
/// token the operator cannot read or delete (written by another user, as
/// `tenet token create` run as root beside an operator that is not) stays
/// where it is for the next look; what is wrong with each is returned,
/// for the caller to say once.
pub fn import_inbox(data: &Path, store: &Store) -> Vec<String> {
    let dir = tokens_dir(data);
    let mut problems = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return problems;
    };
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "token") {
            continue;
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("{}: cannot read it: {e}", path.display()));
                continue;
            }
        };
        // A hash then a record (also one from before tokens had labels).
        let pending = postcard::take_from_bytes::<String>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|(hash, rest)| {
                TokenRecord::decode(rest)
                    .map(|record| PendingToken { hash, record })
                    .map_err(|e| e.to_string())
            });
        match pending {
            Ok(p) => store.add_token_hash(&p.hash, &p.record),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "not a token file; ignored")
            }
        }
        if let Err(e) = std::fs::remove_file(&path) {
            problems.push(format!(
                "{}: imported, cannot delete it: {e}",
                path.display()
            ));
        }
    }
    problems
}

/// Import the hashes of the token Secret (Kubernetes mode) that the store
/// does not hold yet.
pub fn import_secret(tokens: Vec<(String, Vec<u8>)>, store: &Store) {
    for (hash, raw) in tokens {
        if store.has_token_hash(&hash) {
            continue;
        }
        match TokenRecord::decode(&raw) {
            Ok(record) => store.add_token_hash(&hash, &record),
            Err(e) => tracing::warn!(error = %e, "not a token; ignored"),
        }
    }
}

#[cfg(test)]
mod label_tests {
    use super::parse_label;

    #[test]
    fn labels_follow_kubernetes_syntax_and_name_their_fault() {
        assert_eq!(
            parse_label("site=nagoya"),
            Ok(("site".into(), "nagoya".into()))
        );
        assert_eq!(
            parse_label("tenet.dev/namespace=hospital-it"),
            Ok(("tenet.dev/namespace".into(), "hospital-it".into()))
        );
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        assert_eq!(parse_label("site"), Err("\"site\" is not KEY=VALUE".into()));
        assert_eq!(
            parse_label("-site=x"),
            Err("label key \"-site\": use an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit".into())
        );
        assert_eq!(
            parse_label("site=a b"),
            Err("label value \"a b\": use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit".into())
        );
        assert_eq!(
            parse_label("tenet.dev/namespace=Hospital_IT"),
            Err("tenet.dev/namespace=\"Hospital_IT\": a namespace name is at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit".into())
        );
    }
}

#[cfg(test)]
mod inbox_tests {
    use super::*;

    /// One token file the operator cannot read never stops it, nor the
    /// import of the others: it stays for the next look, and is said.
    #[test]
    fn an_unreadable_token_is_left_and_said() {
        let data = tempfile::tempdir().expect("tempdir");
        let dir = tokens_dir(data.path());
        std::fs::create_dir_all(&dir).expect("mkdir");
        let store = Store::open(&data.path().join("tenet.redb")).expect("store");
        let pending = PendingToken {
            hash: token_key("good"),
            record: TokenRecord {
                terminal: None,
                expires_ms: u64::MAX,
                uses_left: 1,
                labels: BTreeMap::new(),
            },
        };
        std::fs::write(dir.join("a.token"), encode(&pending)).expect("token");
        // Reading a directory fails as reading another user's file does.
        std::fs::create_dir(dir.join("b.token")).expect("unreadable");
        let problems = import_inbox(data.path(), &store);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].ends_with("b.token: cannot read it: Is a directory (os error 21)"),
            "{problems:?}"
        );
        assert!(!dir.join("a.token").exists(), "the good one was taken");
        assert!(dir.join("b.token").exists(), "the other stays");
    }
}
