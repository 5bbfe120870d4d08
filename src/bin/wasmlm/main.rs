//! wasmlm's native CLI: a thin shell over the library. `wasmlm --help` lists the commands,
//! `wasmlm COMMAND --help` their options (src/bin/wasmlm/cli.rs).

#[cfg(not(target_arch = "wasm32"))]
mod cli;

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    cli::main()
}

/// The CLI is native only. wasm32 builds this binary only because cargo links a package's
/// binaries for its integration tests (tests/wasm.rs runs under wasm-bindgen-test).
#[cfg(target_arch = "wasm32")]
fn main() {}
