//! `tenet`: the Tenet operator and its admin CLI (see `tenet --help`; the
//! commands are in `cli/`).

fn main() -> std::process::ExitCode {
    tenet::cli::main()
}
