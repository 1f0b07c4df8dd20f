"""Data: WebDataset shards in and out; bundled sources that need no download."""
