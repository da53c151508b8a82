//! How `main` prints an error: the chain of causes once each, and a hint
//! for the failures a new user meets first.
//!
//! Several error types print their source in their own message (ureq's
//! `io: {e}` has the `io::Error` as its source too; so do our `{url}:
//! {source}` variants), so anyhow's `{:#}` would print the same cause twice
//! (`Connection refused (os error 111): ... (os error 111)`). A cause whose
//! text is already in what was printed is left out.

/// The error as one line of causes (`context: cause: ...`), each said once,
/// followed by a hint line when one applies.
pub fn render(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    match hint(&line) {
        Some(h) => format!("{line}\nhint: {h}"),
        None => line,
    }
}

/// What to do next, for a failure recognised by its message.
fn hint(msg: &str) -> Option<&'static str> {
    if msg.contains("UnknownIssuer") || msg.contains("unknown issuer") {
        return Some(
            "the server's certificate is not one this machine trusts: give it with --ca CERT \
             (or IMGSRV_CA=CERT; for a mirror's upstream --upstream-ca CERT). For an `imgsrv \
             serve` with its generated certificate that is DATA/tls/cert.pem from its data \
             directory; copy it from the server if needed",
        );
    }
    if msg.contains("Connection refused") {
        return Some(
            "nothing listens there: is `imgsrv serve` running, and is the URL's port its \
             --listen port (default 8443)?",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "io: {}", self.0)
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let e = anyhow::Error::new(Outer(io)).context("GET https://h:1/v1/images");
        let shown = render(&e);
        assert_eq!(shown.matches("os error 111").count(), 1, "{shown}");
        assert!(
            shown.starts_with("GET https://h:1/v1/images: io: Connection refused"),
            "{shown}"
        );
        assert!(shown.contains("\nhint: nothing listens there"), "{shown}");
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(render(&plain), "outer: inner");
    }

    #[test]
    fn an_unknown_issuer_hints_at_ca() {
        let e = anyhow::anyhow!("invalid peer certificate: UnknownIssuer").context("GET x");
        let shown = render(&e);
        assert!(
            shown.contains("--ca CERT") && shown.contains("IMGSRV_CA"),
            "{shown}"
        );
    }
}
