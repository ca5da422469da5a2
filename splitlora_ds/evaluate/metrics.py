"""The E2E NLG challenge metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr), as the official scorer.

Mirrors tuetschek/e2e-metrics `measure_scores.py` on a CSV of references (`mr,ref`, several rows
per MR) and a hypothesis file with one line per distinct MR, in first-appearance order:

    python -m splitlora_ds.evaluate.metrics --hyp out.txt --refs devset.csv --out scores.json [--impl auto|jar|python]

The official script fixes some mojibake in the reference file (Ł, Â£, Ã©, ã©), runs
mteval-v13a-sig.pl for BLEU/NIST and the MS-COCO caption evaluator for the rest: Stanford's
PTBTokenizer (Java) lowercases and tokenizes, pycocoevalcap's punctuation tokens are dropped, then
meteor-1.5.jar (`-l en -norm`), Rouge and Cider score. Here:

* BLEU: sacrebleu's corpus BLEU (4-gram, clipped by the max count over all references, closest
  reference length, ties to the shorter) on mteval-13a tokens after mteval's ASCII-only
  lowercasing: the definition of mteval-v13a; reported in [0, 1].
* NIST: mteval's corpus NIST (n=5) implemented below, including its reference length (total
  reference words / mean number of references per MR, see `nist`).
* Tokenization for METEOR/ROUGE-L/CIDEr, and METEOR itself, come in two implementations (`impl`):
  - "jar" (default whenever a Java runtime is found): the official ones: stanford-corenlp-3.4.1.jar
    and meteor-1.5.jar from the installed pycocoevalcap wheel, byte-identical to the jars the
    official scorer ships, run as it runs them (see ptb.py, meteor_jar.py);
  - "python" (no Java, or forced): ptb.py's port of the Stanford tokenizer and meteor.py's port
    of METEOR 1.5 with meteor_norm.py's port of its `-norm` normalizer, which read the jar's own
    data (function words, WordNet, paraphrase table, non-breaking prefixes) from the wheel.
  The returned scores say which one ran: "tokenizer_impl" and "meteor_impl".
* ROUGE-L and CIDEr: pycocoevalcap's own Rouge (beta 1.2) and Cider (CIDEr-D, document
  frequencies from these references, x10): the exact code the official script runs.

tests/test_metrics_official.py holds the official scorer's numbers on three hypothesis sets over
the E2E devset; both implementations agree with them within 0.1% (jar: to all printed digits).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from splitlora_ds.errors import ConfigError
from splitlora_ds.evaluate.java import IMPLS, resolve_impl

METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")

# Mojibake the official reader repairs in E2E reference files.
_FIXES = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))
# mteval-v13a lowercases with `tr/[A-Z]/[a-z]/`: ASCII letters only.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


# --------------------------------------------------------------------------- tokenization


@lru_cache(maxsize=1)
def _mteval_tokenizer():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's lowercasing (ASCII) and tokenization, as BLEU and NIST see the text."""
    return _mteval_tokenizer()(text.translate(_ASCII_LOWER)).split()


def coco_tokenize(text: str) -> list[str]:
    """The COCO evaluator's tokens for one text, in pure Python (see ptb.py)."""
    from splitlora_ds.evaluate.ptb import coco_tokens, ptb_tokenize_python

    return coco_tokens(ptb_tokenize_python(text))


def coco_tokenize_all(texts: Sequence[str], impl: str = "auto") -> list[list[str]]:
    """The COCO evaluator's tokens for many texts: one Stanford tokenizer run with impl 'jar'."""
    from splitlora_ds.evaluate.ptb import coco_tokens, ptb_tokenize_jar

    if resolve_impl(impl) == "jar":
        return [coco_tokens(t) for t in ptb_tokenize_jar(texts)]
    return [coco_tokenize(t) for t in texts]


# --------------------------------------------------------------------------- metrics


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ConfigError(f"score: {len(hypotheses)} hypotheses but {len(references)} reference "
                          "lists; expected one hypothesis per reference list")
    if not hypotheses:
        raise ConfigError("score: no hypotheses to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ConfigError(f"score: references[{i}] must be a non-empty list of strings, "
                              f"got {refs!r:.60}")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1], as mteval-v13a.pl (lowercased, 13a tokens, closest ref length)."""
    from sacrebleu.metrics import BLEU

    n_refs = max(len(r) for r in references)
    # sacrebleu takes one stream per reference slot; None marks a missing reference (mteval's
    # padding with empty references, which its closest-length rule skips too).
    streams = [[refs[k].translate(_ASCII_LOWER) if k < len(refs) else None for refs in references]
               for k in range(n_refs)]
    scorer = BLEU(lowercase=False, tokenize="13a", smooth_method="none", effective_order=False)
    hyps = [h.translate(_ASCII_LOWER) for h in hypotheses]
    # min: sacrebleu's float sums can land a hair above 100 for a perfect corpus.
    return min(scorer.corpus_score(hyps, streams).score / 100.0, 1.0)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def nist(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], n: int = 5) -> float:
    """Corpus NIST as mteval-v13a / pymteval, on tokenized text.

    info(w1..wk) = log2(count(w1..wk-1) / count(w1..wk)) over all reference tokens (the 0-gram
    count is the total number of reference words); score = sum_k (sum of info of the clipped
    hits / number of hypothesis k-grams) * exp(-beta * log(min(sys_len / avg_ref_len, 1))^2)
    with beta chosen so that a length ratio of 2/3 gives a penalty of 0.5. The average reference
    length is mteval's: all reference words / (references / MRs), i.e. the references of all MRs
    pooled (the official script pads short reference lists with empty ones, which count neither
    as words nor as references), not the mean of each MR's average length.
    """
    counts: Counter = Counter()
    for rs in refs:
        for r in rs:
            counts[()] += len(r)
            for k in range(1, n + 1):
                counts.update(_ngrams(r, k))
    hit_info, hyp_total = [0.0] * n, [0] * n
    sys_len = 0
    for hyp, rs in zip(hyps, refs):
        for k in range(1, n + 1):
            hyp_ng = _ngrams(hyp, k)
            best: Counter = Counter()
            for r in rs:
                best |= _ngrams(r, k)  # max count over the references
            hyp_total[k - 1] += sum(hyp_ng.values())
            for g, c in hyp_ng.items():
                hits = min(c, best[g])
                if hits:
                    hit_info[k - 1] += hits * math.log2(counts[g[:-1]] / counts[g])
        sys_len += len(hyp)
    refs_per_mr = sum(len(rs) for rs in refs) / len(refs)
    ref_len = counts[()] / refs_per_mr
    total = sum(h / t for h, t in zip(hit_info, hyp_total) if t)
    ratio = sys_len / ref_len if ref_len else 0.0
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        beta = -math.log(0.5) / math.log(1.5) ** 2
        penalty = math.exp(-beta * math.log(ratio) ** 2)
    return total * penalty


def rouge_l(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]]) -> float:
    """pycocoevalcap ROUGE-L (beta 1.2), averaged over sentences."""
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_dicts(hyps, refs)
    return float(Rouge().compute_score(gts, res)[0])


def cider(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]]) -> float:
    """pycocoevalcap CIDEr (the COCO evaluator's CIDEr-D), document frequencies from `refs`."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _coco_dicts(hyps, refs)
    return float(Cider().compute_score(gts, res)[0])


def _coco_dicts(hyps, refs) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    return ({i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)},
            {i: [" ".join(h)] for i, h in enumerate(hyps)})


def meteor(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], *,
           paraphrase: bool = True, impl: str = "auto") -> float:
    """Corpus METEOR 1.5 (`-l en -norm`) on COCO-tokenized text: the jar, or its Python port."""
    return meteor_sets([hyps], refs, paraphrase=paraphrase, impl=impl)[0]


def meteor_sets(hyp_sets: Sequence[Sequence[Sequence[str]]], refs: Sequence[Sequence[Sequence[str]]], *,
                paraphrase: bool = True, impl: str = "auto") -> list[float]:
    """`meteor` for several hypothesis sets against the same references, loading METEOR once."""
    if resolve_impl(impl) == "jar":
        from splitlora_ds.evaluate.meteor_jar import meteor_jar_sets

        return meteor_jar_sets([[" ".join(h) for h in hyps] for hyps in hyp_sets],
                               [[" ".join(r) for r in rs] for rs in refs], paraphrase=paraphrase)
    from splitlora_ds.evaluate.meteor import corpus_meteor_sets
    from splitlora_ds.evaluate.meteor_norm import normalize_line

    norm = lambda toks: normalize_line(" ".join(toks)).split()  # noqa: E731
    return corpus_meteor_sets([[norm(h) for h in hyps] for hyps in hyp_sets],
                              [[norm(r) for r in rs] for rs in refs], paraphrase=paraphrase)


def score(hypotheses: list[str], references: list[list[str]], *, meteor_paraphrase: bool = True,
          impl: str = "auto") -> dict[str, float | str]:
    """The five E2E metrics of `hypotheses[i]` against its references `references[i]`.

    `impl` ('auto', 'jar', 'python') picks the tokenizer and METEOR implementation; 'auto' runs
    the official jars when Java is available. The result names the one used ("tokenizer_impl",
    "meteor_impl"). `meteor_paraphrase=False` skips METEOR's paraphrase module (faster; METEOR
    then comes out slightly lower than the official one).
    """
    return score_many([hypotheses], references, meteor_paraphrase=meteor_paraphrase, impl=impl)[0]


def score_many(hypothesis_sets: Sequence[Sequence[str]], references: list[list[str]], *,
               meteor_paraphrase: bool = True, impl: str = "auto") -> list[dict[str, float | str]]:
    """`score` for several hypothesis sets (e.g. systems) against the same references: each set
    is scored on its own, but references are tokenized and METEOR is loaded only once."""
    if not hypothesis_sets:
        raise ConfigError("score: no hypothesis sets to score")
    for hyps in hypothesis_sets:
        _check(hyps, references)
    impl = resolve_impl(impl)
    refs = [[_fix(r) for r in rs] for rs in references]
    mt_r = [[mteval_tokenize(r) for r in rs] for rs in refs]
    # One tokenizer run over references then hypotheses (the official script runs two per set;
    # with -preserveLines every line is tokenized on its own, so the tokens are the same).
    flat = coco_tokenize_all([r for rs in refs for r in rs] + [h for hs in hypothesis_sets for h in hs],
                             impl)
    it = iter(flat)
    co_r = [[next(it) for _ in rs] for rs in refs]
    co_hs = [[next(it) for _ in hs] for hs in hypothesis_sets]
    meteors = meteor_sets(co_hs, co_r, paraphrase=meteor_paraphrase, impl=impl)
    out = []
    for hyps, co_h, met in zip(hypothesis_sets, co_hs, meteors):
        mt_h = [mteval_tokenize(h) for h in hyps]
        out.append({"bleu": bleu(hyps, refs), "nist": nist(mt_h, mt_r), "meteor": met,
                    "rouge_l": rouge_l(co_h, co_r), "cider": cider(co_h, co_r),
                    "tokenizer_impl": impl, "meteor_impl": impl})
    return out


def _fix(text: str) -> str:
    for bad, good in _FIXES:
        text = text.replace(bad, good)
    return text


# --------------------------------------------------------------------------- files


def load_references(csv_path: str | Path, field: str = "--refs") -> tuple[list[str], list[list[str]]]:
    """MRs in order of first appearance and each MR's references, from an E2E `mr,ref` CSV.

    Rows of one MR need not be adjacent: they are grouped wherever they occur. `field` names the
    command-line option in error messages.
    """
    from splitlora_ds.data.sources import read_e2e_csv  # imports transformers: only when needed

    grouped: dict[str, list[str]] = {}
    for ex in read_e2e_csv(csv_path, field=field):
        grouped.setdefault(ex["group"], []).append(ex["target"])
    return list(grouped), list(grouped.values())


def read_hypotheses(path: str | Path) -> list[str]:
    """One hypothesis per line; only '\\n' separates lines (model output may hold other breaks)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--hyp: file {str(path)!r} does not exist" if not p.exists()
                          else f"--hyp: {str(path)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--hyp: {str(path)!r} is not valid UTF-8 "
                          f"({exc.reason} at byte {exc.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the final newline ends the last line, it is no extra line
        lines.pop()
    return [line.rstrip("\r").strip() for line in lines]


def evaluate_files(hyp_path: str | Path, refs_path: str | Path, *, meteor_paraphrase: bool = True,
                   impl: str = "auto") -> dict[str, float | int | str]:
    hyps = read_hypotheses(hyp_path)
    mrs, refs = load_references(refs_path)
    if len(hyps) != len(mrs):
        raise ConfigError(f"--hyp: {str(hyp_path)!r} has {len(hyps)} lines but --refs "
                          f"{str(refs_path)!r} has {len(mrs)} distinct MRs; expected one "
                          "hypothesis per MR, in the order the MRs first appear")
    out: dict[str, float | int | str] = dict(score(hyps, refs, meteor_paraphrase=meteor_paraphrase,
                                                   impl=impl))
    out.update(n_mrs=len(mrs), n_references=sum(len(r) for r in refs))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitlora_ds.evaluate.metrics",
                                 description="Score hypotheses with the E2E challenge metrics.")
    ap.add_argument("--hyp", required=True, help="hypotheses, one line per distinct MR of --refs")
    ap.add_argument("--refs", required=True, help="E2E reference CSV with columns mr,ref")
    ap.add_argument("--out", required=True, help="JSON file to write the scores to")
    ap.add_argument("--no-paraphrase", action="store_true",
                    help="skip METEOR's paraphrase matching (faster, slightly lower METEOR)")
    ap.add_argument("--impl", default="auto", choices=IMPLS,
                    help="tokenizer and METEOR: the official jars (needs Java), their Python ports, "
                         "or auto: the jars when Java is found (default)")
    args = ap.parse_args(argv)
    try:
        scores = evaluate_files(args.hyp, args.refs, meteor_paraphrase=not args.no_paraphrase,
                                impl=args.impl)
        out = Path(args.out)
        if out.parent and not out.parent.exists():
            raise ConfigError(f"--out: directory {str(out.parent)!r} does not exist")
        out.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    except ConfigError as e:
        print(f"splitlora_ds: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
