"""The model and what it is made of: the Llama-family model, its config, weights, rope and
tokenizer."""
