//! Dataset parsing and generation on small synthetic files, including the error messages.

use std::path::Path;

use kvzip_eval::datasets::{load, split_gsm_problem, DataOptions, DatasetName, WordCount};
use kvzip_eval::generated::{insert_at_depth, truncate_to_tokens, NEEDLE, NEEDLE_ANSWER};
use kvzip_eval::metrics::Metric;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn opts(file: Option<std::path::PathBuf>, num: usize) -> DataOptions {
    DataOptions {
        data_file: file,
        num,
        ..DataOptions::default()
    }
}

const SQUAD: &str = r#"{"version": "1.1", "data": [{"title": "T", "paragraphs": [
 {"context": "Paris is the capital of France.", "qas": [
   {"id": "a", "question": "What is the capital of France?", "answers": [{"text": "Paris", "answer_start": 0}, {"text": "paris", "answer_start": 0}]},
   {"id": "b", "question": "Which country?", "answers": [{"text": "France", "answer_start": 24}]}]},
 {"context": "Second.", "qas": [{"id": "c", "question": "Q?", "answers": [{"text": "S", "answer_start": 0}]}]}
]}]}"#;

#[test]
fn squad_groups_questions_by_context() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), "squad.json", SQUAD);
    let ex = load(DatasetName::Squad, &opts(Some(f.clone()), 10), &WordCount).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].questions.len(), 2);
    assert_eq!(ex[0].answers, vec!["Paris", "France"]);
    assert_eq!(ex[1].id, "squad-1");
    let one = load(DatasetName::Squad, &opts(Some(f.clone()), 1), &WordCount).unwrap();
    assert_eq!(one.len(), 1);
    let capped = DataOptions {
        max_questions: Some(1),
        ..opts(Some(f), 1)
    };
    assert_eq!(
        load(DatasetName::Squad, &capped, &WordCount).unwrap()[0]
            .questions
            .len(),
        1
    );
}

#[test]
fn squad_errors_name_the_file_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.json");
    let e = load(DatasetName::Squad, &opts(Some(missing), 1), &WordCount)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json") && e.contains("--data-file"), "{e}");
    let bad = write(tmp.path(), "bad.json", "{\"data\": 3}");
    let e = load(DatasetName::Squad, &opts(Some(bad), 1), &WordCount)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.json") && e.contains("\"data\""), "{e}");
    let noq = write(
        tmp.path(),
        "noq.json",
        r#"{"data": [{"paragraphs": [{"context": "c", "qas": [{"answers": []}]}]}]}"#,
    );
    let e = load(DatasetName::Squad, &opts(Some(noq), 1), &WordCount)
        .unwrap_err()
        .to_string();
    assert!(e.contains("data[0].paragraphs[0].qas[0]"), "{e}");
}

#[test]
fn gsm8k_splits_context_and_question() {
    let long = "word ".repeat(80);
    let text = format!(
        "{{\"question\": \"{long}one. Tom has 3 apples. How many apples does Tom have?\", \"answer\": \"3 apples\\n#### 3\"}}\n\
         {{\"question\": \"Too short. How many?\", \"answer\": \"#### 1\"}}\n"
    );
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), "gsm.jsonl", &text);
    let ex = load(DatasetName::Gsm8k, &opts(Some(f), 5), &WordCount).unwrap();
    assert_eq!(ex.len(), 1, "the short context is skipped");
    assert!(ex[0].context.ends_with("Tom has 3 apples."));
    assert_eq!(ex[0].questions, vec!["How many apples does Tom have?"]);
    assert_eq!(ex[0].answers, vec!["3"]);
    assert_eq!(
        split_gsm_problem("A b. C d. E?"),
        Some(("A b. C d.".to_owned(), "E?".to_owned()))
    );
    assert_eq!(split_gsm_problem("Only one?"), None);
}

#[test]
fn gsm8k_malformed_line_is_reported_with_line_number() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(
        tmp.path(),
        "gsm.jsonl",
        "{\"question\": \"a. b?\", \"answer\": \"#### 1\"}\n{not json\n",
    );
    let e = load(DatasetName::Gsm8k, &opts(Some(f.clone()), 5), &WordCount)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gsm.jsonl line 2") && e.contains("malformed JSON"),
        "{e}"
    );
    std::fs::write(&f, "{\"question\": \"a. b?\", \"answer\": \"1\"}\n").unwrap();
    let e = load(DatasetName::Gsm8k, &opts(Some(f), 5), &WordCount)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 1") && e.contains("####"), "{e}");
}

#[test]
fn dataset_names_lengths_and_metrics_follow_the_spec() {
    let e = "squadx".parse::<DatasetName>().unwrap_err().to_string();
    assert!(e.contains("squadx") && e.contains("kv-retrieval"), "{e}");
    let d = |s: &str| s.parse::<DatasetName>().unwrap();
    assert_eq!(d("needle").max_new_tokens(), 32);
    assert_eq!(d("needle-multikey").max_new_tokens(), 32);
    assert_eq!(d("squad").max_new_tokens(), 256);
    assert_eq!(d("gsm8k").max_new_tokens(), 512);
    assert_eq!(d("kv-retrieval").max_new_tokens(), 96);
    assert_eq!(d("passkey").max_new_tokens(), 96);
    assert_eq!(d("gsm8k").metric(), Metric::Gsm);
    assert_eq!(d("squad").metric(), Metric::Include);
}

fn essays(dir: &Path) {
    let s = "Alpha beta gamma delta. Epsilon zeta eta theta. Iota kappa lambda mu. ".repeat(60);
    write(dir, "a.txt", &s);
    write(dir, "b.txt", &s);
}

#[test]
fn needle_grid_has_requested_lengths_and_depths() {
    let tmp = tempfile::tempdir().unwrap();
    essays(tmp.path());
    let o = DataOptions {
        data_file: Some(tmp.path().to_owned()),
        num: 10,
        context_tokens: vec![100, 200],
        depths: vec![0, 50, 100],
        ..DataOptions::default()
    };
    let ex = load(DatasetName::Needle, &o, &WordCount).unwrap();
    // The 2 x 3 grid, then a replica over a haystack starting at another essay.
    assert_eq!(ex.len(), 10);
    assert_eq!(ex[4].id, "needle-200-50");
    assert_eq!(ex[6].id, "needle-100-0-r1");
    for e in &ex {
        assert!(e.context.contains(NEEDLE));
        assert_eq!(e.answers, vec![NEEDLE_ANSWER]);
        let len: usize = e.id.split('-').nth(1).unwrap().parse().unwrap();
        assert!(e.id.split('-').count() <= 4, "{}", e.id);
        let n = e.context.split_whitespace().count();
        assert!(n <= len && n + 12 >= len, "{}: {n} words", e.id);
    }
    assert!(ex[0].context.starts_with(NEEDLE));
    assert!(ex[2].context.trim_end().ends_with(NEEDLE));
    let mid = &ex[1].context;
    let at = mid.find(NEEDLE).unwrap();
    assert!(
        mid[..at].trim_end().ends_with('.'),
        "inserted after a sentence end"
    );
}

#[test]
fn generated_tasks_are_deterministic_and_sized() {
    let tmp = tempfile::tempdir().unwrap();
    essays(tmp.path());
    let o = DataOptions {
        data_file: Some(tmp.path().to_owned()),
        num: 2,
        context_tokens: vec![300],
        keys: 3,
        seed: 7,
        ..DataOptions::default()
    };
    for name in [
        DatasetName::NeedleMultikey,
        DatasetName::KvRetrieval,
        DatasetName::Passkey,
    ] {
        let a = load(name, &o, &WordCount).unwrap();
        let b = load(name, &o, &WordCount).unwrap();
        assert_eq!(a, b, "{name} is deterministic");
        assert_eq!(a.len(), 2);
        assert_ne!(a[0].context, a[1].context);
        for ex in &a {
            assert_eq!(ex.questions.len(), ex.answers.len());
            for ans in &ex.answers {
                assert!(
                    ex.context.contains(ans.as_str()),
                    "{name}: gold {ans} in context"
                );
            }
        }
    }
    let kv = load(DatasetName::KvRetrieval, &o, &WordCount).unwrap();
    assert_eq!(kv[0].questions.len(), 3);
    assert!(kv[0].questions[0].starts_with("Key: \""));
    let e = load(
        DatasetName::Needle,
        &DataOptions {
            data_file: Some(tmp.path().join("missing")),
            ..o
        },
        &WordCount,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("missing") && e.contains("--data-file"), "{e}");
}

#[test]
fn truncation_and_insertion_helpers() {
    let t = "a b c d e f";
    assert_eq!(truncate_to_tokens(t, 3, &WordCount).unwrap(), "a b c");
    assert_eq!(truncate_to_tokens(t, 0, &WordCount).unwrap(), "");
    assert_eq!(truncate_to_tokens(t, 99, &WordCount).unwrap(), t);
    assert_eq!(
        insert_at_depth("One. Two. Three.", "X.", 60),
        "One. Two. X. Three."
    );
    assert_eq!(insert_at_depth("One. Two.", "X.", 100), "One. Two. X.");
    assert_eq!(insert_at_depth("One. Two.", "X.", 0), "X. One. Two.");
}
