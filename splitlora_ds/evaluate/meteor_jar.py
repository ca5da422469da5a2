"""Corpus METEOR from meteor-1.5.jar itself, driven the way pycocoevalcap's wrapper drives it.

`java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm`, one `SCORE ||| refs ||| hyp` line per
segment (the jar answers with that segment's statistics against its best reference), then one
`EVAL ||| stats ||| ...` line: the jar answers with each segment's score and the corpus score,
which it computes from the summed statistics. The SCORE lines are written by a helper thread
while this one reads the answers (line-by-line round trips cost about as much as the scoring);
neither side can block the other on a full pipe.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
from typing import IO, Sequence

from splitlora_ds.evaluate.java import java_command, pycocoevalcap_file

# With the paraphrase module off: the other three modules with their English weights.
_NO_PARAPHRASE = ("-m", "exact stem synonym", "-w", "1.0 0.6 0.8")


def _write(proc: subprocess.Popen, lines: Sequence[str]) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write("".join(line + "\n" for line in lines).encode("utf-8"))
        proc.stdin.flush()
    except (BrokenPipeError, ValueError):
        pass  # the jar died: the reader reports it, with the jar's own message


def _read(proc: subprocess.Popen, err: IO[bytes], answers: int) -> list[str]:
    assert proc.stdout is not None
    out = []
    for _ in range(answers):
        reply = proc.stdout.readline().decode("utf-8")
        if not reply:
            err.seek(0)
            raise RuntimeError("meteor-1.5.jar stopped answering: "
                               f"{err.read().decode('utf-8', 'replace')[-800:]}")
        out.append(reply.strip())
    return out


def meteor_jar(hyps: Sequence[str], refs: Sequence[Sequence[str]], *, paraphrase: bool = True) -> float:
    """Corpus METEOR of COCO-tokenized hypothesis strings against their reference strings."""
    return meteor_jar_sets([hyps], refs, paraphrase=paraphrase)[0]


def meteor_jar_sets(hyp_sets: Sequence[Sequence[str]], refs: Sequence[Sequence[str]], *,
                    paraphrase: bool = True) -> list[float]:
    """Corpus METEOR of several hypothesis sets against the same references, in one JVM (its
    start and the paraphrase table take about 8 s): one SCORE/EVAL round per set."""
    jar = pycocoevalcap_file("meteor/meteor-1.5.jar")
    cmd = java_command("-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm",
                       *(() if paraphrase else _NO_PARAPHRASE))
    scores = []
    with tempfile.TemporaryFile() as err:
        # cwd: the jar finds its data/ (paraphrase table) next to itself, as in pycocoevalcap.
        proc = subprocess.Popen(cmd, cwd=jar.parent, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err)
        try:
            for hyps in hyp_sets:
                # The line format of pycocoevalcap's Meteor._stat (which strips '|||' from hypotheses).
                lines = [" ||| ".join(("SCORE", " ||| ".join(rs), hyp.replace("|||", "").replace("  ", " ")))
                         for hyp, rs in zip(hyps, refs)]
                writer = threading.Thread(target=_write, args=(proc, lines), daemon=True)
                writer.start()
                stats = _read(proc, err, len(lines))
                writer.join()
                _write(proc, [" ||| ".join(("EVAL", *stats))])
                scores.append(float(_read(proc, err, len(stats) + 1)[-1]))
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.kill()
            proc.wait()
    return scores


__all__ = ["meteor_jar", "meteor_jar_sets"]
