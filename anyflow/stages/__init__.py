"""The update loops of the stages, one module each; :class:`anyflow.module.AnyFlowModule` holds the networks,
optimizers and checkpoints and hands each training iteration to its stage.

- :mod:`anyflow.stages.regression`: ``teacher`` (flow matching) and ``pretrain`` (flow map): one student update;
- :mod:`anyflow.stages.onpolicy`: ``onpolicy``: a critic update or a generator update;
- :mod:`anyflow.stages.common`: gradient accumulation over micro-batches, and the guarded optimizer step.
"""
