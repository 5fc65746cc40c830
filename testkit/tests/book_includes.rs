//! The book includes its code from the crates, so it cannot drift from code that compiles and
//! is tested. mdBook does not guard this itself: a missing file only logs an error and the build
//! still succeeds, and a missing anchor silently includes nothing. This test does the guarding.

use std::fs;
use std::path::{Path, PathBuf};

/// One `{{#include ...}}` found in a chapter.
struct Include {
    chapter: PathBuf,
    file: PathBuf,
    selector: Option<String>,
}

fn book_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../book/src")
}

fn chapters() -> Vec<PathBuf> {
    let mut chapters: Vec<PathBuf> = fs::read_dir(book_src())
        .expect("book/src is readable")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    chapters.sort();
    chapters
}

/// Finds every `{{#include path}}`, `{{#include path:anchor}}` and `{{#include path:N:M}}`.
fn includes() -> Vec<Include> {
    let mut found = Vec::new();
    for chapter in chapters() {
        let text = fs::read_to_string(&chapter).expect("chapter is readable");
        for (at, _) in text.match_indices("{{#") {
            if text[..at].ends_with('\\') {
                continue; // `\{{#include ...}}` is mdBook's way to show the text itself
            }
            let rest = &text[at + 3..];
            let Some(rest) = rest
                .strip_prefix("include ")
                .or_else(|| rest.strip_prefix("rustdoc_include "))
            else {
                continue;
            };
            let end = rest.find("}}").expect("an include is closed by }}");
            let spec = rest[..end].trim();
            let (path, selector) = match spec.split_once(':') {
                Some((path, selector)) => (path, Some(selector.to_string())),
                None => (spec, None),
            };
            let file = chapter.parent().expect("chapter has a folder").join(path);
            found.push(Include {
                chapter: chapter.clone(),
                file,
                selector,
            });
        }
    }
    found
}

/// The lines between `ANCHOR: name` and `ANCHOR_END: name`, without other anchor markers.
fn anchored_region(text: &str, anchor: &str) -> Option<Vec<String>> {
    // mdBook accepts `ANCHOR: name` and `ANCHOR:name`.
    let is_marker = |line: &str, kind: &str| {
        line.split_once(kind)
            .is_some_and(|(_, name)| name.trim() == anchor)
    };
    let mut lines = text.lines();
    lines.by_ref().find(|line| is_marker(line, "ANCHOR:"))?;
    let mut region = Vec::new();
    for line in lines {
        if is_marker(line, "ANCHOR_END:") {
            return Some(region);
        }
        if !line.contains("ANCHOR:") && !line.contains("ANCHOR_END:") {
            region.push(line.to_string());
        }
    }
    None
}

#[test]
fn every_include_names_an_existing_file_and_a_non_empty_region() {
    let includes = includes();
    assert!(
        !includes.is_empty(),
        "the book includes no code at all: the chapters should include it from the crates"
    );
    let mut problems = Vec::new();
    for include in &includes {
        let where_ = format!(
            "{} includes {}",
            include.chapter.display(),
            include.file.display()
        );
        let Ok(text) = fs::read_to_string(&include.file) else {
            problems.push(format!("{where_}: no such file"));
            continue;
        };
        let region: Vec<String> = match include.selector.as_deref() {
            None => text.lines().map(str::to_string).collect(),
            // Line ranges: `N`, `N:`, `N:M`, `:M` (1-based, inclusive).
            Some(selector) if selector.starts_with(|c: char| c.is_ascii_digit() || c == ':') => {
                let mut bounds = selector.split(':').map(|n| n.parse::<usize>().ok());
                let start = bounds.next().flatten().unwrap_or(1).max(1);
                // `N` alone is that one line; `N:` runs to the end.
                let end = match bounds.next() {
                    None => start,
                    Some(end) => end.unwrap_or(usize::MAX),
                };
                text.lines()
                    .skip(start - 1)
                    .take(end.saturating_sub(start - 1))
                    .map(str::to_string)
                    .collect()
            }
            Some(anchor) => match anchored_region(&text, anchor) {
                Some(region) => region,
                None => {
                    problems.push(format!("{where_}: no anchor `{anchor}` (or no ANCHOR_END)"));
                    continue;
                }
            },
        };
        if region.iter().all(|line| line.trim().is_empty()) {
            problems.push(format!("{where_}: the included region is empty"));
        }
    }
    assert!(
        problems.is_empty(),
        "broken includes:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_chapter_in_the_summary_exists() {
    let summary = fs::read_to_string(book_src().join("SUMMARY.md")).expect("SUMMARY.md");
    let mut missing = Vec::new();
    for link in summary.split("](").skip(1) {
        let target = &link[..link.find(')').expect("a link is closed by )")];
        if target.is_empty() {
            missing.push("a draft chapter with no file: write it or leave it out".to_string());
        } else if !book_src().join(target).is_file() {
            missing.push(target.to_string());
        }
    }
    assert!(missing.is_empty(), "chapters missing: {missing:?}");
}

#[test]
fn the_anchor_finder_finds_what_it_should() {
    let text = "a\n// ANCHOR: x\nb\n// ANCHOR: y\nc\n// ANCHOR_END: y\n// ANCHOR_END: x\n";
    assert_eq!(
        anchored_region(text, "x"),
        Some(vec!["b".to_string(), "c".to_string()])
    );
    assert_eq!(anchored_region(text, "y"), Some(vec!["c".to_string()]));
    assert_eq!(anchored_region(text, "z"), None);
    assert_eq!(anchored_region("// ANCHOR: x\nb\n", "x"), None);
    assert_eq!(
        anchored_region("// ANCHOR:x\nb\n// ANCHOR_END:x\n", "x"),
        Some(vec!["b".to_string()])
    );
}
