"""Training, evaluation, distillation and benchmark loops (one module each)."""
