import pytest
from transformers import AutoTokenizer

from pipeline.data.tokenizer import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLE_TOKENS,
    TokenizerError,
    build_char_tokenizer,
    load_tokenizer,
)

SAMPLES = [
    "what is 3+5-2?",
    "3+5=8\n8-2=6\nanswer: 6",
    "mia saw 4 red boxes at the market.  note: tab\there ~{}[]|\\",
    "",
]
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is 3+5?"},
    {"role": "assistant", "content": "3+5=8\nanswer: 8"},
]


def test_special_tokens(tokenizer):
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == 0
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == EOS_TOKEN
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id,
           *tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS))}
    assert len(ids) == 7
    assert len(tokenizer) == 7 + 97
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_one_token_per_char(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_special_tokens_in_text_are_single_tokens(tokenizer):
    ids = tokenizer("<s>ab</s>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 4
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer("aé", add_special_tokens=False)["input_ids"]
    assert ids[1] == tokenizer.unk_token_id


def test_chat_template_text(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text == "<s><|system|>be brief</s><|user|>what is 3+5?</s><|assistant|>3+5=8\nanswer: 8</s>"
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>be brief</s><|user|>what is 3+5?</s><|assistant|>"
    assert text.startswith(prompt)


def test_chat_template_rejects_unknown_roles(tokenizer):
    with pytest.raises(Exception, match="role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_assistant_mask_from_generation_markers(tokenizer):
    out = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "3+5=8\nanswer: 8</s>"


def test_save_and_load_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path, local_files_only=True), load_tokenizer(tmp_path)):
        assert loaded.get_vocab() == tokenizer.get_vocab()
        assert loaded.chat_template == CHAT_TEMPLATE
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
        for text in SAMPLES:
            assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
            assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
        a = loaded.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        b = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert a["input_ids"] == b["input_ids"] and a["assistant_masks"] == b["assistant_masks"]


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="charset"):
        build_char_tokenizer(charset="")


def test_custom_charset():
    tok = build_char_tokenizer(charset="ab\n")
    assert len(tok) == 10
    assert tok.decode(tok("ab\nc", add_special_tokens=False)["input_ids"]) == "ab\n<unk>"
