"""Lightning callbacks, installed as ``lightning_unlearn.callbacks``."""
