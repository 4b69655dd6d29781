"""Sweeps and studies built on the core (finetune/, train/, model/, data/, pretrain/); the core never imports them."""
