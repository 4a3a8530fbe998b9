"""Precomputed replays: a run's metagradient for any later query without replaying training.

grad_w = J^T g, with J = d theta_T / d w (P x n) and g = d BPD / d theta_T. The replay is linear
in g, so it is done ahead of time and stored as a representation (A, B) with

    grad_w ~ A (B g),   A (n, K) or the identity, B (K, P),

and a new query costs its exact BPD gradient and two small products.
- tangents.py: forward-mode derivatives through training (J times directions in w-space);
- build.py: the methods that make a representation ("exact": B = J^T itself, from one tangent
  per training image; "lowrank": a randomized range finder of J at rank K; "basis": the replayed
  BPD gradients of K fixed images, a query fitted in them), as resumable jobs;
- basis.py: the images of a query basis and their gradients;
- representation.py: the files, their stamps (run digest, final-weight checksum), loading
  with verification, and scoring.
"""
