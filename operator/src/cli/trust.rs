//! `tenet trust`: rotate the keys agents trust (TUF-style). The admins
//! write the next version of the trust anchors (`rotate`), K of the admins
//! in force and K' of the new ones sign it (`sign`), it is put in the
//! operator's data directory (`install`), and the running operator takes
//! it and sends it to every agent, first on every session; each agent checks the
//! signatures against the admin keys it pinned before it pins the new ones.

use std::io::Write;
use std::path::{Path, PathBuf};

use tenet_protocol::enrol::TrustAnchors;
use tenet_protocol::host::now_ms;
use tenet_protocol::rotation::{TrustRotation, verify_rotation};
use tenet_protocol::wire::MAX_SIGNATURES;
use tenet_protocol::{KeyPair, Kind, PublicKey, SignedMessage, Signer};

use super::payload::{CliError, io};
use crate::trust::{
    TrustChain, first_anchors, first_path, has_dispatch_key, load_chain, not_first, recorded_first,
    rotation_path,
};

#[derive(clap::Subcommand)]
pub enum TrustCommand {
    /// The trust anchors in force: version 1 (the operator's --admin-key,
    /// --admin-threshold and DATA/dispatch.key) and each rotation in DATA.
    Show(ChainArgs),
    /// Write the next version of the trust anchors, unsigned, to --out:
    /// the new admin keys and threshold, and the dispatch key (unchanged
    /// unless --new-dispatch-key). Then K admins of the version in force
    /// and K' of the new set sign it (`tenet trust sign`).
    Rotate(RotateArgs),
    /// Add an admin's signature to a rotation file, after printing the
    /// trust anchors it names (check them before you sign).
    Sign {
        /// The rotation file (`tenet trust rotate --out`).
        file: PathBuf,
        /// The admin's private key.
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a signed rotation against the anchors in force and put it in
    /// the data directory as DATA/trust-N.rotation, where the running
    /// operator takes it. Refused (exit 1) unless K admins of the version in
    /// force and K' of the new set signed it.
    Install {
        /// The signed rotation file.
        file: PathBuf,
        #[command(flatten)]
        chain: ChainArgs,
    },
}

/// Where the trust anchors in force come from: version 1 as the operator
/// recorded it (DATA/trust-1.anchors) or as its flags give it, and the
/// rotations in DATA.
#[derive(clap::Args)]
pub struct ChainArgs {
    /// The operator's data directory (only public files are read).
    #[arg(long)]
    pub data: PathBuf,
    /// The admin keys the operator is started with (repeat): version 1.
    /// Needed only where the operator could not record version 1
    /// (DATA/trust-1.anchors); when given, they must match it.
    #[arg(long = "admin-key")]
    pub admin_keys: Vec<PathBuf>,
    /// The threshold the operator is started with (with --admin-key;
    /// default: the recorded one, else 1).
    #[arg(long)]
    pub admin_threshold: Option<u8>,
}

#[derive(clap::Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub chain: ChainArgs,
    /// An admin public key of the new version (repeat); the whole new set.
    #[arg(long = "new-admin-key", required = true)]
    pub new_admin_keys: Vec<PathBuf>,
    /// How many of the new admin keys must sign bundles, approvals and the
    /// next rotation.
    #[arg(long)]
    pub new_admin_threshold: u8,
    /// The public key of a new dispatch key (which also issues security
    /// certificates); its private key must be in DATA as a dispatch*.key
    /// file before the rotation is installed (`tenet keygen --out
    /// DATA/dispatch-N.key`).
    #[arg(long)]
    pub new_dispatch_key: Option<PathBuf>,
    /// Where to write the unsigned rotation (never overwritten).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(command: TrustCommand, out: &mut dyn Write) -> std::io::Result<i32> {
    let result = match command {
        TrustCommand::Show(args) => show(&args, out),
        TrustCommand::Rotate(args) => rotate(&args, out),
        TrustCommand::Sign { file, key } => sign(&file, &key, out),
        TrustCommand::Install { file, chain } => install(&file, &chain, out),
    };
    Ok(result.unwrap_or_else(|e| {
        eprintln!("tenet: {e}");
        1
    }))
}

fn read_keys(paths: &[PathBuf]) -> Result<Vec<PublicKey>, CliError> {
    paths
        .iter()
        .map(|p| PublicKey::read_pem_file(p).map_err(CliError::from))
        .collect()
}

/// The chain in force, as the operator walks it.
fn chain(args: &ChainArgs) -> Result<TrustChain, CliError> {
    let recorded = recorded_first(&args.data).map_err(CliError::Usage)?;
    let first = match recorded {
        Some(r) if args.admin_keys.is_empty() => r,
        recorded => {
            if args.admin_keys.is_empty() {
                return Err(CliError::Usage(format!(
                    "{} is not there: give the operator's --admin-key and --admin-threshold",
                    first_path(&args.data).display()
                )));
            }
            let dispatch = PublicKey::read_pem_file(&args.data.join("dispatch.key.pub"))?;
            let threshold = args
                .admin_threshold
                .or(recorded.as_ref().map(|r| r.admin_threshold))
                .unwrap_or(1);
            let given = first_anchors(read_keys(&args.admin_keys)?, threshold, dispatch)
                .map_err(CliError::Usage)?;
            if let Some(r) = recorded
                && r != given
            {
                return Err(CliError::Usage(not_first(&args.data, &r)));
            }
            given
        }
    };
    load_chain(&args.data, first).map_err(CliError::Usage)
}

/// What a set of anchors says, for a person.
fn describe(anchors: &TrustAnchors) -> String {
    let mut s = format!(
        "version {}: {} of {} admin key(s)",
        anchors.version,
        anchors.admin_threshold,
        anchors.admin_keys.len()
    );
    for k in &anchors.admin_keys {
        s.push_str(&format!("\n  admin key    {}", k.fingerprint()));
    }
    s.push_str(&format!(
        "\n  dispatch key {} (also issues security certificates)",
        anchors.dispatch_key.fingerprint()
    ));
    s
}

fn show(args: &ChainArgs, out: &mut dyn Write) -> Result<i32, CliError> {
    let chain = chain(args)?;
    let _ = writeln!(out, "in force: {}", describe(&chain.anchors));
    for (i, _) in chain.rotations.iter().enumerate() {
        let _ = writeln!(
            out,
            "rotation {} verified",
            rotation_path(&args.data, i as u64 + 2).display()
        );
    }
    Ok(0)
}

fn rotate(args: &RotateArgs, out: &mut dyn Write) -> Result<i32, CliError> {
    let current = chain(&args.chain)?.anchors;
    let dispatch_key = match &args.new_dispatch_key {
        Some(p) => PublicKey::read_pem_file(p)?,
        None => current.dispatch_key.clone(),
    };
    let mut next = first_anchors(
        read_keys(&args.new_admin_keys)?,
        args.new_admin_threshold,
        dispatch_key,
    )
    .map_err(|e| CliError::Usage(e.replace("--admin-key", "--new-admin-key")))?;
    next.version = current.version + 1;
    let both = current
        .admin_keys
        .iter()
        .filter(|k| next.admin_keys.contains(k))
        .count();
    let fewest = usize::from(current.admin_threshold) + usize::from(next.admin_threshold)
        - both.min(usize::from(
            current.admin_threshold.min(next.admin_threshold),
        ));
    if fewest > MAX_SIGNATURES {
        return Err(CliError::Usage(format!(
            "the rotation would need {fewest} signatures ({} of version {} and {} of the new set, {both} key(s) in both), more than the {MAX_SIGNATURES} a frame holds: rotate in two steps",
            current.admin_threshold, current.version, next.admin_threshold
        )));
    }
    let frame = SignedMessage::new(&TrustRotation {
        anchors: next.clone(),
        created_at_ms: now_ms(),
    });
    write_new(&args.out, &frame.encode())?;
    let _ = writeln!(
        out,
        "wrote {} (unsigned)\nfrom {}\nto   {}\nit needs signatures by {} of the admin keys of version {} and {} of its own",
        args.out.display(),
        describe(&current),
        describe(&next),
        current.admin_threshold,
        current.version,
        next.admin_threshold
    );
    Ok(0)
}

fn read_rotation(file: &Path) -> Result<(SignedMessage, TrustRotation), CliError> {
    let bytes = std::fs::read(file).map_err(io(file))?;
    let bad = |e: tenet_protocol::Rejection| CliError::Bundle {
        path: file.display().to_string(),
        message: e.to_string(),
    };
    let frame = SignedMessage::decode(&bytes, Kind::TrustRotation).map_err(bad)?;
    let rotation = frame.open().map_err(bad)?;
    Ok((frame, rotation))
}

fn sign(file: &Path, key: &Path, out: &mut dyn Write) -> Result<i32, CliError> {
    let (mut frame, rotation) = read_rotation(file)?;
    let key = KeyPair::read_file(key)?;
    let _ = writeln!(
        out,
        "signing the trust anchors {} names:\n{}",
        file.display(),
        describe(&rotation.anchors)
    );
    frame.sign(&key)?;
    if frame.signatures.len() > MAX_SIGNATURES {
        return Err(CliError::Usage(format!(
            "{}: a frame holds at most {MAX_SIGNATURES} signatures",
            file.display()
        )));
    }
    tenet_protocol::host::write_atomically(file, &frame.encode(), 0o644).map_err(io(file))?;
    let _ = writeln!(
        out,
        "signed with {}: {} signature(s) now",
        key.public_key().fingerprint(),
        frame.signatures.len()
    );
    Ok(0)
}

fn install(file: &Path, args: &ChainArgs, out: &mut dyn Write) -> Result<i32, CliError> {
    let current = chain(args)?.anchors;
    let bytes = std::fs::read(file).map_err(io(file))?;
    let rotated = verify_rotation(&bytes, &current).map_err(|e| CliError::Bundle {
        path: file.display().to_string(),
        message: e.to_string(),
    })?;
    crate::trust::check_one_key(&rotated.anchors).map_err(CliError::Usage)?;
    has_dispatch_key(&args.data, &rotated.anchors).map_err(CliError::Usage)?;
    let dest = rotation_path(&args.data, rotated.anchors.version);
    write_new(&dest, &bytes)?;
    let _ = writeln!(
        out,
        "installed {}\n{}\nsigned by {} admin(s) of version {} and {} of its own; the running operator takes it and sends it to every agent",
        dest.display(),
        describe(&rotated.anchors),
        rotated.old_signers.len(),
        current.version,
        rotated.new_signers.len()
    );
    Ok(0)
}

/// Write a new file; an existing one is never overwritten.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}
