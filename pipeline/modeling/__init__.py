"""Models: loading (quantized, by reference or directory), chat templates and loss masks, packaged and tiny bases."""
