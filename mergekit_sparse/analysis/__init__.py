"""Analysis: what fine-tuning changed and how tasks relate.

cores (CPI-FT stage 1: deltas and core regions as mask files), overlap (Jaccard between cores,
per-tensor/layer/module breakdowns, task groups), gallop (GaLLoP and baseline scores and masks),
describe (what `inspect` reports), names (layer index and module type of a tensor name).
Built on storage and selection; never imports torch at module level.
"""
