"""Tokenizers: a download-free byte-level one for the demo, or any local/hub HF tokenizer."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from splitlora_ds.errors import ConfigError

EOS = "<|endoftext|>"


def _bytes_to_unicode() -> list[tuple[int, str]]:
    """GPT-2's byte -> printable-char table (the same 256 chars as ByteLevel.alphabet())."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [(b, chr(c)) for b, c in zip(bs, cs)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer built in memory: token id == byte value (0..255), eos = 256.

    A BPE model without merges over the byte alphabet, so every UTF-8 byte is one token and
    decode(encode(s)) == s for any string. Ids equal byte values so tests can be hand-checked.
    pad = eos (as for GPT-2); padding is masked by attention_mask/labels, never by id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode()}
    vocab[EOS] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # add_prefix_space=False: a leading space would break the exact round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "right"
    return fast


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "namespace/name"; anything else with a separator, or a
    # leading "." "/" "~", is a filesystem path the user expects to exist.
    return (source.startswith((".", "/", "~")) or source.count("/") >= 2
            or (os.sep != "/" and os.sep in source)
            or (os.altsep is not None and os.altsep != "/" and os.altsep in source))


def load_tokenizer(source: str | None) -> PreTrainedTokenizerBase:
    """None/"byte" -> `byte_tokenizer()`; else a local tokenizer dir or a hub id.

    Missing pad token falls back to eos (GPT-2 has none); padding is masked anyway.
    """
    if source is None or source == "byte":
        return byte_tokenizer()
    path = os.path.expanduser(source)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"data.tokenizer: {source!r} is not a directory "
                              "(expected a directory with tokenizer.json / vocab files)")
    elif _looks_like_path(source):
        raise ConfigError(f"data.tokenizer: path {source!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.tokenizer: cannot load tokenizer {source!r}: {exc}") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"data.tokenizer: {source!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok
