//! One module per subcommand.

pub mod fetch;
pub mod generate;
pub mod head_scores;
pub mod profile;
pub mod run;
