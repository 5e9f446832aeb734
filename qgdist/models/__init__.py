"""Models: the CNN family (jet images) and the EdgeConv GNN family (particle clouds)."""
