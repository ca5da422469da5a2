"""E2E metrics against the official E2E challenge scorer's own numbers, on both implementations.

OFFICIAL holds what tuetschek/e2e-metrics printed for three hypothesis sets over the E2E devset
(547 MRs, 4672 references), each set generated below by `hypothesis_sets`. Recorded with:

  scorer:  github.com/tuetschek/e2e-metrics at 1b9c4d87fd0bbb171ea966741cdc012588581ed4 (2020-08-17);
           its jars (meteor-1.5.jar, data/paraphrase-en.gz, stanford-corenlp-3.4.1.jar) taken from
           the pycocoevalcap 1.2 wheel, byte-identical to the repository's (git blob ids a833bc01,
           88033c84, 3cfa0a0b); OpenJDK 17.0.15, Perl 5.36.0 + XML::Twig 3.52, Python 3.11.7 with
           future 1.0.0, numpy 2.4.6, matplotlib 3.11.2, scikit-image 0.26.0.
  hyps:    each set written one line per MR, in devset order, to /tmp/e2e-runs/<name>.txt
  command: cd /tmp/e2e-metrics && python measure_scores.py /work/shared/data/e2e/devset.csv \\
               /tmp/e2e-runs/<name>.txt
           (prints 4 decimals); the METEOR, ROUGE_L and CIDEr values below are the unrounded
           `coco_eval.eval` of the same run, read through its own functions:
           `src, ref, hyp = measure_scores.load_data(devset, hyps); measure_scores.run_coco_eval(
           ref, hyp).eval`; BLEU and NIST are mteval-v13a-sig.pl's printed 4 decimals.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from splitlora_ds.errors import ConfigError
from splitlora_ds.evaluate import java as java_mod
from splitlora_ds.evaluate.java import java_available, pycocoevalcap_file, resolve_impl
from splitlora_ds.evaluate.meteor import MeteorScorer, MeteorStats, load_jar_resources
from splitlora_ds.evaluate.meteor_norm import normalize_line
from splitlora_ds.evaluate.metrics import _fix, load_references, main, nist, score, score_many
from splitlora_ds.evaluate.ptb import coco_tokens, ptb_tokenize_jar, ptb_tokenize_python

DEVSET = Path(__file__).resolve().parents[1].parent / "shared/data/e2e/devset.csv"
needs_devset = pytest.mark.skipif(not DEVSET.exists(), reason="E2E devset not in ../shared/data")
needs_java = pytest.mark.skipif(not java_available(), reason="no Java runtime")

OFFICIAL = {
    "references": {"bleu": 1.0, "nist": 14.0339, "meteor": 1.0, "rouge_l": 1.0,
                   "cider": 3.040918503384456},
    "other_mr": {"bleu": 0.3830, "nist": 5.9810, "meteor": 0.3406662657938468,
                 "rouge_l": 0.5219278185240948, "cider": 1.252166576719247},
    "template": {"bleu": 0.5547, "nist": 7.3151, "meteor": 0.4417055089702322,
                 "rouge_l": 0.6570311331616865, "cider": 2.0506422267784674},
}
REL_TOL = 1e-3  # 0.1%; the 4-decimal BLEU/NIST alone leave up to 0.013% of rounding

_FIELD = re.compile(r"\s*([^\[\],]+)\[([^\]]*)\]")


def mr_fields(mr: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in _FIELD.findall(mr)}


def template(mr: str) -> str:
    """A plain realisation of every MR field (exercises '£', hyphens, "isn't" in the metrics)."""
    f = mr_fields(mr)
    text = f"{f['name']} is a {f.get('eatType', 'restaurant')}"
    if "food" in f:
        text += f" serving {f['food']} food"
    if "area" in f:
        text += f" in the {f['area']}"
    if "near" in f:
        text += f", near {f['near']}"
    text += "."
    facts = []
    if "priceRange" in f:
        facts.append(f"a {f['priceRange']} price range")
    if "customer rating" in f:
        facts.append(f"a customer rating of {f['customer rating']}")
    if facts:
        text += " It has " + " and ".join(facts) + "."
    if "familyFriendly" in f:
        text += " It is family-friendly." if f["familyFriendly"] == "yes" else " It isn't family-friendly."
    return text


def hypothesis_sets(mrs: list[str], refs: list[list[str]]) -> dict[str, list[str]]:
    """(1) each MR's first reference, (2) the next MR's first reference, (3) the template."""
    return {"references": [r[0] for r in refs],
            "other_mr": [refs[(i + 1) % len(refs)][0] for i in range(len(refs))],
            "template": [template(mr) for mr in mrs]}


@pytest.fixture(scope="module")
def devset() -> tuple[list[str], list[list[str]]]:
    if not DEVSET.exists():
        pytest.skip("E2E devset not in ../shared/data")
    return load_references(DEVSET)


@pytest.fixture(scope="module", params=["jar", "python"])
def official_run(request, devset) -> tuple[str, dict[str, dict]]:
    """Scores of all three sets with one implementation, computed once per module (one METEOR
    load for the three: ~35 s with the jar, ~45 s in Python on 2 cores)."""
    impl = request.param
    if impl == "jar" and not java_available():
        pytest.skip("no Java runtime: the jar path cannot run here")
    mrs, refs = devset
    sets = hypothesis_sets(mrs, refs)
    return impl, dict(zip(sets, score_many(list(sets.values()), refs, impl=impl)))


@needs_devset
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_scores_equal_the_official_scorer(official_run, name):
    impl, runs = official_run
    got, want = runs[name], OFFICIAL[name]
    assert (got["meteor_impl"], got["tokenizer_impl"]) == (impl, impl)
    off = {k: got[k] for k in want if got[k] != pytest.approx(want[k], rel=REL_TOL)}
    assert not off, f"{impl}/{name}: {off} vs official {want}"


# ------------------------------------------------------------------ the Python ports vs the jars


def _devset_texts(devset) -> list[str]:
    mrs, refs = devset
    hyps = [h for hs in hypothesis_sets(mrs, refs).values() for h in hs]
    return [_fix(r) for rs in refs for r in rs] + hyps


@needs_java
@needs_devset
def test_python_ptb_tokenizer_equals_stanford_on_e2e(devset):
    texts = _devset_texts(devset) + [
        "The Eagle.The Mill (riverside) [x] isn't £20-£25, it's 'Aromi'... rating.. 5.It is",
        "Browns Cambridge- a family -friendly, non-kid-friendly shop; £-25 or 1,000 for 3/5 and/or",
        "St. Mr. Dr. U.S. e.g. city center., “quoted” ‘single’ ``x'' o'clock cannot gonna 30% x!y"]
    jar = ptb_tokenize_jar(texts)
    diffs = [(t, j, p) for t, j in zip(texts, jar) if (p := ptb_tokenize_python(t)) != j]
    assert not diffs, f"{len(diffs)} texts differ, e.g. {diffs[:3]}"


@needs_java
@needs_devset
def test_python_meteor_norm_equals_the_jars(devset):
    # What METEOR receives: COCO tokens joined by spaces; the jar's Normalizer main() prints
    # normalizeLine(line, en, keepPunctuation=true) for each line of its input.
    lines = [" ".join(coco_tokens(t)) for t in ptb_tokenize_jar(_devset_texts(devset))]
    lines += ["a u.s.-based shop -- e.g. 1990's rock'n'roll , 5,000 or 5 , 000 dr. who ... x.. y."]
    jar = pycocoevalcap_file("meteor/meteor-1.5.jar")
    proc = subprocess.run(["java", "-cp", str(jar), "edu.cmu.meteor.util.Normalizer", "en", "true"],
                          input="\n".join(lines).encode("utf-8"), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    official = proc.stdout.decode("utf-8").split("\n")
    diffs = [(l, o) for l, o in zip(lines, official) if normalize_line(l) != o.lower()]
    assert len(official) >= len(lines) and not diffs, diffs[:3]


# ------------------------------------------------------------------ rules, without Java or data


def test_ptb_tokenizer_cases():
    # Recorded from stanford-corenlp-3.4.1.jar (-preserveLines -lowerCase).
    assert ptb_tokenize_python("Cocum is a family -friendly shop, £20-25, near 'Aromi'..") == \
        ["cocum", "is", "a", "family", "-", "friendly", "shop", ",", "#", "20-25", ",", "near",
         "`", "aromi", "'", ".", "."]
    assert ptb_tokenize_python("It isn't in Browns Cambridge- (riverside) center., 5.It") == \
        ["it", "is", "n't", "in", "browns", "cambridge", "-", "-lrb-", "riverside", "-rrb-",
         "center.", ",", "5", ".", "it"]
    # The COCO filter drops its listed punctuation, but not the lowercased bracket tokens.
    assert coco_tokens(ptb_tokenize_python("(a), b; c... d!")) == ["-lrb-", "a", "-rrb-", "b", "c.", "d"]


def test_meteor_norm_cases():
    # Recorded from meteor-1.5.jar's Normalizer (en, keep punctuation), lowercased.
    assert normalize_line("the family-friendly pub it 's in the 20-25 range") == \
        "the family friendly pub it ' s in the 20 25 range"
    assert normalize_line("it's a non-kid-friendly shop .. near café # 20") == \
        "it 's a non kid friendly shop .. near café # 20"
    assert normalize_line("a-b-c x") == "a b-c x"  # the jar's dash replacements do not overlap
    # A word-final period splits off only when no lowercase word follows (or at the end).
    assert normalize_line("center. near mr. Smith u.s. end.") == "center. near mr . smith us end ."


def test_meteor_corpus_leaves_out_chunks_of_whole_matches():
    scorer = MeteorScorer(*load_jar_resources())
    exact = [s.split() for s in ("the eagle is a pub", "zizzi serves italian food")]
    assert scorer.corpus_score(exact, [[e] for e in exact]) == 1.0  # was 0.68 before the rule
    # A whole match adds no chunk; a partial one adds its chunks (here 2: "the eagle" | "pub").
    partial = scorer.pair_stats("the eagle pub".split(), "the eagle is a pub".split())
    total = MeteorStats()
    total.add(scorer.pair_stats(exact[0], exact[0]))
    total.add(partial)
    assert (partial.chunks, total.chunks) == (2, 2)


def test_meteor_identical_reference_wins_without_search():
    scorer = MeteorScorer(*load_jar_resources())
    hyp = "the eagle is a cheap pub".split()
    refs = ["the eagle is a cheap pub near the river".split(), list(hyp), "a pub".split()]
    best = scorer.segment_stats(hyp, refs)  # takes the identical second reference directly
    searched = max((scorer.pair_stats(hyp, r) for r in refs), key=MeteorStats.score)
    assert best.score() == searched.score() == 1.0 and best.ref_len == searched.ref_len == 6


def test_nist_reference_length_pools_all_references():
    refs = [["a b c d".split(), "a b c e".split()], ["f g".split()]]
    hyps = ["a b c d".split(), "f g".split()]
    # Reference counts: 10 words; a b c 2 each, d e f g 1; "a b" "b c" "a b c" 2, others 1.
    # Hits: 1-grams a b c (log2 10/2 each), d (log2 10/1), f g (log2 10/1 each) over 6 words;
    # 2-grams "c d" log2(2/1) = 1 ("a b", "b c", "f g" carry 0) over 4; 3-grams "b c d" 1 over
    # 2; 4-gram "a b c d" log2(2/1) = 1 over 1; no 5-gram.
    info = (3 * math.log2(5) + 3 * math.log2(10)) / 6 + 1 / 4 + 1 / 2 + 1 / 1
    # mteval's reference length: 10 words / (3 references / 2 MRs) = 6.667 (a mean of each MR's
    # mean, 4 + 2 = 6, would give no penalty): 6 hypothesis words -> ratio 0.9.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = math.exp(-beta * math.log(6 / (10 / 1.5)) ** 2)
    assert nist(hyps, refs) == pytest.approx(info * penalty)  # 4.8166 * 0.9781


def test_impl_choice(monkeypatch):
    with pytest.raises(ConfigError, match="impl: 'java' is invalid"):
        resolve_impl("java")
    assert resolve_impl("python") == "python"
    monkeypatch.setattr(java_mod.shutil, "which", lambda name: None)
    java_mod.java_available.cache_clear()
    try:
        assert resolve_impl("auto") == "python"
        with pytest.raises(ConfigError, match="'jar' needs a Java runtime"):
            resolve_impl("jar")
        s = score(["The Eagle is a pub."], [["The Eagle is a pub.", "A pub: The Eagle."]],
                  meteor_paraphrase=False)
        assert (s["meteor_impl"], s["tokenizer_impl"], s["meteor"]) == ("python", "python", 1.0)
    finally:
        java_mod.java_available.cache_clear()


def test_cli_impl_flag(tmp_path, capsys):
    refs = tmp_path / "refs.csv"
    refs.write_text('mr,ref\n"name[A], food[Italian]",A serves family-friendly Italian food.\n',
                    encoding="utf-8")
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("A serves family friendly Italian food.\n", encoding="utf-8")
    out = tmp_path / "s.json"
    assert main(["--hyp", str(hyp), "--refs", str(refs), "--out", str(out), "--impl", "python",
                 "--no-paraphrase"]) == 0
    s = json.loads(out.read_text())
    assert (s["meteor_impl"], s["tokenizer_impl"]) == ("python", "python")
    # -norm splits "family-friendly", so METEOR sees identical word sequences.
    assert s["meteor"] == 1.0 and s["bleu"] < 1.0
    with pytest.raises(SystemExit):
        main(["--hyp", str(hyp), "--refs", str(refs), "--out", str(out), "--impl", "perl"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("impl", ["python", pytest.param("jar", marks=needs_java)])
def test_score_many_equals_score_per_set(impl):
    refs = [["The Eagle is a cheap pub near the river.", "A cheap pub, The Eagle, is by the river."],
            ["Zizzi serves Italian food in the city centre.", "Italian food is served at Zizzi."]]
    sets = [["The Eagle is a pub by the river.", "Zizzi is an Italian place."],
            ["A cheap pub, The Eagle, is by the river.", "Italian food is served at Zizzi."]]
    many = score_many(sets, refs, impl=impl, meteor_paraphrase=False)
    assert many == [score(s, refs, impl=impl, meteor_paraphrase=False) for s in sets]
    assert many[1]["meteor"] == 1.0 > many[0]["meteor"]
    with pytest.raises(ConfigError, match="no hypothesis sets"):
        score_many([], refs)
