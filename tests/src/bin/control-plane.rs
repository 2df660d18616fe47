//! A Kubernetes control plane for benchmarks and by-hand trials: etcd and
//! kube-apiserver on loopback (as the tests start them), the Tenet CRDs
//! installed and Established. Prints `KUBECONFIG=PATH` and runs until its
//! standard input closes, then tears everything down.

use std::io::Read;

fn main() {
    let Some(bin) = tenet_e2e::k8s::binaries() else {
        eprintln!("control-plane: no Kubernetes binaries; run scripts/k8s-binaries (needs Go)");
        std::process::exit(2);
    };
    let cp = tenet_e2e::k8s::ControlPlane::start(&bin);
    cp.install_crds();
    println!("KUBECONFIG={}", cp.kubeconfig.display());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(cp);
}
