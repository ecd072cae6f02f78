//! Chat templates rendered by minijinja (src/model/chat.rs) against transformers'
//! `apply_chat_template` (Jinja2 in transformers' sandbox): tests/data/chat/cases.json, written
//! by scripts/chat_reference.py. Covers SmolLM2's and Llama 3's templates and ones in the styles
//! of Llama 2 chat (raise_exception, `.strip()`, slices), Zephyr (trim_blocks / lstrip_blocks)
//! and a `tojson` dump.

use wegeft::model::{ChatMessage, ChatTemplate};

#[test]
fn minijinja_renders_what_transformers_renders() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat/cases.json");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = |k: &str| Some(r[k].as_str().unwrap().to_string());
    let chats: Vec<Vec<ChatMessage>> = serde_json::from_value(r["chats"].clone()).unwrap();
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 30);
    for c in cases {
        let name = c["template"].as_str().unwrap();
        let src = r["templates"][name].as_str().unwrap();
        let t = ChatTemplate::from_jinja(src).unwrap().with_special_tokens(tok("bos_token"), tok("eos_token"), None);
        let chat = &chats[c["chat"].as_u64().unwrap() as usize];
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let got = t.render(chat, gen);
        match (c["text"].as_str(), c["error"].as_str()) {
            (Some(want), _) => assert_eq!(got.unwrap(), want, "{name}, chat {}, generation prompt {gen}", c["chat"]),
            (None, Some(msg)) => {
                let e = got.unwrap_err().to_string();
                assert!(e.contains(msg), "{name}: {e:?} should carry {msg:?}");
            }
            _ => panic!("bad case {c}"),
        }
    }
    // The crate's own copies of the two real templates are the ones checked here.
    assert_eq!(r["templates"]["smollm2"], wegeft::model::chat::SMOLLM2_CHAT_TEMPLATE);
    assert_eq!(r["templates"]["llama3"], wegeft::model::chat::LLAMA3_CHAT_TEMPLATE);
}
