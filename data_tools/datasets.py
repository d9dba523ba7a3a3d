"""Readers for the single-turn math sets in ../shared/data -> unsharded Problem records.

    gsm8k/{train,test}.jsonl   {"question", "answer"}: the final answer follows "#### " on the last line
    math500/test.jsonl         {"problem", "solution", "answer", "subject", "level", "unique_id"}

Ids are stable across runs (resume keys on them): "gsm8k-<file stem>-<0-based record index>" and
MATH500's own unique_id. GSM8K answers are normalised by dropping thousands separators ("1,080" ->
"1080"); the raw string is kept in metadata["answer_raw"]. Nothing else is rewritten.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.schema import DataError, read_jsonl, require

DATASETS = ("gsm8k", "math500")


@dataclass(frozen=True)
class Problem:
    id: str
    text: str  # the whole single-turn problem, question included, verbatim
    answer: str
    metadata: dict = field(default_factory=dict)


def load_gsm8k(path: str | Path) -> list[Problem]:
    path = Path(path)
    problems = []
    for index, (line_no, obj) in enumerate(read_jsonl(path)):
        question = require(obj, "question", str, path, line_no)
        solution = require(obj, "answer", str, path, line_no)
        if not question.strip():
            raise DataError(f"{path}:{line_no}: field 'question': empty")
        if "#### " not in solution:
            raise DataError(f"{path}:{line_no}: field 'answer': no '#### ' final-answer marker")
        raw = solution.rsplit("#### ", 1)[1].strip()
        if not raw:
            raise DataError(f"{path}:{line_no}: field 'answer': empty final answer after '#### '")
        answer = re.sub(r"(?<=\d),(?=\d{3}\b)", "", raw)  # thousands separators only
        meta = {"source": "gsm8k", "reward_kind": "gsm8k", "split": path.stem, "problem": question}
        if answer != raw:
            meta["answer_raw"] = raw
        problems.append(Problem(f"gsm8k-{path.stem}-{index}", question, answer, meta))
    return problems


def load_math500(path: str | Path) -> list[Problem]:
    path = Path(path)
    problems = []
    for line_no, obj in read_jsonl(path):
        text = require(obj, "problem", str, path, line_no)
        answer = require(obj, "answer", str, path, line_no)
        uid = require(obj, "unique_id", str, path, line_no)
        if not text.strip() or not answer.strip():
            raise DataError(f"{path}:{line_no}: field '{'problem' if not text.strip() else 'answer'}': empty")
        meta = {"source": "math500", "reward_kind": "math", "split": path.stem, "problem": text, "unique_id": uid}
        for key in ("subject", "level"):
            if key in obj:
                meta[key] = obj[key]
        problems.append(Problem(uid, text, answer, meta))
    return problems


def load_problems(path: str | Path, dataset: str) -> list[Problem]:
    """Every problem of the file; DataError naming path:line on bad input, and on a file without any problem."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    problems = load_gsm8k(path) if dataset == "gsm8k" else load_math500(path)
    if not problems:
        raise DataError(f"{path}: no problems (the file is empty)")
    return problems
