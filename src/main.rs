//! The `weft` binary: parses the command line, installs tracing, and hands
//! over to the library. All behaviour lives in `weft::cli` and the crates.

fn main() -> std::process::ExitCode {
    weft::cli::main()
}
