"""Semantic textual similarity: STS12-16, STS-B and SICK-R test, from SentEval's data folder, read as SentEval
reads them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import DatasetError

STS_YEARS = {  # SentEval's subsets per year (STS13 without SMT, as distributed)
    "sts12": ("STS12-en-test", ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"]),
    "sts13": ("STS13-en-test", ["FNWN", "headlines", "OnWN"]),
    "sts14": ("STS14-en-test", ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"]),
    "sts15": ("STS15-en-test", ["answers-forums", "answers-students", "belief", "headlines", "images"]),
    "sts16": ("STS16-en-test", ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"]),
}

Pairs = tuple[list[str], list[str], np.ndarray]  # sentences A, sentences B, gold scores


@dataclass
class STSData:
    """Sentence pairs with gold scores, per subset (one subset for STS-B and SICK-R)."""

    name: str
    subsets: dict[str, Pairs] = field(default_factory=dict)

    def limit(self, n: int | None) -> "STSData":
        if not n:
            return self
        return STSData(self.name, {k: (a[:n], b[:n], g[:n]) for k, (a, b, g) in self.subsets.items()})


def read_sts(root: Path, task: str) -> STSData:
    """``sts12``..``sts16`` (every subset of the year), ``sts-b`` (test) or ``sick-r`` (test), SentEval files."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("senteval", f"folder {root} not found")
    out = STSData(task)
    if task in STS_YEARS:
        folder, subsets = STS_YEARS[task]
        for sub in subsets:
            out.subsets[sub] = _read_year_subset(root / "STS" / folder, sub)
    elif task == "sts-b":  # genre, file, year, id, score, sentence1, sentence2 (sometimes more columns)
        path = root / "STS" / "STSBenchmark" / "sts-test.csv"
        out.subsets["test"] = _columns(path, _lines(path, rows=True), 1, (5, 6, 4),
                                       "genre, file, year, id, score, sentence1, sentence2")
    elif task == "sick-r":  # a header line, then pair_ID, sentence_A, sentence_B, relatedness_score, ...
        path = root / "SICK" / "SICK_test_annotated.txt"
        out.subsets["test"] = _columns(path, _lines(path, rows=True)[1:], 2, (1, 2, 3),
                                       "pair_ID, sentence_A, sentence_B, relatedness_score")
    else:
        raise DatasetError("senteval", f"unknown STS task {task!r}")
    if not any(len(s[0]) for s in out.subsets.values()):
        raise DatasetError("senteval", f"{task}: no sentence pairs found")
    return out


def _read_year_subset(folder: Path, sub: str) -> Pairs:
    """One subset of an STS12-16 year: ``STS.input.<sub>.txt`` (two tab-separated sentences a line) beside
    ``STS.gs.<sub>.txt`` (a gold score a line; an empty line leaves the pair out, as SentEval does)."""
    inp, gs = folder / f"STS.input.{sub}.txt", folder / f"STS.gs.{sub}.txt"
    pairs, gold = _lines(inp), _lines(gs)
    if len(pairs) != len(gold):
        raise DatasetError("senteval", f"{inp} has {len(pairs)} lines but {gs} has {len(gold)}")
    a, b, g = [], [], []
    for n, (line, score) in enumerate(zip(pairs, gold)):
        if score == "":
            continue  # SentEval skips pairs without a gold score
        cols = line.split("\t")
        if len(cols) != 2:
            raise DatasetError("senteval", f"{inp}:line {n + 1}: expected 2 tab-separated sentences, "
                                           f"found {len(cols)} field(s)")
        a.append(_words(cols[0]))
        b.append(_words(cols[1]))
        g.append(_score(f"{gs}:line {n + 1}", score))
    return a, b, np.asarray(g)


def _lines(path: Path, *, rows: bool = False) -> list[str]:
    r"""The lines of a SentEval file as SentEval reads it (text mode, so "\r\n" and "\r" arrive as "\n"):
    STS12-16 with ``read().splitlines()``; STS-B and SICK (``rows``) line by line, on "\n" only, where U+0085,
    U+2028, "\x0b" and "\x0c" are ordinary characters inside a row."""
    if not path.is_file():
        raise DatasetError("senteval", f"missing file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError("senteval", f"{path} is not valid UTF-8 ({exc})") from None
    if not rows:
        return text.splitlines()
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines  # a final newline ends the last row, it starts none


def _words(s: str) -> str:
    """SentEval tokenises by whitespace and the batcher joins the words with single spaces."""
    return " ".join(s.split())


def _score(where: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DatasetError("senteval", f"{where}: gold score {text!r} is not a number") from None
    if not np.isfinite(v):
        raise DatasetError("senteval", f"{where}: gold score {text!r} is not finite")
    return v


def _columns(path: Path, lines: list[str], first: int, cols: tuple[int, int, int], names: str) -> Pairs:
    """Sentence pairs and gold scores from tab-separated ``lines`` (line numbers start at ``first``), columns
    ``cols`` = (sentence A, sentence B, score), as SentEval reads STS-B and SICK."""
    a, b, g = [], [], []
    for n, line in enumerate(lines, start=first):
        fields = line.strip().split("\t")
        if len(fields) <= max(cols):
            raise DatasetError("senteval", f"{path}:line {n}: expected at least {max(cols) + 1} tab-separated "
                                           f"columns ({names}), found {len(fields)}")
        a.append(_words(fields[cols[0]]))
        b.append(_words(fields[cols[1]]))
        g.append(_score(f"{path}:line {n}", fields[cols[2]]))
    return a, b, np.asarray(g)
