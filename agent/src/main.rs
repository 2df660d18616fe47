//! `tenet-agent`: the resident client on each terminal. Enrolment, inventory,
//! sandboxed execution and signed reports arrive with the agent issue; for
//! now it only says what it is.

fn main() {
    println!(
        "tenet-agent {}: the terminal agent is not built yet (see the agent issue)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
