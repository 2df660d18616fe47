//! The standard library payload's steps: what a policy with
//! `remediation: {auto: {}}` asks a terminal to do.
//!
//! The operator computes the steps from the policy's requirements; each
//! step is one envelope argument, fields separated by single spaces, so
//! the admins approve them exactly as the terminal's script
//! (`tenet-std.sh`, an artifact of every standard-library bundle) reads
//! them:
//!
//! | argument | does |
//! |---|---|
//! | `purge NAME` | purges package NAME (nothing when it is not there) |
//! | `install NAME [OP VERSION]...` | unless NAME is installed (`ii`) at a version for which every `dpkg --compare-versions V OP VERSION` holds, installs the bundle's `NAME_*.deb` (up or down) with the bundle's other .debs it lacks |
//! | `file PATH SHA256` | writes the bundle's artifact with that SHA-256 to PATH |
//! | `file-absent PATH` | removes the file PATH |
//! | `service NAME running\|stopped [enabled\|disabled]` | starts or stops service NAME, and enables or disables it at boot |
//!
//! OP is one of dpkg's `lt le eq ne ge gt`. The steps come in that order:
//! purges, installs (one dpkg run), files, services.

use std::fmt;

/// The artifact every standard-library bundle carries: the script the
/// steps are arguments of.
pub const SCRIPT: &str = "tenet-std.sh";

/// A comparison as `dpkg --compare-versions` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpkgOp {
    Lt,
    Le,
    Eq,
    Ne,
    Ge,
    Gt,
}

impl DpkgOp {
    pub const ALL: [DpkgOp; 6] = [
        DpkgOp::Lt,
        DpkgOp::Le,
        DpkgOp::Eq,
        DpkgOp::Ne,
        DpkgOp::Ge,
        DpkgOp::Gt,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DpkgOp::Lt => "lt",
            DpkgOp::Le => "le",
            DpkgOp::Eq => "eq",
            DpkgOp::Ne => "ne",
            DpkgOp::Ge => "ge",
            DpkgOp::Gt => "gt",
        }
    }

    /// Whether `ordering` (of the installed version against the clause's)
    /// satisfies this comparison.
    pub fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::{Equal, Greater, Less};
        match self {
            DpkgOp::Lt => ordering == Less,
            DpkgOp::Le => ordering != Greater,
            DpkgOp::Eq => ordering == Equal,
            DpkgOp::Ne => ordering != Equal,
            DpkgOp::Ge => ordering != Less,
            DpkgOp::Gt => ordering == Greater,
        }
    }
}

/// One step of the standard library payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Purge {
        package: String,
    },
    Install {
        package: String,
        /// Every clause must hold of the installed version (none: any).
        constraint: Vec<(DpkgOp, String)>,
    },
    File {
        path: String,
        /// Lower-case hex.
        sha256: String,
    },
    FileAbsent {
        path: String,
    },
    Service {
        name: String,
        running: bool,
        /// Whether it starts at boot; `None` leaves that as it is.
        enabled: Option<bool>,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Purge { package } => write!(f, "purge {package}"),
            Step::Install {
                package,
                constraint,
            } => {
                write!(f, "install {package}")?;
                for (op, v) in constraint {
                    write!(f, " {} {v}", op.as_str())?;
                }
                Ok(())
            }
            Step::File { path, sha256 } => write!(f, "file {path} {sha256}"),
            Step::FileAbsent { path } => write!(f, "file-absent {path}"),
            Step::Service {
                name,
                running,
                enabled,
            } => {
                write!(
                    f,
                    "service {name} {}",
                    if *running { "running" } else { "stopped" }
                )?;
                match enabled {
                    Some(true) => write!(f, " enabled"),
                    Some(false) => write!(f, " disabled"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Why a step cannot be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StepError(pub String);

/// A Debian package name (policy manual 5.6.1).
pub fn package_name_ok(name: &str) -> bool {
    name.len() >= 2
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// A Debian version's characters (its order is dpkg's business).
pub fn version_ok(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= 128
        && version.starts_with(|c: char| c.is_ascii_digit())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c))
}

/// An absolute path the script can take as one field: no spaces, quotes
/// or shell characters, no `..`, no `//`.
pub fn path_ok(path: &str) -> bool {
    path.len() >= 2
        && path.len() <= 1024
        && path.starts_with('/')
        && !path.ends_with('/')
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._+-@,=:".contains(c))
        && path
            .split('/')
            .skip(1)
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// A systemd unit name's characters.
pub fn service_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@._:-".contains(c))
}

impl Step {
    /// The envelope argument, after checking every field is one the
    /// script reads as meant (what the operator computes from a valid
    /// policy always is).
    pub fn to_arg(&self) -> Result<String, StepError> {
        let bad = |what: &str, value: &str| Err(StepError(format!("{what} {value:?}")));
        match self {
            Step::Purge { package } if !package_name_ok(package) => {
                return bad("not a Debian package name:", package);
            }
            Step::Install {
                package,
                constraint,
            } => {
                if !package_name_ok(package) {
                    return bad("not a Debian package name:", package);
                }
                if let Some((_, v)) = constraint.iter().find(|(_, v)| !version_ok(v)) {
                    return bad("not a Debian version:", v);
                }
            }
            Step::File { path, sha256 } => {
                if !path_ok(path) {
                    return bad("not a plain absolute path:", path);
                }
                if sha256.len() != 64
                    || !sha256
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return bad("not a lower-case hex SHA-256:", sha256);
                }
            }
            Step::FileAbsent { path } if !path_ok(path) => {
                return bad("not a plain absolute path:", path);
            }
            Step::Service { name, .. } if !service_name_ok(name) => {
                return bad("not a service name:", name);
            }
            _ => {}
        }
        Ok(self.to_string())
    }

    /// Read an argument back (what the simulated terminals run; the real
    /// ones read it in `tenet-std.sh`).
    pub fn parse(arg: &str) -> Result<Step, StepError> {
        let fields: Vec<&str> = arg.split(' ').collect();
        let step = match fields.as_slice() {
            ["purge", package] => Step::Purge {
                package: package.to_string(),
            },
            ["install", package, clauses @ ..] if clauses.len() % 2 == 0 => Step::Install {
                package: package.to_string(),
                constraint: clauses
                    .chunks(2)
                    .map(|c| {
                        let op = DpkgOp::ALL
                            .into_iter()
                            .find(|o| o.as_str() == c[0])
                            .ok_or_else(|| StepError(format!("unknown comparison {:?}", c[0])))?;
                        Ok((op, c[1].to_string()))
                    })
                    .collect::<Result<_, StepError>>()?,
            },
            ["file", path, sha256] => Step::File {
                path: path.to_string(),
                sha256: sha256.to_string(),
            },
            ["file-absent", path] => Step::FileAbsent {
                path: path.to_string(),
            },
            ["service", name, state, rest @ ..] if rest.len() <= 1 => Step::Service {
                name: name.to_string(),
                running: match *state {
                    "running" => true,
                    "stopped" => false,
                    other => return Err(StepError(format!("unknown service state {other:?}"))),
                },
                enabled: match rest.first().copied() {
                    None => None,
                    Some("enabled") => Some(true),
                    Some("disabled") => Some(false),
                    Some(other) => {
                        return Err(StepError(format!("unknown boot setting {other:?}")));
                    }
                },
            },
            _ => return Err(StepError(format!("not a standard library step: {arg:?}"))),
        };
        // Whatever parses must also be what `to_arg` writes.
        match step.to_arg() {
            Ok(text) if text == arg => Ok(step),
            Ok(_) => Err(StepError(format!("not in canonical form: {arg:?}"))),
            Err(e) => Err(e),
        }
    }

    /// The order the script runs them in: purges, installs, files, services.
    pub fn phase(&self) -> u8 {
        match self {
            Step::Purge { .. } => 0,
            Step::Install { .. } => 1,
            Step::File { .. } | Step::FileAbsent { .. } => 2,
            Step::Service { .. } => 3,
        }
    }
}

/// The package and version of a Debian file name as apt writes it,
/// `NAME_VERSION_ARCH.deb` (an epoch's `:` written `%3a`).
pub fn deb_file_name(file: &str) -> Option<(String, String)> {
    let stem = file.strip_suffix(".deb")?;
    let mut parts = stem.split('_');
    let (name, version, _arch) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let version = version.replace("%3a", ":").replace("%3A", ":");
    (package_name_ok(name) && version_ok(&version)).then(|| (name.to_string(), version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Step> {
        vec![
            Step::Purge {
                package: "telnetd".into(),
            },
            Step::Install {
                package: "jq".into(),
                constraint: vec![],
            },
            Step::Install {
                package: "browser-a".into(),
                constraint: vec![
                    (DpkgOp::Ge, "120.0".into()),
                    (DpkgOp::Lt, "1:130~rc1".into()),
                ],
            },
            Step::File {
                path: "/etc/tenet/motd".into(),
                sha256: "ab".repeat(32),
            },
            Step::FileAbsent {
                path: "/etc/cron.d/rsh".into(),
            },
            Step::Service {
                name: "clamav-daemon".into(),
                running: true,
                enabled: Some(true),
            },
            Step::Service {
                name: "telnet.socket".into(),
                running: false,
                enabled: None,
            },
        ]
    }

    #[test]
    fn steps_read_back_as_written() {
        for step in all() {
            let arg = step.to_arg().expect("valid");
            assert_eq!(Step::parse(&arg), Ok(step), "{arg}");
        }
        assert_eq!(
            all()[2].to_arg().expect("valid"),
            "install browser-a ge 120.0 lt 1:130~rc1"
        );
    }

    #[test]
    fn fields_the_script_would_misread_are_refused() {
        let refused = [
            Step::Purge {
                package: "-rf".into(),
            },
            Step::Install {
                package: "jq".into(),
                constraint: vec![(DpkgOp::Ge, "1.6 ; reboot".into())],
            },
            Step::File {
                path: "/etc/../shadow".into(),
                sha256: "ab".repeat(32),
            },
            Step::File {
                path: "/etc/motd".into(),
                sha256: "AB".repeat(32),
            },
            Step::FileAbsent {
                path: "/etc/a b".into(),
            },
            Step::FileAbsent {
                path: "relative".into(),
            },
            Step::Service {
                name: "$(id)".into(),
                running: true,
                enabled: None,
            },
        ];
        for step in refused {
            assert!(step.to_arg().is_err(), "{step:?}");
        }
        for arg in [
            "install jq ge",
            "install jq about 1.6",
            "service x paused",
            "service x running enabled now",
            "purge  jq",
            "reboot now",
            "file-absent /etc/x/",
        ] {
            assert!(Step::parse(arg).is_err(), "{arg}");
        }
    }

    #[test]
    fn deb_file_names_name_package_and_version() {
        assert_eq!(
            deb_file_name("libonig5_6.9.8-1_amd64.deb"),
            Some(("libonig5".into(), "6.9.8-1".into()))
        );
        assert_eq!(
            deb_file_name("openssl_1%3a3.0.15-1_amd64.deb"),
            Some(("openssl".into(), "1:3.0.15-1".into()))
        );
        assert_eq!(deb_file_name("install-deb.sh"), None);
        assert_eq!(deb_file_name("a_b.deb"), None);
    }
}
