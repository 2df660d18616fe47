//! The resources for people against a scripted API server (tower-test),
//! as controller-rs tests its reconciler: each test answers the requests
//! the backend makes, in order, and checks what they carried. The same
//! writes run against a real kube-apiserver in `tests/tests/k8s_operator.rs`.

use std::collections::BTreeMap;

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tenet_protocol::report::DispatchRecord;
use tenet_protocol::wire::encode;
use tenet_protocol::{Algorithm, KeyPair, Signer};
use tower_test::mock;

use super::*;
use crate::reconcile::state::PairState;

type ApiHandle = mock::Handle<Request<Body>, Response<Body>>;

fn backend(rt: &tokio::runtime::Runtime) -> (Arc<KubeBackend>, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    // The client spawns its request buffer on the runtime.
    let _entered = rt.enter();
    let client = Client::new(service, "tenet-system");
    let backend = Arc::new(KubeBackend::new(
        client,
        "tenet-system",
        rt.handle().clone(),
    ));
    (backend, handle)
}

fn terminal(offline_since_ms: u64) -> TerminalRecord {
    TerminalRecord {
        identity: KeyPair::generate(Algorithm::Ed25519)
            .expect("key")
            .public_key(),
        labels: BTreeMap::from([("site".to_string(), "nagoya".to_string())]),
        tpm: false,
        attestation_key: None,
        enrolled_at_ms: 1,
        last_sequence: 0,
        offline_since_ms,
        client_keys: vec![[1; 32]],
        tpm_trust: crate::tpm_trust::TpmTrust::None,
        claimed_labels: BTreeMap::new(),
        agent_version: String::new(),
    }
}

/// The next request: its method, path and JSON body.
async fn next(
    handle: &mut ApiHandle,
) -> (Method, String, Value, mock::SendResponse<Response<Body>>) {
    let (request, send) = handle.next_request().await.expect("a request");
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let bytes = request.into_body().collect_bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (method, path, body, send)
}

fn answer(send: mock::SendResponse<Response<Body>>, status: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).expect("json")))
            .expect("response"),
    );
}

#[test]
fn a_published_terminal_gets_a_status_write_only_and_a_404_is_a_deletion() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (backend, mut api) = backend(&rt);
    backend.remember(&[Change::put(
        Table::Terminals,
        "ward-01",
        encode(&terminal(0)),
    )]);
    backend
        .published
        .lock()
        .expect("lock")
        .insert("ward-01".to_string());
    rt.block_on(async {
        // Every request is recorded; the first is answered 404 (a person
        // deleted the Terminal), any later one 200 (so a re-create would
        // succeed here, and be counted, instead of hanging the test).
        let asked = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let asked = asked.clone();
            tokio::spawn(async move {
                loop {
                    let (method, path, body, send) = next(&mut api).await;
                    // Recorded before it is answered: once answered, the
                    // test may stop this server at any moment.
                    let first = {
                        let mut asked = asked.lock().expect("lock");
                        asked.push((method, path, body.clone()));
                        asked.len() == 1
                    };
                    if first {
                        answer(
                            send,
                            404,
                            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "message": "terminals.tenet.dev \"ward-01\" not found",
                                    "reason": "NotFound", "code": 404}),
                        );
                    } else {
                        answer(send, 200, &body);
                    }
                }
            })
        };
        backend
            .write_object(&Dirty::Terminal("ward-01".into()))
            .await
            .expect("a Terminal a person deleted is no error");
        server.abort();
        let asked = asked.lock().expect("lock").clone();
        assert_eq!(
            asked.len(),
            1,
            "the deleted Terminal was not re-created: {asked:?}"
        );
        let (method, path, body) = &asked[0];
        assert_eq!(*method, Method::PATCH);
        assert_eq!(
            path,
            "/apis/tenet.dev/v1alpha1/namespaces/tenet-system/terminals/ward-01/status"
        );
        assert_eq!(body["kind"], "Terminal");
        assert_eq!(body["status"]["connected"], true);
        assert!(
            body.get("spec").is_none(),
            "no spec: a status write never creates"
        );
    });
}

#[test]
fn a_remediation_is_applied_typed_then_its_phase_and_reason() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (backend, mut api) = backend(&rt);
    let key = "ward-01\u{0}hospital-it/browser".to_string();
    let live = crate::store::LiveDispatch {
        policy_generation: 2,
        issued_ms: 1_000,
        sequence: 9,
        record: DispatchRecord {
            terminal: "ward-01".into(),
            envelope_digest: [1; 32],
            nonce_commitment: [2; 32],
            payload_digest: [3; 32],
            deadline_ms: u64::MAX / 2,
            consumed: false,
        },
    };
    let pair = PairRecord {
        generation: 2,
        state: PairState::Dispatched {
            attempt: 2,
            sequence: 9,
            deadline_ms: u64::MAX / 2,
        },
        updated_ms: 1_000,
        remediated: false,
    };
    backend.remember(&[
        Change::put(Table::Terminals, "ward-01", encode(&terminal(0))),
        Change::put(Table::Dispatches, key.clone(), encode(&live)),
        Change::put(Table::Pairs, key.clone(), encode(&pair)),
    ]);
    rt.block_on(async {
        let server = tokio::spawn(async move {
            let (apply_method, apply_path, object, send) = next(&mut api).await;
            answer(send, 200, &object);
            let (status_method, status_path, status, send) = next(&mut api).await;
            let mut whole = object.clone();
            whole["status"] = status["status"].clone();
            answer(send, 200, &whole);
            (
                (apply_method, apply_path, object),
                (status_method, status_path, status),
            )
        });
        backend
            .write_object(&Dirty::Remediation(key.clone()))
            .await
            .expect("written");
        let ((method, path, object), (status_method, status_path, status)) =
            server.await.expect("server");
        let name = remediation_name("ward-01", "hospital-it/browser");
        assert_eq!(method, Method::PATCH);
        assert_eq!(
            path,
            format!("/apis/tenet.dev/v1alpha1/namespaces/hospital-it/remediations/{name}")
        );
        assert_eq!(object["kind"], "Remediation");
        assert_eq!(object["spec"]["attempt"], 2);
        assert_eq!(object["spec"]["sequence"], 9);
        assert_eq!(object["spec"]["policy"], "hospital-it/browser");
        assert_eq!(status_method, Method::PATCH);
        assert_eq!(status_path, format!("{path}/status"));
        assert_eq!(status["status"]["phase"], "Dispatched");
        assert_eq!(status["status"]["reason"], "AwaitingReport");
    });
}
