//! One module per subcommand.

pub mod eval;
pub mod fetch;
pub mod generate;
pub mod head_scores;
pub mod profile;
pub mod report;
pub mod run;
pub mod serve;
