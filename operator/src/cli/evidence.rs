//! `tenet evidence export` and `tenet evidence verify`: what an auditor
//! receives of one terminal's evidence history, and its check with only
//! the public keys the auditor holds.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tenet_protocol::evidence::{AuditorKeys, Export, Item, verify};
use tenet_protocol::keys::PublicKey;

use super::payload::CliError;

#[derive(clap::Subcommand)]
pub enum EvidenceCommand {
    /// Write one terminal's evidence history (the operator's
    /// DATA/evidence.log: its enrolment, every envelope sent to it, every
    /// report it sent, taken or refused) to standard output, as JSON for
    /// an auditor. The other terminals' entries are only their hashes, so
    /// the chain still verifies. Reads the log while the operator runs.
    Export {
        /// The operator's data directory.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        terminal: String,
    },
    /// Check an export offline: the chain, the operator's signature on
    /// every envelope, the admins' approval each carries, the terminal's
    /// signature on every report and the nonce it carries back. Exits 0
    /// and lists each entry when everything holds; otherwise 1 and the
    /// first entry that does not, and why.
    Verify {
        /// The export (`tenet evidence export`).
        file: PathBuf,
        /// An admin's public key (repeat).
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        /// How many of the --trust admins must have approved each
        /// envelope (the fleet's admin threshold).
        #[arg(long)]
        threshold: usize,
        /// The operator's dispatch public key (repeat for each the
        /// operator used: DATA/dispatch*.key.pub).
        #[arg(long = "dispatch-key", required = true)]
        dispatch_keys: Vec<PathBuf>,
        /// The head an earlier verification printed (sha256:...): the
        /// chain must pass through it, or the history was rewritten since.
        #[arg(long)]
        head: Option<String>,
    },
}

/// The export as a file: its format's name, and the items, base64 or hex.
#[derive(Serialize, Deserialize)]
struct ExportFile {
    format: String,
    terminal: String,
    items: Vec<ItemFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ItemFile {
    /// An entry of the terminal's, base64 of its canonical encoding.
    Entry(String),
    /// Another's entry: the hex of its hash.
    Elided(String),
}

const FORMAT: &str = "tenet-evidence-export/1";

pub fn run(command: EvidenceCommand, out: &mut dyn Write) -> std::io::Result<i32> {
    Ok(super::exit_code(match command {
        EvidenceCommand::Export { data, terminal } => export(&data, &terminal, out).map(|()| 0),
        EvidenceCommand::Verify {
            file,
            trust,
            threshold,
            dispatch_keys,
            head,
        } => check(
            &file,
            &trust,
            threshold,
            &dispatch_keys,
            head.as_deref(),
            out,
        ),
    }))
}

fn export(data: &Path, terminal: &str, out: &mut dyn Write) -> Result<(), CliError> {
    let path = crate::evidence::path_in(data);
    if !path.exists() {
        return Err(CliError::Usage(format!(
            "{}: no evidence history (the operator keeps one in its data directory)",
            path.display()
        )));
    }
    let export = crate::evidence::export(&path, terminal).map_err(CliError::Usage)?;
    if !export.items.iter().any(|i| matches!(i, Item::Entry(_))) {
        return Err(CliError::Usage(format!(
            "{}: nothing of terminal {terminal:?} in it",
            path.display()
        )));
    }
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let file = ExportFile {
        format: FORMAT.into(),
        terminal: export.terminal,
        items: export
            .items
            .into_iter()
            .map(|i| match i {
                Item::Entry(bytes) => ItemFile::Entry(b64.encode(bytes)),
                Item::Elided(hash) => ItemFile::Elided(hex::encode(hash)),
            })
            .collect(),
    };
    serde_json::to_writer_pretty(&mut *out, &file)
        .map_err(|e| CliError::Usage(format!("cannot write the export: {e}")))?;
    let _ = writeln!(out);
    Ok(())
}

fn read_keys(paths: &[PathBuf]) -> Result<Vec<PublicKey>, CliError> {
    paths
        .iter()
        .map(|p| {
            PublicKey::read_pem_file(p)
                .map_err(|e| CliError::Usage(format!("{}: {e}", p.display())))
        })
        .collect()
}

fn check(
    file: &Path,
    trust: &[PathBuf],
    threshold: usize,
    dispatch_keys: &[PathBuf],
    head: Option<&str>,
    out: &mut dyn Write,
) -> Result<i32, CliError> {
    let anchor = head
        .map(|h| {
            tenet_protocol::wire::parse_digest(h)
                .ok_or_else(|| CliError::Usage(format!("--head {h:?}: not sha256:<64 hex digits>")))
        })
        .transpose()?;
    let keys = AuditorKeys {
        admin_keys: read_keys(trust)?,
        threshold,
        dispatch_keys: read_keys(dispatch_keys)?,
    };
    let text = std::fs::read_to_string(file).map_err(super::payload::io(file))?;
    let unreadable = |why: String| CliError::Usage(format!("{}: {why}", file.display()));
    let parsed: ExportFile = serde_json::from_str(&text)
        .map_err(|e| unreadable(format!("not an evidence export: {e}")))?;
    if parsed.format != FORMAT {
        return Err(unreadable(format!(
            "format {:?}, not {FORMAT:?}",
            parsed.format
        )));
    }
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let items = parsed
        .items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            ItemFile::Entry(text) => b64
                .decode(text)
                .map(Item::Entry)
                .map_err(|e| unreadable(format!("entry {i} is not base64: {e}"))),
            ItemFile::Elided(text) => hex::decode(&text)
                .ok()
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
                .map(Item::Elided)
                .ok_or_else(|| unreadable(format!("entry {i} is not a hash: {text:?}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let export = Export {
        terminal: parsed.terminal,
        items,
    };
    match verify(&export, &keys, anchor) {
        Ok(verified) => {
            let checked = &verified.checked;
            for c in checked {
                let _ = writeln!(
                    out,
                    "{:>5}  {}  {}",
                    c.index,
                    crate::time::rfc3339(c.at_ms),
                    c.what
                );
            }
            let _ = writeln!(
                out,
                "verified: {} entr{} of terminal {} in a chain of {}",
                checked.len(),
                if checked.len() == 1 { "y" } else { "ies" },
                export.terminal,
                export.items.len()
            );
            let _ = writeln!(
                out,
                "head {} (record it: a later export must pass through it, --head)",
                tenet_protocol::wire::digest_string(&verified.head)
            );
            Ok(0)
        }
        Err(broken) => {
            eprintln!("tenet: {}: {broken}", file.display());
            Ok(1)
        }
    }
}
