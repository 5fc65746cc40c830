//! Properties of the request parser that must hold for *any* input, checked with `proptest`:
//! it generates hundreds of inputs per property, and when one fails it shrinks it to a small
//! example before reporting it.
//!
//! `http.rs` is byte-identical in every step (`identical_files.rs` checks that), so testing
//! step 1's copy tests them all. A failing case is saved in `testkit/proptest-regressions/` and
//! tried first on every later run: commit that file along with the fix.

#[allow(dead_code)] // the servers use all of it; these properties need only `parse`
#[path = "../../step01-iterative/src/http.rs"]
mod http;

use std::fmt;

use http::{MAX_HEAD, Parse, Route, Status, parse};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::FileFailurePersistence;

/// Bytes that print as a byte string (`b"GET / HTTP/1.1\r\n..."`), not as a list of numbers.
#[derive(Clone)]
struct Bytes(Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\" ({} bytes)", self.0.escape_ascii(), self.0.len())
    }
}

/// `name` with each letter in upper or lower case: header names are case-insensitive.
fn any_case(name: &'static str) -> impl Strategy<Value = String> {
    vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars()
            .zip(upper)
            .map(|(c, up)| {
                if up {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    })
}

/// A request line: the methods, target forms and versions the parser tells apart.
fn request_line() -> impl Strategy<Value = String> {
    let method = prop_oneof![
        4 => Just("GET"),
        2 => Just("HEAD"),
        1 => select(&["POST", "DELETE", "OPTIONS"][..]),
    ];
    let target = prop_oneof![
        Just("/".to_string()),
        "/bytes/[0-9]{1,9}",
        "/sleep/[0-9]{1,6}",
        "/[a-z0-9/?=]{0,12}",
        "(?i:https?)://[a-z0-9.:]{0,12}(/[a-z0-9/?=]{0,12})?",
        Just("*".to_string()),
        "[a-z]{1,8}:[0-9]{1,5}",
    ];
    let version = select(&["HTTP/1.0", "HTTP/1.1"][..]);
    (method, target, version).prop_map(|(m, t, v)| format!("{m} {t} {v}\r\n"))
}

/// One header line other than `Host`, most often one that the parser reads.
fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => named("Connection", "(close|keep-alive|keep-alive, close|upgrade)"),
        1 => named("Content-Length", "(0|0|[0-9]{1,4}|[ -~]{0,6})"),
        1 => named("Transfer-Encoding", "(chunked|[ -~]{0,6})"),
        4 => named("X-Other", "[ -~]{0,20}"),
    ]
}

/// A `name: value` line, the name in any case, the value matching the regular expression.
fn named(name: &'static str, value: &'static str) -> impl Strategy<Value = String> {
    (any_case(name), value).prop_map(|(n, v)| format!("{n}: {v}\r\n"))
}

/// A whole, well-formed request head: request line, up to 4 headers and usually one `Host`
/// (sometimes none or two) among them, blank line. `httparse` accepts every one of them;
/// whether *we* serve it is another matter.
fn head() -> impl Strategy<Value = Vec<u8>> {
    lines().prop_map(|lines| format!("{lines}\r\n").into_bytes())
}

/// The request line and the header lines of a head, without the blank line that ends it.
fn lines() -> impl Strategy<Value = String> {
    let hosts = prop_oneof![1 => Just(0), 6 => Just(1), 1 => Just(2)]
        .prop_flat_map(|n| vec((named("Host", "[a-z0-9.:]{0,12}"), any::<Index>()), n));
    (request_line(), vec(header(), 0..5), hosts).prop_map(|(line, mut headers, hosts)| {
        for (host, at) in hosts {
            headers.insert(at.index(headers.len() + 1), host);
        }
        format!("{line}{}", headers.concat())
    })
}

/// `head` with a few bytes overwritten or inserted: inputs close to valid, which reach deeper
/// into the parser than random bytes do (those fail on their first byte).
fn damaged_head() -> impl Strategy<Value = Vec<u8>> {
    (
        head(),
        vec((any::<Index>(), any::<u8>(), any::<bool>()), 1..4),
    )
        .prop_map(|(mut h, edits)| {
            for (at, byte, insert) in edits {
                let at = at.index(h.len());
                if insert {
                    h.insert(at, byte);
                } else {
                    h[at] = byte;
                }
            }
            h
        })
}

/// Inputs around the 8 KiB limit: a head padded by one long header so that the input ends
/// just below, at, or just past 8 KiB, with or without a blank line, and then some bytes more.
fn near_the_limit() -> impl Strategy<Value = Vec<u8>> {
    let ending = select(&["\r\n\r\n", "\r\n", ""][..]);
    let size = MAX_HEAD - 64..MAX_HEAD + 64;
    (lines(), size, ending, vec(any::<u8>(), 0..64))
        .prop_map(|(lines, size, ending, after)| padded(&lines, size, ending, &after))
}

/// `lines` and a long `X-Pad` header ending in `ending`, `size` bytes in all (or a little more
/// if `lines` takes more than that), followed by the bytes `after` it.
fn padded(lines: &str, size: usize, ending: &str, after: &[u8]) -> Vec<u8> {
    let start = format!("{lines}X-Pad: ");
    let pad = size.saturating_sub(start.len() + ending.len());
    [start.as_bytes(), &vec![b'a'; pad], ending.as_bytes(), after].concat()
}

/// Whether `result` is a request refused with `400`.
fn is_400(result: &Parse) -> bool {
    let Parse::Complete { request, .. } = result else {
        return false;
    };
    matches!(request.route, Route::Error(Status::BadRequest, _))
}

/// Proptest's default 256 cases per property (`PROPTEST_CASES` changes that): the whole file
/// takes about a second in a debug build. A failing case is saved where the next run tries it
/// first (proptest's default place assumes a `src/` file, not a test file, so we name one).
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/http_properties.txt"
        )))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Whatever the bytes, `parse` returns; it never panics (on a slice, an overflow, a
    /// multi-byte character cut in two, ...).
    #[test]
    fn parse_never_panics(
        input in prop_oneof![
            vec(any::<u8>(), 0..10_000),
            damaged_head(),
            near_the_limit(),
            // Any characters but space and line ends in the target, UTF-8 included.
            ("[^ \r\n]{0,16}", vec(header(), 0..4)).prop_map(|(target, headers)| {
                format!("GET {target} HTTP/1.1\r\n{}\r\n", headers.concat()).into_bytes()
            }),
        ].prop_map(Bytes)
    ) {
        let _ = parse(&input.0);
    }

    /// Nothing past the first 8 KiB changes the answer: whatever the input, cutting it to 8 KiB
    /// gives the same result. So a client cannot make the server look further, or buffer more;
    /// a head still unfinished at 8 KiB is a `431`, and never "read more".
    #[test]
    fn nothing_past_8_kib_is_looked_at(
        input in prop_oneof![near_the_limit(), damaged_head(), vec(any::<u8>(), 0..10_000)]
            .prop_map(Bytes)
    ) {
        let input = &input.0;
        let result = parse(input);
        prop_assert_eq!(&result, &parse(&input[..input.len().min(MAX_HEAD)]));
        if input.len() >= MAX_HEAD {
            prop_assert_ne!(&result, &Parse::Partial, "8 KiB and still waiting for more");
        }
        if let Parse::Complete { len, .. } = result {
            prop_assert!(len <= MAX_HEAD, "a head of {} bytes was accepted", len);
        }
    }

    /// And the limit is not lower than 8 KiB: a well-formed head of up to 8 KiB, blank line
    /// included, is read whole, whatever follows it.
    #[test]
    fn heads_up_to_8_kib_are_read(
        lines in lines(),
        size in MAX_HEAD - 64..=MAX_HEAD,
        after in vec(any::<u8>(), 0..64),
    ) {
        let head = padded(&lines, size, "\r\n\r\n", &[]);
        let input = Bytes([&head[..], &after].concat());
        let result = parse(&input.0);
        prop_assert!(
            matches!(result, Parse::Complete { len, .. } if len == head.len()),
            "{:?}, a {}-byte head, gave {:?}", input, head.len(), result
        );
    }

    /// A server parses the whole buffer again after each read, so feeding a head in pieces,
    /// split anywhere, means parsing each of its prefixes. Every proper prefix of a head is
    /// `Partial` (none is a head already, none is an error), and from the last byte of the head
    /// on, whatever comes after it, the answer is the same request as for the head alone.
    #[test]
    fn a_head_fed_in_pieces_parses_as_the_whole(
        head in head().prop_map(Bytes),
        after in vec(any::<u8>(), 0..32),
    ) {
        let head = &head.0;
        let whole = parse(head);
        prop_assert!(
            matches!(whole, Parse::Complete { len, .. } if len == head.len()),
            "the whole head gave {:?}", whole
        );
        for end in 0..head.len() {
            let part = parse(&head[..end]);
            prop_assert_eq!(part, Parse::Partial, "after {} of {} bytes", end, head.len());
        }
        let more = [&head[..], &after].concat();
        for end in head.len()..=more.len() {
            prop_assert_eq!(&parse(&more[..end]), &whole, "after {} bytes", end);
        }
    }

    /// More generally, for any input, once `parse` has decided (`Complete` or `Invalid`), more
    /// bytes never change its mind: a server may answer as soon as it has decided.
    #[test]
    fn a_decision_is_final(input in prop_oneof![damaged_head(), head()].prop_map(Bytes)) {
        let input = &input.0;
        let last = parse(input);
        for end in 0..input.len() {
            let early = parse(&input[..end]);
            if early != Parse::Partial {
                prop_assert_eq!(&early, &last, "decided after {} bytes, then changed", end);
            }
        }
    }

    /// Requests sent back to back (pipelined) come out one by one, in order, each exactly as if
    /// it had come alone, and nothing is left over.
    #[test]
    fn pipelined_heads_parse_in_order(heads in vec(head(), 1..8)) {
        let all = heads.concat();
        let mut rest = &all[..];
        for (i, head) in heads.iter().enumerate() {
            let Parse::Complete { len, request } = parse(rest) else {
                return Err(TestCaseError::fail(format!("request {i}: {:?}", parse(rest))));
            };
            prop_assert_eq!(len, head.len(), "request {}'s length", i);
            prop_assert_eq!(Parse::Complete { len, request }, parse(head), "request {}", i);
            rest = &rest[len..];
        }
        prop_assert!(rest.is_empty());
        prop_assert_eq!(parse(rest), Parse::Partial);
    }

    /// A head whose framing could hide a second request is refused with `400`, whatever else it
    /// holds and in whatever order: `Transfer-Encoding` with `Content-Length`, or two
    /// `Content-Length`s, with any values and in any letter case.
    #[test]
    fn ambiguous_framing_is_refused(
        line in request_line(),
        mut headers in vec(header(), 0..6),
        both in prop_oneof![
            (any_case("Transfer-Encoding"), any_case("Content-Length")),
            (any_case("Content-Length"), any_case("Content-Length")),
        ],
        values in ("[ -~]{0,8}", "[ -~]{0,8}"),
        at in (any::<Index>(), any::<Index>()),
    ) {
        headers.insert(at.0.index(headers.len() + 1), format!("{}: {}\r\n", both.0, values.0));
        headers.insert(at.1.index(headers.len() + 1), format!("{}: {}\r\n", both.1, values.1));
        let head = Bytes(format!("{line}{}\r\n", headers.concat()).into_bytes());
        let result = parse(&head.0);
        prop_assert!(is_400(&result), "{:?} gave {:?}", head, result);
    }
}
