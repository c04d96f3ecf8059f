//! Reading ClickHouse's own verdict out of an error: the `Code: N.` of `DB::Exception` texts.
//! The aggregator's retry policy and the query API's status mapping both decide by this number.

/// The server's error code from a response body: `Code: 252. DB::Exception: ...`, or a bare
/// number (what the client reports when the server sent the code header and an empty body).
pub fn exception_code(text: &str) -> Option<u32> {
    if let Ok(code) = text.trim().parse() {
        return Some(code);
    }
    let rest = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits = &rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())];
    digits.parse().ok()
}

/// The server's error code of a `clickhouse` client error, when the server answered with one.
pub fn error_code(error: &clickhouse::error::Error) -> Option<u32> {
    match error {
        clickhouse::error::Error::BadResponse(text) => exception_code(text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_read_from_exception_texts_and_bare_numbers() {
        assert_eq!(exception_code("Code: 6. DB::Exception: Cannot parse"), Some(6));
        assert_eq!(exception_code("prefix Code: 1234. x"), Some(1234));
        assert_eq!(exception_code("159"), Some(159));
        assert_eq!(exception_code("Code: x"), None);
        assert_eq!(exception_code("<html>502</html>"), None);
        assert_eq!(error_code(&clickhouse::error::Error::TimedOut), None);
        assert_eq!(
            error_code(&clickhouse::error::Error::BadResponse(
                "Code: 159. DB::Exception: Timeout".into()
            )),
            Some(159)
        );
    }
}
