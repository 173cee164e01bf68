//! The black-box tests of blockcache, one binary with a module per area.

mod atomic;
mod bad_input;
mod cancel;
mod check;
mod concurrency;
mod crash;
mod daemon;
mod daemon_answers;
mod daemon_hostile;
mod daemon_outage;
mod daemon_owner;
mod daemon_settings;
mod daemon_store;
mod daemon_volume;
mod faults;
mod lifecycle;
mod links;
mod metadata;
mod model;
mod namespace;
mod owner;
mod restore_drill;
mod s3_gateway;
mod s3_store;
mod s3ql;
mod volume;
