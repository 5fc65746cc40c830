//! The contract every step's server keeps, one function per behaviour.
//!
//! Each function starts its own server from `bin` (with the step's extra `args`, such as a mode
//! flag), checks one behaviour from the outside, and panics with a message that says what was
//! expected and what came instead. [`contract_suite!`](crate::contract_suite) turns them all into
//! `#[test]`s. Timings are only generous bounds that tell "blocked" from "served".

use std::io::{ErrorKind, Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use crate::client::{Client, RESPONSE_WITHIN, Response, preview};
use crate::procfs::{fd_limits, lowest_free_fd, set_fd_limit, threads, wait_until};
use crate::server::{Server, run};
use crate::shared::{
    assert_not_spinning, assert_served_again, cpu_in_a_second, refused_for_want_of_fds, try_get,
};

/// Expands to one `#[test] fn` per behaviour of the contract, each calling the function of the
/// same name in [`contract`](crate::contract) with the given binary and extra arguments.
///
/// ```ignore
/// testkit::contract_suite!(env!("CARGO_BIN_EXE_step01-iterative"), &[]);
/// mod edge {
///     testkit::contract_suite!(env!("CARGO_BIN_EXE_step07-epoll"), &["--edge"]);
/// }
/// ```
#[macro_export]
macro_rules! contract_suite {
    ($bin:expr, $args:expr $(,)?) => {
        $crate::contract_suite!(@each $bin, $args;
            help_documents_flags,
            bad_flag_is_refused,
            banner,
            hello,
            absolute_form_target_served,
            head_has_no_body,
            bytes_exact,
            slow_reader_gets_everything,
            sleep_route,
            not_found,
            method_not_allowed,
            keep_alive_by_default,
            http10_closes_unless_keep_alive,
            connection_close_honoured,
            pipelining_in_order,
            malformed_is_400_and_closed,
            head_over_8k_is_431,
            request_body_is_413,
            transfer_encoding_is_501,
            smuggling_framing_is_400,
            host_header_required,
            error_response_closes,
            idle_connection_closed_after_timeout,
            dribbled_head_cut_at_deadline,
            half_close_still_answered,
            client_resets_are_harmless,
            fd_exhaustion_no_spin_and_recovery,
            max_fds_sets_the_soft_limit,
            lingering_close_after_errors,
            lingering_close_is_bounded,
            slow_reader_below_min_rate_cut_off,
            lumpy_reader_above_min_rate_served,
            logging_never_fatal,
        );
    };
    (@each $bin:expr, $args:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::contract::$name($bin, $args);
            }
        )*
    };
}

/// The body of `/bytes/N` repeats this 64-byte line: byte `i` is `LINE[i % 64]`.
pub const LINE: &[u8; 64] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.\n";

/// The body of `GET /`.
pub const HELLO: &[u8] = b"Hello, world!\n";

/// The largest request head a server must accept, blank line included.
pub const MAX_HEAD: usize = 8 * 1024;

/// How many of the server's last log lines a failure message shows.
const LOG_LINES: usize = 30;

/// How long a server may take to close a connection it should close.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// The position of the first byte of `body` that breaks the `/bytes/N` pattern, if any.
pub fn pattern_mismatch(body: &[u8]) -> Option<usize> {
    body.iter()
        .zip(LINE.iter().cycle())
        .position(|(got, want)| got != want)
}

/// `bin --help` exits 0 and documents every flag of the contract.
pub fn help_documents_flags(bin: &str, args: &[&str]) {
    let mut all = args.to_vec();
    all.push("--help");
    let help = run(bin, &all, Duration::from_secs(10));
    assert!(
        help.status.success(),
        "{bin} --help exited with {}; stderr:\n{}",
        help.status,
        help.stderr
    );
    for flag in ["--addr", "--timeout-secs", "--max-fds"] {
        assert!(
            help.stdout.contains(flag),
            "--help does not mention {flag}:\n{}",
            help.stdout
        );
    }
}

/// `--timeout-secs` out of its range (1 to 86400, so that no deadline arithmetic can overflow)
/// is refused at start, with a message, before anything listens; 86400 itself is accepted.
pub fn bad_flag_is_refused(bin: &str, args: &[&str]) {
    for value in ["0", "86401", "18446744073709551615"] {
        let all = with(args, &["--addr", "127.0.0.1:0", "--timeout-secs", value]);
        let refused = run(bin, &all, Duration::from_secs(10));
        assert!(
            !refused.status.success() && refused.stderr.contains("--timeout-secs"),
            "--timeout-secs {value} must be refused with a message; exit {}, stderr:\n{}",
            refused.status,
            refused.stderr
        );
    }
    let server = Server::start(bin, &with(args, &["--timeout-secs", "86400"]));
    assert_hello(&server.get("/"), "GET / with --timeout-secs 86400");
}

/// The first stdout line is exactly `listening on http://127.0.0.1:PORT (pid PID)`, and the
/// hints on stderr tell how to watch the process with `lsof -p PID`.
pub fn banner(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let port = server.addr.port();
    assert_ne!(port, 0, "the banner must show the port picked, not 0");
    let pid = server.pid;
    assert_eq!(
        server.banner(),
        format!("listening on http://127.0.0.1:{port} (pid {pid})"),
        "the banner must show the address and this process's pid"
    );
    let hint = format!("lsof -p {pid}");
    assert!(
        wait_until(Duration::from_secs(5), || server.stderr().contains(&hint)),
        "stderr does not mention `{hint}`:\n{}",
        server.stderr_tail(LOG_LINES)
    );
}

/// `GET /` answers `200` with `Hello, world!\n` and `Content-Length: 14`.
pub fn hello(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    assert_hello(&server.get("/"), "GET /");
    // The query string plays no part in routing.
    assert_hello(&server.get("/?name=reader"), "GET /?name=reader");
}

/// A target may be a whole URL (absolute form, what clients send to a proxy), which RFC 9112
/// §3.2.2 requires servers to accept: it is routed by its path, and a URL with no path means `/`.
/// A target that is neither a path nor a URL (`*`, `host:port`) is `400`.
pub fn absolute_form_target_served(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut client = server.connect();
    for (target, n) in [
        ("http://test/", None),
        ("http://test", None),
        ("HTTP://test:8080/?q=1", None),
        ("http://test/bytes/10", Some(10)),
        ("https://test/bytes/10?q=/x", Some(10)),
    ] {
        let what = format!("GET {target}");
        let request = format!("{what} HTTP/1.1\r\nHost: test\r\n\r\n");
        let response = ask(&server, &mut client, request.as_bytes(), &what);
        match n {
            None => assert_hello(&response, &what),
            Some(n) => assert_bytes(&response, n, &what),
        }
    }
    drop(client); // step 1 serves one connection at a time
    let head = head_then_get(&server, "http://test/bytes/10");
    assert_eq!(head.content_length(), Some(10), "HEAD http://test/bytes/10");
    assert_status(&server.get("http://test/nope"), 404, "GET http://test/nope");
    for target in ["*", "test:8080", "test/bytes/10", "ftp://test/"] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n");
        refused(&server, request.as_bytes(), 400);
    }
}

/// `HEAD /` gets the headers of `GET /` and no body: a `GET` pipelined right behind it parses
/// as the very next response, so not one stray body byte came between them.
pub fn head_has_no_body(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let head = head_then_get(&server, "/");
    assert_eq!(head.content_length(), Some(HELLO.len()), "HEAD /: {head:?}");
}

/// `/bytes/N` serves exactly N bytes of the pattern, up to 64 MiB; more is `400`, and a path
/// that is not a number is `404`.
pub fn bytes_exact(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    for n in [0, 1, 100_000, 1 << 20] {
        let path = format!("/bytes/{n}");
        assert_bytes(&server.get(&path), n, &path);
    }
    let most = 64 << 20;
    let head = head_then_get(&server, &format!("/bytes/{most}"));
    assert_eq!(head.content_length(), Some(most), "HEAD /bytes/{most}");
    assert_status(
        &server.get(&format!("/bytes/{}", most + 1)),
        400,
        "/bytes/ over 64 MiB",
    );
    assert_status(&server.get("/bytes/abc"), 404, "GET /bytes/abc");
}

/// A client that waits before reading makes the server's output back up; once it reads (16 KiB
/// at a time) it still gets all 16 MiB, intact.
pub fn slow_reader_gets_everything(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let n = 16 << 20;
    let mut client = server.connect();
    client.send(format!("GET /bytes/{n} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
    thread::sleep(Duration::from_millis(500));
    let response = expect_response(
        &server,
        &mut client,
        false,
        Duration::from_secs(60),
        "16 MiB",
    );
    assert_bytes(&response, n, "GET /bytes/16777216 read slowly");
}

/// `/sleep/MS` answers like `/` after at least MS milliseconds; MS over 60000 is `400`.
pub fn sleep_route(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let start = Instant::now();
    assert_hello(&server.get("/sleep/300"), "GET /sleep/300");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(290),
        "/sleep/300 answered after only {took:?}"
    );
    assert_status(&server.get("/sleep/60001"), 400, "GET /sleep/60001");
}

/// Any other path is `404`.
pub fn not_found(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    for path in ["/nope", "/bytes/-1"] {
        assert_status(&server.get(path), 404, path);
    }
}

/// Any other method is `405` with `Allow: GET, HEAD`, and the connection closes.
pub fn method_not_allowed(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    for method in ["POST", "DELETE"] {
        let request = format!("{method} / HTTP/1.1\r\nHost: test\r\n\r\n");
        let response = refused(&server, request.as_bytes(), 405);
        assert_eq!(
            response.header("Allow"),
            Some("GET, HEAD"),
            "{method} /: {response:?}"
        );
    }
}

/// On HTTP/1.1 the connection stays open by default: three requests, one after another, on one
/// connection, each answered with `Connection: keep-alive`.
pub fn keep_alive_by_default(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut client = server.connect();
    for i in 1..=3 {
        let response = client.get("/");
        assert_hello(&response, &format!("request {i} on one connection"));
        assert_connection(&response, "keep-alive", "an HTTP/1.1 request");
    }
}

/// HTTP/1.0 closes after the answer, unless the client asks for `Connection: keep-alive`.
pub fn http10_closes_unless_keep_alive(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    {
        let mut client = server.connect();
        let response = ask(&server, &mut client, b"GET / HTTP/1.0\r\n\r\n", "HTTP/1.0");
        assert_hello(&response, "GET / HTTP/1.0");
        assert_connection(&response, "close", "GET / HTTP/1.0");
        assert_closes(&server, &mut client, "after answering HTTP/1.0");
    }
    let mut client = server.connect();
    for i in 1..=2 {
        let request = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
        let what = format!("HTTP/1.0 keep-alive request {i}");
        let response = ask(&server, &mut client, request, &what);
        assert_hello(&response, &what);
        assert_connection(&response, "keep-alive", &what);
    }
}

/// `Connection: close` from the client is answered with `Connection: close`, then a close.
pub fn connection_close_honoured(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    // `close` wins wherever it stands: alone, in a list, or in one of several headers.
    for headers in [
        "Connection: close\r\n",
        "Connection: keep-alive, close\r\n",
        "Connection: close\r\nConnection: keep-alive\r\n",
    ] {
        let mut client = server.connect();
        let request = format!("GET / HTTP/1.1\r\nHost: test\r\n{headers}\r\n");
        let what = format!("GET / with {headers:?}");
        let response = ask(&server, &mut client, request.as_bytes(), &what);
        assert_hello(&response, &what);
        assert_connection(&response, "close", &what);
        assert_closes(&server, &mut client, &format!("after {what}"));
    }
}

/// Requests sent back to back in one write are all answered, in order: first three different
/// ones, then 200 `GET /bytes/i`.
pub fn pipelining_in_order(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut client = server.connect();
    client.send(
        b"GET /bytes/5 HTTP/1.1\r\nHost: test\r\n\r\n\
          HEAD / HTTP/1.1\r\nHost: test\r\n\r\n\
          GET / HTTP/1.1\r\nHost: test\r\n\r\n",
    );
    let first = expect_response(&server, &mut client, false, RESPONSE_WITHIN, "pipelined 1");
    assert_bytes(&first, 5, "pipelined GET /bytes/5");
    let second = expect_response(&server, &mut client, true, RESPONSE_WITHIN, "pipelined 2");
    assert_status(&second, 200, "pipelined HEAD /");
    assert_eq!(
        second.content_length(),
        Some(HELLO.len()),
        "HEAD /: {second:?}"
    );
    let third = expect_response(&server, &mut client, false, RESPONSE_WITHIN, "pipelined 3");
    assert_hello(&third, "pipelined GET /");

    let many = 200;
    let batch: String = (0..many)
        .map(|i| format!("GET /bytes/{i} HTTP/1.1\r\nHost: test\r\n\r\n"))
        .collect();
    client.send(batch.as_bytes());
    for i in 0..many {
        let what = format!("pipelined GET /bytes/{i} ({} of {many})", i + 1);
        let response = expect_response(&server, &mut client, false, RESPONSE_WITHIN, &what);
        assert_bytes(&response, i, &what);
    }
}

/// Bytes that are not an HTTP request get `400`, then a close.
pub fn malformed_is_400_and_closed(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    for request in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: test\r\nno colon here\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: test\r\n\r\n",
    ] {
        refused(&server, request, 400);
    }
}

/// A request head over 8 KiB is `431`, whether or not its blank line ever comes (an endless
/// head must not make the server wait or buffer forever); a head of exactly 8 KiB is served.
pub fn head_over_8k_is_431(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let too_large = refused(&server, &request_head(9 * 1024, true), 431);
    assert!(
        String::from_utf8_lossy(&too_large.body).contains("8 KiB"),
        "the 431's body should say what was wrong: {too_large:?}"
    );
    refused(&server, &request_head(9 * 1024, false), 431);
    // Many small headers in a small head: more than the 64 the parser has room for.
    let mut many = b"GET / HTTP/1.1\r\nHost: test\r\n".to_vec();
    for i in 0..65 {
        many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    refused(&server, &many, 431);
    refused(&server, &request_head(MAX_HEAD + 1, true), 431);
    let mut client = server.connect();
    let response = ask(
        &server,
        &mut client,
        &request_head(MAX_HEAD, true),
        "8 KiB head",
    );
    assert_hello(&response, "a head of exactly 8192 bytes");
}

/// A request with a body (`Content-Length` over 0) is `413`, then a close; `Content-Length: 0`
/// is no body at all, and is served.
pub fn request_body_is_413(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    for method in ["GET", "POST"] {
        let request =
            format!("{method} / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello");
        refused(&server, request.as_bytes(), 413);
    }
    let mut client = server.connect();
    let response = ask(
        &server,
        &mut client,
        b"GET / HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
        "length 0",
    );
    assert_hello(&response, "GET / with Content-Length: 0");
}

/// `Transfer-Encoding` is not supported: `501`, then a close.
pub fn transfer_encoding_is_501(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    refused(
        &server,
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        501,
    );
}

/// Framing that could hide a second request (request smuggling) is `400`, then a close:
/// `Content-Length` with `Transfer-Encoding`, two `Content-Length`s, or a length that is not
/// plain digits.
pub fn smuggling_framing_is_400(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let both = b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    refused(&server, both, 400);
    refused(
        &server,
        b"GET / HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        400,
    );
    for value in ["+5", "-1", "0x5", "5,5", ""] {
        let request = format!("GET / HTTP/1.1\r\nHost: test\r\nContent-Length: {value}\r\n\r\n");
        refused(&server, request.as_bytes(), 400);
    }
}

/// An HTTP/1.1 request needs exactly one `Host` header (RFC 9112 §3.2): none, or two, is `400`,
/// then a close. HTTP/1.0 predates `Host` and is served without one.
pub fn host_header_required(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    for request in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET http://test/ HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: test\r\nHost: test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: one\r\nhost: two\r\n\r\n",
    ] {
        let response = refused(&server, request, 400);
        assert!(
            String::from_utf8_lossy(&response.body).contains("Host"),
            "the 400 should say that Host was wrong: {response:?}"
        );
    }
    let mut client = server.connect();
    let response = ask(&server, &mut client, b"GET / HTTP/1.0\r\n\r\n", "no Host");
    assert_hello(&response, "GET / HTTP/1.0 without Host");
}

/// After an error response nothing more is read as a request: a "body" that looks like a second
/// request gets no answer of its own.
pub fn error_response_closes(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    refused(
        &server,
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 38\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: test\r\n\r\n",
        413,
    );
}

/// With `--timeout-secs 1`, a connection that sends nothing is closed within a few seconds, and
/// so is an idle keep-alive connection after an answered request.
pub fn idle_connection_closed_after_timeout(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--timeout-secs", "1"]));
    let mut silent = server.connect();
    assert_closed_after_idle(&server, &mut silent, Instant::now(), "a silent connection");
    drop(silent);
    let mut client = server.connect();
    assert_hello(&client.get("/"), "GET / before idling");
    let answered = Instant::now();
    assert_closed_after_idle(
        &server,
        &mut client,
        answered,
        "an idle keep-alive connection",
    );
}

/// With `--timeout-secs 2`, a client that dribbles its head one byte every 100 ms, never
/// finishing it, is cut off within 6 s of its first byte: the deadline covers the whole head,
/// where a per-read timeout would never fire.
pub fn dribbled_head_cut_at_deadline(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--timeout-secs", "2"]));
    let mut client = server.connect();
    let head = b"GET / HTTP/1.1\r\nHost: test\r\nX-Dribble: ";
    let mut bytes = head.iter().chain(std::iter::repeat(&b'a'));
    let first = Instant::now();
    let mut cut = false;
    while !cut && first.elapsed() < Duration::from_secs(6) {
        let byte = *bytes.next().expect("an endless dribble");
        // A write fails once the server's close has reached us; else a read sees it.
        cut = client.try_send(&[byte]).is_err() || client.closed_within(Duration::from_millis(100));
    }
    let took = first.elapsed();
    assert!(
        cut,
        "a head dribbled a byte every 100 ms was still open after {took:?}; server stderr:\n{}",
        server.stderr_tail(LOG_LINES)
    );
    assert!(
        took >= Duration::from_secs(1),
        "cut after only {took:?}, before the 2 s deadline"
    );
}

/// A client that sends its request and then `shutdown(SHUT_WR)` still gets the whole answer,
/// then end-of-file.
pub fn half_close_still_answered(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut client = server.connect();
    client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    client.shutdown_write();
    let response = expect_response(&server, &mut client, false, RESPONSE_WITHIN, "half-closed");
    assert_hello(&response, "GET / then shutdown(SHUT_WR)");
    assert_closes(
        &server,
        &mut client,
        "after answering a half-closed connection",
    );
}

/// Clients that reset their connections in the middle of a big answer do not hurt the server:
/// it lives on and answers the next client.
pub fn client_resets_are_harmless(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let clients: Vec<Client> = (0..20)
        .map(|_| {
            let mut client = server.connect();
            client.send(b"GET /bytes/8388608 HTTP/1.1\r\nHost: test\r\n\r\n");
            client
        })
        .collect();
    for (i, mut client) in clients.into_iter().enumerate() {
        let mut byte = [0];
        client
            .stream
            .set_read_timeout(Some(RESPONSE_WITHIN))
            .expect("set_read_timeout");
        client
            .stream
            .read_exact(&mut byte)
            .unwrap_or_else(|err| panic!("client {i}: no first byte of /bytes/8388608: {err}"));
        client.reset();
    }
    assert!(
        server.is_alive(),
        "the server died after client resets:\n{}",
        server.stderr_tail(LOG_LINES)
    );
    assert_hello(&server.get("/"), "GET / after 20 resets");
}

/// Out of file descriptors, the server neither hangs, spins nor dies: new clients get `503` or
/// a close, it burns almost no CPU while idle, and it serves again once descriptors are back.
pub fn fd_exhaustion_no_spin_and_recovery(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let idle = cpu_in_a_second(&server);
    let (original, _) = fd_limits(server.pid);
    // A limit equal to the lowest free descriptor number leaves no room for a new one (those
    // already open above it, say inherited ones, stay open). This is done while the server is
    // idle, with no connection open. A thread parked in a blocking `accept` has already
    // reserved a number for its next connection, so a server with several such threads (a
    // prethreaded pool) may still serve as many clients as it has threads, in any order with
    // the refusals; no more.
    let parked = threads(server.pid);
    set_fd_limit(
        server.pid,
        u64::try_from(lowest_free_fd(server.pid)).expect("fds are >= 0"),
    );
    let mut served = 0;
    for i in 1..=parked + 3 {
        let outcome = try_get(&server, Duration::from_secs(5));
        assert!(
            matches!(outcome, Ok(200)) || refused_for_want_of_fds(&outcome),
            "client {i} with no descriptor left must get 503 or a close, got {outcome:?}; \
             server stderr:\n{}",
            server.stderr_tail(LOG_LINES)
        );
        served += usize::from(matches!(outcome, Ok(200)));
    }
    assert!(
        served <= parked,
        "{served} of {} clients were served with no descriptor left (the server has {parked} \
         threads, each of which may have one in hand)",
        parked + 3
    );
    assert_not_spinning(&server, idle);
    set_fd_limit(server.pid, original);
    assert_served_again(&server, "raising the limit back");
}

/// `--max-fds N` sets the soft `RLIMIT_NOFILE` to N; without it, the soft limit is raised to
/// the hard one.
pub fn max_fds_sets_the_soft_limit(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--max-fds", "100"]));
    let (soft, _) = fd_limits(server.pid);
    assert_eq!(soft, 100, "--max-fds 100 must set the soft limit to 100");
    let server = Server::start(bin, args);
    let (soft, hard) = fd_limits(server.pid);
    assert_eq!(
        soft, hard,
        "without --max-fds the soft limit must be raised to the hard one"
    );
}

/// After an error answer with input still unread behind it, the server closes politely (a
/// lingering close, RFC 9112 §9.6): the client reads the whole answer and then end-of-file,
/// never a reset, even though it goes on sending for a moment after the answer. Cases: a `413`
/// whose 128 KiB body follows its head, a 64 KiB head (`431`), bytes pipelined after a `400`.
/// And a client that sends its whole 3 MB body before reading (as Python's `urllib` does) gets
/// to send it all and read its `413`.
pub fn lingering_close_after_errors(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    assert_lingers(&server, &post(128 << 10), 413);
    assert_lingers(&server, &request_head(64 << 10, false), 431);
    assert_lingers(
        &server,
        b"GARBAGE\r\n\r\nGET / HTTP/1.1\r\nHost: test\r\n\r\n",
        400,
    );
    let mut client = server.connect();
    let what = "a POST of 3 MB, sent whole before reading";
    send_whole(&server, &mut client, &post(3_000_000), what);
    let response = expect_response(&server, &mut client, false, RESPONSE_WITHIN, what);
    assert_status(&response, 413, what);
}

/// A lingering close is bounded: a client that never stops sending after its `413` is cut off
/// (a send fails) within a few seconds, and the server serves others meanwhile and after.
pub fn lingering_close_is_bounded(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut client = server.connect();
    let what = "an endless POST";
    client.send(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 99999999999\r\n\r\n");
    let started = Instant::now();
    let chunk = [b'x'; 16 << 10];
    let mut cut = None;
    client
        .stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .expect("set_write_timeout");
    while cut.is_none() && started.elapsed() < Duration::from_secs(10) {
        match client.stream.write(&chunk) {
            Ok(_) => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => cut = Some(started.elapsed()),
        }
    }
    let took = cut.unwrap_or_else(|| {
        panic!(
            "{what}: still accepted after {:?}: the lingering close has no bound; stderr:\n{}",
            started.elapsed(),
            server.stderr_tail(LOG_LINES)
        )
    });
    assert!(
        took < Duration::from_secs(5),
        "{what}: cut off only after {took:?}"
    );
    assert_hello(&server.get("/"), "GET / after cutting off an endless POST");
}

/// The write deadline is a minimum rate, not a timeout per `write`: with `--timeout-secs 2`, a
/// client that takes `/bytes/67108864` at about 10 KiB/s (1 KiB every 100 ms, through a small
/// receive window, so that a timeout per write would never fire) is cut off within 12 s, short
/// of the whole body. One that takes 256 KiB every 100 ms for 6 s is served whole.
pub fn slow_reader_below_min_rate_cut_off(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--timeout-secs", "2"]));
    let n: usize = 64 << 20;
    let request = format!("GET /bytes/{n} HTTP/1.1\r\nHost: test\r\n\r\n");
    let mut slow = server.connect_small_window();
    slow.send(request.as_bytes());
    let (got, ended) = slow.read_paced(1024, Duration::from_secs(12));
    let got = match ended {
        Some(_) => got,
        None => got + slow.read_paced(1 << 20, Duration::from_secs(30)).0,
    };
    assert!(
        got < n,
        "a reader taking 10 KiB/s for 12 s, then reading fast, got all {got} bytes: the server \
         never abandoned it, though --timeout-secs 2 demands 16 KiB/s; stderr:\n{}",
        server.stderr_tail(LOG_LINES)
    );
    let mut steady = server.connect();
    steady.send(request.as_bytes());
    let (early, ended) = steady.read_paced(256 << 10, Duration::from_secs(6));
    assert!(
        ended.is_none(),
        "a reader taking 2.5 MiB/s was cut off after {early} bytes ({ended:?}): above the \
         minimum rate it must be served; stderr:\n{}",
        server.stderr_tail(LOG_LINES)
    );
    let response = expect_response(&server, &mut steady, false, Duration::from_secs(30), "rest");
    assert_bytes(
        &response,
        n,
        "/bytes/67108864 read at 2.5 MiB/s for 6 s, then fast",
    );
}

/// The rate is an average since the answer began, and counts what the client's kernel took: a
/// reader whose progress comes in lumps, as `curl --limit-rate` reads (a big gulp, then nothing
/// for many seconds while it spends it), is served. With `--timeout-secs 2`, a client that
/// takes 8 MiB at once and then nothing for 12 s (six windows without a byte) is served whole.
pub fn lumpy_reader_above_min_rate_served(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--timeout-secs", "2"]));
    let n: usize = 64 << 20;
    let mut client = server.connect();
    client.send(format!("GET /bytes/{n} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
    // One gulp of 8 MiB, read as fast as it comes.
    let mut buffer = vec![0; 64 << 10];
    let mut gulp = 0;
    client
        .stream
        .set_read_timeout(Some(RESPONSE_WITHIN))
        .expect("set_read_timeout");
    while gulp < 8 << 20 {
        match client.stream.read(&mut buffer) {
            Ok(0) | Err(_) => panic!(
                "cut off after {gulp} bytes; stderr:\n{}",
                server.stderr_tail(LOG_LINES)
            ),
            Ok(k) => {
                client.keep(&buffer[..k]);
                gulp += k;
            }
        }
    }
    thread::sleep(Duration::from_secs(12));
    let response = expect_response(&server, &mut client, false, Duration::from_secs(60), "rest");
    assert_bytes(
        &response,
        n,
        "/bytes/67108864: 8 MiB, 12 s of nothing, then the rest",
    );
}

/// Logging is never fatal: with its stderr a pipe whose reader has left (`server 2>&1 | head
/// -1`), every log line fails with `EPIPE`, and the server still serves, through events it logs
/// (clients resetting in the middle of an answer).
pub fn logging_never_fatal(bin: &str, args: &[&str]) {
    let server = Server::start_with_stderr_gone(bin, args);
    let serves = |what: &str| {
        let outcome = try_get(&server, RESPONSE_WITHIN);
        assert!(
            matches!(outcome, Ok(200)),
            "{what}, with stderr gone: {outcome:?}, and the server is {}: a log line that \
             cannot be written must be dropped (eprintln! panics on EPIPE)",
            if server.is_alive() { "alive" } else { "dead" }
        );
    };
    serves("GET / after the start-up hints");
    for _ in 0..3 {
        let mut client = server.connect();
        client.send(b"GET /bytes/8388608 HTTP/1.1\r\nHost: test\r\n\r\n");
        let mut byte = [0];
        client
            .stream
            .set_read_timeout(Some(RESPONSE_WITHIN))
            .expect("set_read_timeout");
        client.stream.read_exact(&mut byte).expect("a first byte");
        client.reset();
    }
    serves("GET / after three clients reset mid-answer (each logged)");
}

/// A POST with a body of `n` bytes, which the contract refuses with `413`.
fn post(n: usize) -> Vec<u8> {
    let head = format!("POST / HTTP/1.1\r\nHost: test\r\nContent-Length: {n}\r\n\r\n");
    [head.as_bytes(), &vec![b'x'; n]].concat()
}

/// Sends all of `request` before reading anything, as simple clients do; panics if the server
/// makes that fail by closing without reading (and discarding) what is still coming.
#[track_caller]
fn send_whole(server: &Server, client: &mut Client, request: &[u8], what: &str) {
    client
        .stream
        .set_write_timeout(Some(RESPONSE_WITHIN))
        .expect("set_write_timeout");
    if let Err(err) = client.try_send(request) {
        panic!(
            "{what}: sending failed ({err}): the server closed without reading what was still \
             coming, so its kernel answered it with a reset; stderr:\n{}",
            server.stderr_tail(LOG_LINES)
        );
    }
}

/// Sends `request` whole, reads its `status` answer, goes on sending for 250 ms, then expects
/// end-of-file: a lingering close, not a reset.
#[track_caller]
fn assert_lingers(server: &Server, request: &[u8], status: u16) {
    let mut client = server.connect();
    let what = format!("the request {}", preview(request));
    send_whole(server, &mut client, request, &what);
    let response = expect_response(server, &mut client, false, RESPONSE_WITHIN, &what);
    assert_status(&response, status, &what);
    let after = format!("1 KiB sent 50 ms after the {status} to {what}");
    for _ in 0..5 {
        thread::sleep(Duration::from_millis(50));
        send_whole(server, &mut client, &[b'x'; 1024], &after);
    }
    if let Err(err) = client.end_within(CLOSE_WITHIN) {
        panic!(
            "after the {status} to {what}, the connection ended with {err}, not end-of-file: \
             no lingering close; stderr:\n{}",
            server.stderr_tail(LOG_LINES)
        );
    }
}

/// `args` followed by `extra`.
fn with<'a>(args: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    [args, extra].concat()
}

/// A `GET /` head of exactly `len` bytes, padded with one long header; `complete` ends it with
/// the blank line, otherwise it just stops (a head that never ends).
fn request_head(len: usize, complete: bool) -> Vec<u8> {
    let start = b"GET / HTTP/1.1\r\nHost: test\r\nX-Pad: ";
    let end: &[u8] = if complete { b"\r\n\r\n" } else { b"" };
    let pad = len - start.len() - end.len();
    [&start[..], &vec![b'a'; pad], end].concat()
}

/// Sends `request` on a new connection and expects exactly one answer with `status` and
/// `Connection: close`, then a close with nothing more. Returns the answer for further checks.
#[track_caller]
fn refused(server: &Server, request: &[u8], status: u16) -> Response {
    let mut client = server.connect();
    let what = format!("the request {}", preview(request));
    let response = ask(server, &mut client, request, &what);
    assert_status(&response, status, &what);
    assert_connection(&response, "close", &what);
    assert_closes(server, &mut client, &format!("after {status} to {what}"));
    response
}

/// Sends `HEAD path` and `GET /` in one write, checks that the second is the hello right after
/// the first (so the first had no body), and returns the answer to the `HEAD`.
#[track_caller]
fn head_then_get(server: &Server, path: &str) -> Response {
    let mut client = server.connect();
    let what = format!("HEAD {path}");
    client.send(
        format!("{what} HTTP/1.1\r\nHost: test\r\n\r\nGET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .as_bytes(),
    );
    let head = expect_response(server, &mut client, true, RESPONSE_WITHIN, &what);
    assert_status(&head, 200, &what);
    let next = expect_response(
        server,
        &mut client,
        false,
        RESPONSE_WITHIN,
        "GET / after HEAD",
    );
    assert_hello(
        &next,
        &format!("GET / right after {what} (stray body bytes?)"),
    );
    head
}

/// Sends `request` on `client` and reads one response (not to a `HEAD`), or panics.
#[track_caller]
fn ask(server: &Server, client: &mut Client, request: &[u8], what: &str) -> Response {
    client.send(request);
    expect_response(server, client, false, RESPONSE_WITHIN, what)
}

/// Reads one response, or panics saying what was awaited, why it failed, and what the server
/// logged.
#[track_caller]
fn expect_response(
    server: &Server,
    client: &mut Client,
    head_only: bool,
    within: Duration,
    what: &str,
) -> Response {
    match client.read_response(head_only, within) {
        Ok(response) => response,
        Err(err) => panic!(
            "{what}: no valid response: {err}; server stderr:\n{}",
            server.stderr_tail(LOG_LINES)
        ),
    }
}

#[track_caller]
fn assert_status(response: &Response, status: u16, what: &str) {
    assert_eq!(
        response.status,
        status,
        "{what}: expected {status}, got {} {:?} body {}",
        response.status,
        response.headers,
        preview(&response.body)
    );
}

#[track_caller]
fn assert_hello(response: &Response, what: &str) {
    assert_status(response, 200, what);
    assert_eq!(
        response.content_length(),
        Some(HELLO.len()),
        "{what}: {response:?}"
    );
    assert_eq!(
        response.body,
        HELLO,
        "{what}: body {}",
        preview(&response.body)
    );
}

#[track_caller]
fn assert_bytes(response: &Response, n: usize, what: &str) {
    assert_status(response, 200, what);
    assert_eq!(
        response.content_length(),
        Some(n),
        "{what}: Content-Length in {:?}",
        response.headers
    );
    assert_eq!(response.body.len(), n, "{what}: body length");
    if let Some(i) = pattern_mismatch(&response.body) {
        panic!(
            "{what}: byte {i} is {:?}, expected {:?}",
            char::from(response.body[i]),
            char::from(LINE[i % LINE.len()])
        );
    }
}

#[track_caller]
fn assert_connection(response: &Response, want: &str, what: &str) {
    let got = response.header("Connection");
    assert!(
        got.is_some_and(|got| got.eq_ignore_ascii_case(want)),
        "{what} must be answered with Connection: {want}, got {got:?}"
    );
}

#[track_caller]
fn assert_closes(server: &Server, client: &mut Client, what: &str) {
    assert!(
        client.closed_within(CLOSE_WITHIN),
        "{what}: the connection is still open after {CLOSE_WITHIN:?}; server stderr:\n{}",
        server.stderr_tail(LOG_LINES)
    );
}

/// The server closes `client` within 5 s of `since`, but not before about half a second.
#[track_caller]
fn assert_closed_after_idle(server: &Server, client: &mut Client, since: Instant, what: &str) {
    assert_closes(server, client, what);
    let took = since.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "{what} was closed after only {took:?}; --timeout-secs is 1"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_checker_finds_the_first_wrong_byte() {
        let mut body: Vec<u8> = LINE.iter().cycle().take(200).copied().collect();
        assert_eq!(pattern_mismatch(&body), None);
        body[130] = b'!';
        assert_eq!(pattern_mismatch(&body), Some(130));
    }

    #[test]
    fn the_suite_macro_lists_every_behaviour() {
        // A behaviour added here but forgotten in `contract_suite!` would silently never run.
        let source = include_str!("contract.rs");
        let (suite, functions) = source
            .split_once("\n/// The body of `/bytes/N`")
            .expect("the macro comes first");
        let behaviours: Vec<&str> = functions
            .lines()
            .filter_map(|line| {
                line.strip_prefix("pub fn ")?
                    .strip_suffix("(bin: &str, args: &[&str]) {")
            })
            .collect();
        assert!(behaviours.len() >= 20, "found only {behaviours:?}");
        for name in behaviours {
            assert!(
                suite.contains(&format!("            {name},\n")),
                "contract::{name} is missing from contract_suite!"
            );
        }
    }

    #[test]
    fn request_heads_have_the_length_asked_for() {
        assert_eq!(request_head(MAX_HEAD, true).len(), MAX_HEAD);
        assert!(request_head(MAX_HEAD, true).ends_with(b"a\r\n\r\n"));
        assert!(request_head(9 * 1024, false).ends_with(b"aaaa"));
    }
}
