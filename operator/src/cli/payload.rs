//! `tenet keygen` and `tenet payload build|sign|verify|inspect`: making and
//! checking signed payload bundles from the command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tenet_protocol::bundle::{
    Artifact, BundleTrust, Capability, Manifest, PayloadBundle, safe_file_name, verify_bundle,
};
use tenet_protocol::keys::public_key_path;
use tenet_protocol::wire::{digest_string, parse_digest, sha256};
use tenet_protocol::{Algorithm, KeyPair, Kind, PublicKey, SignedMessage, Signer};

use super::Output;
use crate::time::{now_ms, rfc3339};

/// A command failed for a reason a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] tenet_protocol::keys::KeyError),
    #[error("{path}: {message}")]
    Bundle { path: String, message: String },
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(clap::Subcommand)]
pub enum PayloadCommand {
    /// Build an unsigned bundle from a WASM module (.wat or .wasm) and artifacts.
    Build(BuildArgs),
    /// Add a signature with an admin key. The bundle's digest does not change.
    Sign {
        bundle: PathBuf,
        /// The admin's private key file.
        #[arg(long)]
        key: PathBuf,
        /// Write the signed bundle here instead of in place.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify signatures (k of n trusted keys), digest and expiry. Exits 0
    /// when the bundle verifies; otherwise 1 with the reason.
    Verify {
        bundle: PathBuf,
        /// A trusted admin public key (repeat).
        #[arg(long = "trust")]
        trust: Vec<PathBuf>,
        /// How many of the trusted keys must have signed.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// The digest a policy pins (sha256:...); the bundle must have it.
        #[arg(long)]
        digest: Option<String>,
    },
    /// Show what a bundle holds (signatures are listed, not checked).
    Inspect {
        bundle: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

/// Run a `tenet payload` command: 0 when it did what it says, 1 with the
/// reason on stderr.
pub fn run(command: PayloadCommand, stdout: &mut dyn Write) -> std::io::Result<i32> {
    let result = match command {
        PayloadCommand::Build(args) => build(&args, stdout).map(|()| 0),
        PayloadCommand::Sign { bundle, key, out } => {
            sign(&bundle, &key, out.as_deref(), stdout).map(|()| 0)
        }
        PayloadCommand::Verify {
            bundle,
            trust,
            threshold,
            digest,
        } => verify(&bundle, &trust, threshold, digest.as_deref(), stdout),
        PayloadCommand::Inspect { bundle, output } => inspect(&bundle, output, stdout).map(|()| 0),
    };
    Ok(super::exit_code(result))
}

/// `tenet keygen --out KEY`: a new private key (0600) and `KEY.pub`.
pub fn keygen(out_path: &Path, algorithm: Algorithm, out: &mut dyn Write) -> Result<(), CliError> {
    let key = KeyPair::generate(algorithm)?;
    key.write_files(out_path)?;
    let _ = writeln!(
        out,
        "wrote {} (private, mode 0600) and {}\n{} key {}",
        out_path.display(),
        public_key_path(out_path).display(),
        algorithm,
        key.public_key().fingerprint()
    );
    Ok(())
}

/// Arguments of `tenet payload build`.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// The module: WebAssembly text (.wat) or binary (.wasm).
    #[arg(long, required_unless_present_any = ["apt", "std"])]
    pub module: Option<PathBuf>,
    /// Instead of --module: the standard library payload, which carries
    /// out the steps Tenet computes for policies with `remediation: {auto:
    /// {}}` (built into this binary; with SOURCE_DATE_EPOCH set, the same
    /// inputs build the same bundle, byte for byte). Ship what the steps
    /// need with --apt (packages) and --artifact (files' contents).
    #[arg(long, conflicts_with_all = ["module", "capabilities"])]
    pub std: bool,
    /// A standard-library bundle (implies --std) carrying these Debian
    /// packages (NAME or NAME=VERSION; repeat): every .deb a terminal like
    /// --target lacks to install them, dependencies included (resolved by
    /// apt from the target's own sources and keys, in a scratch state).
    #[arg(long = "apt", conflicts_with_all = ["module", "capabilities"], requires = "target")]
    pub apt: Vec<String>,
    /// With --apt: a root file system like the terminals' (a debootstrap
    /// of their release, or an image): its apt sources, archive keys and
    /// installed packages decide what is fetched.
    #[arg(long, requires = "apt")]
    pub target: Option<PathBuf>,
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value = "1.0.0")]
    pub version: String,
    #[arg(long, default_value = "")]
    pub description: String,
    /// A capability the module needs (repeat): run-artifact, read-inventory, write-files, log.
    #[arg(long = "capability")]
    pub capabilities: Vec<String>,
    /// A file shipped with the module, digest-pinned (repeat).
    #[arg(long = "artifact")]
    pub artifacts: Vec<PathBuf>,
    /// How long the bundle may be run: 30d, 12h, 90m.
    #[arg(long, default_value = "30d")]
    pub expires_in: String,
    #[arg(long)]
    pub out: PathBuf,
}

/// `30d`, `12h`, `90m`: how long a bundle stays runnable.
pub fn build(args: &BuildArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut shipped = args.artifacts.clone();
    let mut capability_names = args.capabilities.clone();
    // The standard library's scripts and the closure apt fetched live in a
    // scratch directory until the bundle is written.
    let mut _scratch = None;
    let mut debs = Vec::new();
    let module = if args.std || !args.apt.is_empty() {
        let dir = tempfile::tempdir().map_err(io(Path::new("a scratch directory")))?;
        let mut fetched_into = None;
        if let Some(target) = args.target.as_ref().filter(|_| !args.apt.is_empty()) {
            let (apt_dir, fetched) = super::apt::fetch_closure(&args.apt, target)?;
            debs = fetched;
            fetched_into = Some(apt_dir);
        }
        let mut library = Vec::new();
        for (name, text) in [
            (tenet_protocol::stdlib::SCRIPT, crate::policy::auto::STD_SH),
            (
                crate::policy::auto::INSTALLER,
                crate::policy::auto::INSTALLER_SH,
            ),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).map_err(io(&path))?;
            library.push(path);
        }
        shipped = library
            .into_iter()
            .chain(debs.iter().cloned())
            .chain(args.artifacts.iter().cloned())
            .collect();
        _scratch = Some((dir, fetched_into));
        capability_names = crate::policy::auto::CAPABILITIES
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        wat::parse_str(crate::policy::auto::STD_WAT).map_err(|e| CliError::Bundle {
            path: "stdlib/tenet-std.wat".into(),
            message: format!("not a valid WebAssembly module: {e}"),
        })?
    } else {
        match &args.module {
            // `.wat` text or a `.wasm` binary: the wat crate passes binaries through.
            Some(path) => wat::parse_file(path).map_err(|e| CliError::Bundle {
                path: path.display().to_string(),
                message: format!("not a valid WebAssembly module: {e}"),
            })?,
            None => return Err(CliError::Usage("give --module, --std or --apt".into())),
        }
    };
    let capabilities = capability_names
        .iter()
        .map(|c| {
            Capability::parse(c).ok_or_else(|| {
                let known: Vec<&str> = Capability::ALL.iter().map(|c| c.name()).collect();
                CliError::Usage(format!(
                    "unknown capability {c:?}; known: {}",
                    known.join(", ")
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut artifacts = Vec::new();
    for path in &shipped {
        let data = std::fs::read(path).map_err(io(path))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !safe_file_name(&name) {
            return Err(CliError::Usage(format!(
                "{}: artifact file names may hold only letters, digits and . _ + - ~ %",
                path.display()
            )));
        }
        artifacts.push(Artifact {
            sha256: sha256(&data),
            size: data.len() as u64,
            name,
            data,
        });
    }
    let now = build_time_ms()?;
    let bundle = PayloadBundle {
        manifest: Manifest {
            name: args.name.clone(),
            version: args.version.clone(),
            description: args.description.clone(),
            capabilities,
            created_ms: now,
            expires_ms: now.saturating_add(
                crate::time::parse_lifetime_ms(&args.expires_in)
                    .map_err(|e| CliError::Usage(format!("--expires-in {e}")))?,
            ),
        },
        module,
        artifacts,
    };
    use tenet_protocol::Message;
    bundle.check().map_err(|e| CliError::Bundle {
        path: args.out.display().to_string(),
        message: e.to_string(),
    })?;
    let frame = SignedMessage::new(&bundle);
    write_atomically(&args.out, &frame.encode())?;
    let _ = writeln!(
        out,
        "wrote {} (unsigned; sign it with `tenet payload sign`)\ndigest {}",
        args.out.display(),
        digest_string(&frame.body_digest())
    );
    if args.std || !args.apt.is_empty() {
        let carried: Vec<String> = debs
            .iter()
            .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        if !carried.is_empty() {
            let _ = writeln!(out, "carries {}", carried.join(" "));
        }
        let _ = writeln!(
            out,
            "a standard-library bundle: once signed and in the operator's bundle directory, `tenet policy sign --bundles DIR` names it in the approval of policies with `remediation: {{auto: {{}}}}` whose steps it can carry out"
        );
    }
    Ok(())
}

/// When the bundle was made: now, or SOURCE_DATE_EPOCH (seconds) when set,
/// so that a build can be repeated byte for byte
/// (<https://reproducible-builds.org/specs/source-date-epoch/>).
fn build_time_ms() -> Result<u64, CliError> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .map(|s| s.saturating_mul(1000))
            .map_err(|_| {
                CliError::Usage(format!(
                    "SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970"
                ))
            }),
        Err(_) => Ok(now_ms()),
    }
}

/// Replace `path` whole (mode 0644: a bundle is not secret).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    tenet_protocol::host::write_atomically(path, bytes, 0o644).map_err(io(path))
}

fn read_frame(path: &Path) -> Result<SignedMessage, CliError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    SignedMessage::decode(&bytes, Kind::PayloadBundle).map_err(|e| CliError::Bundle {
        path: path.display().to_string(),
        message: format!("refused: {e} ({})", e.reason()),
    })
}

/// `tenet payload sign BUNDLE --key KEY`: add a signature (in place, or to
/// `--out`). The digest does not change.
pub fn sign(
    bundle: &Path,
    key: &Path,
    out_path: Option<&Path>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let key = KeyPair::read_file(key)?;
    let mut frame = read_frame(bundle)?;
    frame.sign(&key)?;
    let dest = out_path.unwrap_or(bundle);
    write_atomically(dest, &frame.encode())?;
    let _ = writeln!(
        out,
        "signed {} with {}\ndigest {} ({} signature(s))",
        dest.display(),
        key.public_key().fingerprint(),
        digest_string(&frame.body_digest()),
        frame.signatures.len()
    );
    Ok(())
}

/// `tenet payload verify`: exit 0 when the bundle verifies against the
/// trusted keys; otherwise 1 and the reason.
pub fn verify(
    bundle: &Path,
    trust: &[PathBuf],
    threshold: usize,
    digest: Option<&str>,
    out: &mut dyn Write,
) -> Result<i32, CliError> {
    if trust.is_empty() {
        return Err(CliError::Usage(
            "name at least one trusted public key with --trust".into(),
        ));
    }
    let admin_keys = trust
        .iter()
        .map(|p| PublicKey::read_pem_file(p))
        .collect::<Result<Vec<_>, _>>()?;
    let expected = match digest {
        Some(d) => Some(parse_digest(d).ok_or_else(|| {
            CliError::Usage(format!("--digest {d:?} is not sha256:<64 hex digits>"))
        })?),
        None => None,
    };
    let bytes = std::fs::read(bundle).map_err(io(bundle))?;
    let trust = BundleTrust {
        admin_keys,
        threshold,
    };
    match verify_bundle(&bytes, &trust, expected.as_ref(), now_ms()) {
        Ok(v) => {
            let signers: Vec<String> = v.signers.iter().map(|f| f.to_string()).collect();
            let _ = writeln!(
                out,
                "verified: {} {} {}\nsigned by {} of {} trusted key(s), {} required: {}",
                v.bundle.manifest.name,
                v.bundle.manifest.version,
                digest_string(&v.digest),
                v.signers.len(),
                trust.admin_keys.len(),
                threshold.max(1),
                signers.join(", ")
            );
            Ok(0)
        }
        Err(e) => {
            let _ = writeln!(out, "{}: refused: {e} ({})", bundle.display(), e.reason());
            Ok(1)
        }
    }
}

#[derive(Serialize)]
struct Inspection {
    digest: String,
    verified: bool,
    name: String,
    version: String,
    description: String,
    capabilities: Vec<&'static str>,
    created_ms: u64,
    expires_ms: u64,
    module_bytes: usize,
    artifacts: Vec<ArtifactInfo>,
    signatures: Vec<SignatureInfo>,
}

#[derive(Serialize)]
struct ArtifactInfo {
    name: String,
    sha256: String,
    size: u64,
}

#[derive(Serialize)]
struct SignatureInfo {
    key: String,
    algorithm: &'static str,
}

/// `tenet payload inspect`: what a bundle holds. Signatures are listed,
/// not checked: use `verify` for that.
pub fn inspect(bundle: &Path, output: Output, out: &mut dyn Write) -> Result<(), CliError> {
    let frame = read_frame(bundle)?;
    let b: PayloadBundle = frame.open().map_err(|e| CliError::Bundle {
        path: bundle.display().to_string(),
        message: format!("refused: {e} ({})", e.reason()),
    })?;
    let info = Inspection {
        digest: digest_string(&frame.body_digest()),
        verified: false,
        name: b.manifest.name,
        version: b.manifest.version,
        description: b.manifest.description,
        capabilities: b.manifest.capabilities.iter().map(|c| c.name()).collect(),
        created_ms: b.manifest.created_ms,
        expires_ms: b.manifest.expires_ms,
        module_bytes: b.module.len(),
        artifacts: b
            .artifacts
            .iter()
            .map(|a| ArtifactInfo {
                name: a.name.clone(),
                sha256: digest_string(&a.sha256),
                size: a.size,
            })
            .collect(),
        signatures: frame
            .signatures
            .iter()
            .map(|s| SignatureInfo {
                key: s.key.to_string(),
                algorithm: s.algorithm.name(),
            })
            .collect(),
    };
    let _ = match output {
        Output::Json => serde_json::to_writer_pretty(&mut *out, &info)
            .map_err(std::io::Error::from)
            .and_then(|_| writeln!(out)),
        Output::Text => {
            let mut t = format!(
                "bundle       {} {}\ndigest       {}\ndescription  {}\ncapabilities {}\ncreated      {}\nexpires      {}\nmodule       {} bytes\n",
                info.name,
                info.version,
                info.digest,
                info.description,
                info.capabilities.join(", "),
                rfc3339(info.created_ms),
                rfc3339(info.expires_ms),
                info.module_bytes
            );
            for a in &info.artifacts {
                t.push_str(&format!(
                    "artifact     {} {} bytes {}\n",
                    a.name, a.size, a.sha256
                ));
            }
            if info.signatures.is_empty() {
                t.push_str("signatures   none\n");
            }
            for s in &info.signatures {
                t.push_str(&format!(
                    "signature    {} {} (not checked; use `tenet payload verify`)\n",
                    s.algorithm, s.key
                ));
            }
            out.write_all(t.as_bytes())
        }
    };
    Ok(())
}
