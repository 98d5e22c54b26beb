import pytest
import torch

from pipeline.data.batching import (
    Batch,
    BatchingError,
    BucketBatchPlan,
    collate,
    iter_batches,
    prompt_batch,
    prompt_messages,
)
from pipeline.data.loading import tokenize_rows
from pipeline.data.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tokenized(tokenizer, small_demo):
    rows = small_demo.reasoning["train"][:150] + small_demo.text["train"][:97]
    return tokenize_rows(rows, tokenizer, max_length=256)


def _same(a: Batch, b: Batch) -> bool:
    return (a.position == b.position and a.indices == b.indices and torch.equal(a.input_ids, b.input_ids)
            and torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.loss_mask, b.loss_mask)
            and torch.equal(a.labels, b.labels))


def test_epoch_covers_every_row_once(tokenized, tokenizer):
    plan = BucketBatchPlan(tokenized["length"], batch_size=16, seed=1, bucket_batches=4)
    assert len(plan) == -(-len(tokenized) // 16)
    for epoch in range(3):
        batches = plan.epoch(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(tokenized)))
    assert plan.epoch(0) != plan.epoch(1)  # a new order each epoch
    batches = list(iter_batches(tokenized, 16, tokenizer.pad_token_id, seed=1, bucket_batches=4, stop=len(plan)))
    assert sorted(i for b in batches for i in b.indices) == list(range(len(tokenized)))
    assert [b.position for b in batches] == list(range(len(plan)))


def test_drop_last(tokenized):
    plan = BucketBatchPlan(tokenized["length"], batch_size=16, seed=1, drop_last=True)
    assert len(plan) == len(tokenized) // 16
    batches = plan.epoch(0)
    assert len(batches) == len(plan) and all(len(b) == 16 for b in batches)
    assert len(set(i for b in batches for i in b)) == 16 * len(plan)


def test_order_is_deterministic_from_seed(tokenized):
    lengths = tokenized["length"]
    a = BucketBatchPlan(lengths, 8, seed=7).epoch(2)
    assert a == BucketBatchPlan(lengths, 8, seed=7).epoch(2)
    assert a != BucketBatchPlan(lengths, 8, seed=8).epoch(2)


def test_resume_gives_identical_batches(tokenized, tokenizer):
    kw = dict(batch_size=16, pad_id=tokenizer.pad_token_id, seed=3, bucket_batches=2)
    per_epoch = len(BucketBatchPlan(tokenized["length"], 16, seed=3, bucket_batches=2))
    stop = 2 * per_epoch + 3  # crosses two epoch boundaries
    full = list(iter_batches(tokenized, stop=stop, **kw))
    for start in (0, 5, per_epoch, per_epoch + 1, stop - 1):
        resumed = list(iter_batches(tokenized, start=start, stop=stop, **kw))
        assert len(resumed) == stop - start
        assert all(_same(x, y) for x, y in zip(full[start:], resumed))
    # an endless iterator agrees with the bounded one
    it = iter_batches(tokenized, **kw)
    assert all(_same(next(it), b) for b in full)


def test_bucketing_reduces_padding(tokenized):
    lengths = tokenized["length"]

    def pad_fraction(plan):
        real = padded = 0
        for b in plan.epoch(0):
            n = [lengths[i] for i in b]
            real += sum(n)
            padded += max(n) * len(n)
        return 1 - real / padded

    assert pad_fraction(BucketBatchPlan(lengths, 8, seed=0, bucket_batches=16)) < 0.5 * pad_fraction(
        BucketBatchPlan(lengths, 8, seed=0, bucket_batches=1))


def test_collate_right_pads(tokenizer):
    rows = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8], "loss_mask": [1]}]
    b = collate(rows, pad_id=0, pad_to_multiple_of=4)
    assert b.input_ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b.loss_mask.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert b.labels.tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert b.num_loss_tokens == 3
    with pytest.raises(BatchingError, match="row 1 needs 'input_ids' and 'loss_mask'"):
        collate([rows[0], {"input_ids": [1]}], pad_id=0)
    with pytest.raises(BatchingError, match="zero rows"):
        collate([], pad_id=0)


def test_batches_train_a_llama(tokenized, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    b = next(iter_batches(tokenized, 8, tokenizer.pad_token_id))
    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
    # the model's loss is cross-entropy on the loss-masked next tokens
    logits = out.logits[:, :-1]  # (B, T-1, V)
    target = b.input_ids[:, 1:]
    mask = b.loss_mask[:, 1:]
    manual = torch.nn.functional.cross_entropy(logits[mask], target[mask])
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_prompt_batch_left_pads(tokenizer, small_demo):
    rows = small_demo.reasoning["test"][:6]
    batch = prompt_batch(rows, tokenizer)
    ids, am = batch["input_ids"], batch["attention_mask"]
    assistant_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert (ids[:, -1] == assistant_id).all() and (am[:, -1] == 1).all()
    for b, row in enumerate(rows):
        alone = tokenizer.apply_chat_template(row["messages"][:1], tokenize=True, return_dict=True,
                                              add_generation_prompt=True)["input_ids"]
        n = int(am[b].sum())
        assert n == len(alone) and ids[b, -n:].tolist() == alone
        assert am[b, : ids.shape[1] - n].sum() == 0 and (ids[b, : ids.shape[1] - n] == tokenizer.pad_token_id).all()
    assert tokenizer.padding_side == "right"  # the shared tokenizer is left alone
    short = prompt_batch(rows, tokenizer, max_length=5)
    assert short["input_ids"].shape[1] == 5 and (short["input_ids"][:, -1] == assistant_id).all()


def test_prompt_messages():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert prompt_messages({"messages": msgs}) == msgs[:1]
    assert prompt_messages(msgs[:1]) == msgs[:1]
    with pytest.raises(BatchingError, match="only assistant"):
        prompt_messages([msgs[1]])
    with pytest.raises(BatchingError, match="messages"):
        prompt_messages({"text": "x"})


def test_batching_errors(tokenizer):
    with pytest.raises(BatchingError, match="batch_size"):
        BucketBatchPlan([3, 4], 0)
    with pytest.raises(BatchingError, match="empty"):
        BucketBatchPlan([], 4)
    with pytest.raises(BatchingError, match="drop_last"):
        BucketBatchPlan([3, 4], 4, drop_last=True)
    with pytest.raises(BatchingError, match="start"):
        next(BucketBatchPlan([3, 4], 1).iter_positions(start=-1))
    with pytest.raises(BatchingError, match="at least one row"):
        prompt_batch([], tokenizer)
    bare = build_char_tokenizer()
    bare.chat_template = None
    with pytest.raises(BatchingError, match="no chat template"):
        prompt_batch([[{"role": "user", "content": "q"}]], bare)
