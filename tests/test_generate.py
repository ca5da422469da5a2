"""Generation from an exported model, and the evaluate command end to end."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from splitlora_ds.data import byte_tokenizer
from splitlora_ds.evaluate.__main__ import main as evaluate_main
from splitlora_ds.evaluate.generate import generate, load_model

PROMPTS = ["name[Aromi], eatType[pub]", "name[The Eagle]", "name[Zizzi], food[French], area[riverside]"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model saved the two ways splitlora_ds.export writes: merged, and base + adapter."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=257, n_positions=128,
                     bos_token_id=256, eos_token_id=256)
    tok = byte_tokenizer()
    base = GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "merged")
    peft_model.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    return root


def test_left_padded_batches_equal_one_by_one(exported):
    model, tok = load_model(exported / "merged")
    together = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=3)
    alone = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=1)
    assert together == alone and len(together) == 3
    beams = generate(model, tok, PROMPTS, num_beams=3, no_repeat_ngram_size=2, max_new_tokens=12, batch_size=2)
    assert len(beams) == 3 and all("\n" not in h for h in beams)


def test_adapter_folder_loads_with_its_base(exported):
    model, tok = load_model(exported / "adapter")
    base, _ = load_model(exported / "merged")
    ids = torch.tensor([[104, 105, 10]])
    # init_lora_weights=False: the adapter is non-zero, so the adapter model must differ from its base.
    assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_evaluate_command_writes_hypotheses_and_the_five_metrics(exported, tmp_path):
    csv = tmp_path / "test.csv"
    csv.write_text("mr,ref\n"
                   f'"{PROMPTS[0]}",Aromi is a pub.\n'
                   f'"{PROMPTS[1]}",The Eagle.\n'
                   f'"{PROMPTS[0]}",There is a pub called Aromi.\n'
                   f'"{PROMPTS[2]}",Zizzi serves French food by the river.\n')
    out = tmp_path / "results.json"
    assert evaluate_main(["--model", str(exported / "adapter"), "--data", str(csv), "--out", str(out),
                          "--max-new-tokens", "8", "--beams", "2"]) == 0
    results = json.loads(out.read_text())
    assert {"bleu", "nist", "meteor", "rouge_l", "cider"} <= set(results)
    assert results["num_mrs"] == 3  # references grouped by MR, in first-appearance order
    assert len((tmp_path / "results.hyp.txt").read_text().splitlines()) == 3


def test_bad_model_folder_is_an_error(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("mr,ref\nname[A],A.\n")
    assert evaluate_main(["--model", str(tmp_path / "nope"), "--data", str(csv), "--out", str(tmp_path / "r.json")]) == 2
    assert "--model: no such folder" in capsys.readouterr().err


def test_missing_data_file_names_the_option(exported, tmp_path, capsys):
    assert evaluate_main(["--model", str(exported / "merged"), "--data", str(tmp_path / "no.csv"),
                          "--out", str(tmp_path / "r.json")]) == 2
    assert "--data: file" in capsys.readouterr().err
