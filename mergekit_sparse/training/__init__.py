"""Training: data, models and the masked trainer.

data (JSONL records, response-only labels, seeded subsets), models (load an HF folder with
transformers), optim (masked AdamW / SGD with state for selected entries only), trainer (the
training loop, resumable, DDP under torchrun), staged (CPI-FT stage 4 and single runs),
gradients (mean gradients, GaLLoP's signal). Torch starts here.
"""
