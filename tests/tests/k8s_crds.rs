//! The CRDs in a real API server (etcd + kube-apiserver built from the Go
//! module proxy): they install and become Established, the example
//! policies apply unchanged with `kubectl apply -f policies/` (the same
//! files the standalone operator reads), and a malformed policy is refused
//! by the API server with the schema's or the CEL rule's own message.

use tenet_e2e::k8s::control_plane_or_skip;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn crds_install_policies_apply_and_bad_ones_are_refused() {
    let Some(cp) = control_plane_or_skip() else {
        return;
    };
    cp.install_crds();
    cp.kubectl_ok(&["create", "namespace", "hospital-it"]);
    let policies = root().join("policies");
    let applied = cp.kubectl_ok(&["apply", "-f", policies.to_str().expect("path")]);
    assert_eq!(
        applied.lines().filter(|l| l.ends_with(" created")).count(),
        6,
        "{applied}"
    );
    let names = cp.kubectl_ok(&[
        "get",
        "terminalpolicies",
        "-n",
        "hospital-it",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    let mut names: Vec<&str> = names.split_whitespace().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "antivirus-running",
            "antivirus-signatures",
            "browser-a-minimum",
            "no-cleartext-remote-shells",
            "openssl-patched",
            "posture-certificate"
        ]
    );
    // `remediation: {auto: {}}` survives the API server's pruning: the
    // operator reads an auto remediation, not a remediation of neither kind.
    let remediation = cp.kubectl_ok(&[
        "get",
        "tpol",
        "browser-a-minimum",
        "-n",
        "hospital-it",
        "-o",
        "jsonpath={.spec.remediation}",
    ]);
    let remediation: serde_json::Value =
        serde_json::from_str(&remediation).expect("the remediation as JSON");
    assert_eq!(remediation["auto"], serde_json::json!({}), "{remediation}");
    assert_eq!(remediation["maxAttempts"], 3, "{remediation}");

    // The short name and the printer columns work.
    let table = cp.kubectl_ok(&["get", "tpol", "-n", "hospital-it"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("COMPLIANT"), "{table}");

    // A CEL rule of the CRD: maxInFlight and maxInFlightPercent together.
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad_path = tmp.path().join("bad-policy.yaml");
    std::fs::write(
        &bad_path,
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: { name: both-limits, namespace: hospital-it }\nspec:\n  selector: { matchLabels: { site: nagoya } }\n  requirements:\n    - package: { name: browser-a, version: '>= 120.0' }\n  rollout: { maxInFlight: 5, maxInFlightPercent: 10 }\n",
    )
    .expect("write");
    let out = cp.kubectl(&["apply", "-f", bad_path.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("set maxInFlight or maxInFlightPercent, not both"),
        "{err}"
    );
    // The CRD's rules on remediation: auto and a payload of one's own
    // together; auto with arguments it computes itself.
    for (policy, says) in [
        (
            "remediation: { auto: {}, payload: { name: x, digest: 'sha256:0000000000000000000000000000000000000000000000000000000000000000' } }",
            "a remediation sets exactly one of auto, payload",
        ),
        (
            "remediation: { auto: {}, args: ['; reboot'] }",
            "an auto remediation computes its arguments and capabilities",
        ),
    ] {
        std::fs::write(
            &bad_path,
            format!("apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: {{ name: bad-auto, namespace: hospital-it }}\nspec:\n  requirements:\n    - package: {{ name: telnetd, absent: true }}\n  {policy}\n"),
        )
        .expect("write");
        let out = cp.kubectl(&["apply", "-f", bad_path.to_str().expect("path")]);
        assert!(!out.status.success(), "{policy}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    // A schema error: a requirement that is not an object.
    std::fs::write(
        &bad_path,
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: { name: not-a-list, namespace: hospital-it }\nspec:\n  selector: { matchLabels: { site: nagoya } }\n  requirements: browser-a\n",
    )
    .expect("write");
    let out = cp.kubectl(&["apply", "-f", bad_path.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.requirements"), "{err}");
    // Nothing of the refused ones was stored.
    let all = cp.kubectl_ok(&["get", "tpol", "-n", "hospital-it", "-o", "name"]);
    assert_eq!(all.lines().count(), 6, "{all}");
}

/// The deployment manifests apply cleanly to a real API server, and the
/// operator's service account may do what it needs and nothing more.
#[test]
fn the_manifests_apply_with_least_privilege() {
    let Some(cp) = control_plane_or_skip() else {
        return;
    };
    let crds = root().join("crds/crds.yaml");
    cp.kubectl_ok(&["apply", "-f", crds.to_str().expect("path")]);
    let deploy = root().join("deploy");
    // The namespace first; then every object is validated by the server
    // before any is stored.
    cp.kubectl_ok(&[
        "apply",
        "-f",
        deploy.join("00-namespace.yaml").to_str().expect("path"),
    ]);
    cp.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-f",
        deploy.to_str().expect("path"),
    ]);
    let out = cp.kubectl_ok(&["apply", "-f", deploy.to_str().expect("path")]);
    assert!(
        out.contains("deployment.apps/tenet-operator created"),
        "{out}"
    );
    let replicas = cp.kubectl_ok(&[
        "get",
        "deployment",
        "-n",
        "tenet-system",
        "tenet-operator",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas, "2");
    let sa = "system:serviceaccount:tenet-system:tenet-operator";
    let can = |args: &[&str]| {
        let mut a = vec!["auth", "can-i", "--as", sa];
        a.extend_from_slice(args);
        String::from_utf8_lossy(&cp.kubectl(&a).stdout)
            .trim()
            .to_string()
    };
    for allowed in [
        &["patch", "terminalpolicies.tenet.dev/status"][..],
        &["watch", "terminals.tenet.dev"],
        &["create", "remediations.tenet.dev"],
        &["create", "events.events.k8s.io"],
        &[
            "update",
            "leases.coordination.k8s.io/tenet-operator",
            "-n",
            "tenet-system",
        ],
        &["get", "secrets/tenet-admin-keys", "-n", "tenet-system"],
        &["patch", "secrets/tenet-tokens", "-n", "tenet-system"],
        &["patch", "configmaps/tenet-ledger-07", "-n", "tenet-system"],
        &[
            "deletecollection",
            "remediations.tenet.dev",
            "-n",
            "hospital-it",
        ],
    ] {
        assert_eq!(can(allowed), "yes", "{allowed:?}");
    }
    for denied in [
        &["delete", "terminalpolicies.tenet.dev"][..],
        &["list", "secrets", "-n", "tenet-system"],
        &["get", "secrets/other", "-n", "tenet-system"],
        &["get", "secrets", "-n", "kube-system"],
        &["patch", "configmaps/kube-root-ca.crt", "-n", "tenet-system"],
        &["patch", "secrets/tenet-admin-keys", "-n", "tenet-system"],
        &["create", "pods", "-n", "tenet-system"],
        &[
            "update",
            "leases.coordination.k8s.io/someone-else",
            "-n",
            "tenet-system",
        ],
    ] {
        assert_eq!(can(denied), "no", "{denied:?}");
    }
}
