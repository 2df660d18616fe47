use super::*;

#[test]
fn more_requirements_than_the_crd_allows_are_refused() {
    let mut yaml = String::from(
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: { name: many, namespace: it }\nspec:\n  requirements:\n",
    );
    for i in 0..=MAX_REQUIREMENTS {
        yaml.push_str(&format!("    - package: {{ name: p{i} }}\n"));
    }
    let p: tenet_crds::TerminalPolicy = serde_yaml::from_str(&yaml).expect("parses");
    let errors = compile(&p).expect_err("refused");
    assert!(
        errors.iter().any(|e| e.path == "spec.requirements"
            && e.message == "257 requirements; at most 256 (the CRD's maxItems)"),
        "{errors:?}"
    );
}

/// The CRD's CEL rule for a requirement and `compile_requirement` say
/// the same of every combination of the four kinds: the API server and
/// the policy directory refuse the same documents. The rule is read
/// from the generated CRD and run with the `cel` crate.
#[test]
fn the_crd_rule_and_compile_agree_on_exactly_one_kind() {
    use kube::CustomResourceExt;
    fn find_rule(v: &serde_json::Value) -> Option<String> {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::Array(rules)) = m.get("x-kubernetes-validations") {
                    for r in rules {
                        if r["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("exactly one of package"))
                        {
                            return r["rule"].as_str().map(str::to_string);
                        }
                    }
                }
                m.values().find_map(find_rule)
            }
            serde_json::Value::Array(items) => items.iter().find_map(find_rule),
            _ => None,
        }
    }
    fn to_cel(v: &serde_json::Value) -> cel::Value {
        match v {
            serde_json::Value::Object(m) => cel::Value::from(
                m.iter()
                    .map(|(k, v)| (k.clone(), to_cel(v)))
                    .collect::<std::collections::HashMap<String, cel::Value>>(),
            ),
            serde_json::Value::String(s) => cel::Value::from(s.clone()),
            serde_json::Value::Bool(b) => cel::Value::Bool(*b),
            _ => cel::Value::Null,
        }
    }
    let crd = serde_json::to_value(tenet_crds::TerminalPolicy::crd()).expect("crd");
    let rule = find_rule(&crd).expect("the CRD has the exactly-one-of rule");
    let program = cel::Program::compile(&rule).expect("the rule compiles");
    let kinds: [(&str, serde_json::Value); 4] = [
        ("package", serde_json::json!({ "name": "hello" })),
        ("file", serde_json::json!({ "path": "/etc/motd" })),
        ("service", serde_json::json!({ "name": "ssh" })),
        ("expression", serde_json::json!({ "cel": "true" })),
    ];
    let mut accepted = 0;
    for subset in 0u8..16 {
        let requirement: serde_json::Map<String, serde_json::Value> = kinds
            .iter()
            .enumerate()
            .filter(|(i, _)| subset & (1 << i) != 0)
            .map(|(_, (k, v))| (k.to_string(), v.clone()))
            .collect();
        let requirement = serde_json::Value::Object(requirement);
        let mut ctx = cel::Context::default();
        ctx.add_variable_from_value("self", to_cel(&requirement));
        let crd_says = program.execute(&ctx).expect("the rule runs") == cel::Value::Bool(true);
        let policy: tenet_crds::TerminalPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "tenet.dev/v1alpha1",
            "kind": "TerminalPolicy",
            "metadata": { "name": "p", "namespace": "it" },
            "spec": { "requirements": [requirement] },
        }))
        .expect("a TerminalPolicy");
        let compile_says = match compile(&policy) {
            Ok(_) => true,
            Err(errors) => !errors.iter().any(|e| {
                e.message
                    .contains("exactly one of package, file, service, expression")
            }),
        };
        assert_eq!(crd_says, compile_says, "{requirement}");
        accepted += usize::from(crd_says);
    }
    // One kind at a time, and only that: four of the sixteen.
    assert_eq!(accepted, 4);
}
