"""The DVC stages, one module each: read params and declared inputs, call components, write declared outputs."""
