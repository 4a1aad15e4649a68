"""File formats: checkpoints read without model code, and duquant packs."""
