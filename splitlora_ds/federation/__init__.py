"""How adapters are combined across participants (see ../shared/DESIGN.md). One strategy per
way of aggregating, each behind `strategy.Aggregator` (`aggregate_(masters) -> bytes uploaded`):

- `fedavg`: FedAvg's pure functions and collectives, and `FedAvg` (one all-reduce of the clients).
- `secure`: pairwise-masked sums (SecAgg) and `SecureFedAvg`, the same average with masks.
- `lowrank` / `exchange`: adapters of different ranks (stacked / zero_pad) as pure functions,
  and `LowRankExchange`, their collective form over the clients (and server stage 0).
- `secure_lowrank`: `SecureLowRankExchange`, the low-rank exchange's result through pairwise masks
  (dense updates for stacked, padded factors for zero_pad).
- `private`: `Private`, DP update clipping and noise around FedAvg or SecureFedAvg.
- `build`: `build_aggregator`, which of them a rank runs.
- `participation`: which logical clients take part in each round and which rank runs each
  (pure functions of the seed and round, for more data owners than ranks).

The sequential hand-over (one client's adapters to the next) is point to point, in the engine.
"""
