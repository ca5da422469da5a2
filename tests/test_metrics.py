"""E2E metrics against numbers computed by hand, plus the CLI and its errors."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from splitlora_ds.errors import ConfigError
from splitlora_ds.evaluate import load_references, score
from splitlora_ds.evaluate.meteor import MeteorScorer, MeteorStats, load_jar_resources, load_paraphrases
from splitlora_ds.evaluate.metrics import bleu, cider, coco_tokenize, main, nist, rouge_l

DEVSET = Path(__file__).resolve().parents[1].parent / "shared/data/e2e/devset.csv"
KEYS = {"bleu", "nist", "meteor", "rouge_l", "cider"}


def toks(s: str) -> list[str]:
    return s.split()


def test_bleu_by_hand():
    hyp = "the cat sat on the mat"  # 6 words
    refs = ["the cat sat on a red mat", "there is a cat on the mat"]  # 7 and 7 words
    # Clipped precisions (max count over the references):
    #  1-grams: the x2 clipped to 1, cat, sat, on, mat           -> 5/6
    #  2-grams: the cat, cat sat, sat on (ref1); on the, the mat (ref2) -> 5/5
    #  3-grams: the cat sat, cat sat on (ref1); on the mat (ref2); sat on the x -> 3/4
    #  4-grams: the cat sat on (ref1); cat sat on the x, sat on the mat x -> 1/3
    # Closest reference length 7 > 6 -> brevity penalty exp(1 - 7/6).
    expected = math.exp(1 - 7 / 6) * (5 / 6 * 5 / 5 * 3 / 4 * 1 / 3) ** (1 / 4)
    assert bleu([hyp], [refs]) == pytest.approx(expected, rel=1e-9)  # 0.5719
    # Case and mteval tokenization: "Mat." is "mat ." -- no 4-gram in common: BLEU 0.
    assert bleu(["The cat is on the mat."], [["the cat sat on the mat"]]) == 0.0


def test_nist_by_hand():
    refs = [[toks("the cat sat"), toks("the dog sat")]]
    # Reference counts: () 6 words; the 2, sat 2, cat 1, dog 1; "the cat" 1 ...
    # info(the) = log2(6/2), info(cat) = log2(6/1), info(the cat) = log2(count(the)/1) = 1.
    # "the cat ran": 1-gram hits the, cat over 3 words; 2-gram hit "the cat" over 2 bigrams;
    # no 3-gram hit; lengths 3 vs average reference length 3 -> no penalty.
    expected = (math.log2(3) + math.log2(6)) / 3 + 1 / 2
    assert nist([toks("the cat ran")], refs) == pytest.approx(expected)  # 1.8900
    # "the cat": hits over 2 words and 1 bigram; 2/3 of the reference length -> penalty 0.5.
    expected = ((math.log2(3) + math.log2(6)) / 2 + 1 / 1) * 0.5
    assert nist([toks("the cat")], refs) == pytest.approx(expected)  # 1.5425


def test_rouge_l_by_hand():
    hyps = [toks("the cat sat on the mat"), toks("dogs bark")]
    refs = [[toks("cat on mat"), toks("the cat sat on a mat today")], [toks("cats meow")]]
    # Sentence 1: LCS 3 with ref 1 -> P 3/6, R 3/3; LCS 5 with ref 2 -> P 5/6, R 5/7.
    # coco takes the best P (5/6) and the best R (1) separately: F = (1+b^2)PR / (R + b^2 P).
    b2 = 1.2 ** 2
    f1 = (1 + b2) * (5 / 6) * 1 / (1 + b2 * 5 / 6)  # 0.9242
    # Sentence 2: no common word -> 0; the corpus score is the mean over sentences.
    assert rouge_l(hyps, refs) == pytest.approx((f1 + 0) / 2)


def test_cider_by_hand():
    hyps = [toks("the cat"), toks("the dog")]
    refs = [[toks("the cat")], [toks("the dog runs")]]
    # 2 sentences: idf weight of an n-gram = log(2) - log(max(1, df)); "the" is in the
    # references of both (df 2) so it weighs 0, every other n-gram log(2).
    # Sentence 1 equals its reference: cosine 1 for 1- and 2-grams, 0 for 3-/4-grams (empty),
    #   same bigram count -> no length penalty: mean([1, 1, 0, 0]) * 10 = 5.
    # Sentence 2: unigrams {dog} vs {dog, runs}: cosine 1/sqrt(2); bigrams {the dog} vs
    #   {the dog, dog runs}: 1/sqrt(2); the length term uses bigram counts 1 vs 2:
    #   exp(-(1-2)^2 / (2 * 6^2)) -> 10 * mean([1/sqrt2, 1/sqrt2, 0, 0]) * exp(-1/72).
    s2 = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert cider(hyps, refs) == pytest.approx((5 + s2) / 2)  # 4.2434


@pytest.fixture(scope="module")
def scorer() -> MeteorScorer:
    return MeteorScorer(*load_jar_resources())  # the jar's data, no paraphrase table


def test_meteor_fragmentation_by_hand(scorer):
    hyp, ref = toks("the cat sat on the mat"), toks("on the mat sat the cat")
    matches, chunks = scorer.align(hyp, ref)
    # Every word matches exactly, in 3 chunks: "on the mat" | "sat" | "the cat".
    assert chunks == 3 and all(m is not None for m in matches)
    # P = R = 1 -> Fmean 1; penalty gamma * (chunks / matches)^beta = 0.6 * (3/6)^0.2.
    assert scorer.pair_stats(hyp, ref).score() == pytest.approx(1 - 0.6 * 0.5 ** 0.2)  # 0.4777


def test_meteor_stem_and_function_words_by_hand(scorer):
    hyp, ref = toks("the cats sat"), toks("the cat sat")
    s = scorer.pair_stats(hyp, ref)
    # "the" exact (a function word, weight 1 - delta = 0.25), "sat" exact (content, 0.75),
    # "cats"~"cat" by stem (module weight 0.6; the synonym module also proposes this pair, and
    # the jar's search keeps the stem match that came first).
    assert (s.test_function, s.test_content) == ([1, 0, 0, 0], [1, 1, 0, 0])
    # P = R = (1*(0.75+0.25) + 0.6*0.75) / (0.75*2 + 0.25*1) = 1.45/1.75; one chunk covering
    # everything -> no fragmentation penalty (the jar's identical-coverage rule).
    assert s.score() == pytest.approx(1.45 / 1.75)  # 0.8286
    # The corpus score comes from summed statistics, not from averaging sentence scores:
    # lengths 9 / 9, function words 4 / 4, matches 8 exact + 1 stem, chunks 3 + 0 = 3: the jar
    # leaves out the chunk of a segment whose words all match in one chunk (as the second does).
    # meteor-1.5.jar gives 0.48561684844214403 for this corpus too.
    total = MeteorStats()
    total.add(scorer.pair_stats(toks("the cat sat on the mat"), toks("on the mat sat the cat")))
    total.add(s)
    p = (1.0 * (0.75 * 4 + 0.25 * 4) + 0.6 * 0.75 * 1) / (0.75 * 5 + 0.25 * 4)
    assert total.score() == pytest.approx(p * (1 - 0.6 * (3 / 9) ** 0.2))  # P = R = Fmean
    assert scorer.corpus_score([toks("the cat sat on the mat"), hyp],
                               [[toks("on the mat sat the cat")], [ref]]) == pytest.approx(total.score())


def test_meteor_picks_best_reference(scorer):
    hyp = toks("the cat sat on the mat")
    best = scorer.segment_stats(hyp, [toks("a dog"), hyp])
    assert best.score() == 1.0  # identical reference: P = R = 1 and no penalty


def test_meteor_paraphrase_module(tmp_path):
    # The jar's paraphrase file: records of 3 lines (probability, phrase, paraphrase).
    table_file = tmp_path / "para.gz"
    with gzip.open(table_file, "wt", encoding="utf-8") as fh:
        fh.write("0.5\nnear\nclose to\n0.1\nnear\nunknownword\n0.2\nriver\nstream\n")
    table = load_paraphrases({"it", "is", "near", "close", "to", "the", "river"}, table_file)
    assert table == {("near",): [("close", "to")]}  # entries with unseen words are dropped
    scorer = MeteorScorer(*load_jar_resources(), paraphrases=table)
    hyp, ref = toks("it is close to the river"), toks("it is near the river")
    matches, chunks = scorer.align(hyp, ref)
    assert matches[2].module == 3 and (matches[2].match_start, matches[2].match_length) == (2, 2)
    assert chunks == 1
    without = MeteorScorer(*load_jar_resources()).pair_stats(hyp, ref).score()
    assert scorer.pair_stats(hyp, ref).score() > without


def test_meteor_real_paraphrase_table_loads():
    table = load_paraphrases({"a", "the", "centre"})  # scans the wheel's 61 MB table (~5 s)
    assert ("the", "centre") in table[("a", "centre")]


def test_coco_tokenization():
    # Stanford's PTBTokenizer writes '£' as '#' and brackets as -lrb-/-rrb-, which the COCO
    # punctuation list (upper-case -LRB-) does not remove: what the official scorer scores.
    assert coco_tokenize("The shop. It's near Burger King (riverside), £20-25...") == \
        ["the", "shop", "it", "'s", "near", "burger", "king", "-lrb-", "riverside", "-rrb-", "#", "20-25"]


def test_perfect_hypothesis():
    refs = [["The Eagle is a cheap pub near the river.", "A cheap pub, The Eagle, is by the river."],
            ["Zizzi serves Italian food in the city centre.", "Italian food is served at Zizzi."]]
    s = score([r[0] for r in refs], refs, meteor_paraphrase=False)
    assert KEYS <= set(s) and s["meteor_impl"] in ("jar", "python")
    assert s["bleu"] == pytest.approx(1.0) and s["rouge_l"] == pytest.approx(1.0)
    # Whole-match segments add no chunk to the corpus penalty (as in the jar): METEOR is 1.
    assert s["meteor"] == 1.0 and s["cider"] > 0 and s["nist"] > 0


def test_score_rejects_bad_input():
    with pytest.raises(ConfigError, match="2 hypotheses but 1 reference"):
        score(["a", "b"], [["a"]])
    with pytest.raises(ConfigError, match=r"references\[0\]"):
        score(["a"], [[]])


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def e2e_csv(tmp_path) -> Path:
    # MR A appears in rows 1 and 3, separated by MR B: both A references belong to A.
    return _write(tmp_path / "refs.csv", 'mr,ref\n'
                  '"name[A], food[Italian]",A serves Italian food.\n'
                  '"name[B], area[riverside]",B is by the riverside.\n'
                  '"name[A], food[Italian]",Italian food is served at A.\n')


def test_load_references_groups_separated_rows(e2e_csv):
    mrs, refs = load_references(e2e_csv)
    assert mrs == ["name[A], food[Italian]", "name[B], area[riverside]"]
    assert refs == [["A serves Italian food.", "Italian food is served at A."],
                    ["B is by the riverside."]]


def test_cli_writes_json(tmp_path, e2e_csv):
    hyp = _write(tmp_path / "hyp.txt", "Italian food is served at A.\nB is by the riverside.\n")
    out = tmp_path / "scores.json"
    assert main(["--hyp", str(hyp), "--refs", str(e2e_csv), "--out", str(out), "--no-paraphrase"]) == 0
    s = json.loads(out.read_text())
    assert KEYS <= set(s) and (s["n_mrs"], s["n_references"]) == (2, 3)
    assert s["bleu"] == pytest.approx(1.0) and s["rouge_l"] == pytest.approx(1.0)
    # Hypotheses in the wrong MR order score lower.
    swapped = _write(tmp_path / "swapped.txt", "B is by the riverside.\nA serves Italian food.\n")
    assert main(["--hyp", str(swapped), "--refs", str(e2e_csv), "--out", str(out), "--no-paraphrase"]) == 0
    assert json.loads(out.read_text())["bleu"] < 0.5


def test_cli_module_entry_point(tmp_path, e2e_csv):
    hyp = _write(tmp_path / "hyp.txt", "A serves Italian food.\nB is by the river.\n")
    out = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "-m", "splitlora_ds.evaluate.metrics", "--hyp", str(hyp),
                           "--refs", str(e2e_csv), "--out", str(out), "--no-paraphrase"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(out.read_text())) >= KEYS


def test_count_mismatch_and_missing_files(tmp_path, e2e_csv, capsys):
    hyp = _write(tmp_path / "hyp.txt", "only one line\n")
    out = str(tmp_path / "s.json")
    assert main(["--hyp", str(hyp), "--refs", str(e2e_csv), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "1 lines" in err and "2 distinct MRs" in err
    assert str(hyp) in err and str(e2e_csv) in err
    assert main(["--hyp", str(tmp_path / "nope.txt"), "--refs", str(e2e_csv), "--out", out]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert main(["--hyp", str(hyp), "--refs", str(tmp_path / "nope.csv"), "--out", out]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert not Path(out).exists()


@pytest.mark.skipif(not DEVSET.exists(), reason="E2E devset not in shared/data")
def test_devset_smoke():
    mrs, refs = load_references(DEVSET)
    assert len(mrs) == len(refs) > 100
    # The first reference of each MR against all of that MR's references (itself included):
    # BLEU and ROUGE-L are perfect, CIDEr is not (it averages over all references).
    firsts = [r[0] for r in refs]
    assert bleu(firsts, refs) == pytest.approx(1.0)
    co_h, co_r = [coco_tokenize(h) for h in firsts], [[coco_tokenize(r) for r in rs] for rs in refs]
    assert rouge_l(co_h, co_r) == pytest.approx(1.0) and 2 < cider(co_h, co_r) < 5
    # Against the OTHER references only: human-level, well below perfect.
    multi = [r for r in refs if len(r) > 1]
    s = score([r[0] for r in multi], [r[1:] for r in multi], meteor_paraphrase=False)
    assert 0.45 < s["bleu"] < 0.75 and 6 < s["nist"] < 11 and 0.35 < s["meteor"] < 0.55
    assert 0.55 < s["rouge_l"] < 0.8 and 1.2 < s["cider"] < 3
