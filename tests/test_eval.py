"""Validation on the server side: every client's validation tokens are scored exactly once."""

import math

import pytest

from _launch import check, launch, write_recipe
from splitlora_ds.config import load_config
from splitlora_ds.data import load_tokenizer
from splitlora_ds.data.build import plan_data, tokenize_client
from splitlora_ds.metrics import read_scalars

pytestmark = pytest.mark.launcher


@pytest.mark.parametrize("split", [{}, {"client_layers": 1, "client_tail_layers": 1}], ids=["standard", "u_shaped"])
def test_uneven_validation_shards_are_all_scored(tmp_path, split):
    # 3 clients, 11 validation prompts, eval batches of 2: shards of 4/4/3 rows -> 2/2/2 batches,
    # and eval.batch_size=3 below makes them 2/2/1, so client 2 sends an empty batch once (U-shaped:
    # and gets zero rows of tail activations back; the clients score, client0 logs).
    recipe = write_recipe(tmp_path, federation={"clients": 3}, data={"num_samples": 60, "validation_fraction": 0.18},
                          eval={"every": 2, "batch_size": 3}, train={"max_steps": 2, "batch_size": 2}, split=split)
    cfg = load_config(recipe)
    plan = plan_data(cfg.data, 3, cfg.train.seed)
    tok = load_tokenizer(cfg.data.tokenizer)
    val_rows = [tokenize_client(plan, c, tok, cfg.data)[1] for c in range(3)]
    sizes = [len(v) for v in val_rows]
    assert len(set(math.ceil(n / 3) for n in sizes)) > 1, f"the shards should need different batch counts: {sizes}"
    # Every target token after the first position is scored (labels are shifted by one).
    expected = sum(sum(1 for t in row["labels"][1:] if t != -100) for rows in val_rows for row in rows)

    check(launch(4, ["--recipe", str(recipe)]))
    main = tmp_path / "tb" / ("client0" if split else "server0")
    tokens = read_scalars(str(main), "eval/tokens")
    assert [v for _, v in tokens] == [expected]
    loss = read_scalars(str(main), "eval/loss")[0][1]
    ppl = read_scalars(str(main), "eval/ppl")[0][1]
    assert ppl == pytest.approx(math.exp(loss), rel=1e-5)
    for c in range(3):
        assert len(read_scalars(str(main), f"client{c}/eval_loss")) == 1
