//! The contract every step keeps, run against this step's server with two loops, in both ways of
//! spreading connections over them, and edge-triggered with the hand-off (whose loops are woken
//! by an eventfd as well as by their sockets).

const BIN: &str = env!("CARGO_BIN_EXE_step09-multi-reactor");

testkit::contract_suite!(BIN, &["--threads", "2"]);

mod handoff {
    testkit::contract_suite!(super::BIN, &["--threads", "2", "--balance", "handoff"]);
}

mod handoff_edge {
    testkit::contract_suite!(
        super::BIN,
        &["--threads", "2", "--balance", "handoff", "--edge"]
    );
}
