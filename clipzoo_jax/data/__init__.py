"""Data: the TFRecord schema, the built-in toy world, the tokenizer and the training loader."""
