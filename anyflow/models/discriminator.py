"""A small classification head on intermediate transformer-block features of a score network (DMD2 style)."""

from __future__ import annotations

from torch import Tensor, nn

from anyflow.flow import to_network_time


class DiscriminatorHead(nn.Module):
    """One ``LayerNorm → Linear → SiLU → Linear(1)`` head per feature block, token-averaged, summed.

    ``logits(network, x_t, t, embeds)`` runs the (frozen) score network at ``r = t`` and reads the hidden
    states after ``feature_blocks``; gradients reach ``x_t`` through the network but only this head trains.
    """

    def __init__(self, dim: int, feature_blocks: list[int] = (0,), hidden: int = 128):
        super().__init__()
        self.feature_blocks = tuple(int(b) for b in feature_blocks)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            for _ in self.feature_blocks
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"the discriminator reads blocks {self.feature_blocks} but got {len(features)} feature "
                             "maps; pick stage.discriminator.feature_blocks below the network's num_layers.")
        return sum(head(f.float()).mean(dim=(1, 2)) for head, f in zip(self.heads, features))

    def features(self, network, x_t: Tensor, t: Tensor, embeds: Tensor) -> list[Tensor]:
        """Hidden states of ``network`` (at ``r = t``) after the feature blocks."""
        time = to_network_time(t)
        _, features = network(hidden_states=x_t, timestep=time, r_timestep=time, encoder_hidden_states=embeds,
                              return_block_features=self.feature_blocks)
        return features

    def logits(self, network, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        return self(self.features(network, x_t, t, embeds))
