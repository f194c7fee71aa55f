"""Checkpoint averaging ("model soups"): `midtrain.merge.soup.merge_checkpoints` (kept out of this package's import
so that `midtrain --help` does not load torch)."""
