//! The protocol round trip from the command line, as the README shows it:
//! keygen, build, sign, verify, inspect; and tampering.

use std::path::Path;
use std::process::{Command, Output};

fn tenet(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("tenet runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> String {
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    text(&o)
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let noop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/payloads/noop.wat");
    std::fs::copy(noop, dir.path().join("noop.wat")).expect("copy");
    std::fs::write(
        dir.path().join("browser-a_120.0-1_amd64.deb"),
        b"not really a deb",
    )
    .expect("write");
    dir
}

#[test]
fn keygen_build_sign_verify_inspect() {
    let dir = setup();
    let d = dir.path();
    let out = ok(tenet(d, &["keygen", "--out", "admin.key"]));
    assert!(out.contains("ed25519 key sha256:"), "{out}");
    let pem = std::fs::read_to_string(d.join("admin.key")).expect("key");
    assert!(
        !out.contains(pem.lines().nth(1).expect("pem body")),
        "private key printed"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("admin.key"))
        .expect("meta")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let again = tenet(d, &["keygen", "--out", "admin.key"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again).contains("admin.key: cannot write the key file: File exists"),
        "{}",
        text(&again)
    );

    let out = ok(tenet(
        d,
        &[
            "payload",
            "build",
            "--module",
            "noop.wat",
            "--name",
            "noop",
            "--capability",
            "log",
            "--artifact",
            "browser-a_120.0-1_amd64.deb",
            "--out",
            "noop.bundle",
        ],
    ));
    let digest = out
        .lines()
        .find_map(|l| l.strip_prefix("digest "))
        .expect("digest printed")
        .to_string();

    let unsigned = tenet(
        d,
        &[
            "payload",
            "verify",
            "noop.bundle",
            "--trust",
            "admin.key.pub",
        ],
    );
    assert_eq!(unsigned.status.code(), Some(1));
    assert_eq!(
        text(&unsigned),
        "noop.bundle: refused: 0 valid signature(s) by trusted keys, 1 required (ThresholdNotMet)\n"
    );

    ok(tenet(
        d,
        &["payload", "sign", "noop.bundle", "--key", "admin.key"],
    ));
    let out = ok(tenet(
        d,
        &[
            "payload",
            "verify",
            "noop.bundle",
            "--trust",
            "admin.key.pub",
            "--digest",
            &digest,
        ],
    ));
    assert!(
        out.starts_with(&format!("verified: noop 1.0.0 {digest}\n")),
        "{out}"
    );

    let wrong = tenet(
        d,
        &[
            "payload",
            "verify",
            "noop.bundle",
            "--trust",
            "admin.key.pub",
            "--digest",
            &format!("sha256:{}", "0".repeat(64)),
        ],
    );
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        text(&wrong).contains("(WrongPayloadDigest)"),
        "{}",
        text(&wrong)
    );

    let json = ok(tenet(
        d,
        &["payload", "inspect", "noop.bundle", "--output", "json"],
    ));
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["digest"], digest.as_str());
    assert_eq!(v["capabilities"][0], "log");
    assert_eq!(v["artifacts"][0]["name"], "browser-a_120.0-1_amd64.deb");
    assert_eq!(v["signatures"].as_array().map(Vec::len), Some(1));
    let human = ok(tenet(d, &["payload", "inspect", "noop.bundle"]));
    assert!(
        human.contains("artifact     browser-a_120.0-1_amd64.deb 16 bytes sha256:"),
        "{human}"
    );
}

#[test]
fn tampering_any_byte_of_a_signed_bundle_is_refused() {
    let dir = setup();
    let d = dir.path();
    ok(tenet(
        d,
        &["keygen", "--out", "admin.key", "--algorithm", "ecdsa-p256"],
    ));
    ok(tenet(
        d,
        &[
            "payload",
            "build",
            "--module",
            "noop.wat",
            "--name",
            "noop",
            "--artifact",
            "browser-a_120.0-1_amd64.deb",
            "--out",
            "b",
        ],
    ));
    ok(tenet(d, &["payload", "sign", "b", "--key", "admin.key"]));
    let genuine = std::fs::read(d.join("b")).expect("bundle");
    let mut reasons = std::collections::BTreeMap::new();
    for i in 0..genuine.len() {
        let mut t = genuine.clone();
        t[i] ^= 0x20;
        std::fs::write(d.join("t"), &t).expect("write");
        let o = tenet(d, &["payload", "verify", "t", "--trust", "admin.key.pub"]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "byte {i}: {out}");
        assert!(out.starts_with("t: refused: "), "byte {i}: {out}");
        let reason = out
            .trim_end()
            .rsplit('(')
            .next()
            .unwrap_or("")
            .trim_end_matches(')')
            .to_string();
        *reasons.entry(reason).or_insert(0) += 1;
    }
    // Most bytes are under the signature; the frame's own bytes give other reasons.
    assert!(
        reasons.get("BadSignature").copied().unwrap_or(0) > genuine.len() / 2,
        "{reasons:?}"
    );
}

#[test]
fn two_of_two_admins() {
    let dir = setup();
    let d = dir.path();
    ok(tenet(d, &["keygen", "--out", "a1"]));
    ok(tenet(d, &["keygen", "--out", "a2"]));
    ok(tenet(
        d,
        &[
            "payload", "build", "--module", "noop.wat", "--name", "noop", "--out", "b",
        ],
    ));
    ok(tenet(d, &["payload", "sign", "b", "--key", "a1"]));
    let one = tenet(
        d,
        &[
            "payload",
            "verify",
            "b",
            "--trust",
            "a1.pub",
            "--trust",
            "a2.pub",
            "--threshold",
            "2",
        ],
    );
    assert_eq!(
        text(&one),
        "b: refused: 1 valid signature(s) by trusted keys, 2 required (ThresholdNotMet)\n"
    );
    ok(tenet(d, &["payload", "sign", "b", "--key", "a2"]));
    ok(tenet(
        d,
        &[
            "payload",
            "verify",
            "b",
            "--trust",
            "a1.pub",
            "--trust",
            "a2.pub",
            "--threshold",
            "2",
        ],
    ));
}
