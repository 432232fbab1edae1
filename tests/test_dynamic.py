"""Dynamic evaluation: mogrifier_fast.lm.dynamic and ``mogrifier-eval --dynamic``."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mogrifier_fast.lm import dynamic, train
from mogrifier_fast.lm.data import batchify
from mogrifier_fast.lm.dynamic import (
    choose_dynamic,
    default_grid,
    dynamic_evaluate,
    gradient_statistics,
)
from mogrifier_fast.lm.model import LanguageModel
from mogrifier_fast.lm.train import _load_run, evaluate, load_checkpoint, main_eval, main_train
from tests.test_lm import WORDS, final_model, train_args

LR, DECAY = 3e-3, 1e-2  # large enough for the tiny model to adapt within one short split


@pytest.fixture(scope="module")
def repeating_corpus(tmp_path_factory) -> Path:
    """train: random sentences over WORDS; valid and test: three fixed sentences repeated in
    random order. A briefly trained model knows only the word frequencies; the repetition is
    what dynamic evaluation can pick up as it reads."""
    path = tmp_path_factory.mktemp("repeating")
    generator = torch.Generator().manual_seed(0)

    def sentence() -> str:
        length = int(torch.randint(3, 9, (1,), generator=generator))
        ids = torch.randint(len(WORDS), (length,), generator=generator)
        return " ".join(WORDS[int(i)] for i in ids)

    fixed = [sentence() for _ in range(3)]
    (path / "train.txt").write_text("\n".join(sentence() for _ in range(200)) + "\n")
    for split in ("valid", "test"):
        picks = torch.randint(len(fixed), (60,), generator=generator)
        (path / f"{split}.txt").write_text("\n".join(fixed[int(i)] for i in picks) + "\n")
    return path


@pytest.fixture(scope="module")
def run(repeating_corpus, tmp_path_factory) -> Path:
    """A model trained for 30 steps (its best.pt is shared: tests copy it before writing)."""
    out = tmp_path_factory.mktemp("dynamic") / "run"
    main_train(train_args(repeating_corpus, out, "--max-steps", "30", "--eval-every", "30", "--lr", "1e-2"))  # fmt: skip
    return out


@pytest.fixture()
def checkpoint_copy(run, tmp_path) -> Path:
    path = tmp_path / "model.pt"
    shutil.copyfile(run / "best.pt", path)
    return path


@pytest.fixture(scope="module")
def stats(run) -> dict:
    """The run's RMS statistics, computed once (read-only in the tests)."""
    model, corpus, config = _load_run(run, "cpu")
    return gradient_statistics(model, batchify(corpus.train, config["batch_size"]), config["bptt"])


# --------------------------------------------------------------------------- API


def test_dynamic_evaluation_lowers_the_validation_loss(run, stats) -> None:
    model, corpus, _ = _load_run(run, "cpu")
    params = dict(model.named_parameters())  # the tied decoder weight once, as the embedding
    assert stats.keys() == params.keys()
    assert all(stats[n].shape == p.shape and (stats[n] >= 0).all() for n, p in params.items())
    valid = batchify(corpus.valid, 1)
    static = evaluate(model, valid, 8)
    adapted = dynamic_evaluate(model, valid, 5, LR, DECAY, stats, progress=False)
    assert adapted < static - 0.1, (static, adapted)
    # with a vanishing step it is static evaluation: each segment is scored before its update
    still = dynamic_evaluate(model, valid, 5, 1e-12, DECAY, stats, progress=False)
    assert abs(still - static) < 1e-5, (static, still)
    # the first segment is scored with the trained weights, whatever the step
    first = dynamic_evaluate(model, valid[:6], 5, 1.0, DECAY, stats, progress=False)
    assert abs(first - evaluate(model, valid[:6], 5)) < 1e-5


def tiny_model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(len(WORDS), emb=6, hidden=7, rounds=2).eval()


def by_hand(model: LanguageModel, data: torch.Tensor, bptt: int):
    """Over the ``bptt``-row segments of ``data`` (T, B), the state carried: each segment's
    summed cross-entropy, its target count and the gradients of its mean, as the module
    docstring defines them, written out apart from the code under test."""
    state = None
    for start in range(0, data.shape[0] - 1, bptt):
        inputs, targets = data[start : start + bptt], data[start + 1 : start + 1 + bptt]
        model.zero_grad(set_to_none=True)
        logits, state = model(inputs, state)
        loss = F.cross_entropy(logits.reshape(-1, len(WORDS)), targets.reshape(-1), reduction="sum")
        (loss / targets.numel()).backward()
        state = [(h.detach(), c.detach()) for h, c in state]
        yield loss.item(), targets.numel(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_statistics_are_the_mean_squared_gradient_of_each_segment() -> None:
    model = tiny_model()
    data = torch.randint(len(WORDS), (16, 3), generator=torch.Generator().manual_seed(1))
    grads = [g for _, _, g in by_hand(model, data, 5)]  # three segments of 5 rows
    for max_tokens, used in ((None, 3), (16, 2)):  # 15 targets per segment: 16 needs two
        got = gradient_statistics(model, data, 5, max_tokens=max_tokens)
        for name, value in got.items():
            want = sum(g[name] ** 2 for g in grads[:used]) / used
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-12)


def test_each_update_follows_the_rule_of_the_module_docstring(monkeypatch) -> None:
    """theta <- theta - lr g / (r + eps) + min(1, decay r / mean r) (theta0 - theta), the
    parameters checked as each segment is scored; one entry's decay rate is clamped at 1."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(2)
    data = torch.randint(len(WORDS), (16, 1), generator=generator)
    lr, decay, eps = 0.02, 0.3, 1e-3
    stats = {n: torch.rand(p.shape, generator=generator) * 1e-2 + 1e-4 for n, p in model.named_parameters()}  # fmt: skip
    first = next(iter(stats))
    stats[first].view(-1)[0] = 1e4  # decay * r / mean r > 1 there
    rms = {n: s.sqrt() for n, s in stats.items()}
    mean_rms = sum(r.sum() for r in rms.values()) / sum(r.numel() for r in rms.values())
    assert decay * rms[first].view(-1)[0] / mean_rms > 1
    seen = []  # the parameters each segment was scored with
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a: seen.append({n: p.detach().clone() for n, p in model.named_parameters()}) or forward(*a))  # fmt: skip
    got = dynamic_evaluate(model, data, 5, lr, decay, stats, epsilon=eps, progress=False)
    monkeypatch.undo()

    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected, loss_sum, count = [], 0.0, 0
    for loss, tokens, grads in by_hand(model, data, 5):
        expected.append({n: p.detach().clone() for n, p in model.named_parameters()})
        loss_sum, count = loss_sum + loss, count + tokens
        with torch.no_grad():
            for n, p in model.named_parameters():
                rate = torch.clamp(decay * rms[n] / mean_rms, max=1.0)
                p.copy_(p - lr * grads[n] / (rms[n] + eps) + rate * (theta0[n] - p))
    assert len(seen) == len(expected) == 3
    for used, want in zip(seen, expected, strict=True):
        for name in want:
            torch.testing.assert_close(used[name], want[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(seen[2][first], seen[0][first])  # the updates moved the weights
    assert math.isclose(got, loss_sum / count, rel_tol=1e-5)


def set_random_grads(model: LanguageModel) -> list[torch.Tensor]:
    """Give every parameter a random gradient; returns copies of them."""
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    return grads


def grads_are(model: LanguageModel, grads: list[torch.Tensor]) -> bool:
    return all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_statistics_are_taken_without_dropout() -> None:
    torch.manual_seed(0)
    model = LanguageModel(len(WORDS), emb=8, hidden=16, rounds=2, dropout_input=0.5, dropout_output=0.5)  # fmt: skip
    data = torch.randint(len(WORDS), (20, 3))
    grads = set_random_grads(model)
    first, second = gradient_statistics(model, data, 6), gradient_statistics(model, data, 6)
    assert model.training  # the gradients it found are not left behind
    assert grads_are(model, grads)
    assert all(torch.equal(first[n], second[n]) for n in first)  # no random masks
    assert sum(s.sum() for s in first.values()) > 0


def test_parameters_are_restored_bit_identical_even_after_an_exception(
    run, stats, monkeypatch
) -> None:
    model, corpus, _ = _load_run(run, "cpu")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = set_random_grads(model)
    valid = batchify(corpus.valid, 1)
    dynamic_evaluate(model, valid, 5, LR, DECAY, stats, progress=False)
    assert model.training
    assert grads_are(model, grads)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    forward, calls, moved = model.forward, [0], []

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:  # three updates done
            moved.append(any(not torch.equal(before[k], v) for k, v in model.state_dict().items()))
            raise RuntimeError("interrupted")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        dynamic_evaluate(model, valid, 5, LR, DECAY, stats, progress=False)
    assert moved == [True] and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_choose_dynamic_returns_the_best_setting_on_a_validation_prefix(run, stats) -> None:
    model, corpus, _ = _load_run(run, "cpu")
    valid = batchify(corpus.valid, 1)
    diverging = 1e6
    assert not math.isfinite(dynamic_evaluate(model, valid[:61], 5, diverging, DECAY, stats, progress=False))  # fmt: skip
    lr, decay, loss = choose_dynamic(model, valid, 5, stats, lrs=[diverging, 1e-6, LR], decays=[DECAY], max_tokens=60, progress=False)  # fmt: skip
    assert (lr, decay) == (LR, DECAY)  # the diverging setting, first, loses
    with pytest.raises(ValueError, match="every setting made the validation loss non-finite"):
        choose_dynamic(model, valid, 5, stats, lrs=[diverging], decays=[DECAY], max_tokens=60, progress=False)  # fmt: skip
    assert loss == dynamic_evaluate(model, valid[:61], 5, LR, DECAY, stats, progress=False)
    with pytest.raises(ValueError, match=r"^lr: expected a finite value > 0, got 0"):
        dynamic_evaluate(model, valid, 5, 0, DECAY, stats)
    with pytest.raises(ValueError, match=r"^data: expected one column"):
        dynamic_evaluate(model, batchify(corpus.valid, 2), 5, LR, DECAY, stats)


# --------------------------------------------------------------------------- CLI


def test_cli_dynamic_on_a_text_file_stores_and_reuses_the_statistics(
    checkpoint_copy, tmp_path, capsys, monkeypatch
) -> None:
    calls = []
    real = train.gradient_statistics
    monkeypatch.setattr(train, "gradient_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))  # fmt: skip
    own = tmp_path / "own.txt"
    own.write_text("the red dog ran to a park with the blue ball\n" * 24)
    argv = [str(checkpoint_copy), "--text", str(own), "--no-progress"]
    dynamic_argv = [*argv, "--dynamic", "--dynamic-lr", str(LR), "--dynamic-decay", str(DECAY)]
    main_eval(dynamic_argv)
    captured = capsys.readouterr()
    line = captured.out.strip()
    assert line.startswith(f"{own}: loss ") and line.endswith(f"(dynamic evaluation, lr {LR:g}, decay {DECAY:g}, segment 5)")  # fmt: skip
    _, corpus, _ = _load_run(checkpoint_copy, "cpu")  # still loads
    tokens = (batchify(corpus.train, 4).shape[0] - 1) * 4  # the whole training split, batch 4
    assert (
        calls == [1] and f"RMS statistics of {tokens:,} training tokens stored in" in captured.err
    )
    stored = load_checkpoint(checkpoint_copy, required=("model", "config", "dynamic_stats"))
    assert stored["dynamic_stats"]["tokens"] == tokens and stored["dynamic_stats"]["bptt"] == 8

    main_eval(dynamic_argv)
    captured = capsys.readouterr()
    assert calls == [1] and "RMS statistics read from" in captured.err
    assert captured.out.strip() == line  # the same statistics, the same result
    main_eval(argv)
    static = capsys.readouterr().out.strip()
    assert static.endswith("(static evaluation)")
    assert float(line.split()[2]) < float(static.split()[2]) - 0.1  # it adapts to the repetition

    with pytest.raises(SystemExit) as exit_info:
        main_eval([*argv, "--dynamic", "--dynamic-lr", "1e6"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert err.startswith("mogrifier-eval: error: --dynamic-lr: 1e+06 made the loss non-finite")


def test_statistics_are_not_stored_in_a_file_changed_meanwhile(
    checkpoint_copy, tmp_path, capsys, monkeypatch
) -> None:
    """A checkpoint rewritten while the statistics were computed (training still running) is
    left as it is: it is not overwritten with the old weights."""
    real = train.gradient_statistics

    def and_touch(*args, **kwargs):
        os.utime(checkpoint_copy, ns=(0, 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "gradient_statistics", and_touch)
    own = tmp_path / "own.txt"
    own.write_text("the cat sat on a mat\n")
    main_eval([str(checkpoint_copy), "--text", str(own), "--dynamic", "--no-progress"])
    assert "changed since it was read; the RMS statistics are not stored" in capsys.readouterr().err
    assert "dynamic_stats" not in torch.load(checkpoint_copy, weights_only=True)


@pytest.mark.parametrize(("key", "value"), [("bptt", 3), ("batch_size", 1), ("tokens", None)])
def test_stored_statistics_of_another_setting_are_computed_again(
    checkpoint_copy, tmp_path, capsys, key, value
) -> None:
    """Statistics stored for another batchification (or an entry missing its token count)
    are not used: they are computed again and stored in their place."""
    own = tmp_path / "own.txt"
    own.write_text("the cat sat on a mat\n")
    argv = [str(checkpoint_copy), "--text", str(own), "--dynamic", "--no-progress"]
    main_eval(argv)
    checkpoint = torch.load(checkpoint_copy, weights_only=True)
    stats = checkpoint["dynamic_stats"]
    if value is None:
        del stats[key]
    else:
        stats[key] = value
    torch.save(checkpoint, checkpoint_copy)
    capsys.readouterr()
    main_eval(argv)
    err = capsys.readouterr().err
    assert "training tokens stored in" in err and "read from" not in err
    assert (
        load_checkpoint(checkpoint_copy, required=("dynamic_stats",))["dynamic_stats"]["bptt"] == 8
    )


def test_dynamic_tune_chooses_on_validation_only(checkpoint_copy, capsys, monkeypatch) -> None:
    seen = []
    real = dynamic.dynamic_evaluate  # what choose_dynamic calls
    monkeypatch.setattr(dynamic, "dynamic_evaluate", lambda m, data, *a, **k: seen.append(data.clone()) or real(m, data, *a, **k))  # fmt: skip
    main_eval([str(checkpoint_copy), "--split", "test", "--dynamic", "--dynamic-tune", "--dynamic-valid-tokens", "40", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    _, corpus, _ = _load_run(checkpoint_copy, "cpu")
    valid_prefix = batchify(corpus.valid, 1)[:41]
    lrs, decays = default_grid(5)
    assert len(seen) == len(lrs) * len(decays)
    assert all(torch.equal(data, valid_prefix) for data in seen)
    words = out[0].split()
    assert out[0].startswith("chosen on the first 40 validation tokens: --dynamic-lr ")
    lr, decay = float(words[words.index("--dynamic-lr") + 1]), float(words[words.index("--dynamic-decay") + 1])  # fmt: skip
    assert any(abs(lr - x) < 1e-6 * x for x in lrs) and any(abs(decay - x) < 1e-6 * x for x in decays)  # fmt: skip
    assert out[1].startswith("test: loss ") and f"(dynamic evaluation, lr {lr:g}, decay {decay:g}" in out[1]  # fmt: skip


def test_resume_from_a_checkpoint_holding_statistics(repeating_corpus, tmp_path, capsys) -> None:
    main_train(train_args(repeating_corpus, tmp_path / "straight", "--max-steps", "4"))
    main_train(train_args(repeating_corpus, tmp_path / "split", "--max-steps", "2"))
    checkpoint = tmp_path / "split" / "checkpoint-00000002.pt"
    own = tmp_path / "own.txt"
    own.write_text("the cat sat on a mat\n")
    main_eval([str(checkpoint), "--text", str(own), "--dynamic", "--no-progress"])
    assert "dynamic_stats" in torch.load(checkpoint, weights_only=True)
    capsys.readouterr()
    main_train(train_args(repeating_corpus, tmp_path / "split", "--max-steps", "4", "--resume"))
    assert "resuming from checkpoint-00000002.pt (step 2)" in capsys.readouterr().err
    straight, resumed = final_model(tmp_path / "straight", 4), final_model(tmp_path / "split", 4)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dynamic", "--dynamic-lr", "0"], "--dynamic-lr: expected a finite value > 0, got 0.0"),
        (["--dynamic", "--dynamic-lr", "nan"], "--dynamic-lr: expected a finite value > 0, got nan"),
        (["--dynamic", "--dynamic-decay", "-0.1"], "--dynamic-decay: expected a value in [0, 1], got -0.1"),
        (["--dynamic", "--dynamic-segment", "0"], "--dynamic-segment: expected >= 1, got 0"),
        (["--dynamic", "--dynamic-tune", "--dynamic-valid-tokens", "0"], "--dynamic-valid-tokens: expected >= 1, got 0"),
        (["--dynamic", "--dynamic-tune", "--dynamic-lr", "0.001"], "--dynamic-tune: chooses --dynamic-lr and --dynamic-decay on the validation split; got --dynamic-lr 0.001 as well"),
        (["--dynamic", "--dynamic-valid-tokens", "10"], "--dynamic-valid-tokens: applies to --dynamic-tune only"),
        (["--dynamic-lr", "0.001"], "--dynamic-lr: applies to dynamic evaluation only; add --dynamic"),
    ],
)  # fmt: skip
def test_bad_dynamic_flags_are_one_line_errors(argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main_eval([str(tmp_path / "no-run"), *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("mogrifier-eval: error: ") and message in err and "\n" not in err
