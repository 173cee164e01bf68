//! A child process for crash tests: writes blocks, syncs, and reports each synced block on
//! stdout so the parent can kill it with SIGKILL at any moment.
fn main() {}
