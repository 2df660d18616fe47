//! `tenet policy check`, `tenet policy sign` and `tenet policy plan`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tenet_protocol::bundle::{BundleTrust, PayloadBundle};
use tenet_protocol::keys::{Fingerprint, KeyPair, PublicKey};
use tenet_protocol::wire::{Kind, SignedMessage};

use super::Output;
use crate::policy::approval::{SignOptions, Verdict, judge, sign};
use crate::policy::auto::Contents;
use crate::policy::{
    LoadError, LoadedPolicy, PolicySet, TerminalView, evaluate, load_dir, load_inventories,
};

#[derive(Serialize)]
struct CheckReport<'a> {
    files: usize,
    policies: Vec<PolicySummary<'a>>,
    errors: &'a [LoadError],
    /// Policies without enough valid approvals (with `--trust`).
    unapproved: Vec<&'a LoadError>,
}

#[derive(Serialize)]
struct PolicySummary<'a> {
    namespace: &'a str,
    name: &'a str,
    file: String,
    line: usize,
    requirements: usize,
    /// With `--trust`: whether K trusted admins approved this version.
    #[serde(skip_serializing_if = "Option::is_none")]
    approved: Option<bool>,
    /// Every key that signed its approval (valid or not).
    signers: Vec<String>,
}

fn summaries<'a>(set: &'a PolicySet, approvals: &Approvals) -> Vec<PolicySummary<'a>> {
    set.policies
        .iter()
        .map(|p| {
            let key = p.compiled.key();
            PolicySummary {
                namespace: &p.compiled.namespace,
                name: &p.compiled.name,
                file: p.file.display().to_string(),
                line: p.line,
                requirements: p.compiled.requirements.len(),
                approved: approvals.trust.as_ref().map(|_| {
                    matches!(approvals.verdicts.get(&key), Some(Verdict::Approved { .. }))
                }),
                signers: approvals
                    .verdicts
                    .get(&key)
                    .map(|v| match v {
                        Verdict::Approved { signers, .. } | Verdict::Unapproved { signers, .. } => {
                            signers.iter().map(|f| approvals.name(f)).collect()
                        }
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// The admins' keys named with `--trust`, and the verdict on each policy's
/// approval (without `--trust`: who signed, nothing verified).
struct Approvals {
    trust: Option<BundleTrust>,
    /// Key file names by fingerprint, to name signers as people know them.
    names: BTreeMap<Fingerprint, String>,
    verdicts: BTreeMap<String, Verdict>,
}

impl Approvals {
    fn read(keys: &[PathBuf], threshold: usize) -> Result<Approvals, String> {
        let mut names = BTreeMap::new();
        let mut admin_keys = Vec::new();
        for path in keys {
            let key = PublicKey::read_pem_file(path).map_err(|e| e.to_string())?;
            // The same key named twice counts once.
            if names
                .insert(key.fingerprint(), path.display().to_string())
                .is_none()
            {
                admin_keys.push(key);
            }
        }
        if !keys.is_empty() && (threshold == 0 || threshold > admin_keys.len()) {
            return Err(format!(
                "--threshold {threshold} needs between 1 and {} (the distinct --trust keys given)",
                admin_keys.len()
            ));
        }
        Ok(Approvals {
            trust: (!keys.is_empty()).then_some(BundleTrust {
                admin_keys,
                threshold,
            }),
            names,
            verdicts: BTreeMap::new(),
        })
    }

    fn judge(&mut self, policies: &[LoadedPolicy]) {
        // Without --trust, nothing is trusted: the verdict still lists who signed.
        let nobody = BundleTrust {
            admin_keys: Vec::new(),
            threshold: 1,
        };
        for p in policies {
            let verdict = judge(&p.compiled, self.trust.as_ref().unwrap_or(&nobody));
            self.verdicts.insert(p.compiled.key(), verdict);
        }
    }

    fn name(&self, key: &Fingerprint) -> String {
        self.names
            .get(key)
            .cloned()
            .unwrap_or_else(|| format!("{key} (not a --trust key)"))
    }

    /// With `--trust`, each policy without K valid approvals, as an error
    /// at its approval annotation: who signed and what is missing.
    fn errors(&self, policies: &[LoadedPolicy]) -> Vec<LoadError> {
        if self.trust.is_none() {
            return Vec::new();
        }
        policies
            .iter()
            .filter_map(|p| {
                let Some(Verdict::Unapproved { reason, signers }) =
                    self.verdicts.get(&p.compiled.key())
                else {
                    return None;
                };
                let signed = if signers.is_empty() {
                    String::new()
                } else {
                    let names: Vec<String> = signers.iter().map(|f| self.name(f)).collect();
                    format!("; signed by {}", names.join(", "))
                };
                Some(LoadError {
                    file: p.file.clone(),
                    line: p.approval_at.0,
                    column: p.approval_at.1,
                    field: Some(format!(
                        "metadata.annotations.{}",
                        tenet_protocol::approval::APPROVAL_ANNOTATION
                    )),
                    message: format!("{} is not approved: {reason}{signed}", p.compiled.key()),
                })
            })
            .collect()
    }

    /// One line per policy for `plan`.
    fn describe(&self, key: &str) -> String {
        match (self.verdicts.get(key), &self.trust) {
            (Some(Verdict::Approved { signers, .. }), Some(t)) => format!(
                "approved by {} key(s), {} required: {}",
                signers.len(),
                t.threshold,
                signers
                    .iter()
                    .map(|f| self.name(f))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (Some(Verdict::Unapproved { reason, .. }), Some(_)) => {
                format!("NOT APPROVED: {reason} (the operator will not enforce it)")
            }
            (Some(Verdict::Unapproved { signers, .. }), None) if !signers.is_empty() => format!(
                "signed by {} key(s) (not verified: give --trust)",
                signers.len()
            ),
            (Some(Verdict::Unapproved { reason, .. }), None) => reason.clone(),
            _ => "not signed by any admin (run `tenet policy sign`)".into(),
        }
    }
}

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy in a directory and, with --trust, their
    /// approvals. Exits 0 when all are valid (and approved by --threshold
    /// of the --trust keys); otherwise 1, with every error on its own line
    /// as FILE:LINE:COL: message.
    Check {
        /// The policy directory (read recursively; hidden files are skipped).
        dir: PathBuf,
        /// An admin's public key (repeat): each policy must be approved by
        /// --threshold of these, as the operator requires.
        #[arg(long = "trust")]
        trust: Vec<PathBuf>,
        /// How many of the --trust keys must have approved a policy.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Add your signature to the approval of every policy in FILE(s), in
    /// the files themselves (the `tenet.dev/approval` annotation, one line
    /// under `metadata.annotations`; comments and layout are kept). The
    /// operator enforces a policy only once --admin-threshold admins signed
    /// this very version; any change of its meaning voids the approval, and
    /// signing it again starts a new one.
    Sign {
        /// Policy files (YAML, one or more TerminalPolicy documents each).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Your private admin key (from `tenet keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Start a new approval even of an already approved version: how
        /// admins bring back an earlier version of a policy (its old
        /// approval is refused as older than the one in force), or move an
        /// auto remediation to the best bundle now in --bundles. The other
        /// admins then sign again.
        #[arg(long)]
        renew: bool,
        /// The payload bundle directory (the operator's --bundles). Needed
        /// for policies with `remediation: {auto: {}}`: their approval
        /// names the standard-library bundle that carries out their steps
        /// (the one it named before, while it still can; otherwise the one
        /// installing the newest versions).
        #[arg(long)]
        bundles: Option<PathBuf>,
    },
    /// Show, for each terminal in an inventory, which policies select it,
    /// which requirements fail and why, and which payload would be sent.
    /// Nothing is sent.
    Plan {
        /// The policy directory.
        dir: PathBuf,
        /// An inventory file (one YAML document per terminal) or a directory of them.
        #[arg(long)]
        inventory: PathBuf,
        /// An admin's public key (repeat): show whether each policy is
        /// approved as the operator will judge it.
        #[arg(long = "trust")]
        trust: Vec<PathBuf>,
        /// How many of the --trust keys must have approved a policy.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// The payload bundle directory: name the bundles that would be
        /// sent, and say when one an approval names is not there.
        #[arg(long)]
        bundles: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

pub fn run(
    command: PolicyCommand,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> std::io::Result<i32> {
    match command {
        PolicyCommand::Check {
            dir,
            trust,
            threshold,
            output,
        } => match Approvals::read(&trust, threshold) {
            Ok(approvals) => check(&dir, approvals, output, stdout, stderr),
            Err(e) => usage(stderr, &e),
        },
        PolicyCommand::Sign {
            files,
            key,
            renew,
            bundles,
        } => {
            let library = match bundles.as_deref().map(read_bundles).transpose() {
                Ok(l) => l,
                Err(e) => return usage(stderr, &e),
            };
            sign_files(
                &files,
                &key,
                SignOptions {
                    renew,
                    now_ms: tenet_protocol::host::now_ms(),
                    bundles: library.as_deref(),
                },
                stdout,
                stderr,
            )
        }
        PolicyCommand::Plan {
            dir,
            inventory,
            trust,
            threshold,
            bundles,
            output,
        } => {
            let library = match bundles.as_deref().map(read_bundles).transpose() {
                Ok(l) => l,
                Err(e) => return usage(stderr, &e),
            };
            match Approvals::read(&trust, threshold) {
                Ok(approvals) => plan(
                    &dir,
                    &inventory,
                    approvals,
                    library.as_deref(),
                    output,
                    stdout,
                    stderr,
                ),
                Err(e) => usage(stderr, &e),
            }
        }
    }
}

/// The bundles of `dir` (`*.bundle`), as auto remediations choose among
/// them. Their signatures are not checked here: the operator uses only
/// bundles the admins signed, and says so when an approval names another.
fn read_bundles(dir: &Path) -> Result<Vec<Contents>, String> {
    crate::daemon::bundle_files(dir)
        .map_err(|e| format!("--bundles {}: {e}", dir.display()))?
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let frame = SignedMessage::decode(&bytes, Kind::PayloadBundle)
                .map_err(|e| format!("{}: not a payload bundle: {e}", path.display()))?;
            let bundle: PayloadBundle = frame
                .open()
                .map_err(|e| format!("{}: not a payload bundle: {e}", path.display()))?;
            Ok(Contents::of(&bundle, frame.body_digest()))
        })
        .collect()
}

fn usage(err: &mut dyn Write, message: &str) -> std::io::Result<i32> {
    writeln!(err, "tenet: {message}")?;
    Ok(2)
}

/// `tenet policy sign FILE... --key KEY`: 0 when every file was signed;
/// otherwise 1, each failure on stderr (a file that fails is left as it was).
fn sign_files(
    files: &[PathBuf],
    key: &Path,
    options: SignOptions<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let key = match KeyPair::read_file(key) {
        Ok(k) => k,
        Err(e) => return usage(err, &format!("{}: {e}", key.display())),
    };
    let mut failed = false;
    for file in files {
        match sign(file, &key, options) {
            Ok(signed) => {
                for s in signed {
                    let note = match (s.added, s.dropped) {
                        (false, _) => " (this key had signed this version already)".to_string(),
                        (true, 0) => String::new(),
                        (true, n) => format!(
                            " ({n} signature(s) of an earlier version dropped: it changed since)"
                        ),
                    };
                    writeln!(
                        out,
                        "{}: {} signed by {} key(s){note}",
                        file.display(),
                        s.policy,
                        s.signers.len(),
                    )?;
                    if let Some(b) = &s.bundle {
                        writeln!(
                            out,
                            "  its auto remediation runs bundle {} ({})",
                            b.name,
                            tenet_protocol::wire::digest_string(&b.digest)
                        )?;
                        if !b.carries.is_empty() {
                            writeln!(out, "  it carries {}", b.carries.join(", "))?;
                        }
                        if let Some(n) = &b.note {
                            writeln!(out, "  note: {n}")?;
                        }
                    }
                }
            }
            Err(e) => {
                writeln!(err, "{e}")?;
                failed = true;
            }
        }
    }
    Ok(i32::from(failed))
}

/// `tenet policy check DIR`: 0 when every policy is valid, 1 otherwise.
fn check(
    dir: &Path,
    mut approvals: Approvals,
    output: Output,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let set = load_dir(dir);
    approvals.judge(&set.policies);
    let unapproved = approvals.errors(&set.policies);
    match output {
        Output::Json => {
            let report = CheckReport {
                files: set.files,
                policies: summaries(&set, &approvals),
                errors: &set.errors,
                unapproved: unapproved.iter().collect(),
            };
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out)?;
        }
        Output::Text => {
            for e in set.errors.iter().chain(&unapproved) {
                writeln!(out, "{e}")?;
            }
            let approved = match &approvals.trust {
                Some(t) => format!(
                    ", {} approved by {} of {} trusted key(s)",
                    set.policies.len() - unapproved.len(),
                    t.threshold,
                    t.admin_keys.len()
                ),
                None => String::new(),
            };
            writeln!(
                err,
                "{}: {} file(s), {} valid polic{}{approved}, {} error(s)",
                dir.display(),
                set.files,
                set.policies.len(),
                if set.policies.len() == 1 { "y" } else { "ies" },
                set.errors.len() + unapproved.len()
            )?;
        }
    }
    Ok(if set.errors.is_empty() && unapproved.is_empty() {
        0
    } else {
        1
    })
}

#[derive(Serialize)]
struct TerminalPlan<'p> {
    terminal: String,
    policies: Vec<PolicyPlan<'p>>,
}

#[derive(Serialize)]
struct PolicyPlan<'p> {
    policy: String,
    /// Its approval, as the operator would judge it (with `--trust`).
    approval: String,
    selected: bool,
    compliant: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    selector_error: Option<String>,
    drift: Vec<DriftItem<'p>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dispatch: Option<Dispatch<'p>>,
}

#[derive(Serialize)]
struct DriftItem<'p> {
    requirement: &'p str,
    reason: String,
}

#[derive(Serialize)]
struct Dispatch<'p> {
    /// The bundle's name (for an auto remediation: its name in --bundles,
    /// or "the standard library").
    payload: String,
    /// The digest the approval names; empty for an auto policy no admin
    /// signed yet.
    digest: String,
    /// The payload's arguments: for an auto remediation, the steps Tenet
    /// computed from the requirements.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    args: &'p [String],
    /// The remediation is computed by Tenet (`auto`).
    auto: bool,
    /// Why nothing would be sent now: the policy is suspended, not
    /// approved (with `--trust`), or outside its maintenance windows.
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<String>,
}

/// `tenet policy plan DIR --inventory FILE`: what each terminal's drift is
/// and what would be dispatched. 0 when the plan could be made (drift or
/// not), 1 when a policy or an inventory has errors.
fn plan(
    dir: &Path,
    inventory: &Path,
    mut approvals: Approvals,
    library: Option<&[Contents]>,
    output: Output,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let set = load_dir(dir);
    let inventories = load_inventories(inventory);
    let mut failed = false;
    for e in &set.errors {
        writeln!(err, "{e}")?;
        failed = true;
    }
    let inventories = match inventories {
        Ok(i) => i,
        Err(errors) => {
            for e in errors {
                writeln!(err, "{e}")?;
            }
            return Ok(1);
        }
    };
    if failed {
        writeln!(err, "{}: fix the policy errors above first", dir.display())?;
        return Ok(1);
    }

    approvals.judge(&set.policies);
    let plans: Vec<TerminalPlan<'_>> = inventories
        .iter()
        .map(|inv| {
            // A dry run: the inventory's labels stand for those admins assign.
            let view = TerminalView::new(inv, &inv.labels);
            let policies = set
                .policies
                .iter()
                .map(|p| {
                    let c = &p.compiled;
                    let eval = evaluate(c, &view);
                    let compliant = eval.compliant();
                    let drift: Vec<DriftItem<'_>> = eval
                        .results
                        .into_iter()
                        .filter(|r| !r.passed)
                        .map(|r| DriftItem {
                            requirement: r.requirement,
                            reason: r.reason,
                        })
                        .collect();
                    let dispatch = (eval.selected && !drift.is_empty())
                        .then_some(c.spec.remediation.as_ref())
                        .flatten()
                        .map(|r| Dispatch {
                            auto: r.auto.is_some(),
                            payload: payload_name(c, library),
                            digest: c
                                .statement
                                .remediation
                                .as_ref()
                                .map(|a| a.payload_digest)
                                .filter(|d| *d != [0; 32])
                                .map(|d| tenet_protocol::wire::digest_string(&d))
                                .unwrap_or_default(),
                            args: c
                                .statement
                                .remediation
                                .as_ref()
                                .map_or(&r.args[..], |a| &a.args[..]),
                            held: if c.spec.suspend {
                                Some("the policy is suspended".to_string())
                            } else if approvals.trust.is_some()
                                && !matches!(
                                    approvals.verdicts.get(&c.key()),
                                    Some(Verdict::Approved { .. })
                                )
                            {
                                Some("the policy is not approved".to_string())
                            } else {
                                let windows = c
                                    .statement
                                    .remediation
                                    .as_ref()
                                    .map_or(&[][..], |r| &r.windows[..]);
                                tenet_protocol::window::closed(windows, crate::time::now_ms()).map(
                                    |next| format!("waiting for a maintenance window ({next})"),
                                )
                            },
                        });
                    PolicyPlan {
                        approval: approvals.describe(&c.key()),
                        policy: c.key(),
                        selected: eval.selected,
                        compliant,
                        selector_error: eval.selector_error,
                        drift,
                        dispatch,
                    }
                })
                .collect();
            TerminalPlan {
                terminal: inv.terminal.clone(),
                policies,
            }
        })
        .collect();

    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut *out, &plans)?;
            writeln!(out)?;
        }
        Output::Text => {
            for p in &set.policies {
                let key = p.compiled.key();
                writeln!(out, "{key}: {}", approvals.describe(&key))?;
            }
            writeln!(out)?;
            print_plan(&plans, out)?;
        }
    }
    Ok(0)
}

/// How `plan` names the bundle a policy's remediation runs.
fn payload_name(c: &crate::policy::CompiledPolicy, library: Option<&[Contents]>) -> String {
    let Some(r) = c.spec.remediation.as_ref() else {
        return String::new();
    };
    if let Some(p) = &r.payload {
        return p.name.clone();
    }
    let digest = c
        .statement
        .remediation
        .as_ref()
        .map(|a| a.payload_digest)
        .filter(|d| *d != [0; 32]);
    match (library, digest) {
        (_, None) => {
            "the standard library (no admin signed it yet: `tenet policy sign --bundles DIR` names the bundle)".into()
        }
        (None, Some(_)) => "the standard library".into(),
        (Some(l), Some(d)) => match l.iter().find(|b| b.digest == d) {
            Some(b) => format!("{} (standard library)", b.name),
            None => "the standard library (its approved bundle is NOT in --bundles)".into(),
        },
    }
}

fn print_plan(plans: &[TerminalPlan<'_>], out: &mut dyn Write) -> std::io::Result<()> {
    for (i, t) in plans.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        let selected = t.policies.iter().filter(|p| p.selected).count();
        let drifted = t
            .policies
            .iter()
            .filter(|p| p.selected && !p.compliant)
            .count();
        writeln!(
            out,
            "{}: {} polic{} select it, {} drifted",
            t.terminal,
            selected,
            if selected == 1 { "y" } else { "ies" },
            drifted
        )?;
        for p in &t.policies {
            if !p.selected {
                match &p.selector_error {
                    Some(e) => writeln!(out, "  -      {}: not selected ({e})", p.policy)?,
                    None => writeln!(out, "  -      {}: not selected", p.policy)?,
                }
                continue;
            }
            if p.compliant {
                writeln!(out, "  OK     {}", p.policy)?;
                continue;
            }
            writeln!(out, "  DRIFT  {}", p.policy)?;
            for d in &p.drift {
                writeln!(out, "           {}: {}", d.requirement, d.reason)?;
            }
            match &p.dispatch {
                Some(d) => {
                    let held = d
                        .held
                        .as_ref()
                        .map(|h| format!(" (held: {h})"))
                        .unwrap_or_default();
                    if d.auto {
                        let digest = if d.digest.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", d.digest)
                        };
                        writeln!(
                            out,
                            "           would remediate automatically with {}{digest}{held}:",
                            d.payload
                        )?;
                        for step in d.args {
                            writeln!(out, "             {step}")?;
                        }
                        continue;
                    }
                    let args = if d.args.is_empty() {
                        String::new()
                    } else {
                        format!(" with args {}", d.args.join(" "))
                    };
                    writeln!(
                        out,
                        "           would dispatch payload {} {}{args}{held}",
                        d.payload, d.digest
                    )?;
                }
                None => writeln!(out, "           no remediation: drift is reported only")?,
            }
        }
    }
    Ok(())
}
