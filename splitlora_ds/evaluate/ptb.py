"""The COCO evaluator's tokenization: Stanford PTBTokenizer (CoreNLP 3.4.1), lowercased, with
pycocoevalcap's punctuation tokens dropped; from the jar when Java is there, else in Python.

The official E2E script runs `java -cp stanford-corenlp-3.4.1.jar ...PTBTokenizer -preserveLines
-lowerCase` on every reference and hypothesis and removes the tokens listed in `PUNCTUATIONS`
(exactly these strings: the lowercased bracket tokens "-lrb-" etc. are NOT removed, since the
list holds them in upper case). `ptb_tokenize_python` reproduces that tokenizer's decisions for
the kinds of text E2E holds (words, hyphenated words, numbers and prices, contractions, quotes,
brackets, runs of periods); tests/test_metrics_official.py checks it against the jar on every
devset sentence. Not covered: Stanford's rules for e-mail/URL/@-words, SGML tags, sentence-final
abbreviations (their extra "." is dropped with the punctuation anyway) and rarer quote forms.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from splitlora_ds.evaluate.java import JAVA_TIMEOUT_S, java_command, pycocoevalcap_file

# pycocoevalcap/tokenizer/ptbtokenizer.py's PUNCTUATIONS, verbatim.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!",
                          ",", ":", "-", "--", "...", ";"])

_L = r"[^\W\d_]"   # a letter
_A = r"[^\W_]"     # a letter or digit
# A word: letters/digits, internal [.!?] only when a letter follows ("eagle.the", not "5.it"),
# with an o'/d'/l' prefix kept ("o'clock"); parts joined by one hyphen or slash stay one token
# ("non-kid-friendly", "20-25", "5-star", "and/or") but a run of dashes does not join ("x--y").
_PART = rf"(?:(?:[oOdDlL]'(?={_L}))?{_L}{_A}*(?:[.!?]{_L}{_A}*)*|\d+(?:[.,:/]\d+)*{_A}*)"
_WORD = re.compile(rf"{_PART}(?:[-/]{_PART})*")
_SIGNED = re.compile(r"-\d+(?:[.,:/]\d+)*")  # "£-25" -> "#", "-25"
_ABBREV = re.compile(  # kept with their period: known abbreviations, initials, acronyms
    r"(?:(?i:mr|mrs|ms|dr|st|jr|sr|prof|inc|ltd|co|corp|etc|vs|mt|ave|rd|e\.g|i\.e)"
    rf"|(?:{_L}\.)+{_L}|{_L})\.(?!{_A})")
_CONTRACTION = re.compile(r"'(?:s|re|ve|m|d|ll)(?![^\W_])", re.IGNORECASE)
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"),
                "gotta": ("got", "ta"), "gimme": ("gim", "me"), "lemme": ("lem", "me")}
# Single characters (or runs) mapped the way PTB3 escaping and currency normalization do.
_SYMBOLS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-",
            "£": "#", "€": "$", "¢": "cents", "‘": "`", "’": "'", "“": "``", "”": "''",
            "…": "...", "–": "--", "—": "--"}
_RUN = re.compile(r"\.{3,}|--+|[!?]{2,}|``|''")


def ptb_tokenize_python(text: str) -> list[str]:
    """Stanford PTBTokenizer (-preserveLines -lowerCase) on one line, in pure Python."""
    out: list[str] = []
    text = text.replace("\n", " ")
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        m = _ABBREV.match(text, i)
        w = _WORD.match(text, i)
        if m and (not w or m.end() > w.end()):
            out.append(m.group())
            i = m.end()
            continue
        if w and text.startswith(".", w.end()) and text[w.end() + 1:w.end() + 2] in (",", ";", ":"):
            out.append(w.group() + ".")  # "center.," keeps its period, like an abbreviation
            i = w.end() + 1
            continue
        if w:
            word = w.group()
            if (text.startswith("'t", w.end()) and word[-1:] in "nN" and len(word) > 1
                    and not (w.end() + 2 < n and (text[w.end() + 2].isalnum()))):
                out += [word[:-1], word[-1] + "'t"]  # "isn't" -> "is", "n't"
                i = w.end() + 2
                continue
            out += _SPLIT_WORDS.get(word.lower(), (word,))
            i = w.end()
            continue
        if c in "'`":
            m = _CONTRACTION.match(text, i)
            if m and out and i > 0 and not text[i - 1].isspace():
                out.append(m.group())
                i = m.end()
                continue
            # An opening single quote (line start, after a space or an opening bracket) is "`".
            opening = c == "`" or ((i == 0 or text[i - 1].isspace() or text[i - 1] in "([{\"“‘")
                                   and i + 1 < n and text[i + 1].isalpha())
            if text.startswith("''", i) or text.startswith("``", i):
                out.append(text[i:i + 2])
                i += 2
            else:
                out.append("`" if opening else "'")
                i += 1
            continue
        if c == '"':
            opening = i == 0 or text[i - 1].isspace() or text[i - 1] in "([{" or \
                (i + 1 < n and text[i + 1].isalnum())
            out.append("``" if opening else "''")
            i += 1
            continue
        m = _SIGNED.match(text, i) if c == "-" else None
        if m:
            out.append(m.group())
            i = m.end()
            continue
        m = _RUN.match(text, i)
        if m:
            out.append("--" if m.group().startswith("-") else m.group())
            i = m.end()
            continue
        out.append(_SYMBOLS.get(c, c))
        i += 1
    return [t.lower() for t in out]


def coco_tokens(tokens: Sequence[str]) -> list[str]:
    """Drop pycocoevalcap's punctuation tokens (exact strings, after lowercasing)."""
    return [t for t in tokens if t and t not in PUNCTUATIONS]


def ptb_tokenize_jar(texts: Sequence[str]) -> list[list[str]]:
    """The official pass: one PTBTokenizer run over all texts, one line each.

    Empty texts are not sent: the tokenizer drops empty lines, which would shift every later line
    (the official wrapper has that misalignment); they come back as no tokens.
    """
    lines = [t.replace("\n", " ") for t in texts]
    keep = [i for i, t in enumerate(lines) if t.strip()]
    out: list[list[str]] = [[] for _ in lines]
    if not keep:
        return out
    jar = pycocoevalcap_file("tokenizer/stanford-corenlp-3.4.1.jar")
    with tempfile.TemporaryDirectory(prefix="splitlora-ptb-") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_bytes("\n".join(lines[i] for i in keep).encode("utf-8"))
        proc = subprocess.run(
            java_command("-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                         "-preserveLines", "-lowerCase", str(src)),
            capture_output=True, timeout=JAVA_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"Stanford PTBTokenizer failed (exit {proc.returncode}): "
                           f"{proc.stderr.decode('utf-8', 'replace')[-500:]}")
    result = proc.stdout.decode("utf-8").split("\n")
    if len(result) < len(keep):
        raise RuntimeError(f"Stanford PTBTokenizer returned {len(result)} lines for {len(keep)}")
    for i, line in zip(keep, result):
        out[i] = line.rstrip().split(" ")
    return out


__all__ = ["PUNCTUATIONS", "coco_tokens", "ptb_tokenize_jar", "ptb_tokenize_python"]
