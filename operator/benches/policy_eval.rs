//! Evaluating 1,000 compiled policies against one terminal's inventory: the
//! per-terminal cost of a reconcile pass. Target: under 1 ms per terminal.
//!
//! The terminal looks like a real Debian desktop (1,500 packages, 40
//! services, 200 files); the policies mix every requirement kind, label and
//! CEL selectors, and each names its own package so no parse is shared.

use std::fmt::Write as _;

use criterion::{Criterion, criterion_group, criterion_main};
use tenet::policy::{TerminalView, evaluate, load_dir};
use tenet_protocol::inventory::*;

const POLICIES: usize = 1000;

fn inventory() -> Inventory {
    Inventory {
        terminal: "nagoya-ward3-01".into(),
        labels: [("site", "nagoya"), ("role", "ward")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        facts: Facts {
            os: OsFacts {
                family: "debian".into(),
                distribution: "debian".into(),
                version: "12".into(),
                kernel: "6.1.0-26-amd64".into(),
                architecture: "amd64".into(),
            },
            site: Some("nagoya".into()),
            hardware: HardwareFacts {
                model: "ThinkCentre".into(),
                cpu_cores: 4,
                memory_mib: 8192,
                tpm: true,
            },
            security: SecurityFacts {
                disk_encrypted: Some(true),
                firewall: Some(true),
            },
            extra: [("firewall".to_string(), "active".to_string())].into(),
        },
        packages: (0..1500)
            .map(|i| Package {
                name: format!("pkg-{i:04}"),
                version: format!("{}.{}.{}-{}+deb12u1", i % 7, i % 13, i % 100, i % 3 + 1),
                manager: PackageManager::Dpkg,
                state: Default::default(),
                problems: Vec::new(),
            })
            .collect(),
        services: (0..40)
            .map(|i| Service {
                name: format!("svc-{i}"),
                state: if i % 5 == 0 {
                    ServiceState::Stopped
                } else {
                    ServiceState::Running
                },
                enabled: true,
            })
            .collect(),
        files: (0..200)
            .map(|i| FileEntry {
                path: format!("/etc/tenet/f{i}"),
                sha256: format!("{:064x}", i),
                size: 100,
            })
            .collect(),
    }
}

fn policy_yaml(i: usize) -> String {
    let mut y = format!(
        "---\napiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata:\n  name: p{i}\nspec:\n"
    );
    match i % 5 {
        0 => y.push_str("  selector:\n    matchLabels: { site: nagoya }\n"),
        1 => y.push_str("  selector:\n    expression: claims.facts.os.family == 'debian' && claims.facts.hardware.memoryMib >= 4096\n"),
        _ => {}
    }
    y.push_str("  requirements:\n");
    let pkg = format!("pkg-{:04}", i % 1500);
    let _ = match i % 10 {
        0..=3 => writeln!(
            y,
            "    - package: {{ name: {pkg}, version: '>= {}.0, < 99' }}",
            i % 5
        ),
        4 => writeln!(y, "    - package: {{ name: forbidden-{i}, absent: true }}"),
        5 => writeln!(
            y,
            "    - service: {{ name: svc-{}, enabled: true }}",
            i % 40
        ),
        6 => writeln!(
            y,
            "    - file: {{ path: /etc/tenet/f{}, sha256: '{:064x}' }}",
            i % 200,
            i % 200
        ),
        7 => writeln!(
            y,
            "    - expression: {{ cel: '\"{pkg}\" in packages && dpkgCompare(packages[\"{pkg}\"], \"1.0\") >= 0' }}"
        ),
        8 => writeln!(
            y,
            "    - expression: {{ cel: 'labels.site == \"nagoya\" && claims.facts.extra.firewall == \"active\"' }}"
        ),
        _ => writeln!(
            y,
            "    - package: {{ name: {pkg} }}\n    - service: {{ name: svc-{}, state: running }}",
            i % 40
        ),
    };
    y
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let text: String = (0..POLICIES).map(policy_yaml).collect();
    std::fs::write(dir.path().join("policies.yaml"), text).expect("write");
    let set = load_dir(dir.path());
    assert!(set.errors.is_empty(), "{:?}", set.errors.first());
    assert_eq!(set.policies.len(), POLICIES);
    let inv = inventory();

    // Sanity: the policies really select and check this terminal.
    let view = TerminalView::new(&inv, &inv.labels);
    let selected = set
        .policies
        .iter()
        .filter(|p| evaluate(&p.compiled, &view).selected)
        .count();
    assert_eq!(selected, POLICIES);

    c.bench_function("evaluate 1000 policies on one terminal", |b| {
        b.iter(|| {
            let view = TerminalView::new(&inv, &inv.labels);
            let mut drifted = 0;
            for p in &set.policies {
                if !evaluate(&p.compiled, &view).compliant() {
                    drifted += 1;
                }
            }
            std::hint::black_box(drifted)
        })
    });

    c.bench_function("index one terminal (TerminalView::new)", |b| {
        b.iter(|| std::hint::black_box(TerminalView::new(&inv, &inv.labels)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
