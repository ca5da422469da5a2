"""Runs splitlora_ds.attack.record (training with the server-view recorder) as a script, for the
zygote launcher in tests/test_attack_record.py."""

import sys

from splitlora_ds.attack.record import main

sys.exit(main(sys.argv[1:]))
