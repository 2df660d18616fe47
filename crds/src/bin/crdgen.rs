//! Prints the CRD YAML of all Tenet resources.
//! Regenerate the committed copy with `cargo run -p tenet-crds --bin crdgen > crds/crds.yaml`.

fn main() {
    match tenet_crds::crds_yaml() {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!("crdgen: cannot render the CRDs: {e}");
            std::process::exit(1);
        }
    }
}
