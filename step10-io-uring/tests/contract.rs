//! The contract every step keeps, run against this step's server. Where the kernel refuses
//! io_uring, every one of these fails, and the failure shows the server's one line saying why.

testkit::contract_suite!(env!("CARGO_BIN_EXE_step10-io-uring"), &[]);
