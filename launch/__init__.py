"""Entry points: pretrain, generate, upcycle, benchmarks, demo (run them as scripts or with torchrun)."""
