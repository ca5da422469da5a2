"""The attacker's public text, and the victim's shard size (for the DP accounting).

The victim is client 0. The attacker's public text is every row of the data set outside the
victim's training shard: the other clients' shards and the validation rows, the same kind of text
as the victim's and disjoint from it. (In the standard split the server sees the other clients'
targets anyway.) With one client only the validation rows remain.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..data.build import plan_data, tokenize_client
from ..data.examples import IGNORE_INDEX
from ..data.tokenizer import load_tokenizer
from .record import VICTIM


@dataclass
class AttackData:
    tokenizer: object
    victim_samples: int  # the victim's training shard size: its DP sampling rate is batch / this
    public_ids: list[torch.Tensor]  # [n] each
    public_labels: list[torch.Tensor]  # [n] each, IGNORE_INDEX on the prompt

    def most_common_token(self) -> int:
        """The unigram guess for input tokens: the public text's most frequent token."""
        return Counter(torch.cat(self.public_ids).tolist()).most_common(1)[0][0]

    def most_common_target(self) -> int:
        """The unigram guess for targets: the public answers' most frequent token."""
        labels = torch.cat(self.public_labels)
        return Counter(labels[labels != IGNORE_INDEX].tolist()).most_common(1)[0][0]


def load_attack_data(cfg: RunConfig) -> AttackData:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    plan = plan_data(cfg.data, cfg.federation.clients, cfg.train.seed)
    public, victim_samples = [], 0
    for c in range(cfg.federation.clients):
        train_rows, val_rows, _ = tokenize_client(plan, c, tokenizer, cfg.data)
        if c == VICTIM:
            victim_samples = len(train_rows)
        public.extend(val_rows if c == VICTIM else train_rows + val_rows)
    if not public:
        raise ValueError("the attacker has no public text: use several clients or a validation split")
    return AttackData(tokenizer, victim_samples, [torch.tensor(r["input_ids"]) for r in public],
                      [torch.tensor(r["labels"]) for r in public])
