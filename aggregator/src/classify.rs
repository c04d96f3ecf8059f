//! Which ClickHouse insert errors can succeed on retry and which never will.
//!
//! A permanent error is one the same rows will always get: parsing, types, a block that spans
//! too many partitions, a view that throws on a value. Retrying it forever wedges the partition,
//! so the commit path splits the batch instead ([`crate::commit`]). Everything else — network,
//! timeouts, memory, "too many parts" while merges catch up, a missing table during a migration,
//! authentication — is retried with backoff: the same rows will go in once the server is well,
//! and splitting would dead-letter healthy data. Vector's ClickHouse sink keeps a table of the
//! same kind (`src/sinks/clickhouse/service.rs`).

/// What to do after a failed insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Retry the same insert after a backoff.
    Transient,
    /// These rows will never be accepted: isolate the messages that carry them.
    Permanent { code: u32, reason: String },
}

/// Error codes the server returns for the data of one insert (`src/Common/ErrorCodes.cpp`).
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    9,   // SIZES_OF_COLUMNS_DOESNT_MATCH
    16,  // NO_SUCH_COLUMN_IN_TABLE
    25,  // CANNOT_PARSE_ESCAPE_SEQUENCE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  // ATTEMPT_TO_READ_AFTER_EOF
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    44,  // ILLEGAL_COLUMN
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    130, // CANNOT_READ_ARRAY_FROM_TEXT
    131, // TOO_LARGE_STRING_SIZE
    190, // SIZES_OF_ARRAYS_DONT_MATCH
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
    407, // DECIMAL_OVERFLOW
    467, // CANNOT_PARSE_BOOL
    469, // VIOLATED_CONSTRAINT
];

/// 252 is both "too many parts" (merges behind: transient) and "too many partitions for single
/// INSERT block" (the rows span too many partitions: permanent for these rows).
const TOO_MANY_PARTS: u32 = 252;

/// Classifies an insert error of the aggregator: only ClickHouse's own verdicts can be permanent.
pub fn classify(error: &crate::Error) -> Verdict {
    match error {
        crate::Error::ClickHouse(error) => classify_clickhouse(error),
        _ => Verdict::Transient,
    }
}

/// Classifies an error of the `clickhouse` client.
pub fn classify_clickhouse(error: &clickhouse::error::Error) -> Verdict {
    match error {
        clickhouse::error::Error::BadResponse(text) => classify_response(text),
        // The client found the rows do not match the table it described: schema drift that
        // retries will not fix, for these rows.
        clickhouse::error::Error::SchemaMismatch(text) => Verdict::Permanent {
            code: 0,
            reason: format!("schema mismatch: {text}"),
        },
        _ => Verdict::Transient,
    }
}

/// Classifies the text of a ClickHouse error response (`Code: N. DB::Exception: ...`).
pub fn classify_response(text: &str) -> Verdict {
    let Some(code) = chute_schema::server_error::exception_code(text) else {
        return Verdict::Transient; // a proxy's page, an empty body: not the server's verdict
    };
    // A materialized view failed: ClickHouse has already written the block to the source table
    // and to the views that ran before this one (an insert is not atomic across views). Any
    // split would insert those rows again under new tokens and count them twice there, so the
    // batch is retried whole under its own token instead: once the view is fixed or dropped, the
    // retry dedups where the block already is and fills the rest. The partition stalls meanwhile
    // (`chute_aggregator_partition_stalled`, `/readyz`).
    if text.contains("while pushing to view") {
        return Verdict::Transient;
    }
    let permanent = PERMANENT_CODES.contains(&code)
        || (code == TOO_MANY_PARTS && text.contains("Too many partitions for single INSERT block"));
    if permanent {
        Verdict::Permanent {
            code,
            reason: one_line(text),
        }
    } else {
        Verdict::Transient
    }
}

/// Errors go into NATS headers and logs: one line, bounded.
fn one_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut end = flat.len().min(1000);
    while !flat.is_char_boundary(end) {
        end -= 1;
    }
    flat[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permanent(text: &str) -> bool {
        matches!(classify_response(text), Verdict::Permanent { .. })
    }

    #[test]
    fn data_errors_are_permanent_and_keep_their_code() {
        let text = "Code: 53. DB::Exception: Type mismatch in IN or VALUES section. (TYPE_MISMATCH)";
        assert_eq!(
            classify_response(text),
            Verdict::Permanent {
                code: 53,
                reason: text.to_owned()
            }
        );
        assert!(permanent("Code: 117. DB::Exception: Unexpected data\n in RowBinary"));
        assert!(permanent(
            "Code: 395. DB::Exception: Value passed to 'throwIf' function is non-zero"
        ));
        assert!(permanent(
            "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)."
        ));
        assert!(permanent(
            "Code: 469. DB::Exception: Constraint `no_x` for table chute.events is violated at row 1"
        ));
    }

    #[test]
    fn server_trouble_is_transient() {
        assert!(!permanent(
            "Code: 252. DB::Exception: Too many parts (3001). Merges are processing significantly slower than inserts"
        ));
        assert!(!permanent("Code: 241. DB::Exception: Memory limit (total) exceeded"));
        assert!(!permanent("Code: 60. DB::Exception: Table chute.events does not exist"));
        assert!(!permanent("Code: 516. DB::Exception: default: Authentication failed"));
        // A missing grant or a readonly user (e.g. before `aggregator migrate` granted INSERT) is
        // fixed by the operator; the same rows then go in, so they are never dead-lettered for it.
        assert!(!permanent(
            "Code: 497. DB::Exception: chute_aggregator: Not enough privileges"
        ));
        assert!(!permanent(
            "Code: 164. DB::Exception: Cannot execute query in readonly mode"
        ));
        assert!(!permanent("Code: 202. DB::Exception: Too many simultaneous queries"));
        assert!(!permanent("<html>502 Bad Gateway</html>"));
        assert!(
            !permanent("Code: 395. DB::Exception: guard refuses: while pushing to view chute.guard_mv. (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO)"),
            "a failing view already wrote the source table: never split, retry whole"
        );
        assert_eq!(
            classify_clickhouse(&clickhouse::error::Error::TimedOut),
            Verdict::Transient,
            "timeouts are retried"
        );
    }

    #[test]
    fn codes_parse_and_reasons_are_one_bounded_line() {
        let Verdict::Permanent { reason, .. } = classify_response(&format!("Code: 6. {}\nline", "é".repeat(900)))
        else {
            panic!("permanent")
        };
        assert!(reason.len() <= 1000 && !reason.contains('\n'));
    }
}
