//! `tenet payload build --apt PKG[=VERSION]... --target ROOT`: the .debs a
//! terminal like ROOT needs to install these packages, their dependency
//! closure included, fetched by apt in a scratch state of its own.
//!
//! The target root decides everything: its apt sources and keys (so the
//! packages come from the distribution it runs, and verify against its
//! archive keys) and its dpkg status (so only what it lacks is fetched).
//! Nothing of the machine the command runs on (its apt configuration,
//! sources, keys, lists, cache, architecture or installed packages)
//! enters the bundle: a key its sources name by path (`signed-by`) is
//! read under the target ([`sources`]). The .debs are then shipped in a
//! standard-library bundle, digest-pinned under the admins' signatures.

use std::path::{Path, PathBuf};
use std::process::Command;

mod sources;

use super::payload::CliError;

/// A package as apt takes it: `NAME` or `NAME=VERSION`, in Debian's
/// grammar (nothing apt could read as an option).
pub fn check_package(spec: &str) -> Result<(), String> {
    let (name, version) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    use tenet_protocol::stdlib::{package_name_ok, version_ok};
    // Debian's grammar, as the standard library's steps take it; apt also
    // reads a trailing - as "remove" (a trailing + is a name's own, as
    // g++'s).
    let name_ok = package_name_ok(name) && !name.ends_with('-');
    let version_ok = version.is_none_or(version_ok);
    if name_ok && version_ok {
        Ok(())
    } else {
        Err(format!(
            "--apt {spec:?}: name a Debian package, NAME or NAME=VERSION (lower-case letters, digits, + - .)"
        ))
    }
}

/// The apt options that make `target` decide the sources, keys,
/// preferences and installed packages, and `scratch` hold the lists and
/// the downloads.
pub fn apt_options(target: &Path, scratch: &Path, architecture: &str) -> Vec<String> {
    let t = |p: &str| target.join(p).display().to_string();
    let s = |p: &str| scratch.join(p).display().to_string();
    [
        // The target's sources, copied with their keys' paths under it.
        ("Dir::Etc::SourceList", s("sources/sources.list")),
        ("Dir::Etc::SourceParts", s("sources/sources.list.d")),
        ("Dir::Etc::Trusted", t("etc/apt/trusted.gpg")),
        ("Dir::Etc::TrustedParts", t("etc/apt/trusted.gpg.d")),
        ("Dir::Etc::Preferences", t("etc/apt/preferences")),
        ("Dir::Etc::PreferencesParts", t("etc/apt/preferences.d")),
        ("Dir::State::Status", t("var/lib/dpkg/status")),
        ("Dir::State::Lists", s("lists")),
        ("Dir::Cache", s("cache")),
        ("Dir::Cache::Archives", s("archives")),
        // The target's architecture, not this machine's (its foreign
        // ones are in apt_config).
        ("APT::Architecture", architecture.to_string()),
        // Only what the target's archive keys sign.
        ("APT::Get::AllowUnauthenticated", "false".into()),
        ("Acquire::AllowInsecureRepositories", "false".into()),
        (
            "Acquire::AllowDowngradeToInsecureRepositories",
            "false".into(),
        ),
        // The scratch state is this command's alone.
        ("Debug::NoLocking", "1".into()),
        ("APT::Install-Recommends", "false".into()),
        ("APT::Install-Suggests", "false".into()),
        (
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled",
            "false".into(),
        ),
    ]
    .into_iter()
    .flat_map(|(k, v)| ["-o".to_string(), format!("{k}={v}")])
    .collect()
}

/// apt's own configuration for the scratch state: none of this machine's
/// (`/etc/apt/apt.conf` and `apt.conf.d`: proxies, hooks, settings), read
/// through `APT_CONFIG` before anything else; the target's architectures,
/// native first (a list, which `-o` cannot give).
pub fn apt_config(scratch: &Path, architectures: &[String]) -> String {
    let list: String = architectures.iter().map(|a| format!("\"{a}\"; ")).collect();
    format!(
        "Dir::Etc::main \"/dev/null\";\nDir::Etc::parts \"{}\";\nAPT::Architectures {{ {list}}};\n",
        scratch.join("no-parts").display()
    )
}

/// The foreign architectures the target's dpkg was told of
/// (`dpkg --add-architecture`, in `var/lib/dpkg/arch`; the native one
/// may be listed there too).
fn foreign_architectures(target: &Path, native: &str) -> Vec<String> {
    std::fs::read_to_string(target.join("var/lib/dpkg/arch"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|a| {
            !a.is_empty()
                && *a != native
                && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .map(str::to_string)
        .collect()
}

/// The target's native architecture: that of its dpkg.
fn target_architecture(target: &Path) -> Result<String, CliError> {
    let out = Command::new("dpkg-query")
        .env("LC_ALL", "C")
        .arg(format!(
            "--admindir={}",
            target.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${Architecture}", "dpkg"])
        .output()
        .map_err(|source| CliError::Io {
            path: "dpkg-query".into(),
            source,
        })?;
    let arch = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || arch.is_empty() || !arch.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(CliError::Usage(format!(
            "--target {}: cannot tell its architecture (no dpkg installed in it)",
            target.display()
        )));
    }
    Ok(arch)
}

/// Fetch the closure of `packages` for `target` into a scratch directory;
/// the .debs, sorted by file name. The scratch directory is dropped with
/// the returned guard.
pub fn fetch_closure(
    packages: &[String],
    target: &Path,
) -> Result<(tempfile::TempDir, Vec<PathBuf>), CliError> {
    for p in packages {
        check_package(p).map_err(CliError::Usage)?;
    }
    if !target.join("var/lib/dpkg/status").is_file() {
        return Err(CliError::Usage(format!(
            "--target {}: not a Debian root (no var/lib/dpkg/status)",
            target.display()
        )));
    }
    // apt reads a relative path as relative to its own directories.
    let target = &std::fs::canonicalize(target).map_err(|source| CliError::Io {
        path: target.display().to_string(),
        source,
    })?;
    let architecture = target_architecture(target)?;
    let scratch = tempfile::tempdir().map_err(|source| CliError::Io {
        path: "a scratch directory".into(),
        source,
    })?;
    let made = |p: &Path, r: std::io::Result<()>| {
        r.map_err(|source| CliError::Io {
            path: p.display().to_string(),
            source,
        })
    };
    // Open to apt's unprivileged download user (its sandbox), who writes
    // only in the partial directories apt hands it.
    use std::os::unix::fs::PermissionsExt;
    made(
        scratch.path(),
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)),
    )?;
    for d in ["lists/partial", "archives/partial", "cache", "no-parts"] {
        let p = scratch.path().join(d);
        made(&p, std::fs::create_dir_all(&p))?;
    }
    let config = scratch.path().join("apt.conf");
    let architectures: Vec<String> = std::iter::once(architecture.clone())
        .chain(foreign_architectures(target, &architecture))
        .collect();
    made(
        &config,
        std::fs::write(&config, apt_config(scratch.path(), &architectures)),
    )?;
    sources::copy(target, &scratch.path().join("sources"))?;
    let options = apt_options(target, scratch.path(), &architecture);
    apt(
        &config,
        &options,
        &["update"],
        "read the target's package lists",
    )?;
    let mut install = vec!["install", "--download-only", "--no-remove", "-y", "--"];
    install.extend(packages.iter().map(String::as_str));
    apt(
        &config,
        &options,
        &install,
        &format!("resolve {}", packages.join(" ")),
    )?;
    let archives = scratch.path().join("archives");
    let mut debs = Vec::new();
    for entry in std::fs::read_dir(&archives).map_err(|source| CliError::Io {
        path: archives.display().to_string(),
        source,
    })? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "deb") {
            continue;
        }
        // apt writes an epoch's colon as %3a, as the standard library
        // reads it (`bsdutils_1%3a2.38.1-5_amd64.deb`).
        debs.push(path);
    }
    debs.sort();
    // The standard library's two scripts are artifacts too.
    if debs.len() + 2 > tenet_protocol::bundle::MAX_ARTIFACTS {
        return Err(CliError::Usage(format!(
            "the closure of {} is {} packages, more than the {} a bundle ships: split it into bundles the terminals install one after another",
            packages.join(" "),
            debs.len(),
            tenet_protocol::bundle::MAX_ARTIFACTS - 2
        )));
    }
    if debs.is_empty() {
        return Err(CliError::Usage(format!(
            "the target already has {}: nothing to ship",
            packages.join(" ")
        )));
    }
    Ok((scratch, debs))
}

/// Run apt-get with `options` and `args`; its error lines (`E: ...`) are
/// the error.
fn apt(config: &Path, options: &[String], args: &[&str], doing: &str) -> Result<(), CliError> {
    let out = Command::new("apt-get")
        .env("APT_CONFIG", config)
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .arg("-q")
        .args(options)
        .args(args)
        .output()
        .map_err(|source| CliError::Io {
            path: "apt-get".into(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = said.lines().filter(|l| l.starts_with("E: ")).collect();
    Err(CliError::Usage(format!(
        "apt cannot {doing}: {}",
        if errors.is_empty() {
            said.trim()
                .lines()
                .last()
                .unwrap_or("apt-get failed")
                .to_string()
        } else {
            errors.join("; ")
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_follow_debians_grammar() {
        for ok in [
            "jq",
            "libjq1",
            "jq=1.6-2.1+deb12u3",
            "g++",
            "libc6=2.36-9+deb12u14",
            "xy=1:2.0~rc1",
        ] {
            assert_eq!(check_package(ok), Ok(()), "{ok}");
        }
        for bad in [
            "-oAPT::Get::Foo=1",
            "jq-",
            "Jq",
            "j",
            "jq=",
            "jq=v1",
            "jq bash",
            "../jq",
        ] {
            assert!(check_package(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_package("-oDebug=1"),
            Err("--apt \"-oDebug=1\": name a Debian package, NAME or NAME=VERSION (lower-case letters, digits, + - .)".into())
        );
    }

    #[test]
    fn the_target_decides_sources_keys_and_installed_packages() {
        let options = apt_options(Path::new("/r"), Path::new("/s"), "arm64");
        let pairs: Vec<&str> = options
            .iter()
            .skip(1)
            .step_by(2)
            .map(String::as_str)
            .collect();
        assert!(pairs.contains(&"Dir::Etc::SourceList=/s/sources/sources.list"));
        assert!(pairs.contains(&"Dir::Etc::TrustedParts=/r/etc/apt/trusted.gpg.d"));
        assert!(pairs.contains(&"Dir::State::Status=/r/var/lib/dpkg/status"));
        assert!(pairs.contains(&"Dir::State::Lists=/s/lists"));
        assert!(pairs.contains(&"Dir::Cache::Archives=/s/archives"));
        assert!(pairs.contains(&"Dir::Etc::Trusted=/r/etc/apt/trusted.gpg"));
        assert!(pairs.contains(&"APT::Architecture=arm64"));
        assert!(pairs.contains(&"Acquire::AllowInsecureRepositories=false"));
        assert_eq!(
            apt_config(Path::new("/s"), &["arm64".into(), "armhf".into()]),
            "Dir::Etc::main \"/dev/null\";\nDir::Etc::parts \"/s/no-parts\";\nAPT::Architectures { \"arm64\"; \"armhf\"; };\n"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("var/lib/dpkg")).expect("mkdir");
        std::fs::write(tmp.path().join("var/lib/dpkg/arch"), "amd64\ni386\n").expect("arch");
        assert_eq!(foreign_architectures(tmp.path(), "amd64"), ["i386"]);
        assert!(options.iter().step_by(2).all(|o| o == "-o"));
    }
}
