"""Long-document QA -> episodes whose shards are sentence-aligned, fixed-size token chunks.

The paper (section 3.1) chunks LongBench documents "into fixed-size token segments aligned to
sentence boundaries, averaging 10 to 14 shards per document". Here:
- a document is split into sentences (memrl.sentences, math protection off, blank lines are
  boundaries); sentences are packed greedily into chunks of at most `size` tokens, each chunk a
  verbatim slice of the document from its first sentence to its last; a sentence longer than `size`
  is cut at whitespace (or, for a single giant word, by characters) and the cut is counted;
- size = --chunk-tokens when given (one fixed size for every document), else per document the
  smallest size in [min_chunk_tokens, max_chunk_tokens] that packs it into <= target_shards chunks
  (binary search; greedy packing is monotone in size): the default target_shards=12 aims at the
  paper's 10-14 shards, and max_chunk_tokens=1024 is the paper's maximum shard length (appendix A),
  so a document longer than about 12 * 1024 tokens gets more shards, and a short one fewer (each
  chunk at least min_chunk_tokens=64 when the document allows);
- tokens are counted with a tokenizer (--tokenizer: a tokenizer.json or a checkpoint directory
  holding one) or, without one, with the regex \\w+|[^\\w\\s] (words and punctuation marks).

Readers: LongBench JSONL ({"input", "context", "answers", "length", "dataset", "_id", ...}: one
episode per record, id = _id) and L-Eval JSONL ({"instructions": [...], "outputs": [...], "input",
"source", "evaluation"}: one episode per question, id = "leval-<file stem>-<record>-<question>").
answer = the first reference; metadata["answers"] = all of them (score = max F1).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from data_tools.checks import check_chunks
from data_tools.runner import Outcome, run_resumable
from data_tools.schema import DataError, read_jsonl, require, validate_record
from memrl.episodes import Episode
from memrl.sentences import split_sentences

_REGEX_TOKEN = re.compile(r"\w+|[^\w\s]")


class TokenCounter:
    """count(text) -> tokens; a real tokenizer when given, else the regex approximation."""

    def __init__(self, tokenizer_path: str | Path | None = None):
        self._tok = None
        self.name = "regex:\\w+|[^\\w\\s]"
        if tokenizer_path is not None:
            from tokenizers import Tokenizer

            path = Path(tokenizer_path)
            file = path / "tokenizer.json" if path.is_dir() else path
            self._tok = Tokenizer.from_file(str(file))
            self.name = f"tokenizer:{file.parent.name if path.is_dir() else file.name}"

    def count(self, text: str) -> int:
        if self._tok is None:
            return len(_REGEX_TOKEN.findall(text))
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: list[str]) -> list[int]:
        if self._tok is None:
            return [self.count(t) for t in texts]
        return [len(enc.ids) for enc in self._tok.encode_batch(texts, add_special_tokens=False)]


def _words(text: str, start: int, end: int, counter: TokenCounter) -> list[tuple[int, int, int]]:
    """text[start:end] as (start, end, tokens) word units, for a sentence too long for one chunk."""
    spans = [(start + m.start(), start + m.end()) for m in re.finditer(r"\S+", text[start:end])]
    return [(s, e, c) for (s, e), c in zip(spans, counter.count_many([text[s:e] for s, e in spans]))]


def _fit(text: str, unit: tuple[int, int, int], size: int, counter: TokenCounter) -> list[tuple[int, int, int]]:
    """A single word longer than size tokens (a URL, a table row without spaces): cut by characters."""
    out, (start, end, _) = [], unit
    while counter.count(text[start:end]) > size:
        lo, hi = start + 1, end
        while lo < hi:  # the longest prefix that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if counter.count(text[start:mid]) <= size else (lo, mid - 1)
        out.append((start, lo, counter.count(text[start:lo])))
        start = lo
    return out + [(start, end, counter.count(text[start:end]))]


def _pack(units: list[tuple[int, int, int]], size: int) -> list[list[tuple[int, int, int]]]:
    """Greedy packing of (start, end, tokens) units into groups of <= size tokens (by sum). Greedy
    gives the fewest groups for a contiguous split, so the group count falls as size grows."""
    groups: list[list[tuple[int, int, int]]] = []
    total = size + 1
    for unit in units:
        if total + unit[2] > size:
            groups.append([])
            total = 0
        groups[-1].append(unit)
        total += unit[2]
    return groups


@dataclass
class Chunking:
    chunks: list[str]
    size: int  # the token budget used
    hard_cuts: int  # sentences that had to be cut inside


def chunk_document(text: str, counter: TokenCounter, chunk_tokens: int | None = None, target_shards: int = 12,
                   min_chunk_tokens: int = 64, max_chunk_tokens: int = 1024) -> Chunking:
    sentences = split_sentences(text, protect_math=False)
    counts = counter.count_many([text[s:e] for s, e in sentences])
    word_cache: dict[int, list[tuple[int, int, int]]] = {}

    def units(size: int) -> list[tuple[int, int, int]]:
        """Sentences that fit are units; a longer one is replaced by its words (a hard cut)."""
        out = []
        for i, ((s, e), c) in enumerate(zip(sentences, counts)):
            if c <= size:
                out.append((s, e, c))
            else:
                if i not in word_cache:
                    word_cache[i] = _words(text, s, e, counter)
                for w in word_cache[i]:
                    out += [w] if w[2] <= size else _fit(text, w, size, counter)
        return out

    if chunk_tokens is not None:
        size = chunk_tokens
    else:  # the smallest size in [min, max] that packs the document into <= target_shards chunks
        lo, hi = min_chunk_tokens, max(min_chunk_tokens, max_chunk_tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(_pack(units(mid), mid)) <= target_shards else (mid + 1, hi)
        size = lo
    assert size > 0
    chunks = []
    for group in _pack(units(size), size):
        # A real tokenizer is not exactly additive across a join: re-pack by exact count if over.
        if len(group) > 1 and counter.count(text[group[0][0] : group[-1][1]]) > size:
            sub, cur = [], group[0]
            for u in group[1:]:
                if counter.count(text[cur[0] : u[1]]) <= size:
                    cur = (cur[0], u[1], 0)
                else:
                    sub.append(cur)
                    cur = u
            sub.append(cur)
            chunks += [text[a:b] for a, b, _ in sub]
        else:
            chunks.append(text[group[0][0] : group[-1][1]])
    return Chunking(chunks, size, hard_cuts=sum(1 for c in counts if c > size))


@dataclass(frozen=True)
class DocQuestion:
    id: str
    doc_key: str  # questions on one document share its chunks
    document: str
    question: str
    answers: list[str]
    metadata: dict


def _str_list(obj: dict, key: str, path: Path, line_no: int) -> list[str]:
    value = require(obj, key, list, path, line_no)
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise DataError(f"{path}:{line_no}: field '{key}[{i}]': expected str, got {type(v).__name__}")
    return value


def load_longbench(path: str | Path) -> list[DocQuestion]:
    path, out = Path(path), []
    for line_no, obj in read_jsonl(path):
        question = require(obj, "input", str, path, line_no)
        context = require(obj, "context", str, path, line_no)
        answers = _str_list(obj, "answers", path, line_no)
        uid = require(obj, "_id", str, path, line_no)
        if not answers:
            raise DataError(f"{path}:{line_no}: field 'answers': empty list")
        dataset = obj.get("dataset") if isinstance(obj.get("dataset"), str) else path.stem
        if not all(a.strip() for a in answers):
            raise DataError(f"{path}:{line_no}: field 'answers': empty answer string")
        meta = {"source": f"longbench:{dataset}", "reward_kind": "qa", "dataset": dataset, "split": path.stem,
                "answers": answers}
        for key in ("length", "language", "all_classes"):
            if key in obj:
                meta[key] = obj[key]
        out.append(DocQuestion(uid, uid, context, question, answers, meta))
    return out


def load_leval(path: str | Path) -> list[DocQuestion]:
    path, out = Path(path), []
    for record, (line_no, obj) in enumerate(read_jsonl(path)):
        questions = _str_list(obj, "instructions", path, line_no)
        outputs = _str_list(obj, "outputs", path, line_no)
        document = require(obj, "input", str, path, line_no)
        if len(questions) != len(outputs):
            raise DataError(
                f"{path}:{line_no}: field 'outputs': {len(outputs)} answers for {len(questions)} instructions"
            )
        for q_index, (question, answer) in enumerate(zip(questions, outputs)):
            if not answer.strip():
                raise DataError(f"{path}:{line_no}: field 'outputs[{q_index}]': empty answer")
            meta = {"source": f"leval:{path.stem}", "reward_kind": "qa", "dataset": path.stem, "answers": [answer],
                    "record": record, "evaluation": obj.get("evaluation")}
            out.append(DocQuestion(f"leval-{path.stem}-{record}-{q_index}", f"{path.stem}-{record}", document,
                                   question, [answer], meta))
    return out


def load_documents(path: str | Path, fmt: str = "auto") -> list[DocQuestion]:
    if fmt == "auto":
        first = next(iter(read_jsonl(path)), None)
        if first is None:
            raise DataError(f"{path}: empty file")
        line_no, obj = first
        if "instructions" in obj:
            fmt = "leval"
        elif "context" in obj:
            fmt = "longbench"
        else:
            raise DataError(f"{path}:{line_no}: neither LongBench ('context', 'input', 'answers') nor L-Eval "
                            f"('instructions', 'outputs', 'input') fields; has {sorted(obj)}")
    return load_leval(path) if fmt == "leval" else load_longbench(path)


def make_processor(counter: TokenCounter, **chunk_args):
    cache: dict[str, Chunking] = {}

    def process(batch: list[DocQuestion]) -> list[Outcome]:
        outcomes = []
        for dq in batch:
            if not dq.question.strip() or not dq.document.strip():
                outcomes.append(Outcome(dq.id, reason="empty_input", detail="empty question or document"))
                continue
            if dq.doc_key not in cache:
                cache.clear()  # questions of one document are adjacent; keep one document's chunks
                cache[dq.doc_key] = chunk_document(dq.document, counter, **chunk_args)
            ch = cache[dq.doc_key]
            issues = check_chunks(dq.document, ch.chunks)
            too_long = [i for i, c in enumerate(ch.chunks) if counter.count(c) > ch.size]
            if issues or too_long:
                detail = "; ".join(map(str, issues)) or f"chunks over {ch.size} tokens: {too_long[:5]}"
                outcomes.append(Outcome(dq.id, reason="check:" + (issues[0].code if issues else "chunk_too_long"),
                                        detail=detail))
                continue
            meta = {**dq.metadata, "method": "chunk", "chunk_tokens": ch.size, "token_counter": counter.name,
                    "hard_cuts": ch.hard_cuts}
            episode = {"id": dq.id, "question": dq.question.strip(), "shards": ch.chunks, "answer": dq.answers[0],
                       "metadata": meta}
            outcomes.append(Outcome(dq.id, episode=episode))
        return outcomes

    return process


def chunk_raw_documents(path: str | Path, limit: int = 0) -> list[Episode]:
    """LongBench / L-Eval questions (the first `limit`, 0 = all) chunked exactly as `python -m data_tools.chunk_docs
    --input PATH` does by default (regex token count, 12 shards per document), as memrl episodes: train.py and
    evaluate.py pass it to memrl.evaluation.eval_episodes for a raw file (memrl does not import data_tools)."""
    questions = load_documents(path)
    outcomes = make_processor(TokenCounter())(questions[: limit or None])
    failed = [f"{o.id}: {o.reason} {o.detail}" for o in outcomes if o.episode is None]
    if failed:
        raise DataError(f"{path}: {len(failed)} question(s) could not be chunked (python -m data_tools.chunk_docs "
                        f"records them and goes on)", details=failed[:10])
    episodes = []
    for o in outcomes:
        problems = validate_record(o.episode)
        assert not problems, f"{path}: chunked episode {o.id}: {problems}"
        episodes.append(Episode(**o.episode))
    return episodes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.chunk_docs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="LongBench-format or L-Eval JSONL")
    p.add_argument("--format", choices=("auto", "longbench", "leval"), default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--chunk-tokens", type=int, default=None, help="one fixed chunk size for every document")
    p.add_argument("--target-shards", type=int, default=12, help="per-document size aims at this many shards")
    p.add_argument("--min-chunk-tokens", type=int, default=64)
    p.add_argument("--max-chunk-tokens", type=int, default=1024, help="the paper's max shard length")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or a checkpoint dir (default: regex count)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    args = p.parse_args(argv)
    try:
        questions = load_documents(args.input, args.format)[: args.limit]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counter = TokenCounter(args.tokenizer)
    process = make_processor(counter, chunk_tokens=args.chunk_tokens, target_shards=args.target_shards,
                             min_chunk_tokens=args.min_chunk_tokens, max_chunk_tokens=args.max_chunk_tokens)
    try:
        summary = run_resumable([(q.id, q) for q in questions], process, args.out, batch_size=8, desc="chunk")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
