//! The committed CRD YAML is exactly what the Rust types generate.

#[test]
fn committed_crds_match_the_types() {
    let committed = include_str!("../crds.yaml");
    let generated = tenet_crds::crds_yaml().expect("CRDs render");
    assert!(
        committed == generated,
        "crds/crds.yaml is stale: regenerate it with\n  cargo run -p tenet-crds --bin crdgen > crds/crds.yaml"
    );
}

#[test]
fn crds_carry_what_kubectl_users_need() {
    use kube::CustomResourceExt;
    let policy = tenet_crds::TerminalPolicy::crd();
    let names = &policy.spec.names;
    assert_eq!(
        names.short_names.as_deref(),
        Some(&["tpol".to_string()][..])
    );
    let version = &policy.spec.versions[0];
    let columns: Vec<&str> = version
        .additional_printer_columns
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Selected", "Compliant", "Remediating", "Failed", "Age"]
    );
    assert!(
        version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );

    let yaml = tenet_crds::crds_yaml().expect("CRDs render");
    for rule in [
        "self.canary <= self.maxInFlight",
        "!(has(self.maxInFlight) && has(self.maxInFlightPercent))",
        "(has(self.expression) ? 1 : 0) == 1",
        "duration(self.renewBefore) < duration(self.validity)",
    ] {
        assert!(yaml.contains(rule), "missing CEL rule {rule}");
    }
    // A structural schema may not say additionalProperties: false.
    assert!(!yaml.contains("additionalProperties: false"));
}
