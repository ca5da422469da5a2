"""Evaluation of generated text: the E2E NLG challenge metrics (see `metrics`)."""

__all__ = ["load_references", "score", "score_many"]


def __getattr__(name: str):
    # Lazy, so `python -m splitlora_ds.evaluate.metrics` does not import metrics twice.
    if name in __all__:
        from splitlora_ds.evaluate import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
