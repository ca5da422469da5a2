"""Privacy attacks from an honest-but-curious server's position, against real recorded runs:
`python -m splitlora_ds.attack` (see __main__.py and docs/privacy.md)."""
