//! The `burrow` binary: server (`up`), client commands, and the hidden `__init` entry that sets up
//! a sandbox in a fresh process before any async runtime exists (CONVENTIONS.md, "Processes").

fn main() {
    // Sandbox setup forks and enters namespaces: it must run single-threaded, so it is dispatched
    // before anything else (no tokio runtime, no logging threads).
    if std::env::args_os().nth(1).is_some_and(|a| a == "__init") {
        burrow_node::namespace::init::main();
    }
}
