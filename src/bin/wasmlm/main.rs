//! wasmlm's native CLI: a thin shell over the library.
//!
//!   wasmlm generate --bundle DIR [--file NAME] [--chat] [--max-new-tokens N] [--temperature T]
//!                   [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S] [--stop STR]… PROMPT
//!   wasmlm bench --bundle DIR… --out baselines.json [--runs N] [--text FILE] [--threads N]… [--file NAME]…
//!   wasmlm bench-row --bundle DIR --file NAME --runs N --text FILE --threads N   (one row)
//!   wasmlm profile --bundle DIR [--file NAME] [--steps N] [--threads N]   (decode time per op)
//!   wasmlm trace --bundle DIR --file NAME [--decode N] [--greedy N] ID…  (JSON: logits, tokens)
//!   wasmlm membw [--mib N] [--rounds N] [--threads N]   (memory read bandwidth, 1 thread vs N)

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
