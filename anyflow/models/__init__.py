"""Networks: the flow-map Wan transformer, text encoders, autoencoders, the discriminator head."""

from anyflow.models.flowmap_wan import FlowMapWanTransformer3DModel, remap_fastgen_state_dict

__all__ = ["FlowMapWanTransformer3DModel", "remap_fastgen_state_dict"]
