"""Function-valued data: the synthetic sparse functional model, PDE generators, dataset loaders."""
