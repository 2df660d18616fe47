//! Tenet's Debian version ordering against the real `dpkg --compare-versions`
//! on a generated corpus: epochs, tildes, revisions, letters, runs of digits
//! with leading zeros, and the characters `.+~-:` wherever Debian allows them.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tenet::policy::version::compare_dpkg;

fn have_dpkg() -> bool {
    Command::new("dpkg")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// An upstream or revision fragment: digit runs and letter runs joined by
/// separators.
fn fragment(rng: &mut StdRng, seps: &[char]) -> String {
    let mut s = String::new();
    let parts = rng.random_range(1..5);
    for i in 0..parts {
        if i > 0 {
            s.push(seps[rng.random_range(0..seps.len())]);
        }
        match rng.random_range(0..10) {
            0..=5 => {
                if rng.random_bool(0.15) {
                    s.push('0');
                }
                let _ = write!(s, "{}", rng.random_range(0..1000u32));
            }
            6 | 7 => {
                for _ in 0..rng.random_range(1..4) {
                    s.push(rng.random_range(b'a'..=b'z') as char);
                }
            }
            8 => {
                let _ = write!(s, "{}", rng.random_range(0..10u32));
                s.push(rng.random_range(b'a'..=b'e') as char);
            }
            _ => {
                for _ in 0..rng.random_range(1..3) {
                    s.push(rng.random_range(b'A'..=b'Z') as char);
                }
            }
        }
    }
    s
}

fn version(rng: &mut StdRng) -> String {
    let mut v = String::new();
    if rng.random_bool(0.2) {
        let _ = write!(v, "{}:", rng.random_range(0..3u32));
    }
    // Upstream must start with a digit.
    let _ = write!(v, "{}", rng.random_range(0..20u32));
    if rng.random_bool(0.8) {
        v.push(['.', '+', '~', '.'][rng.random_range(0..4)]);
        v.push_str(&fragment(rng, &['.', '+', '~', '.', '.']));
    }
    if rng.random_bool(0.6) {
        v.push('-');
        v.push_str(&fragment(rng, &['.', '+', '~']));
    }
    v
}

/// A second version close to the first, so that the comparison is decided
/// deep inside the strings rather than at the first character.
fn neighbour(rng: &mut StdRng, v: &str) -> String {
    match rng.random_range(0..6) {
        0 => format!("{v}~{}", fragment(rng, &['.'])),
        1 => format!("{v}+{}", fragment(rng, &['.'])),
        2 => format!("{v}.{}", rng.random_range(0..10u32)),
        3 => {
            let cut = rng.random_range(1..=v.len());
            let head = &v[..cut];
            let head = head.trim_end_matches([':', '-']);
            if head.is_empty()
                || !head.as_bytes()[head.find(':').map_or(0, |i| i + 1)..]
                    .first()
                    .is_some_and(u8::is_ascii_digit)
            {
                version(rng)
            } else {
                head.to_string()
            }
        }
        _ => version(rng),
    }
}

#[test]
fn debian_ordering_matches_dpkg_on_a_generated_corpus() {
    if !have_dpkg() {
        assert!(
            std::env::var_os("CI").is_none(),
            "dpkg is required under CI"
        );
        eprintln!("skipping: dpkg is not installed");
        return;
    }
    let mut rng = StdRng::seed_from_u64(0x7e4e7);
    let mut pairs: Vec<(String, String)> = [
        ("1.0~rc1", "1.0"),
        ("1.0", "1.0-0"),
        ("1.0-1", "1.0-1~bpo1"),
        ("2:1.0", "10.0"),
        ("1.0a", "1.0+"),
        ("1.0.0", "1.0"),
        ("1.00", "1.0"),
        ("0:1.0", "1.0"),
        ("1.0~~", "1.0~"),
        ("1.2.3-1+deb12u1", "1.2.3-1"),
        ("118.0.2-1", "120.0"),
        ("9.0", "120.0"),
        ("1.0-1.1", "1.0-1a"),
        ("1:2.4.1-3", "2.4.1-3"),
        ("3.0.15-1~deb12u1", "3.0.11-1~deb12u2"),
        ("1.0+dfsg-1", "1.0-1"),
        ("007", "7"),
        ("1.0-a", "1.0-A"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    while pairs.len() < 3000 {
        let a = version(&mut rng);
        let b = neighbour(&mut rng, &a);
        pairs.push((a, b));
    }

    // One shell runs dpkg for every pair: lt, then eq, printing <, = or >.
    let mut script = String::new();
    for (a, b) in &pairs {
        let _ = writeln!(
            script,
            "if dpkg --compare-versions '{a}' lt '{b}'; then echo '<'; elif dpkg --compare-versions '{a}' eq '{b}'; then echo '='; else echo '>'; fi"
        );
    }
    let mut child = Command::new("sh")
        .arg("-s")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sh runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(script.as_bytes()).expect("script written");
    }
    let out = child.wait_with_output().expect("sh finishes");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().is_empty(),
        "dpkg complained about the corpus: {stderr}"
    );
    let verdicts: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(verdicts.len(), pairs.len());

    let mut mismatches = Vec::new();
    let mut seen = [0usize; 3];
    for ((a, b), dpkg) in pairs.iter().zip(&verdicts) {
        let ours = match compare_dpkg(a, b) {
            Some(Ordering::Less) => "<",
            Some(Ordering::Equal) => "=",
            Some(Ordering::Greater) => ">",
            None => "unparsed",
        };
        seen[match dpkg.as_str() {
            "<" => 0,
            "=" => 1,
            _ => 2,
        }] += 1;
        if ours != dpkg {
            mismatches.push(format!("{a} vs {b}: dpkg says {dpkg}, Tenet says {ours}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // The corpus exercises all three outcomes, not just one.
    assert!(seen.iter().all(|n| *n > 50), "outcomes <,=,>: {seen:?}");
}

#[test]
fn versions_dpkg_rejects_are_rejected() {
    // dpkg orders an empty version below every other; a policy or an
    // inventory with one is a mistake all the same.
    assert!(compare_dpkg("", "1.0").is_none());
    for bad in [
        "abc", "1.0 beta", ":1.0", "a:1.0", "1.0-", "1.0_1", "1.0-1_2",
    ] {
        assert!(
            compare_dpkg(bad, "1.0").is_none(),
            "{bad:?} should not parse"
        );
        if have_dpkg() {
            let out = Command::new("dpkg")
                .args(["--compare-versions", bad, "lt", "1.0"])
                .output()
                .expect("dpkg runs");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("bad syntax"),
                "dpkg accepted {bad:?} silently"
            );
        }
    }
}
