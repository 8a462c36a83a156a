"""Training: the SFT recipe, continued pretraining, adversarial training, the memory preflight."""
