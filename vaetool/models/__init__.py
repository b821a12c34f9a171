"""The model families behind one interface (base.py) and their layers and likelihoods: math only."""
