"""Data generators that write files in exactly the two public source formats (toy numpy model, Pythia 8)."""
