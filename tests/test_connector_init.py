"""A newly initialised connector breaks symmetry (issue 6): fan-in-scaled linear layers and N(0, 1) latents.

Measured with an Idefics2 stand-in before this change: with every weight at std 0.02 and equal latents, a model
trained from scratch never left the answer prior. Loading a checkpoint must leave its weights untouched.
"""

import pytest
import torch
from torch import nn

from conftest import tiny_autoregressive_model, tiny_connector_config, tiny_cross_attention_model
from vlmforge.modeling.modeling_connector import Connector

BUILDERS = {"autoregressive": tiny_autoregressive_model, "cross_attention": tiny_cross_attention_model}


def connector_of(model) -> Connector:
    (connector,) = [module for module in model.modules() if isinstance(module, Connector)]
    return connector


@pytest.mark.parametrize("fusion", sorted(BUILDERS))
def test_new_connector_linear_layers_are_fan_in_scaled(fusion):
    connector = connector_of(BUILDERS[fusion](connector_config=tiny_connector_config(n_latents=16)))
    linears = [(name, module) for name, module in connector.named_modules() if isinstance(module, nn.Linear)]
    assert len(linears) >= 7  # projection gate/up/down, then q/k/v/o and the MLP of each perceiver layer
    for name, module in linears:
        expected = module.in_features**-0.5
        assert module.weight.std().item() == pytest.approx(expected, rel=0.15), name
        assert module.bias is None or not module.bias.any(), name


@pytest.mark.parametrize("fusion", sorted(BUILDERS))
def test_new_latents_are_distinct_standard_normal_queries(fusion):
    model = BUILDERS[fusion](connector_config=tiny_connector_config(n_latents=16))
    latents = connector_of(model).perceiver_resampler.latents  # (n_latents, D)
    assert latents.std().item() == pytest.approx(1.0, rel=0.25)
    distances = torch.cdist(latents, latents) + torch.eye(len(latents)) * 1e9
    assert distances.min().item() > 0.5  # no two latents alike: each can become a different query


def test_new_connector_passes_a_signal_with_distinct_visual_tokens():
    connector = connector_of(tiny_autoregressive_model(connector_config=tiny_connector_config(n_latents=16)))
    features = torch.randn(2, 16, connector.modality_projection.gate_proj.in_features)  # (N, P, vision_hidden)
    with torch.no_grad():
        projected = connector.modality_projection(features)
        pooled = torch.stack(connector(features, torch.ones(2, 16, dtype=torch.bool)))  # (N, L, text_hidden)
    # std 0.02 would scale activations by ~0.02 * sqrt(width) per layer: the projection's output would be ~1e-3
    assert projected.pow(2).mean().sqrt().item() > 0.1
    # the visual tokens of one image differ from each other, and the two images' tokens differ
    assert pooled.std(dim=1).mean().item() > 0.3
    assert (pooled[0] - pooled[1]).abs().mean().item() > 0.1


def test_loading_a_checkpoint_keeps_its_connector_weights(tmp_path):
    model = tiny_autoregressive_model()
    connector = connector_of(model)
    with torch.no_grad():
        for index, parameter in enumerate(connector.parameters()):
            parameter.fill_(0.01 * (index + 1))
    model.save_pretrained(tmp_path)
    loaded = connector_of(type(model).from_pretrained(tmp_path))
    for (name, saved), (_, reloaded) in zip(connector.named_parameters(), loaded.named_parameters()):
        torch.testing.assert_close(reloaded, saved, msg=name)
