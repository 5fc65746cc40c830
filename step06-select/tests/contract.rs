//! The contract every step keeps, run against this step's server.

testkit::contract_suite!(env!("CARGO_BIN_EXE_step06-select"), &[]);
