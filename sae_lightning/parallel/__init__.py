"""Latent-sharded SAEs on Lightning's ``ModelParallelStrategy`` (docs/multi-gpu.md).

A dictionary too large for one device is split along its latents over the ``tensor_parallel``
dimension of a 2-D device mesh; the ``data_parallel`` dimension splits the batch as DDP does.
One module per job: :mod:`.mesh` (the mesh and its groups), :mod:`.comm` (counted collectives),
:mod:`.selection` (TopK / BatchTopK over shards), :mod:`.sharded` (the sharded forward pass),
:mod:`.module` (the LightningModule), :mod:`.strategy` (recipe -> strategy) and
:mod:`.checkpoint` (export and resharding of sharded checkpoints).
"""
