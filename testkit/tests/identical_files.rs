//! `http.rs` is the same file in every step, and `conn.rs` in every event-loop step: the lesson of a step is how it schedules the work,
//! never the work itself, and the parser's property tests (`http_properties.rs`) test step 1's
//! copy on behalf of all of them. This test keeps the copies from drifting apart. It finds the
//! steps by listing the workspace, so that a new step is covered the day it is added.

use std::fs;
use std::path::{Path, PathBuf};

/// The workspace's root folder, where the steps are.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The names of the folders `stepNN-name` at the top of the workspace, in order: step 1 first.
fn steps() -> Vec<String> {
    let root = root();
    let mut steps: Vec<String> = fs::read_dir(&root)
        .unwrap_or_else(|err| panic!("listing {}: {err}", root.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_dir())
        .filter_map(|path| Some(path.file_name()?.to_string_lossy().into_owned()))
        .filter(|name| is_step(name))
        .collect();
    steps.sort();
    steps
}

/// `step` followed by two digits and a dash, like `step01-iterative`.
fn is_step(name: &str) -> bool {
    let name = name.as_bytes();
    name.len() > 7
        && name.starts_with(b"step")
        && name[4..6].iter().all(u8::is_ascii_digit)
        && name[6] == b'-'
}

#[test]
fn every_step_has_the_same_http_rs() {
    let names = steps();
    assert!(
        names.len() >= 4,
        "expected at least 4 step folders in the workspace, found {names:?}"
    );
    assert!(
        names[0].starts_with("step01-"),
        "no step01 folder among {names:?}"
    );
    assert_same_file("src/http.rs", &names);
}

/// The connection state machine, `conn.rs`, first written for step 5, is the same file in every
/// event-loop step that has one: from step 5 on, the diff between steps is how the loop waits.
#[test]
fn every_event_loop_step_has_the_same_conn_rs() {
    let names: Vec<String> = steps()
        .into_iter()
        .filter(|name| root().join(name).join("src/conn.rs").is_file())
        .collect();
    assert!(
        names
            .first()
            .is_some_and(|name| name.starts_with("step05-"))
            && names.len() >= 2,
        "conn.rs should be in step 5 and the steps after it, found in {names:?}"
    );
    assert_same_file("src/conn.rs", &names);
}

/// `file` is byte-identical in every step of `names`, whose first is the original.
#[track_caller]
fn assert_same_file(file: &str, names: &[String]) {
    let root = root();
    let read = |path: &str| {
        fs::read(root.join(path)).unwrap_or_else(|err| panic!("reading {path}: {err}"))
    };
    let original = format!("{}/{file}", names[0]);
    let want = read(&original);
    let differ: Vec<String> = names[1..]
        .iter()
        .map(|name| format!("{name}/{file}"))
        .filter(|copy| read(copy) != want)
        .collect();
    assert!(
        differ.is_empty(),
        "{file} must be byte-identical in these steps, and {differ:?} differ from {original}. \
         Make the change in {original}, then copy it over, from the workspace root:\n{}\n\
         (if a copy above holds the change you want, copy it to {original} first)",
        differ
            .iter()
            .map(|copy| format!("    cp {original} {copy}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn step_folders_are_recognised() {
    assert!(is_step("step01-iterative"));
    assert!(is_step("step10-io-uring"));
    assert!(!is_step("testkit"));
    assert!(!is_step("step1-short"));
    assert!(!is_step("step01"));
}

/// The exercises are copies of steps: their `http.rs` and `conn.rs` must stay the steps' own,
/// or an exercise would teach against code the book no longer shows.
#[test]
fn every_exercise_has_the_steps_shared_files() {
    let root = root();
    let exercises = root.join("exercises");
    let mut names: Vec<String> = fs::read_dir(&exercises)
        .unwrap_or_else(|err| panic!("listing {}: {err}", exercises.display()))
        .filter_map(|entry| Some(entry.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.starts_with("ex") && exercises.join(name).join("src").is_dir())
        .collect();
    names.sort();
    assert!(names.len() >= 7, "expected the exercises, found {names:?}");
    let read =
        |path: &Path| fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let mut differ = Vec::new();
    for (file, original) in [
        ("http.rs", "step01-iterative/src/http.rs"),
        ("conn.rs", "step05-busy-poll/src/conn.rs"),
    ] {
        let want = read(&root.join(original));
        for name in &names {
            let copy = exercises.join(name).join("src").join(file);
            if copy.is_file() && read(&copy) != want {
                differ.push(format!("cp {original} exercises/{name}/src/{file}"));
            }
        }
    }
    assert!(
        differ.is_empty(),
        "exercises whose shared files drifted from the steps'; from the workspace root:\n    {}\n\
         (then regenerate their .start.sha256 and check that solution.patch still applies: \
         exercises/prove)",
        differ.join("\n    ")
    );
}
