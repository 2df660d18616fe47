//! Facts the agent finds out about its terminal, rather than what someone
//! typed into its configuration: the operating system (`os-release` under
//! the root), the kernel, the architecture, CPU and memory, whether a TPM
//! is there, whether the root file system is encrypted, whether a firewall
//! ruleset is loaded. All of it is the terminal's claim (`claims.facts` in
//! CEL), as anything it says of itself.
//!
//! Each fact is read by a small pure parser over the text the system gives
//! (tested on real samples); the reading itself is at the edge
//! ([`observe`]). What cannot be told stays empty (or `None`), and the
//! configured value, if any, stands.

use std::path::Path;

use tenet_protocol::inventory::{Facts, OsFacts};

/// What the agent observes, over the `configured` facts: an observed value
/// replaces the configured one; where nothing was observed the configured
/// value stands (`site`, `extra`, a model the firmware does not name).
pub fn observe(root: &Path, configured: &Facts) -> Facts {
    let mut facts = configured.clone();
    let os_release = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(root.join(p)).ok())
        .unwrap_or_default();
    let os = parse_os_release(&os_release);
    set(&mut facts.os.family, os.family);
    set(&mut facts.os.distribution, os.distribution);
    set(&mut facts.os.version, os.version);
    set(
        &mut facts.os.architecture,
        debian_architecture(std::env::consts::ARCH).into(),
    );
    // The kernel, the hardware and the security state are the running
    // machine's: only for the root it runs (`/`).
    if root != Path::new("/") {
        return facts;
    }
    set(
        &mut facts.os.kernel,
        read("/proc/sys/kernel/osrelease").trim().to_string(),
    );
    if let Ok(n) = std::thread::available_parallelism() {
        facts.hardware.cpu_cores = u32::try_from(n.get()).unwrap_or(u32::MAX);
    }
    if let Some(mib) = parse_meminfo_mib(&read("/proc/meminfo")) {
        facts.hardware.memory_mib = mib;
    }
    set(
        &mut facts.hardware.model,
        model(
            &read("/sys/class/dmi/id/sys_vendor"),
            &read("/sys/class/dmi/id/product_name"),
        ),
    );
    facts.hardware.tpm = ["/dev/tpmrm0", "/dev/tpm0", "/sys/class/tpm/tpm0"]
        .iter()
        .any(|p| Path::new(p).exists());
    facts.security.disk_encrypted = root_encrypted(&read("/proc/self/mountinfo"));
    facts.security.firewall = firewall();
    facts
}

fn set(field: &mut String, observed: String) {
    if !observed.is_empty() {
        *field = observed;
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The OS from `os-release` (`ID`, `ID_LIKE`, `VERSION_ID`): the family is
/// `debian` for Debian and what derives from it (Ubuntu, Raspberry Pi OS).
pub fn parse_os_release(text: &str) -> OsFacts {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
            .unwrap_or_default()
    };
    let id = field("ID");
    let like = field("ID_LIKE");
    let family = if id == "debian" || like.split_whitespace().any(|l| l == "debian") {
        "debian".to_string()
    } else {
        like.split_whitespace().next().unwrap_or(&id).to_string()
    };
    OsFacts {
        family,
        distribution: id,
        version: field("VERSION_ID"),
        ..OsFacts::default()
    }
}

/// Debian's name of a Rust target architecture (the agent's own, which is
/// the terminal's); the Rust name where Debian's is not certain from it
/// (`arm` is armel or armhf).
pub fn debian_architecture(rust: &str) -> &str {
    match rust {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// `MemTotal` of `/proc/meminfo`, in MiB.
pub fn parse_meminfo_mib(text: &str) -> Option<u64> {
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// The machine's vendor and product, as the firmware names them.
pub fn model(vendor: &str, product: &str) -> String {
    let (vendor, product) = (vendor.trim(), product.trim());
    match (vendor.is_empty(), product.is_empty()) {
        (_, true) => String::new(),
        (true, false) => product.to_string(),
        (false, false) if product.starts_with(vendor) => product.to_string(),
        (false, false) => format!("{vendor} {product}"),
    }
}

/// Whether the root file system is on dm-crypt: its device (from
/// `/proc/self/mountinfo`), or a device beneath it (LVM on LUKS), has a
/// device-mapper UUID starting `CRYPT-`. `None` when the root's device is
/// not found.
fn root_encrypted(mountinfo: &str) -> Option<bool> {
    let device = Path::new("/sys/dev/block").join(root_device(mountinfo)?);
    // A root not on a block device (overlay, btrfs subvolume, ZFS): unknown.
    device.exists().then(|| encrypted(&device, 0))
}

/// The `major:minor` of the file system mounted at `/` (the last mount
/// there is the one in force).
pub fn root_device(mountinfo: &str) -> Option<String> {
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(4) == Some(&"/")).then(|| f.get(2).map(|d| d.to_string()))?
    })
}

/// Whether a device-mapper UUID is an encryption target's (cryptsetup's
/// LUKS, plain, TrueCrypt or BitLocker; not dm-verity or dm-integrity,
/// which it names `CRYPT-VERITY-...` and `CRYPT-INTEGRITY-...`).
pub fn encrypting_uuid(uuid: &str) -> bool {
    [
        "CRYPT-LUKS",
        "CRYPT-PLAIN-",
        "CRYPT-TCRYPT-",
        "CRYPT-BITLK-",
    ]
    .iter()
    .any(|p| uuid.starts_with(p))
}

fn encrypted(device: &Path, depth: usize) -> bool {
    if depth > 8 {
        return false;
    }
    if std::fs::read_to_string(device.join("dm/uuid")).is_ok_and(|u| encrypting_uuid(&u)) {
        return true;
    }
    std::fs::read_dir(device.join("slaves")).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| encrypted(&e.path(), depth + 1))
    })
}

/// Whether nftables has a ruleset loaded (`nft list ruleset` prints one);
/// `None` when it cannot be asked (no nft, or not allowed).
fn firewall() -> Option<bool> {
    let out = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| ruleset_loaded(&String::from_utf8_lossy(&out.stdout)))
}

/// A ruleset that filters what comes in: a filter chain hooked on input
/// (a NAT chain, or empty tables, is not a firewall).
pub fn ruleset_loaded(ruleset: &str) -> bool {
    ruleset
        .lines()
        .any(|l| l.trim_start().starts_with("type filter hook input "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_of_debian_and_its_derivatives() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(
            parse_os_release(debian),
            OsFacts {
                family: "debian".into(),
                distribution: "debian".into(),
                version: "12".into(),
                ..OsFacts::default()
            }
        );
        let ubuntu = "NAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nID=ubuntu\nID_LIKE=debian\n";
        let os = parse_os_release(ubuntu);
        assert_eq!(
            (
                os.family.as_str(),
                os.distribution.as_str(),
                os.version.as_str()
            ),
            ("debian", "ubuntu", "24.04")
        );
        let fedora = "ID=fedora\nVERSION_ID=40\n";
        assert_eq!(parse_os_release(fedora).family, "fedora");
        assert_eq!(parse_os_release("").family, "");
    }

    #[test]
    fn memory_model_and_architecture() {
        assert_eq!(
            parse_meminfo_mib("MemTotal:       24634432 kB\nMemFree: 1 kB\n"),
            Some(24057)
        );
        assert_eq!(parse_meminfo_mib("nothing"), None);
        assert_eq!(
            model("LENOVO", "ThinkCentre M70q"),
            "LENOVO ThinkCentre M70q"
        );
        assert_eq!(model("QEMU", "QEMU Standard PC"), "QEMU Standard PC");
        assert_eq!(model("", "\n"), "");
        assert_eq!(debian_architecture("x86_64"), "amd64");
        assert_eq!(debian_architecture("aarch64"), "arm64");
    }

    #[test]
    fn the_root_device_from_mountinfo() {
        let mountinfo = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw\n23 22 0:21 / /proc rw - proc proc rw\n";
        assert_eq!(root_device(mountinfo).as_deref(), Some("254:1"));
        // Mounted over: the last mount at / is the one in force.
        let over = format!("{mountinfo}30 22 0:40 / / rw - overlay overlay rw\n");
        assert_eq!(root_device(&over).as_deref(), Some("0:40"));
        assert_eq!(root_device("23 22 0:21 / /proc rw - proc proc rw\n"), None);
    }

    #[test]
    fn a_firewall_is_a_ruleset_with_a_base_chain() {
        let loaded = "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\t}\n}\n";
        assert!(ruleset_loaded(loaded));
        let nat_only = "table ip nat {\n\tchain POSTROUTING {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t}\n}\n";
        assert!(!ruleset_loaded(nat_only));
        assert!(!ruleset_loaded("table inet filter {\n}\n"));
        assert!(!ruleset_loaded(""));
    }

    #[test]
    fn only_encryption_targets_count_as_encrypted() {
        assert!(encrypting_uuid("CRYPT-LUKS2-0a1b2c-root"));
        assert!(encrypting_uuid("CRYPT-PLAIN-swap"));
        assert!(!encrypting_uuid("CRYPT-VERITY-0a1b2c-root"));
        assert!(!encrypting_uuid("CRYPT-INTEGRITY-data"));
        assert!(!encrypting_uuid("LVM-abcdef"));
    }

    /// On this machine: what the agent says of it.
    #[test]
    fn the_running_machine_is_observed() {
        let facts = observe(Path::new("/"), &Facts::default());
        assert!(facts.hardware.cpu_cores >= 1);
        assert!(facts.hardware.memory_mib > 0);
        assert!(!facts.os.kernel.is_empty());
        assert_eq!(
            facts.os.architecture,
            debian_architecture(std::env::consts::ARCH)
        );
    }

    /// Another root (a test root, an image): its os-release, and nothing of
    /// the machine; the configured values stand where nothing was seen.
    #[test]
    fn another_root_keeps_the_configured_facts() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc")).expect("mkdir");
        std::fs::write(
            dir.path().join("etc/os-release"),
            "ID=debian\nVERSION_ID=12\n",
        )
        .expect("os-release");
        let configured = Facts {
            site: Some("nagoya".into()),
            hardware: tenet_protocol::inventory::HardwareFacts {
                model: "ward PC".into(),
                ..Default::default()
            },
            os: OsFacts {
                version: "11".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let facts = observe(dir.path(), &configured);
        assert_eq!(facts.os.version, "12");
        assert_eq!(facts.os.family, "debian");
        assert_eq!(facts.site.as_deref(), Some("nagoya"));
        assert_eq!(facts.hardware.model, "ward PC");
        assert_eq!(facts.hardware.cpu_cores, 0);
        assert_eq!(facts.security.disk_encrypted, None);
    }
}
