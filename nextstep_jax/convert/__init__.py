"""Table-driven weight conversion (HF Qwen2, NextStep-1 releases, Flux VAE layouts) in both directions."""
