//! The black-box tests of blockcache, one binary with a module per area.

mod bad_input;
mod crash;
mod faults;
mod s3ql;
