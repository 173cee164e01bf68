//! The black-box tests of blockcache, one binary with a module per area.

mod crash;
mod faults;
mod s3ql;
