"""METEOR 1.5 for English in pure Python: what `meteor-1.5.jar -l en -norm` computes.

The official E2E script scores METEOR through pycocoevalcap's wrapper around meteor-1.5.jar,
which needs Java. This module redoes the jar's English scoring without it, reading the jar's own
resources from the installed pycocoevalcap wheel (function words, WordNet synsets/exceptions,
the paraphrase table), so the data is the official data and comes from PyPI:

* matchers, in order: exact, Snowball-English stem (nltk), WordNet synonym, paraphrase; every
  matcher proposes candidate matches for ALL word pairs (not just unmatched ones);
* the jar's alignment search: one-to-one uncontested matches are fixed, the rest are resolved by a
  beam search (width 40) preferring more matched words, then fewer chunks, then smaller distance;
  like the jar, the search weighs non-exact words 0.5 and sums into ints (so single-word stem or
  synonym matches do not count there), and its distance bookkeeping is reproduced as is;
* 'rank' parameters for English: alpha 0.85, beta 0.20, gamma 0.60, delta 0.75 (function words
  weigh 1 - delta), module weights 1.0 / 0.6 / 0.8 / 0.6;
* per segment the best-scoring reference is kept; the corpus score is computed from the summed
  sufficient statistics (the jar's EVAL line), not by averaging segment scores;
* summing segments, the jar leaves out the chunk count of a segment that matches its reference
  entirely in one chunk (MeteorStats.addStats), so a corpus of exact matches scores 1.

The text is expected already normalized as the jar's `-norm` does it (see meteor_norm.py).
Not reproduced: Java String.hashCode collisions are ignored.
"""

from __future__ import annotations

import gzip
import importlib.util
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

ALPHA, BETA, GAMMA, DELTA = 0.85, 0.20, 0.60, 0.75
MODULE_WEIGHTS = (1.0, 0.6, 0.8, 0.6)  # exact, stem, synonym, paraphrase: used for the score
SEARCH_WEIGHTS = (1.0, 0.5, 0.5, 0.5)  # what MeteorScorer hands its aligner for the beam order
BEAM_SIZE = 40
EXACT, STEM, SYNONYM, PARAPHRASE = range(4)

Synsets = dict[str, frozenset[int]]  # word -> WordNet synset ids
PhraseTable = dict[tuple[str, ...], list[tuple[str, ...]]]  # phrase -> paraphrases

# WordNet's morphy suffix rules as the jar applies them (noun, verb, adjective), in its order.
_DETACH = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
           ("men", "man"), ("ies", "y"), ("s", ""), ("ies", "y"), ("es", "e"), ("es", ""),
           ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", ""), ("er", ""), ("est", ""),
           ("er", "e"), ("est", "e"))


# --------------------------------------------------------------------------- resources


def _pycocoevalcap_meteor_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "meteor"
        if (d / "meteor-1.5.jar").is_file():
            return d
    raise RuntimeError("METEOR needs the resources shipped in the pycocoevalcap wheel "
                       "(meteor/meteor-1.5.jar); reinstall with `pip install pycocoevalcap`")


def _pairs(text: str) -> Iterable[tuple[str, str]]:
    """The jar's two-line records: a key line followed by a value line."""
    lines = text.split("\n")
    for k in range(0, len(lines) - 1, 2):
        yield lines[k], lines[k + 1]


@lru_cache(maxsize=1)
def load_jar_resources() -> tuple[frozenset[str], Synsets, dict[str, tuple[str, ...]]]:
    """(function words, word -> WordNet synset ids, inflected form -> base forms) from the jar."""
    with zipfile.ZipFile(_pycocoevalcap_meteor_dir() / "meteor-1.5.jar") as jar:
        read = lambda name: jar.read(name).decode("utf-8").replace("\r", "")  # noqa: E731
        function_words = frozenset(w for w in read("function/english.words").split("\n") if w)
        synsets = {w: frozenset(int(s) for s in ids.split())
                   for w, ids in _pairs(read("synonym/english.synsets"))}
        bases: dict[str, tuple[str, ...]] = {}
        for base, forms in _pairs(read("synonym/english.exceptions")):
            for form in forms.split():
                bases[form] = bases.get(form, ()) + (base,)
    return function_words, synsets, bases


def load_paraphrases(vocab: set[str], path: Path | None = None) -> PhraseTable:
    """The paraphrase table (phrase -> paraphrases, file order), keeping only entries whose words
    all occur in `vocab`: any other entry can never match, and the full table (5.3M pairs) would
    take gigabytes as Python objects. Scanning the 61 MB gzip takes about 5 s (bytes, streamed)."""
    path = path or _pycocoevalcap_meteor_dir() / "data" / "paraphrase-en.gz"
    known = {w.encode("utf-8") for w in vocab}.issuperset
    table: PhraseTable = {}
    with gzip.open(path, "rb") as fh:
        lines = iter(fh)
        # Records of three lines: a probability (unused by the jar), a phrase, its paraphrase.
        for _prob, ref, par in zip(lines, lines, lines):
            ref_w, par_w = ref.split(), par.split()
            if known(ref_w) and known(par_w):
                table.setdefault(tuple(w.decode("utf-8") for w in ref_w), []).append(
                    tuple(w.decode("utf-8") for w in par_w))
    return table


# --------------------------------------------------------------------------- statistics


@dataclass
class MeteorStats:
    """The jar's sufficient statistics ("test" = hypothesis, "reference" = reference)."""

    test_len: int = 0
    ref_len: int = 0
    test_func: int = 0  # function words in the hypothesis
    ref_func: int = 0
    # matched words per module, split into content / function words, on each side
    test_content: list[int] = field(default_factory=lambda: [0] * 4)
    test_function: list[int] = field(default_factory=lambda: [0] * 4)
    ref_content: list[int] = field(default_factory=lambda: [0] * 4)
    ref_function: list[int] = field(default_factory=lambda: [0] * 4)
    chunks: int = 0

    def add(self, o: MeteorStats) -> None:
        self.test_len += o.test_len
        self.ref_len += o.ref_len
        self.test_func += o.test_func
        self.ref_func += o.ref_func
        for mine, theirs in ((self.test_content, o.test_content), (self.test_function, o.test_function),
                             (self.ref_content, o.ref_content), (self.ref_function, o.ref_function)):
            for k in range(4):
                mine[k] += theirs[k]
        # MeteorStats.addStats leaves out the chunk of a segment that matches its reference
        # entirely in one chunk, so a corpus of exact matches scores 1, not 1 - gamma * ...
        if not o.is_whole_match():
            self.chunks += o.chunks

    def is_whole_match(self) -> bool:
        """Every word on both sides matched, in a single chunk (the jar's `test = ref` case)."""
        return (sum(self.test_content) + sum(self.test_function) == self.test_len
                and sum(self.ref_content) + sum(self.ref_function) == self.ref_len
                and self.chunks == 1)

    def score(self) -> float:
        """MeteorScorer.computeMetrics: weighted P and R, Fmean, fragmentation penalty."""
        test_w_len = DELTA * (self.test_len - self.test_func) + (1 - DELTA) * self.test_func
        ref_w_len = DELTA * (self.ref_len - self.ref_func) + (1 - DELTA) * self.ref_func
        test_w = sum(w * (DELTA * c + (1 - DELTA) * f)
                     for w, c, f in zip(MODULE_WEIGHTS, self.test_content, self.test_function))
        ref_w = sum(w * (DELTA * c + (1 - DELTA) * f)
                    for w, c, f in zip(MODULE_WEIGHTS, self.ref_content, self.ref_function))
        test_m = sum(self.test_content) + sum(self.test_function)
        ref_m = sum(self.ref_content) + sum(self.ref_function)
        # Java yields NaN or 0 here and the jar maps both to 0.
        if test_w_len <= 0 or ref_w_len <= 0 or test_w == 0 or ref_w == 0:
            return 0.0
        p, r = test_w / test_w_len, ref_w / ref_w_len
        fmean = 1.0 / ((1 - ALPHA) / p + ALPHA / r)
        if self.is_whole_match():
            frag = 0.0  # identical strings get no penalty at all
        else:
            frag = self.chunks / ((test_m + ref_m) / 2)
        return max(fmean * (1 - GAMMA * frag ** BETA), 0.0)


# --------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class Match:
    start: int         # first reference word
    length: int        # reference words covered
    match_start: int   # first hypothesis word
    match_length: int  # hypothesis words covered
    module: int


class _Path:
    """PartialAlignment: a beam-search state over reference positions."""

    __slots__ = ("matches", "used1", "used2", "m1", "m2", "chunks", "idx", "last_end", "distance")

    def __init__(self, n_ref: int, n_hyp: int) -> None:
        self.matches: list[Match | None] = [None] * n_ref
        self.used1, self.used2 = [False] * n_hyp, [False] * n_ref
        self.m1 = self.m2 = self.chunks = self.idx = self.distance = 0
        self.last_end = -1

    def copy(self) -> _Path:
        p = _Path.__new__(_Path)
        p.matches, p.used1, p.used2 = self.matches[:], self.used1[:], self.used2[:]
        p.m1, p.m2, p.chunks, p.idx = self.m1, self.m2, self.chunks, self.idx
        p.last_end, p.distance = self.last_end, self.distance
        return p

    def is_used(self, m: Match) -> bool:
        return (any(self.used2[m.start:m.start + m.length])
                or any(self.used1[m.match_start:m.match_start + m.match_length]))

    def take(self, m: Match) -> None:
        """Score `m` as the next match: the jar's int fields truncate the weighted sums."""
        w = SEARCH_WEIGHTS[m.module]
        self.m1 = int(self.m1 + m.match_length * w)
        self.m2 = int(self.m2 + m.length * w)
        if self.last_end != -1 and m.match_start != self.last_end:
            self.chunks += 1
        self.idx = m.start + m.length
        self.last_end = m.match_start + m.match_length

    def key(self) -> tuple[int, int, int]:
        return (-(self.m1 + self.m2), self.chunks, self.distance)


class MeteorScorer:
    """Aligns and scores tokenized (lowercased, normalized) hypothesis / reference word lists."""

    def __init__(self, function_words: frozenset[str], synsets: Synsets,
                 exceptions: dict[str, tuple[str, ...]], paraphrases: PhraseTable | None = None) -> None:
        from nltk.stem.snowball import SnowballStemmer  # the jar uses Snowball's English stemmer

        self.function_words, self.synsets, self.exceptions = function_words, synsets, exceptions
        self.paraphrases = paraphrases or {}
        self._max_phrase = max((len(k) for k in self.paraphrases), default=0)
        self._stem = lru_cache(maxsize=None)(SnowballStemmer("english").stem)
        self._syn = lru_cache(maxsize=None)(self._synonym_sets)

    # -- synonym dictionary (SynonymDictionary) --------------------------------------------

    def _morph(self, word: str) -> str:
        """WordNet base form by suffix rules; '' when none is a WordNet word. (The jar's
        '-ful' branch can never fire: no rule suffix ends in 'ful'.)"""
        if word.endswith("ss") or len(word) <= 2:
            return word
        for suffix, ending in _DETACH:
            if word.endswith(suffix):
                base = word[:len(word) - len(suffix)] + ending
                if base in self.synsets:
                    return base
        return ""

    def _synonym_sets(self, word: str) -> frozenset[int]:
        own = self.synsets.get(word, frozenset())
        if word in self.exceptions:
            stem_sets = frozenset().union(*(self.synsets.get(b, frozenset())
                                            for b in self.exceptions[word]))
        else:
            stem_sets = self.synsets.get(self._morph(word), frozenset())
        return own | stem_sets

    # -- candidate matches (Exact/Stem/Synonym/ParaphraseMatcher) ----------------------------

    def _candidates(self, hyp: Sequence[str],
                    ref: Sequence[str]) -> tuple[list[list[Match]], list[int], list[int]]:
        by_start: list[list[Match]] = [[] for _ in ref]
        cov1, cov2 = [0] * len(hyp), [0] * len(ref)

        def add(m: Match) -> None:
            by_start[m.start].append(m)
            for k in range(m.match_length):
                cov1[m.match_start + k] += 1
            for k in range(m.length):
                cov2[m.start + k] += 1

        # Identical sentences: exact matches alone (the jar does this to avoid beam errors).
        identical = list(hyp) == list(ref)
        for j, r in enumerate(ref):
            for i, h in enumerate(hyp):
                if h == r:
                    add(Match(j, 1, i, 1, EXACT))
        if identical:
            return by_start, cov1, cov2
        stems1, stems2 = [self._stem(w) for w in hyp], [self._stem(w) for w in ref]
        for j, r in enumerate(ref):
            for i, h in enumerate(hyp):
                if h != r and stems1[i] == stems2[j]:
                    add(Match(j, 1, i, 1, STEM))
        syn1, syn2 = [self._syn(w) for w in hyp], [self._syn(w) for w in ref]
        for j, r in enumerate(ref):
            for i, h in enumerate(hyp):
                if h != r and not syn1[i].isdisjoint(syn2[j]):
                    add(Match(j, 1, i, 1, SYNONYM))
        if self.paraphrases:
            in_hyp, in_ref = _Positions(hyp), _Positions(ref)
            for j in range(len(ref)):  # reference phrase -> paraphrase found in the hypothesis
                for length, par in self._phrases_at(ref, j):
                    for i in in_hyp.find(par):
                        add(Match(j, length, i, len(par), PARAPHRASE))
            for i in range(len(hyp)):  # hypothesis phrase -> paraphrase found in the reference
                for length, par in self._phrases_at(hyp, i):
                    for j in in_ref.find(par):
                        add(Match(j, len(par), i, length, PARAPHRASE))
        return by_start, cov1, cov2

    def _phrases_at(self, words: Sequence[str], start: int) -> Iterable[tuple[int, tuple[str, ...]]]:
        for length in range(1, min(self._max_phrase, len(words) - start) + 1):
            for par in self.paraphrases.get(tuple(words[start:start + length]), ()):
                yield length, par

    # -- alignment search (Aligner.align / resolve) ------------------------------------------

    def align(self, hyp: Sequence[str], ref: Sequence[str]) -> tuple[list[Match | None], int]:
        """The chosen matches (indexed by reference start) and their chunk count."""
        by_start, cov1, cov2 = self._candidates(hyp, ref)
        start = _Path(len(ref), len(hyp))
        for j, ms in enumerate(by_start):  # uncontested one-to-one matches are fixed up front
            if len(ms) == 1:
                m = ms[0]
                if (all(cov2[m.start + k] == 1 for k in range(m.length))
                        and all(cov1[m.match_start + k] == 1 for k in range(m.match_length))):
                    start.matches[j] = m
                    start.used2[m.start:m.start + m.length] = [True] * m.length
                    start.used1[m.match_start:m.match_start + m.match_length] = [True] * m.match_length
        best = self._resolve(by_start, start)
        return best.matches, _count_chunks(best.matches)

    def _resolve(self, by_start: list[list[Match]], start: _Path) -> _Path:
        next_paths = [start]
        n = len(by_start)
        for current in range(n + 1):
            paths = sorted(next_paths, key=_Path.key)  # stable, like Collections.sort
            next_paths = []
            for path in paths[:BEAM_SIZE]:
                if current == n:  # complete: close the open chunk
                    if path.last_end != -1:
                        path.chunks += 1
                    next_paths.append(path)
                    continue
                if path.used2[current]:
                    if current < path.idx:  # inside a match already taken
                        next_paths.append(path)
                    elif path.matches[path.idx] is not None:  # a match fixed up front
                        m = path.matches[path.idx]
                        path.take(m)
                        path.distance += abs(m.start - m.match_start)
                        next_paths.append(path)
                    continue
                for m in by_start[current]:
                    if path.is_used(m):
                        continue
                    new = path.copy()
                    new.used2[m.start:m.start + m.length] = [True] * m.length
                    new.used1[m.match_start:m.match_start + m.match_length] = [True] * m.match_length
                    new.matches[current] = m
                    new.take(m)
                    # The jar adds this distance to the parent path, not the new one (so later
                    # siblings and the skip path inherit it); kept for identical tie-breaking.
                    path.distance += abs(m.start - m.match_start)
                    next_paths.append(new)
                if path.last_end != -1:  # skip this reference word: closes the chunk
                    path.chunks += 1
                    path.last_end = -1
                path.idx += 1
                next_paths.append(path)
            if not next_paths:
                next_paths.append(paths[0])
        return sorted(next_paths, key=_Path.key)[0]

    # -- statistics ---------------------------------------------------------------------------

    def pair_stats(self, hyp: Sequence[str], ref: Sequence[str]) -> MeteorStats:
        matches, chunks = self.align(hyp, ref)
        func1 = [w in self.function_words for w in hyp]
        func2 = [w in self.function_words for w in ref]
        s = MeteorStats(test_len=len(hyp), ref_len=len(ref), test_func=sum(func1),
                        ref_func=sum(func2), chunks=chunks)
        for m in matches:
            if m is None:
                continue
            for k in range(m.match_length):
                (s.test_function if func1[m.match_start + k] else s.test_content)[m.module] += 1
            for k in range(m.length):
                (s.ref_function if func2[m.start + k] else s.ref_content)[m.module] += 1
        return s

    def segment_stats(self, hyp: Sequence[str], refs: Sequence[Sequence[str]]) -> MeteorStats:
        """Statistics against the best-scoring reference (the first one on ties)."""
        # Only an identical reference scores 1 (P = R = 1 needs every word matched exactly, no
        # penalty needs a single chunk), so the first identical one wins: the rest need no
        # alignment. (Not for an empty hypothesis: every reference scores 0, the first wins.)
        if hyp:
            same = next((ref for ref in refs if list(ref) == list(hyp)), None)
            if same is not None:
                return self.pair_stats(hyp, same)
        best, best_score = MeteorStats(), -1.0
        for ref in refs:
            s = self.pair_stats(hyp, ref)
            if s.score() > best_score:
                best, best_score = s, s.score()
        return best

    def corpus_score(self, hyps: Sequence[Sequence[str]],
                     refs: Sequence[Sequence[Sequence[str]]]) -> float:
        total = MeteorStats()
        for hyp, rs in zip(hyps, refs):
            total.add(self.segment_stats(hyp, rs))
        return total.score()


class _Positions:
    """Where each n-gram of `words` starts (ascending), indexed per n on first use: finding a
    paraphrase is then one lookup, not a scan of the sentence."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = tuple(words)
        self.by_n: dict[int, dict[tuple[str, ...], list[int]]] = {}

    def find(self, phrase: tuple[str, ...]) -> Sequence[int]:
        n = len(phrase)
        index = self.by_n.get(n)
        if index is None:
            index = self.by_n[n] = {}
            for i in range(len(self.words) - n + 1):
                index.setdefault(self.words[i:i + n], []).append(i)
        return index.get(phrase, ())


def _count_chunks(matches: Sequence[Match | None]) -> int:
    """Aligner.getCountAndChunks: runs of matches contiguous in both strings."""
    chunks, idx, last_end = 0, 0, -1
    while idx < len(matches):
        m = matches[idx]
        if m is None:
            if last_end != -1:
                chunks += 1
                last_end = -1
            idx += 1
        else:
            if last_end != -1 and m.match_start != last_end:
                chunks += 1
            idx = m.start + m.length
            last_end = m.match_start + m.match_length
    return chunks + (last_end != -1)


def corpus_meteor(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], *,
                  paraphrase: bool = True) -> float:
    """Corpus METEOR 1.5 of tokenized hypotheses against their tokenized references."""
    return corpus_meteor_sets([hyps], refs, paraphrase=paraphrase)[0]


def corpus_meteor_sets(hyp_sets: Sequence[Sequence[Sequence[str]]],
                       refs: Sequence[Sequence[Sequence[str]]], *, paraphrase: bool = True) -> list[float]:
    """Corpus METEOR of several hypothesis sets against the same references: the paraphrase
    table (a 5 s scan) is read once for all of them."""
    function_words, synsets, exceptions = load_jar_resources()
    table = None
    if paraphrase:
        vocab = {w for hyps in hyp_sets for h in hyps for w in h}
        vocab |= {w for rs in refs for r in rs for w in r}
        table = load_paraphrases(vocab)
    scorer = MeteorScorer(function_words, synsets, exceptions, table)
    return [scorer.corpus_score(hyps, refs) for hyps in hyp_sets]


__all__ = ["MeteorScorer", "MeteorStats", "Match", "corpus_meteor", "corpus_meteor_sets", "load_jar_resources",
           "load_paraphrases", "ALPHA", "BETA", "GAMMA", "DELTA", "MODULE_WEIGHTS"]
