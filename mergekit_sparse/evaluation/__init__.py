"""Evaluation: how good a model is and how much it forgot.

accuracy (exact-match generation and multiple-choice log-likelihood), metrics (forget ratio,
collapse rate, sequential forgetting; accuracy tables incl. lm-eval results), forget (the
`forget` document), sanity (load a written folder with transformers and check its logits).
"""
