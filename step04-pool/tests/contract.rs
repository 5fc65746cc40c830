//! The contract every step keeps (see testkit::contract), run against this step.
testkit::contract_suite!(env!("CARGO_BIN_EXE_step04-pool"), &[]);
