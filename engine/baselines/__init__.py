"""The baselines' mathematics, in grad_w's shape (Q, n) and sign convention (negative = proponent):
the TRAK family through `traker` (trak.py) and similarity scores (similarity.py). Their
lifecycle objects, with MAGIC's, are in engine.methods."""
