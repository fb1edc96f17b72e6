//! Resume logic, summary aggregation and report files on synthetic results (no model).

use std::collections::BTreeMap;

use kvzip_eval::datasets::Example;
use kvzip_eval::metrics::Metric;
use kvzip_eval::report::{markdown_table, write_report};
use kvzip_eval::results::{
    example_path, load_finished, prepare_out_dir, ExampleResult, QueryRecord, RatioRecord,
    RunConfig,
};
use kvzip_eval::runner::{run_all, ExampleEvaluator, RunEvent};
use kvzip_eval::summary::summarize;
use kvzip_eval::Result;

fn config() -> RunConfig {
    RunConfig {
        model: "m".into(),
        data: "squad".into(),
        methods: vec!["kvzip".into(), "snapkv".into()],
        ratios: vec![0.5, 0.1],
        metric: Metric::Include,
        max_new_tokens: 8,
        data_options: serde_json::json!({"num": 3}),
    }
}

fn examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| Example {
            id: format!("ex-{i}"),
            context: format!("context {i}"),
            questions: vec!["q1".into(), "q2".into()],
            answers: vec!["yes".into(), "blue".into()],
        })
        .collect()
}

/// Answers "yes" everywhere; "blue" only with the full cache and kvzip at 0.5.
struct Scripted {
    calls: Vec<usize>,
    fail_at: Option<usize>,
}

impl ExampleEvaluator for Scripted {
    fn evaluate(&mut self, index: usize, ex: &Example) -> Result<ExampleResult> {
        if self.fail_at == Some(index) {
            return Err(kvzip_eval::EvalError::Input("interrupted".into()));
        }
        self.calls.push(index);
        let rec = |ratio: f64, blue: bool| RatioRecord {
            ratio,
            ratio_real: ratio,
            answers: vec!["Yes.".into(), if blue { "Blue!" } else { "red" }.into()],
        };
        let methods = BTreeMap::from([
            ("kvzip".to_owned(), vec![rec(0.5, true), rec(0.1, false)]),
            ("snapkv".to_owned(), vec![rec(0.5, false), rec(0.1, false)]),
        ]);
        Ok(ExampleResult {
            id: ex.id.clone(),
            index,
            n_sys: 3,
            n_ctx: 10,
            queries: ex
                .questions
                .iter()
                .zip(&ex.answers)
                .map(|(q, g)| QueryRecord {
                    question: q.clone(),
                    gold: g.clone(),
                    full: format!("the {g}"),
                })
                .collect(),
            methods,
            timings_ms: BTreeMap::new(),
        })
    }
}

#[test]
fn interrupted_run_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    prepare_out_dir(&out, &config()).unwrap();
    let exs = examples(3);
    let mut ev = Scripted {
        calls: vec![],
        fail_at: Some(2),
    };
    assert!(run_all(&out, &exs, &mut ev, &mut |_| {}).is_err());
    assert_eq!(ev.calls, vec![0, 1]);
    assert!(example_path(&out, 1).exists() && !example_path(&out, 2).exists());

    let mut ev = Scripted {
        calls: vec![],
        fail_at: None,
    };
    let mut events = Vec::new();
    let res = run_all(&out, &exs, &mut ev, &mut |e| events.push(e)).unwrap();
    assert_eq!(
        ev.calls,
        vec![2],
        "only the unfinished example is evaluated"
    );
    assert_eq!(events, vec![RunEvent::Skipped(2), RunEvent::Done(2)]);
    assert_eq!(
        res.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(load_finished(&out).unwrap().len(), 3);
    // No temp files left behind by the atomic writes.
    let names: Vec<String> = std::fs::read_dir(out.join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".json")), "{names:?}");
}

#[test]
fn resume_refuses_other_settings_or_changed_data() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    prepare_out_dir(&out, &config()).unwrap();
    prepare_out_dir(&out, &config()).unwrap();
    let mut more = config();
    more.data_options = serde_json::json!({"num": 5});
    prepare_out_dir(&out, &more).expect("a larger --num extends the run");
    let mut other = config();
    other.ratios = vec![0.3];
    let e = prepare_out_dir(&out, &other).unwrap_err().to_string();
    assert!(e.contains("--out"), "{e}");
    let mut ev = Scripted {
        calls: vec![],
        fail_at: None,
    };
    run_all(&out, &examples(1), &mut ev, &mut |_| {}).unwrap();
    let mut changed = examples(1);
    changed[0].id = "other".into();
    let e = run_all(&out, &changed, &mut ev, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("other") && e.contains("--out"), "{e}");
    std::fs::write(example_path(&out, 0), "{ broken").unwrap();
    let e = load_finished(&out).unwrap_err().to_string();
    assert!(e.contains("00000.json") && e.contains("delete"), "{e}");
}

#[test]
fn summary_averages_over_all_queries_with_full_cache_at_ratio_one() {
    let mut ev = Scripted {
        calls: vec![],
        fail_at: None,
    };
    let results: Vec<ExampleResult> = examples(2)
        .iter()
        .enumerate()
        .map(|(i, e)| ev.evaluate(i, e).unwrap())
        .collect();
    let s = summarize(&config(), &results);
    assert_eq!((s.n_examples, s.n_queries), (2, 4));
    let kvzip: Vec<(f64, f64)> = s.methods["kvzip"]
        .iter()
        .map(|p| (p.ratio, p.score))
        .collect();
    assert_eq!(kvzip, vec![(0.1, 50.0), (0.5, 100.0), (1.0, 100.0)]);
    assert_eq!(s.score_at("snapkv", 0.5), Some(50.0));
    assert_eq!(s.full_score(), Some(100.0));
    let json = s.methods_json();
    assert_eq!(json["kvzip"][2]["ratio"], 1.0);
    assert_eq!(json["snapkv"][0]["score"], 50.0);
    // Two examples: every point has a bootstrap interval that brackets its mean.
    for pts in s.methods.values() {
        for p in pts {
            let (lo, hi) = (p.ci_low.unwrap(), p.ci_high.unwrap());
            assert!(lo <= p.score && p.score <= hi, "{p:?}");
        }
    }
    let table = markdown_table(&s);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "| ratio | kvzip | snapkv |");
    assert!(
        lines[2].starts_with("| 1.0 (full) | 100.0 ["),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].starts_with("| 0.5 | 100.0 [") && lines[3].contains("] (100%) | 50.0 ["),
        "{}",
        lines[3]
    );
    assert!(lines[4].contains("(50%)"), "{}", lines[4]);
}

#[test]
fn report_writes_tables_json_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("results/m/squad");
    prepare_out_dir(&out, &config()).unwrap();
    let mut ev = Scripted {
        calls: vec![],
        fail_at: None,
    };
    run_all(&out, &examples(2), &mut ev, &mut |_| {}).unwrap();
    let rep = tmp.path().join("report");
    let files = write_report(&tmp.path().join("results"), &rep).unwrap();
    assert_eq!(files.len(), 6);
    // One self-contained HTML page: tables and the plot inline, nothing fetched.
    let html = std::fs::read_to_string(rep.join("report.html")).unwrap();
    assert!(html.contains("<table") && html.contains("<svg") && html.contains("m / squad"));
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    let md = std::fs::read_to_string(rep.join("m-squad.md")).unwrap();
    assert!(
        md.contains("| 1.0 (full) |") && md.contains("m-squad.png"),
        "{md}"
    );
    let svg = std::fs::read_to_string(rep.join("m-squad.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("kvzip") && svg.contains("<polyline"));
    let png = std::fs::read(rep.join("m-squad.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 5_000, "PNG has content ({} bytes)", png.len());
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rep.join("m-squad.json")).unwrap()).unwrap();
    assert_eq!(js["n_queries"], 4);
    assert!(std::fs::read_to_string(rep.join("report.md"))
        .unwrap()
        .contains("## m / squad"));
    let e = write_report(&tmp.path().join("report"), &rep)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no results"), "{e}");
}
