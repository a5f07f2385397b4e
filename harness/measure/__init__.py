"""Measurement probes for a training run, one module per concern:

- ``memory``: process RSS sampler (CPU), eval-phase peak, per-category breakdown of a step;
- ``callback``: ``MeasureCallback``, the training-phase probes for a transformers Trainer;
- ``flops``: parameter counts, FLOPs per token, peak FLOP/s, throughput and MFU;
- ``pricing``: the hardware price table and dollar cost (no torch import);
- ``serving``: adapter vs full-checkpoint footprint and inference latency.

Every function that feeds the run record returns a dict keyed by the record's metric names, so
run.py can ``metrics.update(...)`` them. Import the submodule you need
(``from harness.measure import pricing``); this package imports none of them itself.
"""
