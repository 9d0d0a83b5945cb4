//! The tokenizer from the GGUF's own vocabulary and merges (GPT-2 byte-level BPE; the `smollm`
//! pre-tokenizer splits digits one by one before the byte-level regex), and the model's chat
//! template.

use candle_core::quantized::gguf_file::Content;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::AppResult;

/// GGUF token type of control tokens (`<|im_start|>`, `<|endoftext|>`, ...).
const CONTROL: i32 = 3;

fn strings(content: &Content, key: &str) -> AppResult<Vec<String>> {
    let value = content.metadata.get(key).ok_or_else(|| format!("GGUF metadata {key}: missing"))?;
    let items = value.to_vec().map_err(|e| format!("GGUF metadata {key}: {e}"))?;
    items.iter().map(|v| v.to_string().cloned().map_err(|e| format!("GGUF metadata {key}: {e}").into())).collect()
}

/// The tokenizer of the model file.
///
/// # Errors
/// Missing or malformed tokenizer metadata.
pub fn from_gguf(content: &Content) -> AppResult<Tokenizer> {
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(content, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or(format!("merge without a space: {m:?}"))
        })
        .collect::<Result<_, _>>()?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| format!("tokenizer.ggml.token_type: {e}"))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| format!("BPE from the GGUF: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == CONTROL)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}

/// The model's chat template for one user turn, ready for the assistant's answer (the GGUF's
/// `tokenizer.chat_template`: a default system turn when none is given).
pub fn chat_prompt(user: &str) -> String {
    format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
}

/// Token ids of `text` (special tokens recognised whole).
///
/// # Errors
/// What the tokenizer reports.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> AppResult<Vec<u32>> {
    Ok(tokenizer.encode(text, false).map_err(|e| format!("encode: {e}"))?.get_ids().to_vec())
}
