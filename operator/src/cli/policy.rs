//! `tenet policy check` and `tenet policy plan`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::Output;
use crate::policy::{LoadError, PolicySet, TerminalView, evaluate, load_dir, load_inventories};

#[derive(Serialize)]
struct CheckReport<'a> {
    files: usize,
    policies: Vec<PolicySummary<'a>>,
    errors: &'a [LoadError],
}

#[derive(Serialize)]
struct PolicySummary<'a> {
    namespace: &'a str,
    name: &'a str,
    file: String,
    line: usize,
    requirements: usize,
}

fn summaries(set: &PolicySet) -> Vec<PolicySummary<'_>> {
    set.policies
        .iter()
        .map(|p| PolicySummary {
            namespace: &p.compiled.namespace,
            name: &p.compiled.name,
            file: p.file.display().to_string(),
            line: p.line,
            requirements: p.compiled.requirements.len(),
        })
        .collect()
}

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy in a directory. Exits 0 when all are valid;
    /// otherwise 1, with every error on its own line as FILE:LINE:COL: message.
    Check {
        /// The policy directory (read recursively; hidden files are skipped).
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
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
        PolicyCommand::Check { dir, output } => check(&dir, output, stdout, stderr),
        PolicyCommand::Plan {
            dir,
            inventory,
            output,
        } => plan(&dir, &inventory, output, stdout, stderr),
    }
}

/// `tenet policy check DIR`: 0 when every policy is valid, 1 otherwise.
pub fn check(
    dir: &Path,
    output: Output,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let set = load_dir(dir);
    match output {
        Output::Json => {
            let report = CheckReport {
                files: set.files,
                policies: summaries(&set),
                errors: &set.errors,
            };
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out)?;
        }
        Output::Text => {
            for e in &set.errors {
                writeln!(out, "{e}")?;
            }
            writeln!(
                err,
                "{}: {} file(s), {} valid polic{}, {} error(s)",
                dir.display(),
                set.files,
                set.policies.len(),
                if set.policies.len() == 1 { "y" } else { "ies" },
                set.errors.len()
            )?;
        }
    }
    Ok(if set.errors.is_empty() { 0 } else { 1 })
}

#[derive(Serialize)]
struct TerminalPlan<'p> {
    terminal: String,
    policies: Vec<PolicyPlan<'p>>,
}

#[derive(Serialize)]
struct PolicyPlan<'p> {
    policy: String,
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
    payload: &'p str,
    digest: &'p str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    args: &'p [String],
    /// Why nothing would be sent, when the policy is suspended.
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<&'static str>,
}

/// `tenet policy plan DIR --inventory FILE`: what each terminal's drift is
/// and what would be dispatched. 0 when the plan could be made (drift or
/// not), 1 when a policy or an inventory has errors.
pub fn plan(
    dir: &Path,
    inventory: &Path,
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

    let plans: Vec<TerminalPlan<'_>> = inventories
        .iter()
        .map(|inv| {
            let view = TerminalView::new(inv);
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
                            payload: &r.payload.name,
                            digest: &r.payload.digest,
                            args: &r.args,
                            held: c.spec.suspend.then_some("the policy is suspended"),
                        });
                    PolicyPlan {
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
        Output::Text => print_plan(&plans, out)?,
    }
    Ok(0)
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
                    let held = d.held.map(|h| format!(" (held: {h})")).unwrap_or_default();
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
