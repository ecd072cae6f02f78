#!/usr/bin/env python3
"""Writes tests/data/chat/cases.json: chat templates rendered by transformers'
`apply_chat_template(..., tokenize=False)` (Jinja2 in transformers' sandbox), for
tests/chat_templates.rs to compare with this crate's minijinja rendering.

The templates: SmolLM2-Instruct's and Meta Llama 3 Instruct's (as the crate embeds them), and
templates written in the styles of Llama 2 chat (system block, alternating roles checked with
raise_exception, `.strip()`, slices), Zephyr/TinyLlama (block tags on their own lines, so
trim_blocks/lstrip_blocks matter) and one that dumps the messages with `tojson`.

    /tmp/pt/bin/python scripts/chat_reference.py --tokenizer .cache/llama3/tokenizer.json
"""
import argparse
import json
import os

from transformers import PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "data", "chat")

SMOLLM2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"

LLAMA2_STYLE = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"

ZEPHYR_STYLE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""

TOJSON = "{{ messages | tojson }}\n{{ messages[-1] | tojson(indent=2) }}\n{% for m in messages %}{{ m.role.upper() }}:{{ m.content.split()|length }} {% endfor %}"

TEMPLATES = dict(smollm2=SMOLLM2, llama3=LLAMA3, llama2_style=LLAMA2_STYLE, zephyr_style=ZEPHYR_STYLE,
                 tojson=TOJSON)

CHATS = [
    [dict(role="user", content="What is 345 + 678?")],
    [dict(role="system", content="You are terse."), dict(role="user", content="  Hi!\n"),
     dict(role="assistant", content=" Hello. "), dict(role="user", content="Count: 1 2 3 \"quoted\" é")],
    [dict(role="user", content="one"), dict(role="user", content="two")],  # roles do not alternate
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="any tokenizer.json (only rendering is used)")
    a = ap.parse_args()
    tok = PreTrainedTokenizerFast(tokenizer_file=a.tokenizer, bos_token="<s>", eos_token="</s>")
    cases = []
    for name, t in TEMPLATES.items():
        for i, msgs in enumerate(CHATS):
            for gen in (True, False):
                try:
                    text = tok.apply_chat_template(msgs, chat_template=t, add_generation_prompt=gen, tokenize=False)
                    err = None
                except Exception as e:  # raise_exception
                    text, err = None, str(e)
                cases.append(dict(template=name, chat=i, add_generation_prompt=gen, text=text, error=err))
    os.makedirs(OUT, exist_ok=True)
    json.dump(dict(bos_token="<s>", eos_token="</s>", templates=TEMPLATES, chats=CHATS, cases=cases),
              open(os.path.join(OUT, "cases.json"), "w"), ensure_ascii=False, indent=0)
    for c in cases:
        print(c["template"], c["chat"], c["add_generation_prompt"], repr(c["text"])[:100], c["error"])


if __name__ == "__main__":
    main()
