//! Kubernetes mode end to end, against a real kube-apiserver and etcd: two
//! `tenet operator --kubernetes` replicas (one holds the Lease), a policy
//! applied with kubectl, simulated agents enrolling with a token from the
//! token Secret and converging; `kubectl get terminalpolicies` shows them
//! compliant; a new required version reconciles again; the leader is
//! killed in the middle of a rollout and the other replica takes over
//! without a duplicate dispatch; deleting the policy cleans up its
//! Remediations and pair states (the operator's finalizer).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenet_e2e::k8s::{ControlPlane, control_plane_or_skip};
use tenet_e2e::{Running, binary, create_token_with, free_port, sign_policies, wait_until};
use tenet_protocol::{Algorithm, KeyPair, Signer};

const TERMINALS: usize = 20;

fn policy(version: &str, bundle: &str, digest: &str, window: u32) -> String {
    format!(
        "apiVersion: tenet.dev/v1alpha1\nkind: TerminalPolicy\nmetadata: {{ name: bench-app, namespace: hospital-it }}\nspec:\n  selector: {{ matchLabels: {{ fleet: bench }} }}\n  requirements:\n    - package: {{ name: bench-app, version: '>= {version}' }}\n  remediation:\n    payload: {{ name: {bundle}, digest: '{digest}' }}\n    args: [bench-app_{version}-1_all.deb]\n    capabilities: [run-artifact, log]\n  rollout: {{ maxInFlight: {window}, haltOnFailurePercent: 50 }}\n  certificate: {{ validity: 1h, renewBefore: 15m, minimumLevel: 50 }}\n"
    )
}

/// An operator replica, its stdout lines collected.
struct Replica {
    process: Running,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Replica {
    fn start(cp: &ControlPlane, dir: &Path, name: &str, port: u16) -> Replica {
        Replica::start_of(&binary("tenet"), cp, dir, name, port)
    }

    /// A replica of another `tenet` binary (an earlier release's).
    fn start_of(tenet: &Path, cp: &ControlPlane, dir: &Path, name: &str, port: u16) -> Replica {
        let mut child = Command::new(tenet)
            .args([
                "operator",
                "--kubernetes",
                "--namespace",
                "tenet-system",
                "--identity",
                name,
                "--data",
                "data",
                "--admin-key",
                "admin.pub",
                "--bundles",
                "bundles",
                "--lease-seconds",
                "4",
                "--listen",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--metrics")
            .arg(format!("127.0.0.1:{}", free_port()))
            .env("KUBECONFIG", &cp.kubeconfig)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log"))
            .spawn()
            .expect("operator");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                l.lock().expect("lines").push(line);
            }
        });
        Replica {
            process: Running(child),
            lines,
        }
    }

    fn said(&self, what: &str) -> bool {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .any(|l| l.contains(what))
    }
}

/// What a Service does for the agents: connect them to whichever replica
/// listens (only the leader serves the gateway).
fn forwarder(ports: [u16; 2]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let Some(upstream) = ports
                .iter()
                .find_map(|p| TcpStream::connect(("127.0.0.1", *p)).ok())
            else {
                continue;
            };
            let pipe = |mut from: TcpStream, mut to: TcpStream| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            };
            if let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) {
                pipe(client, u2);
                pipe(upstream, c2);
            }
        }
    });
    port
}

fn jsonpath(cp: &ControlPlane, what: &[&str], path: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    let p = format!("jsonpath={path}");
    args.extend_from_slice(&["-o", &p]);
    String::from_utf8_lossy(&cp.kubectl(&args).stdout).into_owned()
}

#[test]
fn two_replicas_reconcile_policies_in_the_api_server() {
    let Some(cp) = control_plane_or_skip() else {
        return;
    };
    cp.install_crds();
    cp.kubectl_ok(&["create", "namespace", "hospital-it"]);
    cp.kubectl_ok(&["create", "namespace", "tenet-system"]);

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    std::fs::write(dir.join("admin.pub"), admin.public_key().to_pem()).expect("pub");
    admin
        .write_files(&dir.join("admin.key"))
        .expect("admin key");
    std::fs::create_dir_all(dir.join("bundles")).expect("mkdir");
    let mut digests = Vec::new();
    for v in ["2.0", "3.0", "4.0"] {
        let name = format!("install-bench-app-{}", &v[..1]);
        let (bytes, digest) =
            tenet::bench::simulated_install_bundle(&admin, &name, "bench-app", &format!("{v}-1"))
                .expect("bundle");
        std::fs::write(dir.join(format!("bundles/{name}.bundle")), bytes).expect("bundle");
        digests.push((name, digest));
    }
    std::fs::write(dir.join("template.yaml"), tenet::bench::template()).expect("template");

    // Two replicas; the first takes the Lease and creates the keys.
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = Replica::start(&cp, dir, "op-a", port_a);
    wait_until(
        Duration::from_secs(60),
        "op-a leading and listening",
        || a.said("gateway listening"),
    );
    let b = Replica::start(&cp, dir, "op-b", port_b);
    let gateway = forwarder([port_a, port_b]);
    assert_eq!(
        jsonpath(
            &cp,
            &["lease", "tenet-operator", "-n", "tenet-system"],
            "{.spec.holderIdentity}"
        ),
        "op-a"
    );

    // The policy, applied with kubectl before any admin signed it: it is
    // not in force, and its Ready condition says why.
    std::fs::write(
        dir.join("policy.yaml"),
        policy("2.0", &digests[0].0, &digests[0].1, 100),
    )
    .expect("policy");
    let apply = || {
        cp.kubectl_ok(&[
            "apply",
            "-f",
            dir.join("policy.yaml").to_str().expect("path"),
        ])
    };
    apply();
    wait_until(
        Duration::from_secs(30),
        "the unsigned policy Unapproved",
        || {
            jsonpath(
            &cp,
            &["terminalpolicy", "bench-app", "-n", "hospital-it"],
            "{.status.conditions[0].status} {.status.conditions[0].reason} {.status.conditions[0].message}",
        )
        .starts_with("False Unapproved not approved (not signed by any admin (no tenet.dev/approval annotation; run `tenet policy sign`)); nothing of it is in force")
        },
    );
    // Signed by the admin (the annotation alone changes, not the
    // generation) and applied again: in force.
    sign_policies(&dir.join("policy.yaml"), &dir.join("admin.key"));
    apply();

    // Agents enrol with a token from the token Secret, which assigns them
    // the bench fleet and the Nagoya site (the Terminals' SITE column), in
    // the hospital-it namespace's tenancy.
    let uses = TERMINALS.to_string();
    let (token, fingerprint) = create_token_with(
        dir,
        &[
            "--uses",
            &uses,
            "--kubernetes",
            "tenet-system",
            "--label",
            "fleet=bench",
            "--label",
            "site=nagoya",
            "--label",
            "tenet.dev/namespace=hospital-it",
        ],
        &[("KUBECONFIG", cp.kubeconfig.as_path())],
    );
    let _agents = Running(
        Command::new(binary("tenet-agent"))
            .args(["simulate", "--count", &TERMINALS.to_string()])
            .arg("--operator")
            .arg(format!("127.0.0.1:{gateway}"))
            .args([
                "--ca-fingerprint",
                &fingerprint,
                "--inventory",
                "template.yaml",
            ])
            .args([
                "--prefix",
                "ward",
                "--progress-seconds",
                "1",
                "--run-delay-ms",
                "150",
            ])
            .env("TENET_BOOTSTRAP_TOKEN", &token)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("simulate.log")).expect("log"))
            .spawn()
            .expect("simulate"),
    );
    let compliant = |generation: &str| {
        jsonpath(
            &cp,
            &["terminalpolicy", "bench-app", "-n", "hospital-it"],
            "{.status.observedGeneration} {.status.compliant}/{.status.selected} {.status.conditions[0].reason}",
        ) == format!("{generation} {TERMINALS}/{TERMINALS} Converged")
    };
    wait_until(
        Duration::from_secs(90),
        "all compliant with generation 1",
        || compliant("1"),
    );
    let listed = cp.kubectl_ok(&["get", "terminalpolicies", "-A"]);
    assert!(listed.contains("bench-app"), "{listed}");

    // Another tenant's policy, even approved, selecting the same labels:
    // it selects none of hospital-it's terminals.
    cp.kubectl_ok(&["create", "namespace", "other-tenant"]);
    std::fs::write(
        dir.join("other.yaml"),
        policy("2.0", &digests[0].0, &digests[0].1, 100)
            .replace("namespace: hospital-it", "namespace: other-tenant"),
    )
    .expect("policy");
    sign_policies(&dir.join("other.yaml"), &dir.join("admin.key"));
    cp.kubectl_ok(&[
        "apply",
        "-f",
        dir.join("other.yaml").to_str().expect("path"),
    ]);
    wait_until(
        Duration::from_secs(30),
        "the other tenant's policy reconciled, selecting nothing",
        || {
            jsonpath(
                &cp,
                &["terminalpolicy", "bench-app", "-n", "other-tenant"],
                "{.status.selected} {.status.conditions[0].reason}",
            ) == "0 Converged"
        },
    );
    cp.kubectl_ok(&[
        "delete",
        "terminalpolicy",
        "bench-app",
        "-n",
        "other-tenant",
    ]);
    // The resources for people are written behind the reconciler's ledger:
    // they follow within moments.
    let all = |what: &[&str], path: &str, value: &str| {
        jsonpath(&cp, what, path)
            .split_whitespace()
            .filter(|v| *v == value)
            .count()
            == TERMINALS
    };
    wait_until(Duration::from_secs(20), "Terminals 1/1 compliant", || {
        all(
            &["terminals", "-n", "tenet-system"],
            "{.items[*].status.compliance}",
            "1/1",
        )
    });
    wait_until(Duration::from_secs(20), "Remediations Succeeded", || {
        all(
            &["remediations", "-n", "hospital-it"],
            "{.items[*].status.phase}",
            "Succeeded",
        )
    });
    // With the CamelCase reason the CRD documents.
    assert!(all(
        &["remediations", "-n", "hospital-it"],
        "{.items[*].status.reason}",
        "Compliant",
    ));
    // Security certificates, reconciled here too: simulated terminals have
    // no TPM, so their level is capped at 60.
    // (Audits, issuance and the writes behind: once seen to take over 30 s
    // on the CI machine.)
    wait_until(
        Duration::from_secs(60),
        "SecurityCertificates at level 60",
        || {
            all(
                &["securitycertificates", "-n", "tenet-system"],
                "{.items[*].status.level}",
                "60",
            )
        },
    );
    // `kubectl get terminals` shows each terminal's level (of its
    // certificate) and when it last reported.
    wait_until(Duration::from_secs(40), "Terminals at level 60", || {
        all(
            &["terminals", "-n", "tenet-system"],
            "{.items[*].status.securityLevel}",
            "60",
        )
    });
    let table = cp.kubectl_ok(&["get", "terminals", "-n", "tenet-system"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "SITE",
            "CONNECTED",
            "COMPLIANT",
            "LEVEL",
            "LAST-REPORT"
        ],
        "{table}"
    );
    let ward = table
        .lines()
        .find(|l| l.starts_with("ward-00001 "))
        .unwrap_or_else(|| panic!("no ward-00001 in\n{table}"));
    let columns: Vec<&str> = ward.split_whitespace().collect();
    assert_eq!(columns.get(1), Some(&"nagoya"), "{table}");
    assert_eq!(columns.get(4), Some(&"60"), "{table}");
    // An age (`12s`, `3m`), not `<none>`.
    assert!(
        columns
            .get(5)
            .is_some_and(|age| age.ends_with('s') || age.ends_with('m')),
        "{table}"
    );
    let owner = jsonpath(
        &cp,
        &[
            "remediation",
            "ward-00001.6a8062ce0eda",
            "-n",
            "hospital-it",
        ],
        "{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
    );
    assert_eq!(owner, "TerminalPolicy/bench-app");
    let events = cp.kubectl_ok(&["get", "events", "-n", "hospital-it"]);
    assert!(events.contains("Converged"), "{events}");

    // An admin relabels a terminal on its Terminal resource: moved to the
    // lab fleet, the bench fleet's policy no longer selects it; labels
    // that are not valid are not taken; moved back, it is selected again.
    let relabel = |labels: &str| {
        cp.kubectl_ok(&[
            "patch",
            "terminal",
            "ward-00001",
            "-n",
            "tenet-system",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"spec":{{"labels":{{{labels}}}}}}}"#),
        ])
    };
    let selected = || {
        jsonpath(
            &cp,
            &["terminalpolicy", "bench-app", "-n", "hospital-it"],
            "{.status.selected}",
        )
    };
    relabel(r#""fleet":"lab""#);
    wait_until(
        Duration::from_secs(30),
        "ward-00001 moved to the lab",
        || selected() == (TERMINALS - 1).to_string(),
    );
    wait_until(Duration::from_secs(10), "the relabelling said", || {
        a.said(
            "terminal ward-00001 relabelled from its Terminal resource: fleet=lab,site=nagoya,tenet.dev/namespace=hospital-it",
        )
    });
    relabel(r#""site":"Osaka Bay""#);
    wait_until(Duration::from_secs(30), "the bad label refused", || {
        std::fs::read_to_string(dir.join("op-a.log")).is_ok_and(|l| {
            l.contains("the labels on the Terminal resource are not valid")
                && l.contains(r#"label value "Osaka Bay": use at most 63 letters"#)
        })
    });
    assert_eq!(selected(), (TERMINALS - 1).to_string());
    relabel(r#""fleet":"bench","site":"nagoya""#);
    wait_until(
        Duration::from_secs(30),
        "ward-00001 back in the bench fleet",
        || selected() == TERMINALS.to_string(),
    );

    // A new required version, rolled out two at a time; the leader is
    // killed in the middle of it.
    std::fs::write(
        dir.join("policy.yaml"),
        policy("3.0", &digests[1].0, &digests[1].1, 2),
    )
    .expect("policy");
    sign_policies(&dir.join("policy.yaml"), &dir.join("admin.key"));
    apply();
    wait_until(Duration::from_secs(30), "the rollout under way", || {
        let c = jsonpath(
            &cp,
            &["terminalpolicy", "bench-app", "-n", "hospital-it"],
            "{.status.observedGeneration} {.status.compliant}",
        );
        c.split_once(' ')
            .is_some_and(|(g, n)| g == "2" && n.parse::<usize>().is_ok_and(|n| n >= 4))
    });
    let _ = a.process.0.kill();
    let _ = a.process.0.wait();
    wait_until(Duration::from_secs(30), "op-b leading", || {
        b.said("op-b: leader")
    });
    wait_until(
        Duration::from_secs(120),
        "all compliant with generation 2",
        || compliant("2"),
    );
    assert_eq!(
        jsonpath(
            &cp,
            &["lease", "tenet-operator", "-n", "tenet-system"],
            "{.spec.holderIdentity}"
        ),
        "op-b"
    );
    // No terminal ran a dispatch again after its success was acknowledged,
    // and each enrolled once.
    wait_until(Duration::from_secs(5), "a simulator progress line", || {
        std::fs::read_to_string(dir.join("simulate.log"))
            .is_ok_and(|l| l.contains("re-dispatched after an acknowledged success"))
    });
    let log = std::fs::read_to_string(dir.join("simulate.log")).expect("log");
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("re-dispatched"))
        .expect("progress");
    assert!(
        last.contains(&format!("{TERMINALS} enrolled"))
            && last.contains(" 0 re-dispatched after an acknowledged success"),
        "{last}"
    );

    // Deleting a Terminal resource de-enrols the terminal: the policy
    // selects one fewer, its Remediation and certificate go.
    cp.kubectl_ok(&["delete", "terminal", "ward-00020", "-n", "tenet-system"]);
    wait_until(Duration::from_secs(30), "ward-00020 de-enrolled", || {
        jsonpath(
            &cp,
            &["terminalpolicy", "bench-app", "-n", "hospital-it"],
            "{.status.selected}",
        ) == (TERMINALS - 1).to_string()
            && jsonpath(
                &cp,
                &["securitycertificates", "-n", "tenet-system"],
                "{.items[*].metadata.name}",
            )
            .split_whitespace()
            .count()
                == TERMINALS - 1
            && !jsonpath(
                &cp,
                &["remediations", "-n", "hospital-it"],
                "{.items[*].metadata.name}",
            )
            .contains("ward-00020.")
    });
    assert_eq!(
        jsonpath(
            &cp,
            &["terminals", "-n", "tenet-system"],
            "{.items[*].metadata.name}"
        )
        .split_whitespace()
        .count(),
        TERMINALS - 1
    );

    // Deleting the policy: the finalizer lets the operator remove its
    // Remediations and pair states first.
    cp.kubectl_ok(&[
        "delete",
        "terminalpolicy",
        "bench-app",
        "-n",
        "hospital-it",
        "--wait=false",
    ]);
    wait_until(Duration::from_secs(30), "the policy gone", || {
        jsonpath(
            &cp,
            &["terminalpolicies", "-n", "hospital-it"],
            "{.items[*].metadata.name}",
        )
        .trim()
        .is_empty()
    });
    assert_eq!(
        jsonpath(
            &cp,
            &["remediations", "-n", "hospital-it"],
            "{.items[*].metadata.name}"
        )
        .trim(),
        ""
    );
    wait_until(Duration::from_secs(10), "pair states gone", || {
        jsonpath(
            &cp,
            &["terminal", "ward-00001", "-n", "tenet-system"],
            "{.status.compliance}",
        ) == "0/0"
    });

    // Re-created under the same name (its metadata.generation starts again
    // at 1), with a new version: its envelopes carry a newer generation than
    // any the agents saw, so it rolls out instead of being refused as a
    // rollback.
    std::fs::write(
        dir.join("policy.yaml"),
        policy("4.0", &digests[2].0, &digests[2].1, 100),
    )
    .expect("policy");
    sign_policies(&dir.join("policy.yaml"), &dir.join("admin.key"));
    cp.kubectl_ok(&[
        "apply",
        "-f",
        dir.join("policy.yaml").to_str().expect("path"),
    ]);
    let remaining = TERMINALS - 1;
    wait_until(
        Duration::from_secs(90),
        "the re-created policy converged",
        || {
            jsonpath(
                &cp,
                &["terminalpolicy", "bench-app", "-n", "hospital-it"],
                "{.status.observedGeneration} {.status.compliant}/{.status.selected} {.status.conditions[0].reason}",
            ) == format!("1 {remaining}/{remaining} Converged")
        },
    );
    drop(b);
}

/// A ledger the previous release (v0.1.0, built by `scripts/old-release`)
/// wrote, without format markers, is migrated by HEAD's operator when it
/// takes the Lease: every shard is marked format 2, the terminals it holds
/// are kept, and they come back to it (their agents' versions recorded).
#[test]
fn a_ledger_of_the_previous_release_is_migrated_when_the_operator_opens_it() {
    let Some(cp) = control_plane_or_skip() else {
        return;
    };
    let previous = tenet_e2e::old_release("v0.1.0");
    cp.install_crds();
    cp.kubectl_ok(&["create", "namespace", "tenet-system"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let admin = KeyPair::generate(Algorithm::Ed25519).expect("key");
    std::fs::write(dir.join("admin.pub"), admin.public_key().to_pem()).expect("pub");
    std::fs::create_dir_all(dir.join("bundles")).expect("mkdir");
    std::fs::write(dir.join("template.yaml"), tenet::bench::template()).expect("template");

    let port = free_port();
    let old = Replica::start_of(&previous.join("tenet"), &cp, dir, "op-old", port);
    wait_until(
        Duration::from_secs(60),
        "the old operator listening",
        || old.said("gateway listening"),
    );
    let out = Command::new(previous.join("tenet"))
        .args(["token", "create", "--data", "data", "--uses", "3"])
        .args(["--kubernetes", "tenet-system", "--label", "fleet=bench"])
        .env("KUBECONFIG", &cp.kubeconfig)
        .current_dir(dir)
        .output()
        .expect("tenet token create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .expect("token output")
            .trim()
            .to_string()
    };
    let _agents = Running(
        Command::new(binary("tenet-agent"))
            .args(["simulate", "--count", "3", "--prefix", "ward"])
            .arg("--operator")
            .arg(format!("127.0.0.1:{port}"))
            .args([
                "--ca-fingerprint",
                &field("ca-fingerprint "),
                "--inventory",
                "template.yaml",
            ])
            .env("TENET_BOOTSTRAP_TOKEN", field("token "))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("simulate.log")).expect("log"))
            .spawn()
            .expect("simulate"),
    );
    let connected = || {
        jsonpath(
            &cp,
            &["terminals", "-n", "tenet-system"],
            "{.items[*].status.connected}",
        )
        .split_whitespace()
        .filter(|c| *c == "true")
        .count()
    };
    wait_until(
        Duration::from_secs(60),
        "3 terminals connected to the old operator",
        || connected() == 3,
    );
    let formats = || {
        jsonpath(
            &cp,
            &[
                "configmaps",
                "-n",
                "tenet-system",
                "-l",
                "tenet.dev/ledger=true",
            ],
            "{range .items[*]}{.metadata.annotations.tenet\\.dev/ledger-format}{\",\"}{end}",
        )
    };
    assert_eq!(
        formats(),
        ",".repeat(16),
        "the previous release marks no format"
    );
    drop(old);

    let new = Replica::start(&cp, dir, "op-new", port);
    wait_until(Duration::from_secs(60), "HEAD's operator listening", || {
        new.said("gateway listening")
    });
    assert_eq!(formats(), "2,".repeat(16));
    let log = std::fs::read_to_string(dir.join("op-new.log")).expect("log");
    assert!(log.contains("store migrated"), "{log}");
    wait_until(
        Duration::from_secs(60),
        "the 3 terminals back, with their agents' versions",
        || {
            connected() == 3
                && jsonpath(
                    &cp,
                    &["terminals", "-n", "tenet-system"],
                    "{.items[*].status.agentVersion}",
                ) == [concat!(env!("CARGO_PKG_VERSION"), "-simulated"); 3].join(" ")
        },
    );
}
