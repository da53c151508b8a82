//! Name rules shared by the server (which refuses bad names with 400) and
//! the client (which refuses them before uploading anything).

fn matches(s: &str, max: usize, first: fn(u8) -> bool, rest: fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    !b.is_empty() && b.len() <= max && first(b[0]) && b[1..].iter().all(|&c| rest(c))
}

fn lower_or_digit(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn alnum(c: u8) -> bool {
    c.is_ascii_alphanumeric()
}

/// Image: `^[a-z0-9][a-z0-9._-]{0,127}$`
pub fn image_name(s: &str) -> bool {
    matches(s, 128, lower_or_digit, |c| {
        lower_or_digit(c) || matches!(c, b'.' | b'_' | b'-')
    })
}

/// Version: `^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}$`
pub fn version(s: &str) -> bool {
    matches(s, 128, alnum, |c| {
        alnum(c) || matches!(c, b'.' | b'_' | b'+' | b':' | b'-')
    })
}

/// Alias: `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`
pub fn alias(s: &str) -> bool {
    matches(s, 64, alnum, |c| {
        alnum(c) || matches!(c, b'.' | b'_' | b'-')
    })
}

/// Trusted publisher key name: the alias rule, `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`.
pub fn key_name(s: &str) -> bool {
    alias(s)
}

/// Variant, operating system, architecture: `^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$`
pub fn token(s: &str) -> bool {
    matches(s, 64, alnum, |c| {
        alnum(c) || matches!(c, b'.' | b'_' | b'+' | b'-')
    })
}

/// Attachment name: `^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$`
pub fn attachment_name(s: &str) -> bool {
    matches(s, 128, alnum, |c| {
        alnum(c) || matches!(c, b'.' | b'_' | b'+' | b'-')
    })
}

/// Principal: `^[a-z0-9][a-z0-9._-]{0,63}$` (it also goes in `https://NAME:TOKEN@host`).
pub fn principal_name(s: &str) -> bool {
    matches(s, 64, lower_or_digit, |c| {
        lower_or_digit(c) || matches!(c, b'.' | b'_' | b'-')
    })
}

/// A scope: an image-name glob (`*` and `?` wildcards), e.g. `debian-*` or `*`.
pub fn scope(s: &str) -> bool {
    matches(
        s,
        128,
        |c| lower_or_digit(c) || matches!(c, b'*' | b'?'),
        |c| lower_or_digit(c) || matches!(c, b'.' | b'_' | b'-' | b'*' | b'?'),
    ) && glob::Pattern::new(s).is_ok()
}

/// Whether image `name` falls under `scope`. An invalid scope matches nothing.
pub fn scope_matches(scope: &str, name: &str) -> bool {
    self::scope(scope) && glob::Pattern::new(scope).is_ok_and(|p| p.matches(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        assert!(image_name("debian-12.x_y") && image_name(&"a".repeat(128)));
        for bad in [
            "",
            "Debian",
            "-x",
            ".x",
            "a/b",
            "a b",
            "..",
            &"a".repeat(129),
        ] {
            assert!(!image_name(bad), "{bad}");
        }
        assert!(version("20240209_13:00") && version("1.0+b1"));
        assert!(!version(":x") && !version(".1") && !version("a b") && !version("a/b"));
        assert!(alias("stable") && !alias("a:b") && !alias(&"a".repeat(65)));
        assert!(
            token("x86_64") && token("debian") && !token("Alpine Linux") && !token(&"a".repeat(65))
        );
        assert!(attachment_name("incus.tar.xz") && !attachment_name("../x"));
        for ok in ["*", "debian-*", "debian-1?", "exact-name"] {
            assert!(scope(ok), "{ok}");
        }
        for bad in ["", "Debian-*", "[a-z]*", "a/b", "a b", "**/x"] {
            assert!(!scope(bad), "{bad}");
        }
        assert!(scope_matches("*", "anything") && scope_matches("debian-*", "debian-12"));
        assert!(!scope_matches("debian-*", "ubuntu-24") && !scope_matches("debian-*", "debian"));
        assert!(
            scope_matches("debian-1?", "debian-12") && !scope_matches("debian-1?", "debian-123")
        );
        assert!(!scope_matches("[a]*", "a"), "invalid scopes match nothing");
    }
}
