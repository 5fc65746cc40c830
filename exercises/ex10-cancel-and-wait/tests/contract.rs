//! The contract every step keeps: your change must not break it.

testkit::contract_suite!(env!("CARGO_BIN_EXE_ex10-cancel-and-wait"), &[]);
