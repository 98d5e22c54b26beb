"""A character-level tokenizer for the demo, built with `tokenizers` and wrapped for `transformers`.

Every printable ASCII character plus newline and tab is one token; anything else maps to ``<unk>``.
Special tokens: ``<pad>`` (id 0), ``<s>`` (bos), ``</s>`` (eos, also ends every chat turn), ``<unk>`` and
the role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``.

The chat template wraps assistant content (and its closing eos) in ``{% generation %}`` markers, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` yields the assistant loss mask::

    <s><|user|>what is 3+5?</s><|assistant|>3+5=8\\nanswer: 8</s>
                                            ^^^^^^^^^^^^^^^^^^^^^ assistant mask
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "PAD_TOKEN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "ROLE_TOKENS",
    "DEFAULT_CHARSET",
    "CHAT_TEMPLATE",
    "TokenizerError",
    "build_char_tokenizer",
    "load_tokenizer",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS)

# printable ASCII (space .. ~) then newline and tab: 97 characters
DEFAULT_CHARSET: str = "".join(chr(c) for c in range(32, 127)) + "\n\t"

CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class TokenizerError(ValueError):
    """Bad tokenizer settings or a tokenizer that cannot do what the data needs."""


def build_char_tokenizer(charset: str = DEFAULT_CHARSET, model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A char-level ``PreTrainedTokenizerFast`` with pad/bos/eos/unk, role tokens and the chat template.

    Ids: the special tokens first (pad=0, bos=1, eos=2, unk=3, roles 4..6), then ``charset`` in order.
    """
    if not isinstance(charset, str) or not charset:
        raise TokenizerError("charset must be a non-empty string")
    chars = list(dict.fromkeys(charset))  # keep order, drop repeats
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        if ch in vocab:
            continue
        vocab[ch] = len(vocab)
    # BPE with no merges and no pre-tokenizer = one token per character; unknown chars -> <unk>.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN, fuse_unk=False))
    core.decoder = decoders.Fuse()  # join characters without spaces
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a saved tokenizer offline (``AutoTokenizer.from_pretrained``), never running code from the
    folder (``trust_remote_code=False``: a tokenizer that needs its own code is refused, without a prompt).
    Any failure is one TokenizerError line naming the folder."""
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer path {str(p)!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers and tokenizers raise many types for unreadable files
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise TokenizerError(f"the tokenizer in {p} cannot be loaded ({type(error).__name__}: {reason}); "
                             "give a folder with a transformers tokenizer (tokenizer.json or "
                             "tokenizer_config.json and its vocabulary)") from None
    if not isinstance(tokenizer, PreTrainedTokenizerBase) or len(tokenizer) < 1:
        raise TokenizerError(f"the tokenizer in {p} is not a transformers tokenizer ({type(tokenizer).__name__})")
    return tokenizer
