//! The black-box tests of blockcache, one binary with a module per area.

mod faults;
mod s3ql;
