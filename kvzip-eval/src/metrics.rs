//! Task metrics (KVZIP-SPEC §6.4): SQuAD-style normalisation, the include score used by squad,
//! needle and retrieval tasks, and the GSM8K "the answer is" check.

use serde::{Deserialize, Serialize};

/// How a prediction is scored against its gold answer; every score is in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// 1 if the normalised gold is a substring of the normalised prediction.
    Include,
    /// 1 if the text after the last "the answer is " (lower-cased prediction) contains the gold.
    Gsm,
}

impl Metric {
    /// The name used in summaries: `include` or `gsm`.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Include => "include",
            Metric::Gsm => "gsm",
        }
    }

    /// Scores `prediction` against `gold` (0 for an empty prediction).
    pub fn score(self, prediction: &str, gold: &str) -> f64 {
        match self {
            Metric::Include => include_score(prediction, gold),
            Metric::Gsm => gsm_score(prediction, gold),
        }
    }
}

/// Number words replaced by digits during normalisation.
const NUMBER_WORDS: [(&str, &str); 21] = [
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
    ("eleven", "11"),
    ("twelve", "12"),
    ("thirteen", "13"),
    ("fourteen", "14"),
    ("fifteen", "15"),
    ("sixteen", "16"),
    ("seventeen", "17"),
    ("eighteen", "18"),
    ("nineteen", "19"),
    ("twenty", "20"),
];

/// Strips a trailing `</s>` and surrounding whitespace from a model answer.
pub fn clean_prediction(prediction: &str) -> &str {
    let p = prediction.trim();
    p.strip_suffix("</s>").unwrap_or(p).trim()
}

/// Answer normalisation: lower case, ASCII punctuation removed, the articles a/an/the dropped,
/// number words zero..twenty turned into digits, whitespace squashed to single spaces.
pub fn normalize(text: &str) -> String {
    let lower: String = text
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(|w| {
            NUMBER_WORDS
                .iter()
                .find(|(word, _)| *word == w)
                .map_or(w, |(_, digit)| digit)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Include score: 1 when `normalize(gold)` occurs in `normalize(prediction)`, else 0; an empty
/// prediction (after removing `</s>`) scores 0.
pub fn include_score(prediction: &str, gold: &str) -> f64 {
    let pred = clean_prediction(prediction);
    if pred.is_empty() {
        return 0.0;
    }
    f64::from(u8::from(normalize(pred).contains(&normalize(gold))))
}

/// The gold answer of a GSM8K solution: the text after the last `#### `, trimmed (the whole
/// string when there is no marker).
pub fn gsm_gold(solution: &str) -> &str {
    solution
        .rsplit_once("####")
        .map_or(solution, |(_, tail)| tail)
        .trim()
}

/// GSM8K score: the prediction is lower-cased and cut after its last `"the answer is "` (the
/// whole prediction when the phrase is missing, like Python's `split(...)[-1]`); 1 when that
/// tail contains `gold` verbatim (no normalisation), else 0. Empty predictions score 0.
pub fn gsm_score(prediction: &str, gold: &str) -> f64 {
    let pred = clean_prediction(prediction).to_lowercase();
    if pred.is_empty() || gold.is_empty() {
        return 0.0;
    }
    let tail = pred
        .rsplit_once("the answer is ")
        .map_or(pred.as_str(), |(_, t)| t);
    f64::from(u8::from(tail.contains(gold)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_follows_squad_rules() {
        assert_eq!(normalize("The  Denver Broncos!"), "denver broncos");
        assert_eq!(normalize("An apple, a day."), "apple day");
        assert_eq!(normalize("Two thousand"), "2 thousand");
        assert_eq!(normalize("Saint-Denis"), "saintdenis");
    }

    #[test]
    fn include_is_substring_after_normalisation() {
        assert_eq!(
            include_score("It was the Denver Broncos.", "Denver Broncos"),
            1.0
        );
        assert_eq!(include_score("Carolina", "Denver Broncos"), 0.0);
        assert_eq!(include_score("  </s>", "x"), 0.0);
        assert_eq!(include_score("eleven people", "11"), 1.0);
    }

    #[test]
    fn gsm_uses_the_last_answer_sentence() {
        assert_eq!(gsm_gold("3 + 4 = 7\n#### 7"), "7");
        assert_eq!(gsm_score("So 3+4=7. The answer is 7.", "7"), 1.0);
        assert_eq!(gsm_score("The answer is 7. No, the answer is 8.", "7"), 0.0);
        assert_eq!(gsm_score("It is 18", "18"), 1.0);
        assert_eq!(gsm_score("", "18"), 0.0);
    }
}
