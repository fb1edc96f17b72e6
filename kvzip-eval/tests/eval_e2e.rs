//! One tiny end-to-end sweep on the default model (SmolLM2-135M-Instruct, fetched into the
//! kvzip cache when missing): a 160-token passkey example, three methods at ratio 0.5, written
//! to disk, resumed without recomputation, summarised.

use kvzip_eval::datasets::{load, DataOptions, DatasetName, TokenCount};
use kvzip_eval::methods::Method;
use kvzip_eval::results::{load_finished, prepare_out_dir, RunConfig};
use kvzip_eval::runner::{run_all, ModelEvaluator, RunEvent};
use kvzip_eval::summary::summarize;
use kvzip_hub::fetch::{default_cache_dir, fetch_model, DEFAULT_MODEL};
use kvzip_models::engine::{Engine, GenerateOptions};
use kvzip_templates::{ModelFamily, PromptPieces, Tokenizer};

struct Tok<'a>(&'a Tokenizer);

impl TokenCount for Tok<'_> {
    fn count(&self, text: &str) -> kvzip_eval::Result<usize> {
        Ok(self.0.encode(text)?.len())
    }
}

#[test]
fn passkey_sweep_on_the_default_model_resumes() {
    let cache = default_cache_dir().expect("kvzip cache directory");
    let dir = fetch_model(DEFAULT_MODEL, &cache).expect("default model available");
    let engine = Engine::load(&dir).expect("model loads");
    let tokenizer = Tokenizer::from_dir(&dir).expect("tokenizer loads");
    let data = DatasetName::Passkey;
    let opts = DataOptions {
        num: 1,
        context_tokens: vec![160],
        seed: 3,
        ..DataOptions::default()
    };
    let examples = load(data, &opts, &Tok(&tokenizer)).expect("passkey example");
    let pieces = match tokenizer.chat_template() {
        Ok(t) => PromptPieces::from_chat_template(&t, data.task()).expect("pieces"),
        Err(_) => {
            PromptPieces::for_family(ModelFamily::from_model_name(DEFAULT_MODEL), data.task())
        }
    };
    let prompt = pieces.encode(&tokenizer).expect("prompt ids");
    let mut generate = GenerateOptions::greedy(engine.spec(), data.max_new_tokens());
    if let Some(id) = tokenizer.token_to_id("<|im_end|>") {
        generate.stop_tokens.push(id);
    }
    let methods = vec![Method::Kvzip, Method::SnapKv, Method::Streaming];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = RunConfig {
        model: DEFAULT_MODEL.into(),
        data: data.as_str().into(),
        methods: methods.iter().map(|m| m.as_str().to_owned()).collect(),
        ratios: vec![0.5],
        metric: data.metric(),
        max_new_tokens: data.max_new_tokens(),
        data_options: serde_json::json!({"num": 1}),
    };
    prepare_out_dir(&out, &config).unwrap();
    let mut ev = ModelEvaluator::new(
        &engine,
        &tokenizer,
        prompt,
        data.task(),
        methods,
        vec![0.5],
        generate,
    );
    let mut events = Vec::new();
    let res = run_all(&out, &examples, &mut ev, &mut |e| events.push(e)).expect("sweep runs");
    assert_eq!(events, vec![RunEvent::Skipped(0), RunEvent::Done(0)]);
    let r = &res[0];
    eprintln!(
        "[eval e2e] gold {} | full {:?} | {:?}",
        r.queries[0].gold, r.queries[0].full, r.methods
    );
    assert!(
        r.n_ctx > 100 && r.n_ctx <= 160,
        "context tokens {}",
        r.n_ctx
    );
    assert!(
        r.queries[0].full.contains(&r.queries[0].gold),
        "the full cache retrieves the pass key: {:?}",
        r.queries[0].full
    );
    for recs in r.methods.values() {
        assert_eq!(recs.len(), 1);
        assert!(
            (recs[0].ratio_real - 0.5).abs() < 0.02,
            "{}",
            recs[0].ratio_real
        );
        assert_eq!(recs[0].answers.len(), 1);
    }
    // A rerun finds the finished example and evaluates nothing.
    let mut events = Vec::new();
    run_all(&out, &examples, &mut ev, &mut |e| events.push(e)).expect("resume");
    assert_eq!(events, vec![RunEvent::Skipped(1)]);
    let s = summarize(&config, &load_finished(&out).unwrap());
    assert_eq!(s.full_score(), Some(100.0));
    assert_eq!(s.methods["kvzip"].len(), 2);
}
