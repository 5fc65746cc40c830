//! The contract every step keeps: your change must not break it.

testkit::contract_suite!(
    env!("CARGO_BIN_EXE_ex09-least-loaded"),
    &["--threads", "2", "--balance", "least"]
);
