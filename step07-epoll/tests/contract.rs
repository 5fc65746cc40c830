//! The contract every step keeps, run against this step's server in both trigger modes, and
//! against the same server written on mio.

testkit::contract_suite!(env!("CARGO_BIN_EXE_step07-epoll"), &[]);

mod edge {
    testkit::contract_suite!(env!("CARGO_BIN_EXE_step07-epoll"), &["--edge"]);
}

mod mio {
    testkit::contract_suite!(env!("CARGO_BIN_EXE_step07-mio"), &[]);
}
