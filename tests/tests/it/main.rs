//! The black-box tests of blockcache, one binary with a module per area.

mod s3ql;
