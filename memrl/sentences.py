"""Rule-based sentence segmentation that keeps numbers, abbreviations and LaTeX math intact.

`split_sentences(text)` returns (start, end) character spans into `text`, so callers slice the
original string and every sentence is verbatim (nothing is re-joined or re-spaced).

A boundary is a terminator run [.?!]+ (plus closing quotes/brackets) followed by whitespace and a
character that can start a sentence (capital, digit, quote, bracket, "$" or "\\"), with exceptions:
- numbers: "3.5", "1,000", "$2.50" have no whitespace after the dot, so they never match;
- abbreviations: titles and Latin forms (Mr., Dr., e.g., i.e., No. 5) never end a sentence; forms
  that may (a.m., p.m., etc., U.S., Inc.) end one only when a typical sentence opener follows;
- protected spans are opaque: $...$, $$...$$, \\(...\\), \\[...\\], \\begin{env}...\\end{env} and
  [asy]...[/asy]. A span whose math ends in a terminator ("... q.$ Next", "...7.\\]Find") closes the
  sentence. A "$...$" pair that reads like prose ("$2 per egg. How much ... $") is currency, not math;
- a blank line is always a boundary (MATH500 paragraphs, document paragraphs);
- "day.She" (two glued sentences, both words lower->Upper) is split.
Cost: linear in the text. Every scan resumes where the previous one stopped (an opener without its closer is
searched for once, not once per opener), and no pattern backtracks over a long word; long documents
(data_tools.chunk_docs) go through here too.
"""

from __future__ import annotations

import bisect
import re

NEVER_END = {
    "mr", "mrs", "ms", "dr", "prof", "rev", "gen", "sen", "rep", "capt", "lt", "col", "sgt", "mt",
    "vs", "e.g", "i.e", "cf", "approx", "fig", "figs", "eq", "eqs", "vol", "pp", "ch", "st", "ave", "no", "nos",
}
MAYBE_END = {
    "a.m", "p.m", "etc", "u.s", "u.k", "inc", "ltd", "co", "corp", "jr", "sr", "oz", "lb", "lbs", "ft", "hr", "hrs",
    "min", "sec",
}
STARTERS = set(
    "he she it they we i you the a an this that these those there his her their its our my your if how what "
    "which who when where why each every after before then so but in on at for find compute calculate "
    "determine one two three some all both".split()
)
_TERMINATOR = re.compile(r"[.?!]+[\"'\u201d\u2019)\]]*")
_OPENER = re.compile(r"\\\$|\$\$|\$|\\\(|\\\[|\\begin\{([A-Za-z*]+)\}|\[asy\]")
_CLOSER = {"$$": "$$", "\\(": "\\)", "\\[": "\\]", "[asy]": "[/asy]"}
_TEXT_CMD = re.compile(r"\\(?:text\w*|mbox|mathrm|mathbf|operatorname|emph)\s*\{[^{}]*\}")
# \b: try words from their start only, else a long run of letters is re-scanned from each of its positions
_PROSE = re.compile(r"\b[A-Za-z]{2,}[,;:]?\s+[A-Za-z]{2,}[,;:]?\s+[A-Za-z]{2,}")
_SENTENCE_START = re.compile(r"[A-Z0-9$\\\"'\u201c\u2018(\[]")


def _plausible_inline_math(content: str) -> bool:
    """False for a $...$ pair that is really two currency signs around prose."""
    if "\n\n" in content or re.search(r"[.?!]\s+[A-Z]", content):
        return False
    if content[:1].isdigit() and content[-1:].isspace():  # "$2 and $3": "2 and " ends in a space
        return False
    stripped = re.sub(r"\\[A-Za-z]+", " ", _TEXT_CMD.sub(" ", content))
    return not _PROSE.search(stripped)


def protected_spans(text: str) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) spans of math / asy code, in order."""
    spans, i = [], 0
    next_at: dict[str, tuple[int, int]] = {}  # closer -> (searched from, found at or -1): text.find, remembered

    def find(closer: str, start: int) -> int:
        """text.find(closer, start) in amortised linear time: a search that found nothing (or something at or after
        `start`) from an earlier position is still the answer."""
        frm, at = next_at.get(closer, (len(text) + 1, -1))
        if not (frm <= start and (at == -1 or at >= start)):
            at = text.find(closer, start)
            next_at[closer] = (start, at)
        return at

    while (m := _OPENER.search(text, i)) is not None:
        tok = m.group(0)
        if tok == "\\$":  # an escaped dollar is a literal (LaTeX currency)
            i = m.end()
            continue
        if tok == "$":
            close = re.compile(r"(?<!\\)\$").search(text, m.end())
            end = close.start() if close else -1
            closer = "$"
            if end != -1 and (end == m.end() or not _plausible_inline_math(text[m.end() : end])):
                end = -1
        else:
            closer = f"\\end{{{m.group(1)}}}" if m.group(1) else _CLOSER[tok]
            end = find(closer, m.end())
        if end == -1:
            i = m.end()  # unmatched or implausible opener: plain text
            continue
        spans.append((m.start(), end + len(closer)))
        i = end + len(closer)
    return spans


_DISPLAY_OPENERS = ("$$", "\\[", "\\begin")
_CLOSERS = re.compile(r"(?:\$\$|\$|\\\]|\\\)|\\end\{[A-Za-z*]+\}|\[/asy\])\s*$")


def math_body_end(span: str) -> str:
    """The last non-space character inside a math span, closers removed ("$f(1) = 1,$" -> ",")."""
    body = span
    while (m := _CLOSERS.search(body)) is not None and m.start() < len(body):
        body = body[: m.start()].rstrip()
        if not m.group(0).strip().startswith("\\end"):
            break
    return body[-1:]


def _starts_sentence(text: str, pos: int) -> bool:
    return pos < len(text) and bool(_SENTENCE_START.match(text, pos))


def _next_word(text: str, pos: int) -> str:
    m = re.match(r"[\"'(]*([A-Za-z']+)", text[pos : pos + 40])
    return m.group(1).lower() if m else ""


def _is_boundary(text: str, term_start: int, term_end: int, dot: bool) -> bool:
    """Is there a sentence boundary right after text[term_start:term_end] (a terminator run)?"""
    ws_end = term_end
    while ws_end < len(text) and text[ws_end].isspace():
        ws_end += 1
    if ws_end == len(text):
        return True
    if ws_end == term_end:  # no whitespace: only "day.She"-style glued sentences
        return bool(re.search(r"[a-z]{2}$", text[max(0, term_start - 2) : term_start])) and bool(
            re.match(r"[A-Z][a-z]", text[ws_end : ws_end + 2])
        )
    if not _starts_sentence(text, ws_end):
        return False
    if dot:
        m = re.search(r"([A-Za-z][A-Za-z.]*)$", text[max(0, term_start - 20) : term_start])
        word = m.group(1).lower().rstrip(".") if m else ""
        if word == "no" or word == "nos":
            return not text[ws_end].isdigit()  # "No. 5" vs "The answer is no. Then"
        if word in NEVER_END:
            return False
        if word in MAYBE_END:
            return _next_word(text, ws_end) in STARTERS
    return True


def split_sentences(text: str, protect_math: bool = True) -> list[tuple[int, int]]:
    """(start, end) spans of the sentences of `text`, whitespace-trimmed, in order, never empty."""
    spans = protected_spans(text) if protect_math else []
    starts = [s for s, _ in spans]

    def inside(pos: int) -> bool:
        k = bisect.bisect_right(starts, pos) - 1
        return k >= 0 and spans[k][0] <= pos < spans[k][1]

    cuts = set()
    for m in _TERMINATOR.finditer(text):
        if not inside(m.start()) and _is_boundary(text, m.start(), m.end(), dot=m.group(0)[0] == "."):
            cuts.add(m.end())
    for s, e in spans:  # math that ends its sentence: "$q.$ Find", ".\]Find", "\end{cases}\]Find"
        glued_capital = re.match(r"\s*[A-Z][a-z]", text[e : e + 40]) is not None
        if math_body_end(text[s:e]) in (".", "?", "!"):
            if _is_boundary(text, e - 1, e, dot=False) or glued_capital:
                cuts.add(e)
        elif text.startswith(_DISPLAY_OPENERS, s) and glued_capital:
            cuts.add(e)  # display math then a capitalised word: a new sentence in LaTeX source
    for m in re.finditer(r"\n[ \t]*\n", text):
        if not inside(m.start()):
            cuts.add(m.start())

    out, prev = [], 0
    for cut in sorted(cuts) + [len(text)]:
        seg = text[prev:cut]
        lead = len(seg) - len(seg.lstrip())
        body = seg.strip()
        if body:
            out.append((prev + lead, prev + lead + len(body)))
        prev = cut
    return out


def sentences(text: str, protect_math: bool = True) -> list[str]:
    return [text[s:e] for s, e in split_sentences(text, protect_math)]
