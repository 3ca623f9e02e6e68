"""Records, prompt formatting and label masking, TOFU and synthetic data, DataModules."""
