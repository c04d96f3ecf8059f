//! The rules file: YAML -> validated [`crate::spec::RuleSet`], with errors that name the line.
//! Owned by RULES (to be completed).
