"""METEOR 1.5's `-norm` text normalizer for English, in Python (edu.cmu.meteor.util.Normalizer).

A Moses-style tokenizer with METEOR's additions; what matters on E2E text: a hyphen between two
letters/digits becomes a space ("family-friendly" -> "family friendly", "20-25" -> "20 25"),
contractions split to the right ("it's" -> "it 's"), symbols other than . ' ` , - are set apart,
and a word-final period is split off unless a lowercase word follows it (the jar's trick for
unlisted abbreviations: on lowercased COCO text that keeps every period but a sentence-final one)
or the word is a listed non-breaking prefix. Punctuation is kept (the official call has no
-noPunct). The regular expressions and their order are the jar's; Java's \\s and \\p{Digit} /
\\p{Lower} are ASCII-only, hence the explicit classes.
"""

from __future__ import annotations

import re
import zipfile
from functools import lru_cache

from splitlora_ds.evaluate.java import pycocoevalcap_file

_ALPHA = "A-Za-zŠŽšžŸÀ-ÖØ-öø-žЀ-ӿԀ-ԧꙀ-ꙮ꙾-ꚗᴀ-ᵿ"
_ALNUM = "0-9" + _ALPHA
_JAVA_SPACE = " \t\n\x0b\f\r"

_SEP_OTHER = re.compile(rf"([^{_ALNUM}{_JAVA_SPACE}.'`,\-‘’])")
_MULTI_DOT = re.compile(r"\.(\.+)")
_MULTI_DOT2 = re.compile(r"DOTMULTI\.([^.])")
_COMMA = (re.compile(r"([^0-9]),([^0-9])"), re.compile(r"([0-9]),([^0-9])"),
          re.compile(r"([^0-9]),([0-9])"))
_QUOTE = re.compile(r"([`‘’])")
_QUOTE2 = re.compile(r"([“”]|'')")
_RM_DASH = re.compile(rf"([{_ALNUM}.])-([{_ALNUM}])")
_CONT_EN = ((re.compile(rf"([^{_ALPHA}])'([^{_ALPHA}])"), r"\1 ' \2"),
            (re.compile(rf"([^{_ALPHA}0-9])'([{_ALPHA}])"), r"\1 ' \2"),
            (re.compile(rf"([{_ALPHA}])'([^{_ALPHA}])"), r"\1 ' \2"),
            (re.compile(rf"([{_ALPHA}])'([{_ALPHA}])"), r"\1 '\2"),
            (re.compile(r"([0-9])'(s)"), r"\1 '\2"))
_HAS_ALPHA = re.compile(rf"[{_ALPHA}]")
_WHITE = re.compile("[ \u2000-\u200a\u202f\u205f\u3000\u00a0]+")
_ANY, _NUMERIC_ONLY = 1, 2


@lru_cache(maxsize=1)
def nonbreaking_prefixes() -> dict[str, int]:
    """nonbreaking/english.prefixes from meteor-1.5.jar: prefix -> any / numeric-only."""
    with zipfile.ZipFile(pycocoevalcap_file("meteor/meteor-1.5.jar")) as jar:
        text = jar.read("nonbreaking/english.prefixes").decode("utf-8")
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            out[fields[0]] = _NUMERIC_ONLY if fields[1:2] == ["#NUMERIC_ONLY#"] else _ANY
    return out


def _java_trim(s: str) -> str:
    return s.strip("".join(chr(c) for c in range(33)))


def normalize_line(line: str) -> str:
    """Normalizer.normalizeLine(line, English, keepPunctuation=true), then lowercased."""
    s = _SEP_OTHER.sub(r" \1 ", f" {line} ")
    s = _MULTI_DOT.sub(r" DOTMULTI\1", s)
    while "DOTMULTI." in s:
        s = _MULTI_DOT2.sub(r"DOTDOTMULTI \1", s)
        s = s.replace("DOTMULTI.", "DOTDOTMULTI")
    for pattern in _COMMA:
        s = pattern.sub(r"\1 , \2", s)
    s = _QUOTE2.sub(' " ', _QUOTE.sub("'", s))
    s = s.replace("–", "-").replace("--", "-")
    s = _RM_DASH.sub(r"\1 \2", s)
    for pattern, repl in _CONT_EN:
        s = pattern.sub(repl, s)
    words = [w for w in re.split("[ \t\n\r\f]+", s) if w]  # java.util.StringTokenizer
    nbp = nonbreaking_prefixes()
    rebuilt = []
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else None
        if len(word) > 1 and word.endswith("."):
            pre = word[:-1]
            kind = nbp.get(pre)
            if "." in pre and _HAS_ALPHA.search(pre):
                word = word.replace(".", "")  # U.S. -> US
            elif kind == _ANY or (nxt is not None and "a" <= nxt[0] <= "z"):
                pass
            elif kind == _NUMERIC_ONLY and nxt is not None and "0" <= nxt[0] <= "9":
                pass
            else:
                word = pre + " ."
        rebuilt.append(word)
    s = "".join(w + " " for w in rebuilt)
    while "DOTDOTMULTI" in s:
        s = s.replace("DOTDOTMULTI", "DOTMULTI.")
    s = s.replace("DOTMULTI", ".")
    return _java_trim(_WHITE.sub(" ", s)).lower()


__all__ = ["normalize_line", "nonbreaking_prefixes"]
