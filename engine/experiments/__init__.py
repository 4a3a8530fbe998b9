"""The experiments that test the engine's claims, apart from the maths: LDS protocols and the
retraining bank (lds, protocols, bank, stats, plots), the comparison table of every attribution
method (comparison), and the seed write-up's Figures 2 and 4 (figure2, figure4)."""
