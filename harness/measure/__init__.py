"""Measurement probes for a training run, one module per concern:

- ``memory``: process RSS sampler (CPU), eval-phase peak, per-category breakdown of a step;
- ``callback``: ``MeasureCallback``, the training-phase probes for a transformers Trainer;
- ``flops``: parameter counts, FLOPs per token, peak FLOP/s, throughput and MFU;
- ``environment``: what a run ran on (the record's ``env``) and which price preset its device matches;
- ``pricing``: the hardware price table and dollar cost (no torch import);
- ``serving``: adapter vs full-checkpoint footprint and inference latency.

Every function that feeds the run record returns a dict keyed by the record's metric names, so
the job can ``metrics.update(...)`` them. Import the submodule you need
(``from harness.measure import pricing``); this package imports none of them itself.
"""
