//! The contract every step keeps (see testkit::contract), run against step 2.
testkit::contract_suite!(env!("CARGO_BIN_EXE_step02-fork"), &[]);
