"""Selection: every "top x %" of the project — exact streaming top-k with a deterministic tie rule.

keys (the integer order of float32 values, key histograms and their quantiles), topk (the
selectors: `TopK` with a sampled window and one counting pass, `RadixTopK`, `PerTensorTopK`,
in-memory `topk_mask`), passes (the selector protocol, `Pass`, and the driver that feeds chunks
to selectors pass by pass). Depends on storage only; never imports torch at module level.
"""
