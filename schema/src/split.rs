//! The statement splitter: one migration file holds several statements, each ended by a `;`
//! outside strings, quoted identifiers and comments. Comments are stripped, so what reaches
//! ClickHouse (and the golden files) is only the statements.

use crate::error::{Error, Result};

/// Splits SQL text into statements: each ends at a `;` outside `'strings'`, `"identifiers"`,
/// `` `identifiers` ``, `-- comments` and `/* comments */`; the text after the last `;` is a
/// statement too. Comments are removed (a line holding only a comment disappears), statements
/// are trimmed, and empty ones dropped. `file_name` only labels errors.
pub fn split_statements(file_name: &str, sql: &str) -> Result<Vec<String>> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' | '`' => {
                current.push(c);
                let mut closed = false;
                while let Some(inner) = chars.next() {
                    current.push(inner);
                    if inner == '\\' {
                        if let Some(escaped) = chars.next() {
                            current.push(escaped);
                        }
                    } else if inner == c {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    let what = if c == '\'' {
                        "string literal"
                    } else {
                        "quoted identifier"
                    };
                    return Err(Error::Unterminated {
                        file_name: file_name.to_owned(),
                        what,
                    });
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                for skipped in chars.by_ref() {
                    if skipped == '\n' {
                        break;
                    }
                }
                end_line_after_comment(&mut current);
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut previous = '\0';
                let mut closed = false;
                for inner in chars.by_ref() {
                    if previous == '*' && inner == '/' {
                        closed = true;
                        break;
                    }
                    previous = inner;
                }
                if !closed {
                    return Err(Error::Unterminated {
                        file_name: file_name.to_owned(),
                        what: "block comment",
                    });
                }
                current.push(' ');
            }
            ';' => push_statement(&mut statements, &mut current),
            _ => current.push(c),
        }
    }
    push_statement(&mut statements, &mut current);
    Ok(statements)
}

/// After a `--` comment: drop the line entirely if only whitespace preceded the comment,
/// otherwise end the line (without the trailing blanks before the comment).
fn end_line_after_comment(current: &mut String) {
    let trimmed_len = current.trim_end_matches([' ', '\t']).len();
    current.truncate(trimmed_len);
    if current.is_empty() || current.ends_with('\n') {
        return;
    }
    current.push('\n');
}

fn push_statement(statements: &mut Vec<String>, current: &mut String) {
    let statement = current.trim();
    if !statement.is_empty() {
        statements.push(statement.to_owned());
    }
    current.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_semicolons_outside_strings_and_comments() {
        let sql = "-- header; not a statement\n\
                   CREATE TABLE a (s String DEFAULT 'x;y') ENGINE = Memory;\n\
                   /* block; comment */ SELECT 'it''s; fine', \"we;ird\", `b;t` -- tail; comment\n\
                   FROM t;\n\
                   SELECT 'back\\'slash;';\n\
                   \n-- only a comment;\n";
        let statements = split_statements("f.sql", sql).unwrap();
        assert_eq!(
            statements,
            vec![
                "CREATE TABLE a (s String DEFAULT 'x;y') ENGINE = Memory",
                "SELECT 'it''s; fine', \"we;ird\", `b;t`\nFROM t",
                "SELECT 'back\\'slash;'",
            ]
        );
    }

    #[test]
    fn last_statement_needs_no_semicolon() {
        assert_eq!(
            split_statements("f.sql", "SELECT 1;\nSELECT 2\n").unwrap(),
            vec!["SELECT 1", "SELECT 2"]
        );
    }

    #[test]
    fn unterminated_string_names_the_file() {
        let error = split_statements("0009_bad.sql", "SELECT 'oops;").unwrap_err();
        assert_eq!(error.to_string(), "0009_bad.sql: unterminated string literal");
        let error = split_statements("0009_bad.sql", "SELECT 1 /* open").unwrap_err();
        assert_eq!(error.to_string(), "0009_bad.sql: unterminated block comment");
    }

    #[test]
    fn a_file_of_only_comments_has_no_statements() {
        assert!(split_statements("f.sql", "-- nothing here;\n/* nor; here */\n;\n")
            .unwrap()
            .is_empty());
    }
}
