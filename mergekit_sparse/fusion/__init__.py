"""Fusion: merging checkpoints on one streaming driver.

maths (pure functions: SLERP and its coefficients, fold weights, core-conflict resolution),
driver (the streaming fusion pass over every tensor, with on-the-fly or stored cores), api
(`fuse_checkpoints`: open inputs, validate options once, run the driver; what the CLI and the
pipeline call). Never imports torch at module level; only the optional `--check` of a folder
output loads it (through evaluation.sanity).
"""
