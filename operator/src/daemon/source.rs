//! Where the operator's inputs come from: the policies, the bootstrap
//! tokens and, in Kubernetes mode, the Terminals people deleted.
//!
//! - [`DirectorySource`]: a policy directory (a git checkout: GitOps) and
//!   the data directory's token inbox.
//! - [`KubeSource`]: TerminalPolicy resources in every namespace, the token
//!   Secret, Terminal resources deleted by hand (de-enrolment) and their
//!   `spec.labels` edited by hand (relabelling).
//!
//! A directory may be the checkout of a git remote's branch
//! ([`super::remote::Pull`]), brought up to date before each read.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use tenet_protocol::bundle::BundleTrust;

use crate::daemon::DaemonError;
use crate::fleet::OperatorFleet;
use crate::kubernetes::{KubeBackend, Policies};
use crate::policy::approval::{Gate, Unapproved};
use crate::policy::{CompiledPolicy, load_dir, yaml_files};
use crate::reconcile::pass::PolicyStatus;
use crate::store::{ApprovedPolicy, Store};

/// What a source holds after its last refresh.
#[derive(Default)]
pub struct Loaded {
    /// The policies in force, their generations stamped by the store.
    pub policies: Vec<CompiledPolicy>,
    /// Why a policy is not (or not in its latest form) in force.
    pub errors: Vec<String>,
    /// The git commit the policies came from, when there is one.
    pub revision: Option<String>,
    /// Policies whose latest version the admins did not approve, by
    /// `namespace/name`: their last approved generation stays in force.
    pub unapproved: BTreeMap<String, Unapproved>,
}

pub enum Source {
    Directory(DirectorySource),
    Kubernetes(KubeSource),
}

impl Source {
    /// Take in what changed: new tokens, deleted terminals, policies
    /// (then in [`Source::loaded`]).
    /// Only policies the admins approved (`trust`: their keys and
    /// threshold) come into force.
    pub async fn refresh(
        &mut self,
        store: &Store,
        fleet: &OperatorFleet,
        trust: &BundleTrust,
        out: &mut (dyn Write + Send),
    ) -> Result<(), DaemonError> {
        match self {
            Source::Directory(d) => {
                let problems = crate::tokens::import_inbox(&d.data, store);
                if problems != d.token_problems {
                    for p in &problems {
                        tracing::warn!(problem = %p, "token not imported; looked at again every tick");
                    }
                    d.token_problems = problems;
                }
                if let Some(pull) = &mut d.pull
                    && pull.sync().await
                {
                    // Read it all again, and its commit, even when no
                    // policy file changed.
                    d.stamp = None;
                }
                d.reload(store, trust)?;
                // A failed fetch shows beside the files' errors.
                let mut errors = d.file_errors.clone();
                errors.extend(d.pull.as_ref().and_then(|p| p.failure.clone()));
                d.loaded.errors = errors;
                Ok(())
            }
            Source::Kubernetes(k) => k.refresh(store, fleet, trust, out).await,
        }
    }

    pub fn loaded(&self) -> &Loaded {
        match self {
            Source::Directory(d) => &d.loaded,
            Source::Kubernetes(k) => &k.loaded,
        }
    }

    /// Tell the source what became of its policies (Kubernetes: their
    /// status and Ready condition).
    pub fn publish(&self, statuses: &[PolicyStatus]) {
        if let Source::Kubernetes(k) = self {
            k.policies.publish(statuses);
        }
    }
}

/// The envelopes' generation of each policy: the store's, which only goes
/// up (a file's or a resource's own can start again at 1). It moves with
/// the spec and, for an auto remediation, with the bundle the admins
/// approved: a new bundle for the same spec is a new generation, so the
/// terminals where the old one failed are tried again.
fn stamp_generations(store: &Store, policies: &mut [CompiledPolicy]) {
    for p in policies {
        let digest = match (&p.spec.remediation, &p.statement.remediation) {
            (Some(r), Some(approved)) if r.auto.is_some() => tenet_protocol::wire::sha256(
                &[&p.statement.spec_digest[..], &approved.payload_digest[..]].concat(),
            ),
            _ => p.statement.spec_digest,
        };
        p.generation = store.policy_generation(&p.key(), digest) as i64;
    }
}

/// The policies as read now, through the approval gate: those in force
/// (stamped with their generation) and why the others are not. Only the
/// approved are stamped, so an unapproved edit does not move a policy's
/// generation.
/// `tenant_scoped`: the source's mode (Kubernetes namespaces are tenants),
/// which a kept version takes from the source, not from the store.
/// `incomplete`: some files or resources could not be read now, so a kept
/// version whose policy is not among the candidates is not forgotten.
fn admit(
    gate: &mut Gate,
    store: &Store,
    trust: &BundleTrust,
    candidates: Vec<CompiledPolicy>,
    before: &BTreeMap<String, Unapproved>,
    tenant_scoped: bool,
    incomplete: bool,
) -> (Vec<CompiledPolicy>, BTreeMap<String, Unapproved>) {
    if !gate.seeded() {
        let kept = store
            .approved_policies()
            .into_iter()
            .filter_map(|(key, record)| match approved_version(&record, tenant_scoped) {
                Ok(p) => Some(p),
                Err(why) => {
                    tracing::warn!(policy = %key, reason = %why, "the version approved before the restart cannot be read; not kept");
                    None
                }
            })
            .collect();
        gate.seed(kept, trust);
    }
    let mut admitted = gate.admit(candidates, trust);
    // What is in force is kept for the next start; what is no longer read
    // is forgotten.
    for p in &admitted.policies {
        // The frame covers the spec: the same frame, the same version kept.
        let Ok(frame) = &p.approval else { continue };
        if store.approved_is(&p.key(), frame) {
            continue;
        }
        if let Ok(spec_json) = serde_json::to_string(&*p.spec) {
            store.set_approved(
                &p.key(),
                &ApprovedPolicy {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    spec_json,
                    approval: frame.to_vec(),
                    observed_generation: p.observed_generation,
                    tenant_scoped: p.tenant_scoped,
                },
            );
        }
    }
    if !incomplete {
        for key in store.approved_keys() {
            if !admitted.policies.iter().any(|p| p.key() == key) {
                store.forget_approved(&key);
            }
        }
    }
    stamp_generations(store, &mut admitted.policies);
    for (key, u) in &mut admitted.unapproved {
        if u.in_force.is_some() {
            u.in_force = admitted
                .policies
                .iter()
                .find(|p| p.key() == *key)
                .map(|p| p.generation);
        }
        if before.get(key) != Some(u) {
            tracing::warn!(policy = %key, reason = %u.reason, in_force = ?u.in_force, "policy not approved by the admins");
        }
    }
    (admitted.policies, admitted.unapproved)
}

/// A version approved before a restart, compiled again from what the store
/// kept: its spec and its approval annotation.
fn approved_version(
    record: &ApprovedPolicy,
    tenant_scoped: bool,
) -> Result<CompiledPolicy, String> {
    use base64::Engine;
    let spec: tenet_crds::policy::TerminalPolicySpec =
        serde_json::from_str(&record.spec_json).map_err(|e| e.to_string())?;
    let mut policy = tenet_crds::TerminalPolicy::new(&record.name, spec);
    policy.metadata.namespace = Some(record.namespace.clone());
    policy.metadata.generation = Some(record.observed_generation);
    policy.metadata.annotations = Some(
        [(
            tenet_protocol::approval::APPROVAL_ANNOTATION.to_string(),
            base64::engine::general_purpose::STANDARD.encode(&record.approval),
        )]
        .into(),
    );
    let mut compiled = crate::policy::compile(&policy).map_err(|errors| {
        errors
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    compiled.tenant_scoped = tenant_scoped;
    Ok(compiled)
}

/// A policy directory and the token inbox of the data directory.
pub struct DirectorySource {
    dir: PathBuf,
    data: PathBuf,
    /// The last good generation of each policy (with its file), kept while
    /// its file is broken.
    good: BTreeMap<String, (PathBuf, CompiledPolicy)>,
    gate: Gate,
    /// Path, modification time and size of every file last loaded: the
    /// directory is parsed and compiled again only when this changes (or
    /// it is `None`).
    stamp: Option<Vec<(PathBuf, SystemTime, u64)>>,
    /// The directory could not be listed last time (logged once).
    unreadable: bool,
    /// The errors of the files as last read.
    file_errors: Vec<String>,
    /// Token files that could not be imported, as last said.
    token_problems: Vec<String>,
    /// The git remote the directory is a checkout of, if it is one.
    pull: Option<super::remote::Pull>,
    loaded: Loaded,
}

impl DirectorySource {
    pub fn new(dir: PathBuf, data: PathBuf) -> DirectorySource {
        DirectorySource {
            dir,
            data,
            good: BTreeMap::new(),
            gate: Gate::default(),
            stamp: None,
            unreadable: false,
            file_errors: Vec::new(),
            token_problems: Vec::new(),
            pull: None,
            loaded: Loaded::default(),
        }
    }

    /// The directory is a checkout of `pull`'s remote, brought up to date
    /// before each read.
    pub fn pulling(mut self, pull: super::remote::Pull) -> DirectorySource {
        self.pull = Some(pull);
        self
    }

    fn reload(&mut self, store: &Store, trust: &BundleTrust) -> Result<(), DaemonError> {
        let files = match yaml_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                // Out of file descriptors, or the directory is gone: what
                // is in force stays, and nothing is re-read (nor `git`
                // started) until it can be listed again.
                if !self.unreadable {
                    tracing::error!(error = %e, "cannot list the policy directory; the policies in force stay");
                    self.unreadable = true;
                }
                // Shown in the status; read again in full once it can be
                // listed.
                self.file_errors = vec![e.to_string()];
                self.loaded.errors = self.file_errors.clone();
                self.stamp = None;
                return Ok(());
            }
        };
        self.unreadable = false;
        let stamp: Vec<_> = files
            .into_iter()
            .filter_map(|p| {
                let m = std::fs::metadata(&p).ok()?;
                Some((p, m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()))
            })
            .collect();
        if self.stamp.as_ref() == Some(&stamp) {
            return Ok(());
        }
        self.stamp = Some(stamp);
        let set = load_dir(&self.dir);
        let broken: HashSet<&Path> = set.errors.iter().map(|e| e.file.as_path()).collect();
        let mut next = BTreeMap::new();
        for p in &set.policies {
            next.insert(p.compiled.key(), (p.file.clone(), p.compiled.clone()));
        }
        // A policy whose file is broken now keeps its last good generation.
        for (key, (file, compiled)) in &self.good {
            if !next.contains_key(key) && broken.contains(file.as_path()) {
                next.insert(key.clone(), (file.clone(), compiled.clone()));
            }
        }
        let candidates: Vec<CompiledPolicy> = next.values().map(|(_, p)| p.clone()).collect();
        let (policies, unapproved) = admit(
            &mut self.gate,
            store,
            trust,
            candidates,
            &self.loaded.unapproved,
            false,
            !set.errors.is_empty(),
        );
        let errors: Vec<String> = set.errors.iter().map(ToString::to_string).collect();
        if errors != self.file_errors {
            for e in &errors {
                tracing::error!(error = %e, "policy error; the last good version stays in force");
            }
        }
        self.good = next;
        self.file_errors = errors.clone();
        self.loaded = Loaded {
            policies,
            errors,
            revision: git_revision(&self.dir),
            unapproved,
        };
        Ok(())
    }
}

/// The commit checked out in `dir`, when it is in a git work tree.
fn git_revision(dir: &Path) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|r| !r.is_empty())
}

/// The Kubernetes API: TerminalPolicies, the token Secret, and deleted
/// Terminals.
pub struct KubeSource {
    pub backend: Arc<KubeBackend>,
    policies: Policies,
    gate: Gate,
    loaded: Loaded,
}

impl KubeSource {
    pub fn new(backend: Arc<KubeBackend>, policies: Policies) -> KubeSource {
        KubeSource {
            backend,
            policies,
            gate: Gate::default(),
            loaded: Loaded::default(),
        }
    }

    async fn refresh(
        &mut self,
        store: &Store,
        fleet: &OperatorFleet,
        trust: &BundleTrust,
        out: &mut (dyn Write + Send),
    ) -> Result<(), DaemonError> {
        match self.backend.tokens().await {
            Ok(tokens) => crate::tokens::import_secret(tokens, store),
            Err(e) => tracing::warn!(error = %e, "cannot read the token Secret"),
        }
        match self.backend.deleted_terminals().await {
            Ok(gone) => {
                for t in gone {
                    if fleet.forget_terminal(&t) {
                        let _ = writeln!(
                            out,
                            "terminal {t} de-enrolled (its Terminal resource was deleted)"
                        );
                        tracing::warn!(terminal = %t, "de-enrolled: its Terminal resource was deleted");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list Terminals"),
        }
        self.backend
            .backfill_labels(|name| store.terminal(name).map(|r| r.labels))
            .await;
        for (t, labels) in self
            .backend
            .relabelled(|name, fingerprint, labels| store.labels_differ(name, fingerprint, labels))
        {
            if store.relabel(&t, &labels) {
                let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(
                    out,
                    "terminal {t} relabelled from its Terminal resource: {}",
                    shown.join(",")
                );
                tracing::info!(terminal = %t, labels = %shown.join(","), "relabelled from its Terminal resource");
            }
        }
        self.backend.mark_expired(crate::time::now_ms());
        let (candidates, errors) = self.policies.refresh(store).await;
        let (policies, unapproved) = admit(
            &mut self.gate,
            store,
            trust,
            candidates,
            &self.loaded.unapproved,
            true,
            !errors.is_empty(),
        );
        if errors != self.loaded.errors {
            for e in &errors {
                tracing::error!(error = %e, "policy error");
            }
        }
        self.loaded = Loaded {
            policies,
            errors,
            revision: None,
            unapproved,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::approval::{SignOptions, sign};
    use tenet_protocol::{Algorithm, KeyPair, Signer};

    const POLICY: &str = "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata:\n  name: browser\n  namespace: it\nspec:\n  requirements:\n    - package: { name: browser-a, version: '>= 120.0' }\n";

    /// An edit no admin approved, then a restart: the version approved
    /// before it stays in force, as it does while the operator runs (the
    /// store keeps it), and one whose approval no longer verifies does not.
    #[test]
    fn the_last_approved_version_outlives_a_restart() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (dir, data) = (tmp.path().join("policies"), tmp.path().join("data"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::create_dir_all(&data).expect("mkdir");
        let file = dir.join("browser.yaml");
        std::fs::write(&file, POLICY).expect("policy");
        let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
        sign(
            &file,
            &admin,
            SignOptions {
                renew: false,
                now_ms: 1_000,
                bundles: None,
            },
        )
        .expect("signed");
        let trust = BundleTrust {
            admin_keys: vec![admin.public_key()],
            threshold: 1,
        };
        let constraint = |p: &CompiledPolicy| {
            p.spec.requirements[0]
                .package
                .as_ref()
                .and_then(|r| r.version.clone())
                .unwrap_or_default()
        };
        {
            let store = Store::open(&data.join("tenet.redb")).expect("store");
            let mut source = DirectorySource::new(dir.clone(), data.clone());
            source.reload(&store, &trust).expect("reload");
            assert_eq!(source.loaded.policies.len(), 1);
            store.sync().expect("sync");
        }
        // Someone with write access to the directory, not an admin.
        let signed = std::fs::read_to_string(&file).expect("read");
        std::fs::write(&file, signed.replace(">= 120.0", ">= 1.0")).expect("edit");

        // The restart: a new store and source over the same files.
        let store = Store::open(&data.join("tenet.redb")).expect("store");
        let mut source = DirectorySource::new(dir.clone(), data.clone());
        source.reload(&store, &trust).expect("reload");
        let loaded = &source.loaded;
        assert_eq!(loaded.policies.len(), 1, "the approved version is in force");
        assert_eq!(constraint(&loaded.policies[0]), ">= 120.0");
        let u = loaded
            .unapproved
            .get("it/browser")
            .expect("the edit is not approved");
        assert_eq!(
            u.message(),
            "the latest edit is not approved (the approval is for another version of this policy (it changed since it was signed)); generation 1, the last approved, stays in force"
        );
        drop(source);
        drop(store);

        // A restart while the file does not even load: the kept version is
        // not forgotten, and is back in force once the file loads again.
        let edited = std::fs::read_to_string(&file).expect("read");
        std::fs::write(&file, "spec: [").expect("broken");
        let store = Store::open(&data.join("tenet.redb")).expect("store");
        let mut source = DirectorySource::new(dir.clone(), data.clone());
        source.reload(&store, &trust).expect("reload");
        assert!(source.loaded.policies.is_empty());
        store.sync().expect("sync");
        drop(source);
        drop(store);
        std::fs::write(&file, &edited).expect("loads again");
        let store = Store::open(&data.join("tenet.redb")).expect("store");
        let mut source = DirectorySource::new(dir.clone(), data.clone());
        source.reload(&store, &trust).expect("reload");
        assert_eq!(constraint(&source.loaded.policies[0]), ">= 120.0");
        drop(source);
        drop(store);

        // Admins who rotated the old key away: the kept version does not
        // verify, and nothing of the policy is in force.
        let other = KeyPair::generate(Algorithm::Ed25519).expect("key");
        let rotated = BundleTrust {
            admin_keys: vec![other.public_key()],
            threshold: 1,
        };
        let store = Store::open(&data.join("tenet.redb")).expect("store");
        let mut source = DirectorySource::new(dir, data);
        source.reload(&store, &rotated).expect("reload");
        assert!(source.loaded.policies.is_empty());
    }
}
