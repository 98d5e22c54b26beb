"""Assistant-token masks for chat templates without `{% generation %}` markers (every released one).

The templates below are the published ones (the `chat_template` of each model's tokenizer_config.json),
rendered with SmolLM2's real byte-level BPE tokenizer given the special tokens each template needs. Each
test decodes the masked tokens, span by span, and compares them with the assistant contents and their
end-of-turn tokens.
"""

from __future__ import annotations

import pytest

from pipeline.data.loading import DataLoadError, has_generation_markers, tokenize_row
from pipeline.data.tokenizer import CHAT_TEMPLATE, build_char_tokenizer

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen/Qwen2.5-*-Instruct
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# mistralai/Mistral-7B-Instruct-v0.2 (and Mixtral-8x7B-Instruct-v0.1)
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# mistralai/Mistral-7B-Instruct-v0.3: the system message goes into the user message that is the last message
# (`loop.last`), so it is in the prompt and gone once the reply follows: no prefix property with a system message
MISTRAL_V3 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

SINGLE = [{"role": "user", "content": "what is 3+5-2?"},
          {"role": "assistant", "content": "3+5=8\n8-2=6\nanswer: 6"}]
MULTI = [{"role": "user", "content": "what is 1+1?"},
         {"role": "assistant", "content": "1+1=2\nanswer: 2"},
         {"role": "user", "content": "and 2+2? Say it in words."},
         {"role": "assistant", "content": "Two plus two is four.\nanswer: 4"}]
SYSTEM = [{"role": "system", "content": "Answer briefly."}, *MULTI]


def masked_spans(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The masked tokens decoded, one string per maximal run of masked tokens."""
    spans, run = [], []
    for token, marked in [*zip(ids, mask), (None, 0)]:
        if marked:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


def variant(base, template: str, *, bos: str | None, eos: str, special: list[str]):
    """SmolLM2's BPE with another model's chat template and the special tokens that template writes."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_str(base.backend_tokenizer.to_str())
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos,
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def templates(smollm2_tokenizer):
    """name -> (tokenizer, end-of-turn token)."""
    return {
        "smollm2": (smollm2_tokenizer, "<|im_end|>"),
        "llama3": (variant(smollm2_tokenizer, LLAMA3, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                           special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                    "<|end_header_id|>", "<|eot_id|>"]), "<|eot_id|>"),
        "qwen2.5": (variant(smollm2_tokenizer, QWEN25, bos=None, eos="<|im_end|>",
                            special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), "<|im_end|>"),
        "mistral": (variant(smollm2_tokenizer, MISTRAL, bos="<s>", eos="</s>", special=["<s>", "</s>"]), "</s>"),
    }


@pytest.mark.parametrize("name", ["smollm2", "llama3", "qwen2.5", "mistral"])
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_masks_are_each_assistant_content_and_its_end_of_turn_token(templates, name, messages):
    tokenizer, end = templates[name]
    assert not has_generation_markers(tokenizer)
    ids, mask = tokenize_row({"messages": messages}, tokenizer)
    assert masked_spans(tokenizer, ids, mask) == [m["content"] + end for m in messages if m["role"] == "assistant"]
    # the ids are the one tokenisation apply_chat_template gives (bos once, as the template writes it)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    if tokenizer.bos_token_id is not None and name != "smollm2":  # SmolLM2's bos is <|im_start|>
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id and not mask[0]


def test_smollm2_default_system_prompt_and_headers_are_not_masked(smollm2_tokenizer):
    ids, mask = tokenize_row({"messages": MULTI}, smollm2_tokenizer)
    text = smollm2_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # injected
    unmasked = smollm2_tokenizer.decode([token for token, marked in zip(ids, mask) if not marked])
    assert unmasked == text.replace(MULTI[1]["content"] + "<|im_end|>", "").replace(MULTI[3]["content"] + "<|im_end|>", "")
    assert unmasked.count("<|im_start|>assistant\n") == 2 and unmasked.endswith("<|im_start|>assistant\n\n")
    with_system = tokenize_row({"messages": SYSTEM}, smollm2_tokenizer)
    assert "SmolLM" not in smollm2_tokenizer.decode(with_system[0])  # a given system message replaces it
    assert masked_spans(smollm2_tokenizer, *with_system) == [MULTI[1]["content"] + "<|im_end|>",
                                                             MULTI[3]["content"] + "<|im_end|>"]


def test_templates_that_trim_or_lead_with_a_space(templates, smollm2_tokenizer):
    """Llama-3 trims the content; Mistral v0.3 writes one space before it (the model generates it too)."""
    tokenizer, _ = templates["llama3"]
    messages = [SINGLE[0], {"role": "assistant", "content": "  answer: 6 \n"}]
    assert masked_spans(tokenizer, *tokenize_row({"messages": messages}, tokenizer)) == ["answer: 6<|eot_id|>"]
    v3 = variant(smollm2_tokenizer, MISTRAL_V3, bos="<s>", eos="</s>", special=["<s>", "</s>", "[INST]", "[/INST]"])
    ids, mask = tokenize_row({"messages": MULTI}, v3)  # without a system message it renders turn by turn
    assert masked_spans(v3, ids, mask) == [" " + m["content"] + "</s>" for m in MULTI if m["role"] == "assistant"]


# Reasoning of assistant turns before the last user message is dropped (as Qwen3's template does)
DROPS_EARLIER_REASONING = (
    "{%- set ns = namespace(last_user=0) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- set content = m.content %}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


def test_templates_without_the_prefix_property_are_refused_in_one_line(smollm2_tokenizer):
    rewrites = variant(smollm2_tokenizer, DROPS_EARLIER_REASONING, bos=None, eos="<|im_end|>", special=[])
    thinking = [MULTI[0], {"role": "assistant", "content": "<think>one and one</think>\n1+1=2\nanswer: 2"}, *MULTI[2:]]
    assert masked_spans(rewrites, *tokenize_row({"messages": thinking[:2]}, rewrites)) == [
        thinking[1]["content"] + "<|im_end|>"]  # one turn: nothing is rewritten
    with pytest.raises(DataLoadError) as info:
        tokenize_row({"messages": thinking}, rewrites, 7)
    assert str(info.value) == (
        "row 7: message 1 (assistant): the chat template renders the conversation up to this message differently "
        "once later messages follow (it rewrites earlier turns), so assistant tokens cannot be found turn by turn; "
        "add {% generation %} ... {% endgeneration %} around the assistant content in the template")
    # Mistral v0.3 with a system message: it is in the prompt of a reply, not in the conversation through it
    v3 = variant(smollm2_tokenizer, MISTRAL_V3, bos="<s>", eos="</s>", special=["<s>", "</s>", "[INST]", "[/INST]"])
    with pytest.raises(DataLoadError) as info:
        tokenize_row({"messages": SYSTEM}, v3, 3)
    assert str(info.value) == (
        "row 3: message 2 (assistant): the chat template's generation prompt for it is not how the template starts "
        "the message (the conversation before it, rendered with add_generation_prompt=True, is not the start of the "
        "conversation through it), so its tokens cannot be found; add {% generation %} ... {% endgeneration %} around "
        "the assistant content in the template")
    with pytest.raises(DataLoadError, match=r"^row 0: message 0 \(assistant\): the conversation starts with an "
                                            r"assistant message, which has no prompt") as info:
        tokenize_row({"messages": [{"role": "assistant", "content": "hi"}, *SINGLE]}, smollm2_tokenizer)
    assert "\n" not in str(info.value)


def test_a_template_that_rewrites_the_content_is_refused(smollm2_tokenizer):
    upper = variant(smollm2_tokenizer, "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + "
                    "(m['content'] | upper) + '<|im_end|>\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
                    bos=None, eos="<|im_end|>", special=[])
    with pytest.raises(DataLoadError, match=r"^row 0: message 1 \(assistant\): the chat template does not render its "
                                            r"content verbatim"):
        tokenize_row({"messages": SINGLE}, upper)


def test_without_a_special_token_after_the_content_the_mask_ends_with_it(smollm2_tokenizer):
    plain = variant(smollm2_tokenizer, "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}", bos=None, eos="<|im_end|>",
                    special=[])
    ids, mask = tokenize_row({"messages": MULTI}, plain)
    # the prompt's last space and "Two" are one token (" Two"), which overlaps the reply: masked
    assert masked_spans(plain, ids, mask) == [MULTI[1]["content"], " " + MULTI[3]["content"]]


def test_a_token_straddling_the_prompt_and_the_content_is_masked():
    """A BPE merge across the end of the generation prompt ('A' + the content's 'b' -> 'Ab'): the token
    overlaps the assistant span, so it is masked (the rule transformers applies to generation spans)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = "ABQbcdxyz:?"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["Ab"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("A", "b")]))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken("<e>", special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<e>")
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q:' + m['content'] + '<e>' }}"
                               "{% else %}{{ 'A' + m['content'] + '<e>' }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'A' }}{% endif %}")
    ids, mask = tokenize_row({"messages": [{"role": "user", "content": "xy?"}, {"role": "assistant", "content": "bcd"}]},
                             tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["Q", ":", "x", "y", "?", "<e>", "Ab", "c", "d", "<e>"]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_a_slow_tokenizer_is_refused_in_one_line():
    from transformers import ByT5Tokenizer

    slow = ByT5Tokenizer()
    slow.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
    with pytest.raises(DataLoadError, match=r"^row 2: the tokenizer \(ByT5Tokenizer\) is not a fast tokenizer, so it "
                                            r"gives no character offsets"):
        tokenize_row({"messages": SINGLE}, slow, 2)


def test_the_demo_template_keeps_its_markers_and_agrees_with_the_derived_masks(small_demo):
    """The demo's char tokenizer still goes through its {% generation %} markers (bit-identical to
    transformers' mask), and the derivation gives the same ids and masks with the markers removed."""
    marked = build_char_tokenizer()
    unmarked = build_char_tokenizer()
    unmarked.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    rows = small_demo.reasoning["train"][:100] + [{"messages": SYSTEM}]
    for row in rows:
        out = marked.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert tokenize_row(row, marked) == (out["input_ids"], out["assistant_masks"])
        assert tokenize_row(row, unmarked) == (out["input_ids"], out["assistant_masks"])


@pytest.mark.parametrize("name", ["smollm2", "llama3", "qwen2.5", "mistral"])
def test_stop_tokens_are_eos_and_the_end_of_turn(templates, name):
    """Answers stop at eos and at the token the template ends an assistant turn with: for Llama 3 that is
    <|eot_id|>, not its eos <|end_of_text|>; for the others the two are one token."""
    from pipeline.data import stop_token_ids

    tokenizer, end = templates[name]
    stops = stop_token_ids(tokenizer)
    assert stops[0] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(stops) == list(dict.fromkeys([tokenizer.eos_token, end]))


def test_stop_tokens_without_a_template_are_eos(smollm2_tokenizer):
    from pipeline.data import stop_token_ids

    bare = variant(smollm2_tokenizer, "", bos=None, eos="<|im_end|>", special=[])
    bare.chat_template = None
    assert stop_token_ids(bare) == [bare.eos_token_id]
