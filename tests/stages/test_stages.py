"""The recipe's stages on a tiny teacher: LOO, conversion, MMR, steps, SFT, resume and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, ScheduleConfig
from pipeline.stages import StageError, run_convert, run_loo, run_mmr, run_sft, run_step
from pipeline.stages.loo import LOO_FILE, rank_layers, without_layer
from pipeline.stages.mmr import MMR_FILE, rank_candidates

from tests.stages.conftest import RecordingReporter, tiny_config


def convert(cfg, teacher, loo, out_dir, work_dir, reporter=None):
    """The first conversion to cfg.schedule.counts[0] layers, as the chain calls it."""
    return run_convert(cfg.train, cfg.mamba, cfg.data.view(cfg.data.distill_on), cfg.hardware, cfg.seed,
                       cfg.schedule.counts[0], teacher=teacher, loo=loo, out_dir=out_dir, work_dir=work_dir,
                       reporter=reporter or RecordingReporter())


def score_mmr(cfg, teacher, parent, out_dir, work_dir, reporter=None):
    return run_mmr(cfg.mmr, cfg.data.view(cfg.data.distill_on), cfg.hardware, cfg.seed, teacher=teacher,
                   parent=parent, out_dir=out_dir, work_dir=work_dir, reporter=reporter or RecordingReporter())


@pytest.fixture(scope="module")
def loo_dir(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("loo")
    cfg = tiny_config()
    run_loo(cfg.loo, cfg.data.view("eval", "distill"), cfg.hardware, 2, teacher=tiny_teacher, out_dir=out,
            work_dir=out / "work", reporter=RecordingReporter())
    return out


def test_loo_scores_change_when_a_layer_is_removed_and_the_ranking_is_saved(loo_dir):
    loo = json.loads((loo_dir / LOO_FILE).read_text())
    assert loo["metric"] == "nll" and len(loo["layers"]) == 4
    assert loo["scored_on"] == {"source": "eval", "split": "validation", "rows": 8}  # never the test split
    for entry in loo["layers"]:
        assert entry["score"] != pytest.approx(loo["baseline"], abs=1e-6)
        assert entry["importance"] == pytest.approx(entry["score"] - loo["baseline"])  # NLL: rise = importance
    assert loo["ranking"] == rank_layers(loo)
    importances = {e["layer"]: e["importance"] for e in loo["layers"]}
    assert [importances[i] for i in loo["ranking"]] == sorted(importances.values())
    assert (loo_dir / "loo.png").stat().st_size > 1000
    meta = json.loads((loo_dir / "stage.json").read_text())
    assert meta["stage"] == "loo" and meta["ranking"] == loo["ranking"]


def test_without_layer_restores_the_model(tiny_teacher):
    from pipeline.convert import hybridize
    from pipeline.stages.common import load_model

    cfg = tiny_config()
    model = hybridize(load_model(tiny_teacher, cfg.hardware), [])
    ids = torch.randint(10, 90, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        with without_layer(model, 1, "block"):
            assert model.config.layer_types[1] == "mlp"
            skipped = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(before, skipped)
    assert torch.equal(before, after) and model.config.layer_types[1] == "full_attention"


def test_first_conversion_distils_and_loss_falls(tiny_teacher, loo_dir, tmp_path):
    cfg = tiny_config()
    cfg.train = dataclasses.replace(cfg.train, steps=30, log_every=1, save_every=10)
    reporter = RecordingReporter()
    meta = convert(cfg, tiny_teacher, loo_dir, tmp_path / "H-2", tmp_path / "work", reporter)
    loo = json.loads((loo_dir / LOO_FILE).read_text())
    assert meta["converted_layers"] == sorted(loo["ranking"][:2])
    assert meta["n_mamba"] == 2 and meta["layer_pattern"].count("M") == 2
    losses = [m["train/kl"] for _, m in reporter.metrics if "train/kl" in m]
    assert len(losses) == 30
    assert meta["cumulative_train_tokens"] == meta["tokens_seen"] > 0  # from the teacher: this stage's only
    assert meta["parent"] == "teacher"
    assert meta["data"]["rows"] > 0 and meta["data"]["digest"] and meta["data"]["source"].startswith("demo:")
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert (tmp_path / "H-2" / "model.safetensors").is_file()  # (its run_config.json: the executor's, tests/chain)


def test_killed_conversion_resumes_to_the_same_weights(tiny_teacher, loo_dir, tmp_path):
    cfg = tiny_config()  # 6 steps, state saved every 2
    convert(cfg, tiny_teacher, loo_dir, tmp_path / "straight", tmp_path / "work1")
    with pytest.raises(KeyboardInterrupt):  # dies in step 5, after the save at step 4
        convert(cfg, tiny_teacher, loo_dir, tmp_path / "killed", tmp_path / "work2", RecordingReporter(fail_at_metric=5))
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed_reporter = RecordingReporter()
    convert(cfg, tiny_teacher, loo_dir, tmp_path / "killed", tmp_path / "work2", resumed_reporter)
    steps = [step for step, m in resumed_reporter.metrics if step is not None]
    assert min(steps) == 5, steps  # continued after the last save, not from zero
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.fixture(scope="module")
def h2(tiny_teacher, loo_dir, tmp_path_factory):
    """H-2 of the tiny teacher, and its MMR scoring with one initialisation a candidate (result, reporter,
    folder): the MMR tests share them."""
    folder = tmp_path_factory.mktemp("H-2-mmr")
    cfg = tiny_config()
    convert(cfg, tiny_teacher, loo_dir, folder / "H-2", folder / "w")
    reporter = RecordingReporter()
    result = score_mmr(cfg, tiny_teacher, folder / "H-2", folder / "mmr", folder / "mw", reporter)
    return folder, result, reporter


def test_mmr_scores_every_attention_layer_and_the_step_follows_the_scores(tiny_teacher, h2, tmp_path):
    cfg = tiny_config()
    folder, result, reporter = h2
    pattern = json.loads((folder / "H-2" / "stage.json").read_text())["layer_pattern"]
    attention = [i for i, kind in enumerate(pattern) if kind == "A"]
    assert sorted(e["layer"] for e in result["ranking"]) == attention
    # each trial's curve under the same train/... keys, in a reporter (an MLflow run) of its own
    assert sorted(reporter.trials) == [f"layer-{layer}" for layer in attention]
    for trial in reporter.trials.values():
        assert {"train/loss", "train/kl", "train/lr"} <= set(trial.metrics[-1][1])
    losses = [e["loss"] for e in result["ranking"]]
    assert losses == sorted(losses) and all(loss > 0 for loss in losses)
    # The step converts the lowest-loss layer: rewrite the scores so the other layer wins, and check.
    mmr = json.loads((folder / "mmr" / MMR_FILE).read_text())
    flipped = {e["layer"]: -e["loss"] for e in mmr["ranking"]}
    mmr["ranking"] = rank_candidates(flipped)
    (tmp_path / "flipped").mkdir()
    (tmp_path / "flipped" / MMR_FILE).write_text(json.dumps(mmr))
    meta = run_step(cfg.train, cfg.data.view("distill"), cfg.hardware, cfg.seed, 3, teacher=tiny_teacher,
                    parent=folder / "H-2", mmr=tmp_path / "flipped", out_dir=tmp_path / "H-3", work_dir=tmp_path / "sw",
                    reporter=RecordingReporter())
    assert meta["converted_layers"] == [mmr["ranking"][0]["layer"]]
    assert meta["n_mamba"] == 3


def test_killed_mmr_keeps_finished_trials(tiny_teacher, h2, tmp_path):
    cfg = tiny_config()
    parent = h2[0] / "H-2"
    with pytest.raises(KeyboardInterrupt):  # mmr.train.steps=3 logs 3 step metrics + 1 trial metric per layer
        score_mmr(cfg, tiny_teacher, parent, tmp_path / "mmr", tmp_path / "mw", RecordingReporter(fail_at_metric=6))
    done = json.loads((tmp_path / "mw" / "trials.json").read_text())
    assert len(done) == 1
    reporter = RecordingReporter()
    score_mmr(cfg, tiny_teacher, parent, tmp_path / "mmr", tmp_path / "mw", reporter)
    assert any("(recorded)" in line for line in reporter.lines)


def test_mmr_averages_independent_initialisations_and_resumes_between_them(tiny_teacher, h2, tmp_path):
    cfg = tiny_config()
    folder, single, _ = h2
    two = dataclasses.replace(cfg, mmr=dataclasses.replace(cfg.mmr, seeds=2))
    # killed in the second initialisation of the first candidate (3 step metrics a trial)
    with pytest.raises(KeyboardInterrupt):
        score_mmr(two, tiny_teacher, folder / "H-2", tmp_path / "mmr", tmp_path / "mw",
                  RecordingReporter(fail_at_metric=4))
    recorded = json.loads((tmp_path / "mw" / "trials.json").read_text())
    assert [list(draws) for draws in recorded.values()] == [["0"]]
    reporter = RecordingReporter()
    result = score_mmr(two, tiny_teacher, folder / "H-2", tmp_path / "mmr", tmp_path / "mw", reporter)
    first = next(iter(recorded))
    assert f"  mmr layer {first}: 1 of 2 initialisations recorded" in reporter.lines
    attention = sorted(entry["layer"] for entry in single["ranking"])
    assert sorted(reporter.trials) == sorted([f"layer-{layer}" for layer in attention if str(layer) != first]
                                             + [f"layer-{layer}-init-1" for layer in attention])
    assert result["seeds"] == 2 and json.loads((tmp_path / "mmr" / MMR_FILE).read_text()) == result
    by_layer = {entry["layer"]: entry for entry in single["ranking"]}
    for entry in result["ranking"]:
        losses = entry["losses"]
        # draw 0 is the one-initialisation score (the same mixer, the same batches); draw 1 is another mixer
        assert losses[0] == by_layer[entry["layer"]]["loss"] and losses[1] != losses[0]
        assert entry["loss"] == pytest.approx(sum(losses) / 2, rel=1e-12)
        assert entry["std"] == pytest.approx(abs(losses[1] - losses[0]) / 2**0.5, rel=1e-9)
    assert [entry["loss"] for entry in result["ranking"]] == sorted(entry["loss"] for entry in result["ranking"])
    assert all(entry["std"] is None and len(entry["losses"]) == 1 for entry in single["ranking"])
    assert (tmp_path / "mmr" / "mmr.png").stat().st_size > 0


def test_mmr_seeds_must_be_a_positive_count():
    from pipeline.config import MMRConfig

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="mmr.seeds must be an int >= 1"):
            MMRConfig(seeds=bad)


def test_sft_trains_on_assistant_tokens(tiny_teacher, loo_dir, tmp_path):
    cfg = tiny_config()
    convert(cfg, tiny_teacher, loo_dir, tmp_path / "H-2", tmp_path / "w")
    meta = run_sft(cfg.sft.train, cfg.data.view("sft"), cfg.hardware, checkpoint=tmp_path / "H-2",
                   out_dir=tmp_path / "H-2-SFT", work_dir=tmp_path / "sw", reporter=RecordingReporter())
    assert meta["checkpoint"] == "H-2-SFT" and meta["steps"] == 3 and meta["n_mamba"] == 2
    before = load_file(tmp_path / "H-2" / "model.safetensors")
    after = load_file(tmp_path / "H-2-SFT" / "model.safetensors")
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # all trained


@pytest.mark.parametrize("counts, message", [
    ([3, 3], "strictly increasing"), ([4, 2], "strictly increasing"), ([], "empty"), ([0, 1], "positive"),
])
def test_bad_schedules(counts, message):
    with pytest.raises(ConfigError, match=message):
        ScheduleConfig(counts=counts)


def test_schedule_exceeding_the_layer_count(tiny_teacher, loo_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"exceeds the teacher's 4 layers"):
        ScheduleConfig(counts=[2, 5]).validate(4)
    cfg = tiny_config()
    with pytest.raises(StageError, match="exceeds the teacher's 4 layers"):
        run_convert(cfg.train, cfg.mamba, cfg.data.view("distill"), cfg.hardware, cfg.seed, 5, teacher=tiny_teacher,
                    loo=loo_dir, out_dir=tmp_path / "x", work_dir=tmp_path / "w")


def test_teacher_path_that_does_not_exist(tmp_path):
    from pipeline.stages import import_teacher

    with pytest.raises(StageError, match=r"teacher path does not exist: .*nope"):
        import_teacher(tiny_config().hardware, source=tmp_path / "nope", out_dir=tmp_path / "out",
                       work_dir=tmp_path / "w")


def test_unsupported_user_teacher(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.convert import ConversionError
    from pipeline.stages import import_teacher

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConversionError, match="unsupported teacher architecture GPT2LMHeadModel"):
        import_teacher(tiny_config().hardware, source=tmp_path / "gpt2", out_dir=tmp_path / "out",
                       work_dir=tmp_path / "w")


@pytest.mark.parametrize("rows, message", [
    ([], "empty"),
    ([{"prompt": "hi", "completion": "x"}], r"row 0 has neither 'messages' nor 'text'"),
])
def test_bad_datasets(tiny_teacher, tmp_path, rows, message):
    from pipeline.config import DataConfig
    from pipeline.stages.common import StageData, load_tokenizer

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = StageData(DataConfig(distill=str(path)), load_tokenizer(tiny_teacher))
    with pytest.raises(ValueError, match=message):
        data.tokenized("distill")


def test_chat_data_with_a_tokenizer_without_chat_template(tiny_teacher, tmp_path):
    from pipeline.config import DataConfig
    from pipeline.stages.common import StageData, load_tokenizer

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                             {"role": "assistant", "content": "answer: 2"}]}) + "\n")
    tokenizer = load_tokenizer(tiny_teacher)
    tokenizer.chat_template = None
    data = StageData(DataConfig(distill=str(path)), tokenizer)
    with pytest.raises(ValueError, match="no chat template"):
        data.tokenized("distill")


def test_teacher_mix_of_reasoning_and_generic_batches_resumes_in_place():
    import itertools

    from pipeline.stages.launch import mixed_source

    class Stub:
        def batch_source(self, kind, batch_size, seed):
            return lambda position: ((kind, i) for i in itertools.count(position))

    source = mixed_source(Stub(), tiny_config().train, generic_every=3)
    straight = list(itertools.islice(source(0), 10))
    assert [kind for kind, _ in straight].count("generic") == 3
    assert straight[2] == ("generic", 0) and straight[5] == ("generic", 1) and straight[3] == ("distill", 2)
    for cut in (1, 2, 3, 4, 7):
        resumed = list(itertools.islice(source(0), cut)) + list(itertools.islice(source(cut), 10 - cut))
        assert resumed == straight, cut


def test_bf16_mixed_stages_keep_fp32_masters_save_dtype_and_evaluate(tiny_teacher, loo_dir, tmp_path):
    """hardware.precision=bf16-mixed on CPU (autocast): the distillation teacher is held in bf16, the student
    trains as fp32 masters, save_dtype picks the checkpoint's dtype, evaluation scores in fp32."""
    from pipeline.stages import run_evaluate
    from pipeline.stages.common import load_model

    cfg = tiny_config()
    cfg.hardware = dataclasses.replace(cfg.hardware, device="cpu", precision="bf16-mixed")
    cfg.train = dataclasses.replace(cfg.train, save_dtype="bfloat16")
    assert load_model(tiny_teacher, cfg.hardware).dtype == torch.bfloat16  # frozen: bf16
    assert load_model(tiny_teacher, cfg.hardware, fp32=True).dtype == torch.float32  # to be trained: fp32
    convert(cfg, tiny_teacher, loo_dir, tmp_path / "H-2", tmp_path / "w")
    saved = load_file(tmp_path / "H-2" / "model.safetensors")
    assert saved["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for name, t in saved.items() if name.endswith(("A_log", ".D")))
    run_sft(cfg.sft.train, cfg.data.view("sft"), cfg.hardware, checkpoint=tmp_path / "H-2",
            out_dir=tmp_path / "H-2-SFT", work_dir=tmp_path / "sw", reporter=RecordingReporter())
    assert load_file(tmp_path / "H-2-SFT" / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.float32
    records = run_evaluate(cfg.evaluate, cfg.data.view("eval"), cfg.hardware, teacher=tiny_teacher,
                           checkpoints={"H-2-SFT": tmp_path / "H-2-SFT"}, out_dir=tmp_path / "eval",
                           work_dir=tmp_path / "ew", reporter=RecordingReporter())
    assert [r["checkpoint"] for r in records] == ["teacher", "H-2-SFT"]
    assert all(r["tokens_per_s"] > 0 for r in records)


def test_loo_rows_come_from_validation_files_or_a_held_out_share_never_the_test_split(tiny_teacher, tmp_path):
    from pipeline.config import DataConfig
    from pipeline.stages.common import StageData, load_tokenizer

    def chat(i):
        return {"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": f"answer: {i + 1}"}],
                "answer": str(i + 1)}

    distill = tmp_path / "distill.jsonl"
    distill.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(100)))
    tests = tmp_path / "eval"
    tests.mkdir()
    (tests / "test.jsonl").write_text(json.dumps(chat(500)) + "\n")
    tokenizer = load_tokenizer(tiny_teacher)
    data = StageData(DataConfig(distill=str(distill), eval=str(tests), validation_share=0.1), tokenizer)
    assert data.selection() == ("held_out", 10)
    assert [row["answer"] for row in data.selection_rows()] == [str(i + 1) for i in range(90, 100)]
    assert len(data.rows("distill", "train")) == 90  # the distillation never trains on them

    (tests / "validation.jsonl").write_text(json.dumps(chat(700)) + "\n")
    data = StageData(DataConfig(distill=str(distill), eval=str(tests)), tokenizer)
    assert data.selection() == ("eval", "validation")
    assert [row["answer"] for row in data.selection_rows()] == ["701"]
    assert len(data.rows("distill", "train")) == 98  # 2% held out whenever data.distill has no validation split
