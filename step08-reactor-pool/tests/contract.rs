//! The contract every step keeps, run against this step's server in both trigger modes.

testkit::contract_suite!(env!("CARGO_BIN_EXE_step08-reactor-pool"), &[]);

mod edge {
    testkit::contract_suite!(env!("CARGO_BIN_EXE_step08-reactor-pool"), &["--edge"]);
}
