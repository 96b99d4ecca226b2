"""raysys: retrieval-based multi-granular VL pre-training from unpaired corpora, on Ray."""
__version__ = "0.1.0"
